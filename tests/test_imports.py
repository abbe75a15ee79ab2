"""What importing costs: the pure core loads no I/O library, `--help` loads no service."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import tedge_firmware.core

IO_LIBRARIES = ("asyncio", "aiohttp", "aiomqtt", "paho", "watchfiles", "yarl")


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", [m.name for m in pkgutil.iter_modules(tedge_firmware.core.__path__)])
def test_a_core_module_loads_no_io_library(module: str) -> None:
    loaded = loaded_after(f"import tedge_firmware.core.{module}")
    assert sorted(name for name in loaded if name.split(".")[0] in IO_LIBRARIES) == []


def test_help_loads_neither_the_services_nor_the_simulator_nor_the_demo() -> None:
    loaded = loaded_after(
        "from click.testing import CliRunner\n"
        "from tedge_firmware.cli.main import main_group\n"
        "assert CliRunner().invoke(main_group, ['--help']).exit_code == 0"
    )
    # tomlkit and logging.config: only a command that reads tedge.toml or logs needs them.
    heavy = ("aiohttp", "aiomqtt", "paho", "rich", "cryptography", "watchfiles", "asyncio", "tomlkit")
    ours = ("tedge_firmware.sim", "tedge_firmware.demo", "tedge_firmware.connector", "tedge_firmware.gateway.plugin")
    assert sorted(name for name in loaded if name.split(".")[0] in heavy or name.startswith(ours)) == []
    assert "logging.config" not in loaded


def test_the_daemon_loads_only_what_it_runs_with() -> None:
    # `tedge-firmware run`: its command module and the service it starts (issue 17: idle RSS)
    loaded = loaded_after(
        "import tedge_firmware.cli.main, tedge_firmware.gateway.service, tedge_firmware.gateway.lifecycle"
    )
    # tomlkit edits tedge.toml (config set), rich draws the demo, cryptography reads a
    # certificate only when device.id is not set, ctypes finds sync_file_range at the first
    # download
    unwanted = ("rich", "tomlkit", "cryptography", "ctypes")
    ours = ("tedge_firmware.sim", "tedge_firmware.demo", "tedge_firmware.connector", "tedge_firmware.shell.config_edit")
    assert sorted(name for name in loaded if name.split(".")[0] in unwanted or name.startswith(ours)) == []

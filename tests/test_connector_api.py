"""The connector SDK's public surface: pinned names, typing marker, docstrings, import hygiene."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import tedge_firmware.connector as sdk


def test_all_is_pinned_and_sorted() -> None:
    assert sdk.__all__ == [
        "ApplyStep",
        "BrokerAuthError",
        "BrokerSettings",
        "Command",
        "ConfigError",
        "Connector",
        "DownloadSettings",
        "Firmware",
        "Phase",
        "Progress",
        "ProgressHook",
        "TeStates",
        "TedgeFirmwareError",
        "VerifyStep",
    ]
    assert sdk.__all__ == sorted(sdk.__all__)
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None


def test_py_typed_ships_with_the_package() -> None:
    assert (Path(sdk.__file__).parent.parent / "py.typed").is_file()
    assert (Path(sdk.__file__).parent / "py.typed").is_file()


def test_every_public_class_and_method_has_a_docstring() -> None:
    missing = []
    for name in sdk.__all__:
        value = getattr(sdk, name)
        if inspect.isclass(value):
            if not (value.__doc__ or "").strip():
                missing.append(name)
            for member_name, member in vars(value).items():
                if member_name.startswith("_"):
                    continue
                if (inspect.isfunction(member) or isinstance(member, property)) and not (member.__doc__ or "").strip():
                    missing.append(f"{name}.{member_name}")
    assert missing == []
    assert "Connector(" in (sdk.__doc__ or "")


def test_the_sdk_does_not_import_the_gateway_the_cli_the_demo_or_the_simulator() -> None:
    code = (
        "import sys, tedge_firmware.connector\n"
        "bad = [m for m in sys.modules if m.startswith(('tedge_firmware.gateway', 'tedge_firmware.cli', "
        "'tedge_firmware.demo', 'tedge_firmware.sim'))]\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cli_module_does_not_import_the_sdk_until_the_command_runs() -> None:
    code = "import sys, tedge_firmware.cli.connector\nprint('tedge_firmware.connector' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("children", "kwargs", "message"),
    [
        ((), {}, "at least one child"),
        (("",), {}, "empty"),
        (("a/b",), {}, "contains"),
        (("+",), {}, "contains"),
        ((".." ,), {}, "path component"),
        (("c",), {"heartbeat": 0}, "heartbeat"),
        (("c",), {"retention": -1}, "retention"),
        (("c",), {"apply": "not callable"}, "apply"),
        (("c",), {"verify": 42}, "verify"),
        (("c",), {"broker": sdk.BrokerSettings(port=0)}, "port"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path: Path, children, kwargs, message: str) -> None:
    async def apply(firmware: sdk.Firmware) -> None:
        return None

    arguments = {"apply": apply, "work_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        sdk.Connector(*children, **arguments)


def test_constructor_keeps_children_in_order_without_duplicates(tmp_path: Path) -> None:
    async def apply(firmware: sdk.Firmware) -> None:
        return None

    connector = sdk.Connector("b", "a", "b", apply=apply, work_dir=tmp_path)
    assert connector.child_ids == ("b", "a")
    assert connector.work_dir == tmp_path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stall_timeout": 0}, "positive"),
        ({"retry_budget": float("inf")}, "positive"),
        ({"retry_initial": 100.0, "retry_max_interval": 10.0}, "retry_initial"),
        ({"parallel": 0}, "parallel"),
        ({"progress_interval": 0}, "progress_interval"),
    ],
)
def test_download_settings_are_validated(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sdk.DownloadSettings(**kwargs)


@pytest.mark.parametrize(
    ("args", "timeout", "message"),
    [("", None, "empty"), ("   ", None, "empty"), ([], None, "non-empty"), (["x", 1], None, "non-empty"), ("a\0b", None, "NUL"), ("true", 0, "positive"), ("true", -1, "positive")],
)
def test_command_is_validated(args, timeout, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sdk.Command(args, timeout=timeout)


def test_command_argv() -> None:
    assert sdk.Command("flash $FIRMWARE_FILE").argv == ("/bin/sh", "-c", "flash $FIRMWARE_FILE")
    assert sdk.Command(["/usr/bin/flash", "--now"]).argv == ("/usr/bin/flash", "--now")
    assert sdk.Command(("a",), timeout=2.5).timeout == 2.5


def test_firmware_environment_names_every_variable(tmp_path: Path) -> None:
    firmware = sdk.Firmware("c1", "op-1", 3, "image", "1.0", "ab" * 32, "http://gw/x", tmp_path / "f")
    assert firmware.environment() == {
        "FIRMWARE_FILE": str(tmp_path / "f"),
        "FIRMWARE_NAME": "image",
        "FIRMWARE_VERSION": "1.0",
        "FIRMWARE_SHA256": "ab" * 32,
        "OPERATION_ID": "op-1",
        "ATTEMPT": "3",
        "CHILD_ID": "c1",
    }


def test_phase_values_are_the_persisted_names() -> None:
    assert [phase.value for phase in sdk.Phase] == ["received", "downloading", "downloaded", "applying", "successful", "failed"]
    assert [phase for phase in sdk.Phase if phase.ended] == [sdk.Phase.SUCCESSFUL, sdk.Phase.FAILED]

"""The README stays true to the code: every configuration key and command is documented."""

from __future__ import annotations

import re
from pathlib import Path

import click
from click.testing import CliRunner

from tedge_firmware.cli.main import LAZY_COMMANDS, main_group
from tedge_firmware.core.config import KEYS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_config_key_is_in_the_readme() -> None:
    missing = [spec.name for spec in KEYS if f"`{spec.name}`" not in README]
    assert missing == []


def test_every_command_is_in_the_readme() -> None:
    # the documented form puts --config-dir before the command
    missing = [
        name
        for name in [*main_group.commands, *LAZY_COMMANDS]  # the lazy ones too
        if not re.search(rf"tedge-firmware (\[?--config-dir \S+ )?{re.escape(name)}\b", README)
    ]
    assert missing == []


def test_help_runs() -> None:
    result = CliRunner().invoke(main_group, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "file-transfer" in result.output


def _groups(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _groups(command, (*path, name))
    return found


def test_help_lists_commands_without_cutting_their_description() -> None:
    for path in _groups(main_group):
        result = CliRunner().invoke(main_group, [*path, "--help"], terminal_width=80)
        assert result.exit_code == 0, result.output
        listing = result.output.split("Commands:", 1)[1]
        assert not [line for line in listing.splitlines() if line.endswith("...")], (path, listing)

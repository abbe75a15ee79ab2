"""Which broker the demo runs on: Mosquitto when it is installed, else the embedded one."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tedge_firmware.demo.options import BrokerChoice, BrokerKind
from tedge_firmware.demo.processes import (
    HOST,
    ChildProcess,
    free_port,
    mosquitto_process,
)
from tedge_firmware.errors import ConfigError

# where Debian puts mosquitto, often not on a user's PATH
MOSQUITTO_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")
EMBEDDED_BROKER = "amqtt"  # the `demo-broker` extra
_GET_MOSQUITTO = "sudo apt-get install mosquitto; `make demo` does it when run as root"
_GET_EMBEDDED = (
    "pip install 'tedge-firmware[demo-broker]'; `make demo` does it when mosquitto cannot be "
    "installed"
)
_NO_BROKER: dict[BrokerChoice, str] = {
    "auto": "no MQTT broker: mosquitto was not found and the embedded broker is not "
    f"installed: install mosquitto ({_GET_MOSQUITTO}) or the embedded broker ({_GET_EMBEDDED})",
    "mosquitto": f"--broker mosquitto: mosquitto was not found: install it ({_GET_MOSQUITTO})",
    "embedded": "--broker embedded: the embedded broker is not installed: "
    f"install it ({_GET_EMBEDDED})",
}


def find_mosquitto(path: str | None = None) -> str | None:
    """The mosquitto binary on `path` (default: PATH, then MOSQUITTO_DIRS); None when none."""
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *MOSQUITTO_DIRS])
    return shutil.which("mosquitto", path=path)


def embedded_broker_installed() -> bool:
    """Whether amqtt can be imported; not imported here: it runs in a process of its own."""
    return importlib.util.find_spec(EMBEDDED_BROKER) is not None


@dataclass(frozen=True)
class DemoBroker:
    """The broker the demo runs: Mosquitto (its binary), or the embedded one (amqtt)."""

    kind: BrokerKind
    mosquitto: str | None = None

    @property
    def label(self) -> str:
        return "mosquitto" if self.kind == "mosquitto" else "embedded broker (amqtt)"

    def process(self, home: Path, extra_lines: Sequence[str] = ()) -> tuple[ChildProcess, int]:
        """The broker's process and its plain loopback port; `extra_lines`: more Mosquitto
        configuration (a TLS listener), for Mosquitto only."""
        if self.kind == "embedded":
            assert not extra_lines
            return embedded_broker_process(home)
        assert self.mosquitto is not None
        return mosquitto_process(
            self.mosquitto, home, max_queued=100_000, extra_lines=extra_lines
        )


def choose_broker(choice: BrokerChoice, mosquitto: str | None, embedded: bool) -> DemoBroker:
    """`auto` prefers Mosquitto; ConfigError (one line, saying how to get one) when none fits."""
    if choice != "embedded" and mosquitto is not None:
        return DemoBroker("mosquitto", mosquitto)
    if choice != "mosquitto" and embedded:
        return DemoBroker("embedded")
    raise ConfigError(_NO_BROKER[choice])


def find_broker(choice: BrokerChoice) -> DemoBroker:
    return choose_broker(choice, find_mosquitto(), embedded_broker_installed())


def embedded_broker_process(home: Path) -> tuple[ChildProcess, int]:
    port = free_port()
    argv = [
        sys.executable, "-m", "tedge_firmware.demo.embedded_broker",
        "--host", HOST, "--port", str(port), "--log-file", str(home / "embedded-broker.log"),
    ]  # fmt: skip
    return ChildProcess("embedded broker", argv, home / "embedded-broker.out"), port

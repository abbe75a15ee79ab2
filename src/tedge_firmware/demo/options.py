"""The demo's options and the names it uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GATEWAY_ID = "demo-gateway"


def cloud_id(child: str) -> str:
    """The demo's children declare themselves over te/: Cumulocity knows them by the external
    id thin-edge gives such a child."""
    return f"{GATEWAY_ID}:device:{child}"


FIRMWARE_NAME = "demo-firmware"
FIRMWARE_VERSION = "1.0"
FAIL_REASON = "demo: flash write error (this child fails on purpose)"
FLAKY_REASON = "demo: flash verify error (flaky child, retried)"
MAX_LIVE_ROWS = 24
REFRESH_S = 0.25

SECURE_NEEDS_MOSQUITTO = (
    "--secure needs mosquitto (its TLS listener takes a child's certificate as its identity "
    "for the ACL; the embedded broker cannot): install it (sudo apt-get install mosquitto)"
)

BrokerChoice = Literal["auto", "mosquitto", "embedded"]
BrokerKind = Literal["mosquitto", "embedded"]
BROKER_CHOICES: tuple[BrokerChoice, ...] = ("auto", "mosquitto", "embedded")
ProtocolChoice = Literal["legacy", "te", "mixed"]
PROTOCOL_CHOICES: tuple[ProtocolChoice, ...] = ("legacy", "te", "mixed")


@dataclass(frozen=True)
class DemoOptions:
    children: int = 10
    size: int = 64 * 2**20
    fail: int = 1  # children whose apply always fails
    flaky: int = 1  # children whose first apply fails; retried once with a new operation
    cloud_cuts: int = 1  # the first cloud downloads cut halfway (the gateway resumes)
    ramp: float = 0.2  # seconds between two operations of the bulk operation
    apply_seconds: float = 1.0  # how long the demo "flash" takes
    timeout: float = 600.0  # for the whole rollout
    live: bool | None = None  # rich live table; None: when the output is a terminal
    workdir: Path | None = None  # where the temporary directory goes
    keep: bool = False  # keep the temporary directory (logs) afterwards
    broker: BrokerChoice = "auto"  # auto: mosquitto when installed, else the embedded one
    # the children's protocol: thin-edge 0.x requests, thin-edge 1.x/2.x te/ commands, or both
    protocol: ProtocolChoice = "mixed"
    # a locked site: every MQTT client and download over TLS with client certificates, the ACL
    secure: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOL_CHOICES)}")
        if self.broker not in BROKER_CHOICES:
            raise ValueError(f"--broker must be one of {', '.join(BROKER_CHOICES)}")
        if self.secure and self.broker == "embedded":
            raise ValueError(SECURE_NEEDS_MOSQUITTO)
        if self.children < 1:
            raise ValueError("--children must be at least 1")
        if self.fail < 0 or self.flaky < 0 or self.fail + self.flaky > self.children:
            raise ValueError("--fail and --flaky must be >= 0 and add up to at most --children")
        if self.ramp < 0 or self.apply_seconds < 0 or self.timeout <= 0 or self.cloud_cuts < 0:
            raise ValueError("--ramp, --apply-seconds and --cuts must be >= 0, --timeout > 0")

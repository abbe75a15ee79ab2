"""The values a connector is configured with and hands to its user (public, frozen)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tedge_firmware.connector._state import Phase
from tedge_firmware.core.config import MqttAuth
from tedge_firmware.core.retry import RetryPolicy
from tedge_firmware.shell.mqtt import MqttSettings


@dataclass(frozen=True)
class Firmware:
    """The firmware one operation asks for, downloaded and verified.

    `path` is the verified file. It belongs to the connector: it is removed when the operation
    ends, so copy it if you need it later.
    """

    child_id: str
    operation_id: str
    attempt: int
    name: str
    version: str
    sha256: str
    url: str
    path: Path

    def environment(self) -> dict[str, str]:
        """The environment variables a command step gets (besides the connector's own)."""
        return {
            "FIRMWARE_FILE": str(self.path),
            "FIRMWARE_NAME": self.name,
            "FIRMWARE_VERSION": self.version,
            "FIRMWARE_SHA256": self.sha256,
            "OPERATION_ID": self.operation_id,
            "ATTEMPT": str(self.attempt),
            "CHILD_ID": self.child_id,
        }


@dataclass(frozen=True)
class Progress:
    """What a progress hook is told: an operation's phase and the bytes downloaded so far.

    `reason` is set when `phase` is `Phase.FAILED`.
    """

    child_id: str
    operation_id: str
    phase: Phase
    downloaded: int = 0
    reason: str | None = None


ApplyStep = Callable[[Firmware], Awaitable[None]]
"""An async callback that installs the firmware; returning means applied, raising means failed
(the exception's message is the reason)."""

VerifyStep = Callable[[Firmware], Awaitable[bool]]
"""An async callback that tells, after an interrupted apply (crash, reboot), whether the
firmware is installed; True reports successful, False or an exception failed."""

ProgressHook = Callable[[Progress], None]
"""A plain function called on every phase change and while downloading; it must not block."""


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the MQTT broker the gateway listens on.

    `client_id` defaults to `tedge-firmware-connector-<child>` (or a digest of the child ids
    when one connector serves several); the session is persistent, so requests sent while the
    connector is away are delivered when it is back. TLS is used when `ca_file` or `ca_dir` is
    set; `cert_file`/`key_file` add a client certificate.
    """

    host: str = "localhost"
    port: int = 1883
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    ca_dir: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def mqtt_settings(broker: BrokerSettings, child_ids: Sequence[str]) -> MqttSettings:
    """The MQTT session settings for `broker` (ValueError for unusable values)."""
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=broker.client_id or default_client_id(child_ids),
        clean_session=False,
        auth=MqttAuth(broker.ca_file, broker.ca_dir, broker.cert_file, broker.key_file),
        username=broker.username,
        password=broker.password,
    )


def default_client_id(child_ids: Sequence[str]) -> str:
    if len(child_ids) == 1:
        return f"tedge-firmware-connector-{child_ids[0]}"
    digest = hashlib.sha256("\n".join(sorted(child_ids)).encode()).hexdigest()[:16]
    return f"tedge-firmware-connector-{digest}"


@dataclass(frozen=True)
class DownloadSettings:
    """How firmware is downloaded from the gateway.

    - `stall_timeout`: seconds without a byte before a connection is dropped and resumed.
    - `retry_budget`: seconds the download may keep failing without progress (connection
      errors, 5xx, stalls) before the operation fails; every byte of progress restarts it.
    - `retry_initial`, `retry_max_interval`: the backoff between attempts (doubling, jittered).
    - `parallel`: downloads at the same time (over all children).
    - `progress_interval`: seconds between progress hook calls while downloading.
    - `ca_path`: CA certificates (a PEM file or a directory of them) trusted for https
      besides the system's; `cert_file`/`key_file`: the child's client certificate, for a
      gateway that requires one (thin-edge's `http.ca_path`, `http.client.auth.*`).
    """

    stall_timeout: float = 60.0
    retry_budget: float = 3600.0
    retry_initial: float = 1.0
    retry_max_interval: float = 60.0
    parallel: int = 2
    progress_interval: float = 1.0
    ca_path: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        values = (self.stall_timeout, self.retry_budget, self.retry_max_interval)
        if not all(math.isfinite(value) and value > 0 for value in values):
            raise ValueError("stall_timeout, retry_budget, retry_max_interval must be positive")
        if not 0 <= self.retry_initial <= self.retry_max_interval:
            raise ValueError("retry_initial must be between 0 and retry_max_interval")
        if self.parallel < 1 or not self.progress_interval > 0:
            raise ValueError("parallel must be >= 1 and progress_interval positive")


def retry_policy(download: DownloadSettings) -> RetryPolicy:
    return RetryPolicy(
        initial=download.retry_initial,
        max_interval=download.retry_max_interval,
        max_elapsed=download.retry_budget,
    )

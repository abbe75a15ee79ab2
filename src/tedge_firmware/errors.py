"""The one exception tree of tedge-firmware.

Foreign exceptions (aiomqtt, aiohttp, OSError, tomllib, json) are mapped into this tree at the
boundary where they are raised; code above the shells only ever sees these classes.

    TedgeFirmwareError
    ├── ConfigError            a configuration value or file is unusable (names the key or file)
    ├── InputError             a message from outside cannot be understood
    │   ├── SmartRestError     a SmartREST record that does not parse
    │   ├── MessageError       a firmware_update JSON payload that does not parse
    │   └── TopicError         a topic that does not name a valid child
    ├── OperationFailed        one operation cannot go on; its `reason` goes to Cumulocity (502)
    │   ├── DownloadError      the cloud download failed (reason names the url)
    │   ├── JwtError           no usable token for a tenant download
    │   └── DirectoryMissing   a data directory vanished at run time
    ├── StoreError             an operation file cannot be read or written
    ├── BrokerError            the MQTT broker cannot be used
    │   └── BrokerAuthError    the broker refused our credentials (fatal: restart will not help)
    ├── InvalidTransition      the state machine was asked for a move it does not allow (a bug)
    └── SimulatorError         the Cumulocity simulator refused a request (tests and demo only)
"""

from __future__ import annotations


class TedgeFirmwareError(Exception):
    """Base class of every error raised by tedge-firmware."""


class ConfigError(TedgeFirmwareError):
    """A configuration value or file is unusable. The message names the key or file."""


class InputError(TedgeFirmwareError):
    """A message received from outside cannot be understood; it is logged and skipped."""


class SmartRestError(InputError):
    """A SmartREST record that does not parse (e.g. a 515 with fewer than 5 fields)."""


class MessageError(InputError):
    """A firmware_update request or response JSON payload that does not parse."""


class TopicError(InputError):
    """A topic whose child level is empty or not a valid child id."""


class OperationFailed(TedgeFirmwareError):
    """One operation cannot go on. `reason` is the single-line text sent in the 502."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DownloadError(OperationFailed):
    """The download of a firmware from the cloud failed."""

    def __init__(
        self, url: str, detail: str, unreachable: bool = False, space_short: int | None = None
    ) -> None:
        super().__init__(f"Download from {url} failed with {detail}")
        self.url = url
        self.detail = detail
        self.unreachable = unreachable  # retries of transient failures ran out
        self.space_short = space_short  # the disk lacks this many bytes for the file


class JwtError(OperationFailed):
    """No usable JWT token could be obtained for a download from the tenant."""


class DirectoryMissing(OperationFailed):
    """A data directory is missing when an operation needs it."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"Directory {path} is not found. "
            "Run 'c8y-firmware-plugin --init' to create the directory."
        )
        self.path = path


class StoreError(TedgeFirmwareError):
    """An operation file cannot be read, parsed or written."""


class BrokerError(TedgeFirmwareError):
    """The MQTT broker cannot be reached or used."""


class BrokerAuthError(BrokerError):
    """The broker refused the connection for a reason a retry will not fix (credentials)."""


class InvalidTransition(TedgeFirmwareError):
    """An operation state change that the state machine does not allow."""


class SimulatorError(TedgeFirmwareError):
    """The simulator refused a request (e.g. an operation for a device that cannot take it)."""

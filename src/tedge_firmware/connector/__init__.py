"""Child-device connector SDK: a robust `firmware_update` client in a few lines.

A child-device connector answers the gateway's firmware requests for one or more child devices
(`tedge/<child>/commands/req/firmware_update`, thin-edge.io's legacy protocol). This SDK does
everything but the device-specific part: it acknowledges requests, downloads the firmware with
resume across cuts and restarts, checks its SHA-256, calls your apply step once, reports
`successful` or `failed` with a reason, and stays idempotent across restarts and re-sent
requests. You write the apply step::

    import asyncio
    from tedge_firmware.connector import BrokerSettings, Connector, Firmware

    async def apply(firmware: Firmware) -> None:
        await flash(firmware.path)          # raise to fail; the message is the reason

    asyncio.run(
        Connector(
            "child1",
            apply=apply,
            work_dir="/var/lib/child1-connector",
            broker=BrokerSettings(host="192.168.1.10"),
        ).run()
    )

With `protocol="te"` the same connector serves thin-edge 1.x/2.x commands
(`te/device/<child>///cmd/firmware_update/<id>`): it moves each command to the gateway's
download state and installs the gateway's copy once the gateway hands it over (`TeStates`).

The same, without Python: `tedge-firmware connector --child-id child1 --apply-command CMD`.
Everything here is async; blocking work in a callback belongs in `asyncio.to_thread`.
"""

from tedge_firmware.connector._command import Command
from tedge_firmware.connector._connector import Connector
from tedge_firmware.connector._model import (
    ApplyStep,
    BrokerSettings,
    DownloadSettings,
    Firmware,
    Progress,
    ProgressHook,
    VerifyStep,
)
from tedge_firmware.connector._state import Phase
from tedge_firmware.connector._te import TeStates
from tedge_firmware.errors import BrokerAuthError, ConfigError, TedgeFirmwareError

__all__ = [
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

"""A child-device connector in a few lines: the SDK does the rest (resume, SHA-256, restarts)."""

import asyncio
import os
import shutil
from pathlib import Path

from tedge_firmware.connector import BrokerSettings, Connector, Firmware

SLOT = Path(os.environ.get("SLOT_DIR", "/var/lib/my-device"))


async def apply(firmware: Firmware) -> None:
    """Install the verified file; raise to fail (the message reaches Cumulocity)."""
    await asyncio.to_thread(shutil.copyfile, firmware.path, SLOT / "firmware.img")
    (SLOT / "version").write_text(firmware.version)


async def verify(firmware: Firmware) -> bool:
    """After an apply cut short by a reboot: is this version installed now?"""
    return (SLOT / "version").read_text() == firmware.version


asyncio.run(
    Connector(
        os.environ.get("CHILD_ID", "my-child"),
        apply=apply,
        verify=verify,
        work_dir=os.environ.get("WORK_DIR", "/var/lib/my-child-connector"),
        broker=BrokerSettings(
            host=os.environ.get("GATEWAY", "localhost"),
            port=int(os.environ.get("GATEWAY_PORT", "1883")),
        ),
    ).run()
)

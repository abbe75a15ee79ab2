"""`tedge-firmware cache fill URL`: ask the running gateway to download a firmware into its cache
now (the `cache_fill` command of `core.cache_fill`), and follow it to its end."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from datetime import datetime

import click

from tedge_firmware.core.cache_fill import cache_fill_topic
from tedge_firmware.core.config import TedgeConfig
from tedge_firmware.core.firmware_update import TE_EXECUTING, TE_FAILED, TE_SUCCESSFUL
from tedge_firmware.core.units import format_size
from tedge_firmware.errors import BrokerError
from tedge_firmware.shell.mqtt import MqttSession, MqttSettings

CONNECT_TIMEOUT_S = 10.0


async def fill(config: TedgeConfig, url: str, pin: int | None, wait_s: float) -> int:
    """0: in the cache; 1: the gateway failed it; 2: the broker cannot be reached; 3: no end
    within `wait_s` (the command stays, retained, for the service to do)."""
    cmd_id = f"cli-{secrets.token_hex(6)}"
    topic = cache_fill_topic(cmd_id)
    settings = dataclasses.replace(
        MqttSettings.from_tedge_config(config, f"tedge-firmware-{cmd_id}"), clean_session=True
    )
    session = MqttSession(settings, [topic])
    running = asyncio.create_task(session.run())
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await session.wait_connected()
        except (TimeoutError, BrokerError):
            click.echo(f"cannot reach the MQTT broker at {settings.address}", err=True)
            return 2
        command: dict[str, object] = {"status": "init", "url": url}
        if pin is not None:
            command["pin"] = pin
        session.publish(topic, json.dumps(command), retain=True)
        click.echo(f"cache_fill {cmd_id}: {url}")
        code = await _follow(session, topic, wait_s)
        if code != 3:
            session.publish(topic, b"", retain=True)  # the requester clears the command
        return code
    finally:
        await session.close(timeout=5.0)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrokerError):
            await running


async def _follow(session: MqttSession, topic: str, wait_s: float) -> int:
    shown: set[str] = set()
    try:
        async with asyncio.timeout(wait_s):
            while True:
                message = await session.messages.get()
                if message.topic != topic or not message.payload:
                    continue
                try:
                    state = json.loads(message.payload)
                except ValueError:
                    continue
                status = state.get("status") if isinstance(state, dict) else None
                if status == TE_EXECUTING and status not in shown:
                    shown.add(status)
                    click.echo("executing: the gateway is filling its cache")
                elif status == TE_SUCCESSFUL:
                    click.echo(_success(state))
                    return 0
                elif status == TE_FAILED:
                    click.echo(f"failed: {state.get('reason', 'no reason given')}", err=True)
                    return 1
    except TimeoutError:
        click.echo(
            f"no end within {wait_s:g} s: the command stays on the broker ({topic}, retained) "
            "and the gateway fills the cache when it runs; clear it with an empty retained "
            "message to cancel",
            err=True,
        )
        return 3


def _success(state: dict[str, object]) -> str:
    size = state.get("size")
    shown = format_size(size) if isinstance(size, int) else "?"
    text = f"in the cache: sha256 {state.get('sha256')}, {shown}"
    until = state.get("pinnedUntil")
    if isinstance(until, int):
        text += f", pinned until {datetime.fromtimestamp(until).strftime('%Y-%m-%d %H:%M:%S')}"
    return text

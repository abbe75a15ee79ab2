"""The simulator's MQTT side: the far end of the cloud bridge, on the local broker.

thin-edge's bridge maps the tenant's MQTT topics onto `c8y/...` on the local broker. The
simulator plays the tenant there: it subscribes to `c8y/s/us` and `c8y/s/us/+` (SmartREST from
the gateway and its children) and `c8y/s/uat` (JWT requests), and publishes on `c8y/s/ds`
(operations, `106`) and `c8y/s/dat` (`71,<token>`). It runs on the project's MqttSession
(reconnects, subscribes again on every connect, ordered at-least-once outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tedge_firmware.core import topics
from tedge_firmware.errors import BrokerError
from tedge_firmware.shell.mqtt import Message, MqttSession, MqttSettings

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "c8y-sim"
SUBSCRIPTIONS = (topics.C8Y_UPSTREAM, f"{topics.C8Y_UPSTREAM}/+", topics.C8Y_JWT_REQUEST)
_CLOSE_TIMEOUT = 2.0


class CloudLink:
    """One MQTT session that hands every message to `deliver`, in arrival order."""

    def __init__(self, settings: MqttSettings, deliver: Callable[[Message], None]) -> None:
        self._settings = settings
        self._session = MqttSession(settings, SUBSCRIPTIONS, on_connect=self._subscribed)
        self._deliver = deliver
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def address(self) -> str:
        return self._settings.address

    async def start(self, connect_timeout: float | None) -> None:
        """Run the session; with a timeout, wait until it is connected and subscribed.

        BrokerError when it is not connected in time, BrokerAuthError when refused.
        """
        run = asyncio.create_task(self._session.run(), name="c8y-sim mqtt")
        pump = asyncio.create_task(self._pump(), name="c8y-sim pump")
        self._tasks = [run, pump]
        if connect_timeout is None:
            return
        try:
            async with asyncio.timeout(connect_timeout):
                await self._session.wait_connected()
        except (TimeoutError, BrokerError) as error:
            await self.stop()
            if run.done() and not run.cancelled() and run.exception() is not None:
                raise run.exception() from error  # type: ignore[misc]
            raise BrokerError(
                f"c8y-sim: no connection to the MQTT broker at {self.address} "
                f"within {connect_timeout:g} s"
            ) from error

    def publish(self, topic: str, payload: str) -> None:
        self._session.publish(topic, payload, qos=1)

    async def stop(self) -> None:
        """Deliver what is queued (bounded), then disconnect."""
        await self._session.close(timeout=_CLOSE_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _subscribed(self) -> None:
        """After every (re)connect: from now on nothing the gateway sends is missed."""
        log.info(
            "c8y-sim: listening on %s at %s as %s",
            ", ".join(SUBSCRIPTIONS),
            self.address,
            self._settings.client_id,
        )

    async def _pump(self) -> None:
        while True:
            message = await self._session.messages.get()
            try:
                self._deliver(message)
            except Exception:  # a bug in the simulator must not stop it from listening
                log.exception("c8y-sim: failed to handle a message on %s", message.topic)

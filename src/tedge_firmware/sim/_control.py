"""The control API of a running simulator, for `tedge-firmware c8y-sim update` and `status`.

It shares the simulator's HTTP server and answers only clients on the loopback interface (the
binaries may be served to the whole network, the control of the tenant is not):

    GET  /sim/status                   gateway, operations, inventory, errors, bulks, stats
    GET  /sim/operations/<id>[?wait=S] one operation; with `wait`, up to S seconds for its end
    POST /sim/operations               {"devices": [...], "name", "version", and "url" or
                                        "path" (a file on this machine), "ramp": seconds}
                                       → 201 {"operations": [...]} for one device,
                                         202 {"bulk": {...}} for several; 409 when refused
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tedge_firmware.errors import SimulatorError

if TYPE_CHECKING:
    from tedge_firmware.sim._simulator import C8ySimulator

CONTROL_PREFIX = "/sim"
MAX_WAIT_S = 3600.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def control_routes(sim: C8ySimulator) -> list[web.RouteDef]:
    api = _ControlApi(sim)
    return [
        web.get(f"{CONTROL_PREFIX}/status", _loopback_only(api.status)),
        web.get(f"{CONTROL_PREFIX}/operations/{{op_id}}", _loopback_only(api.operation)),
        web.post(f"{CONTROL_PREFIX}/operations", _loopback_only(api.create)),
    ]


def _loopback_only(handler: _Handler) -> _Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            loopback = ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return _error(403, "the simulator's control API answers only local clients")
        return await handler(request)

    return guarded


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _ControlApi:
    def __init__(self, sim: C8ySimulator) -> None:
        self._sim = sim

    async def status(self, request: web.Request) -> web.Response:
        sim = self._sim
        return web.json_response(
            {
                "gateway": sim.gateway_id,
                "broker": sim.broker_address,
                "connected": sim.connected,
                "operations": [operation.to_json() for operation in sim.operations],
                "inventory": [device.to_json() for device in sim.inventory.values()],
                "errors": [violation.to_json() for violation in sim.errors],
                "bulks": [sim.bulk_progress(bulk.id).to_json() for bulk in sim.bulks],
                "stats": sim.stats.to_json(),
            }
        )

    async def operation(self, request: web.Request) -> web.Response:
        op_id = request.match_info["op_id"]
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            return _error(400, "wait must be a number of seconds")
        try:
            operation = self._sim.operation(op_id)
            if wait > 0 and not operation.status.final:
                try:
                    operation = await self._sim.wait_finished(op_id, min(wait, MAX_WAIT_S))
                except TimeoutError:
                    operation = self._sim.operation(op_id)
        except KeyError:
            return _error(404, f"no operation {op_id!r}")
        return web.json_response(operation.to_json())

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        try:
            devices, name, version, url, ramp = self._parse(body)
        except ValueError as error:
            return _error(400, str(error))
        try:
            if len(devices) == 1:
                operation = self._sim.create_firmware_operation(devices[0], name, version, url)
                return web.json_response({"operations": [operation.to_json()]}, status=201)
            bulk = self._sim.bulk_firmware_operation(devices, name, version, url, ramp_seconds=ramp)
        except SimulatorError as error:
            return _error(409, str(error))
        return web.json_response({"bulk": self._sim.bulk_progress(bulk.id).to_json()}, status=202)

    def _parse(self, body: Any) -> tuple[list[str], str, str, str, float]:
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        devices = body.get("devices")
        if (
            not isinstance(devices, list)
            or not devices
            or not all(isinstance(device, str) for device in devices)
        ):
            raise ValueError("devices must be a non-empty list of device ids")
        name, version = body.get("name"), body.get("version")
        if not isinstance(name, str) or not name or not isinstance(version, str) or not version:
            raise ValueError("name and version must be non-empty strings")
        ramp = body.get("ramp", 0)
        if isinstance(ramp, bool) or not isinstance(ramp, int | float) or ramp < 0:
            raise ValueError("ramp must be a number of seconds, 0 or more")
        return devices, name, version, self._url(body), float(ramp)

    def _url(self, body: dict[str, Any]) -> str:
        url, path = body.get("url"), body.get("path")
        if (url is None) == (path is None):
            raise ValueError("give either url or path")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError("url must be an http(s) URL")
            return url
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise ValueError("path must be an absolute file path")
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"{path} is not a file")
        return self._sim.add_file(self._free_name(file.name), file)

    def _free_name(self, file_name: str) -> str:
        """A binary name like the file's, not yet taken (a new update never changes an old URL)."""
        base = _UNSAFE.sub("_", file_name).lstrip(".-")[:150] or "firmware"
        candidate, number = base, 1
        while self._sim.has_file(candidate):
            number += 1
            candidate = f"{base}-{number}"
        return candidate

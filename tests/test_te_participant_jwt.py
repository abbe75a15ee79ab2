"""The `te/` participant and the tenant's token: a command whose firmware is on the tenant is
fetched with the JWT (when `tedgeUrl` is not thin-edge's proxy, which would add it itself); a
firmware on any other host never sees the token."""

from __future__ import annotations

import json
from pathlib import Path

from brokers import Broker, free_port
from harness import FirmwareServer, Gateway, observer, write_simulated_tenant_config
from tedge_firmware.sim import C8ySimulator

TOPIC = "te/device/child1///cmd/firmware_update/c8y-mapper-3"


def command(url: str) -> str:
    return json.dumps({"status": "gateway_download", "remoteUrl": url, "tedgeUrl": url, "name": "a", "version": "1"})


async def test_the_tenants_firmware_is_fetched_with_the_token_and_another_hosts_without(
    tmp_path: Path, broker: Broker
) -> None:
    config_dir = tmp_path / "etc"
    write_simulated_tenant_config(config_dir, tmp_path / "data", broker.port, free_port(), [])
    elsewhere = FirmwareServer(files={"other.bin": b"not from the tenant"})
    await elsewhere.start()
    gateway = Gateway(config_dir, tmp_path / "data")
    try:
        async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device", require_token=True) as sim:
            await gateway.start()
            url = sim.add_file("tenant.bin", b"from the tenant")
            async with observer(broker.port, [TOPIC, TOPIC + "x"]) as obs:
                await obs.publish(TOPIC, command(url), retain=True)
                await obs.next(TOPIC)
                moved = json.loads(await obs.next(TOPIC, timeout=20))
                assert moved["status"] == "gateway_downloaded"  # the sim answers 401 without it
                other = elsewhere.url("other.bin").replace("127.0.0.1", "localhost")  # another host
                await obs.publish(TOPIC + "x", command(other), retain=True)
                await obs.next(TOPIC + "x")
                assert json.loads(await obs.next(TOPIC + "x", timeout=20))["status"] == "gateway_downloaded"
            assert sim.stats.files["tenant.bin"].complete == 1
        [request] = elsewhere.requests
        assert "Authorization" not in request.headers
    finally:
        await gateway.stop()
        await elsewhere.stop()

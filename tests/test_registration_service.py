"""Child registration over a real broker and a real temporary config dir: start-up with and
without the cloud's 106, children and files changing at run time, bursts, hostile names, the
network API, the `registration` command, and a child that registers over MQTT and then gets a
firmware update through the all-in-one service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import (
    CHILD,
    E501,
    E503,
    FirmwareServer,
    Gateway,
    Observer,
    load,
    observer,
    req_topic,
    res_topic,
    sha256,
    us,
    write_config,
)
from tedge_firmware.gateway.registration import RegistrationOptions, serve_registration

US = "c8y/s/us"
TOPICS = (US, "c8y/s/us/+")
DEVICE_ID = "parent-device"  # write_config's device.id


def r101(child: str, name: str | None = None) -> tuple[str, bytes]:
    return (US, f"101,{child},{name or child},thin-edge.io-child".encode())


def te(child: str) -> str:
    """The external id of a child registered over te/, as thin-edge's mapper gives it."""
    return f"{DEVICE_ID}:device:{child}"


def r114(operations: list[str], child: str | None = None) -> tuple[str, bytes]:
    return (US if child is None else f"{US}/{child}", ",".join(["114", *operations]).encode() + b"\n")


def declaration(child: str, command: str) -> str:
    return f"te/device/{child}///cmd/{command}"


class Registration:
    """`serve_registration` in-process against the test's broker and config dir."""

    def __init__(self, tmp_path: Path, broker: Broker, *, cloud_list_timeout: int = 30, **options: object) -> None:
        self.config_dir = tmp_path / "etc"
        write_config(
            self.config_dir,
            tmp_path / "data",
            broker.port,
            free_port(),
            extra=f"[firmware.registration]\ncloud_list_timeout = {cloud_list_timeout}\n",
        )
        self.root = self.config_dir / "operations" / "c8y"
        self.options = RegistrationOptions(**options)  # type: ignore[arg-type]
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def child(self, child: str, *operations: str) -> Path:
        directory = self.root / child
        directory.mkdir(parents=True, exist_ok=True)
        for operation in operations:
            (directory / operation).touch()
        return directory

    async def start(self) -> None:
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(serve_registration(load(self.config_dir), self.stop_event, self.options))

    async def stop(self) -> None:
        if self.task is not None:
            self.stop_event.set()
            async with asyncio.timeout(5):
                await self.task
            self.task = None


@pytest.fixture
async def reg(tmp_path: Path, broker: Broker) -> AsyncIterator[Registration]:
    instance = Registration(tmp_path, broker)
    try:
        yield instance
    finally:
        await instance.stop()


async def expect(obs: Observer, since: int, expected: list[tuple[str, bytes]], timeout: float = 10.0) -> None:
    """The next messages after `since` are exactly `expected`, in this order."""
    for topic, _payload in expected:
        await obs.next(topic, timeout)
    assert obs.log[since : since + len(expected)] == expected


async def started(reg: Registration, obs: Observer) -> None:
    """Start with a main-device operation: its 114 says the first look (after the watch) is done."""
    (reg.root).mkdir(parents=True, exist_ok=True)
    (reg.root / "c8y_Restart").touch()
    mark = len(obs.log)
    await reg.start()
    await expect(obs, mark, [r114(["c8y_Restart"])])


def tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


# --- start-up ------------------------------------------------------------------------------------


async def test_startup_with_children_and_the_clouds_106(reg: Registration, broker: Broker) -> None:
    (reg.root).mkdir(parents=True)
    (reg.root / "c8y_Restart").touch()
    reg.child("child-a", "c8y_Firmware")
    reg.child("child-b", "c8y_Restart", "c8y_Firmware")
    reg.child("child-c")
    async with observer(broker.port, TOPICS) as obs:
        await reg.start()
        await expect(obs, 0, [r114(["c8y_Restart"]), (US, b"105")])
        await obs.publish("c8y/s/ds", "106,child-a,only-in-the-cloud")
        await expect(
            obs,
            2,
            [
                r101("child-b"),
                r101("child-c"),
                r114(["c8y_Firmware"], "child-a"),
                r114(["c8y_Firmware", "c8y_Restart"], "child-b"),
                r114([], "child-c"),
            ],
        )
        await obs.silence(0.5)
        # a later 106 (an answer to someone else's 105) changes nothing
        await obs.publish("c8y/s/ds", "106")
        await obs.silence(0.3)


async def test_no_106_registers_every_child_after_the_configured_time(tmp_path: Path, broker: Broker) -> None:
    reg = Registration(tmp_path, broker, cloud_list_timeout=1)
    reg.child("child-a", "c8y_Firmware")
    async with observer(broker.port, TOPICS) as obs:
        await reg.start()
        try:
            await expect(obs, 0, [(US, b"105")])
            asked = time.monotonic()
            await expect(obs, 1, [r101("child-a"), r114(["c8y_Firmware"], "child-a")])
            assert time.monotonic() - asked >= 0.9
            # the 106 that comes too late changes nothing
            await obs.publish("c8y/s/ds", "106")
            await obs.silence(0.3)
        finally:
            await reg.stop()


async def test_no_children_no_105(reg: Registration, broker: Broker) -> None:
    async with observer(broker.port, TOPICS) as obs:
        await reg.start()
        await obs.silence(0.5)
        assert reg.root.is_dir()  # created, to be watched
        mark = len(obs.log)
        reg.child("late", "c8y_Firmware")
        await expect(obs, mark, [r101("late"), r114(["c8y_Firmware"], "late")])


# --- run time ------------------------------------------------------------------------------------


async def test_children_created_changed_and_removed_at_run_time(reg: Registration, broker: Broker) -> None:
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        reg.child("child1")
        await expect(obs, mark, [r101("child1")])  # at once, before any operation file
        mark = len(obs.log)
        (reg.root / "child1" / "c8y_Firmware").touch()
        (reg.root / "child1" / "c8y_Restart").touch()
        await expect(obs, mark, [r114(["c8y_Firmware", "c8y_Restart"], "child1")])
        mark = len(obs.log)
        (reg.root / "child1" / "c8y_Restart").write_text("[exec]\n")  # changed: the full list again
        await expect(obs, mark, [r114(["c8y_Firmware", "c8y_Restart"], "child1")])
        mark = len(obs.log)
        (reg.root / "child1" / "c8y_Restart").unlink()
        await expect(obs, mark, [r114(["c8y_Firmware"], "child1")])
        mark = len(obs.log)
        shutil.rmtree(reg.root / "child1")
        await expect(obs, mark, [r114([], "child1")])
        mark = len(obs.log)
        reg.child("child1", "c8y_Firmware")  # a new directory again: registered again
        await expect(obs, mark, [r101("child1"), r114(["c8y_Firmware"], "child1")])
        mark = len(obs.log)
        (reg.root / "c8y_Firmware").touch()  # the main device
        await expect(obs, mark, [r114(["c8y_Firmware", "c8y_Restart"])])
        await obs.silence(0.5)


async def test_many_files_changed_in_a_burst_give_one_114(reg: Registration, broker: Broker) -> None:
    names = [f"c8y_Op{index:02d}" for index in range(60)]
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        reg.child("child1", *names)
        await expect(obs, mark, [r101("child1"), r114(names, "child1")])
        await obs.silence(1.0)
        mark = len(obs.log)
        for name in names[:30]:
            (reg.root / "child1" / name).write_text("# changed\n")
        await expect(obs, mark, [r114(names, "child1")])
        await obs.silence(1.0)


async def test_invalid_operation_files_are_ignored(reg: Registration, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        directory = reg.child("child1", "c8y_Bad-Name", "c8y_Firmware.toml", "c8y_Firmware")
        (directory / "c8y_Broken").write_text("[exec\n")
        os.mkfifo(directory / "c8y_Fifo")
        await expect(obs, mark, [r101("child1"), r114(["c8y_Firmware"], "child1")])
        await obs.silence(0.5)
        logged = caplog.text
        assert "c8y_Broken" in logged and "TOML" in logged
        assert "c8y_Bad-Name" in logged and "c8y_Fifo" in logged
        # fixing the content makes it count
        mark = len(obs.log)
        (directory / "c8y_Broken").write_text("[exec]\n")
        await expect(obs, mark, [r114(["c8y_Broken", "c8y_Firmware"], "child1")])


async def test_hostile_directory_names_are_refused_with_a_log_line(
    reg: Registration, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    hostile = ["+", "#", "bad\x01child", "back\\slash", "x" * 201, DEVICE_ID, " "]
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        for name in hostile:
            reg.child(name, "c8y_Firmware")
        os.mkdir(os.fsencode(reg.root) + b"/not-utf8-\xff")
        reg.child("good", "c8y_Firmware")
        await expect(obs, mark, [r101("good"), r114(["c8y_Firmware"], "good")])
        await obs.silence(0.5)
    refused = [r.getMessage() for r in caplog.records if "ignored child directory" in r.getMessage()]
    assert len(refused) == len(hostile) + 1


async def test_polling_where_notifications_are_not_available(tmp_path: Path, broker: Broker) -> None:
    reg = Registration(tmp_path, broker, force_polling=True, poll_delay_ms=100)
    try:
        async with observer(broker.port, TOPICS) as obs:
            await started(reg, obs)
            mark = len(obs.log)
            reg.child("child1", "c8y_Firmware")
            await expect(obs, mark, [r101("child1"), r114(["c8y_Firmware"], "child1")])
            mark = len(obs.log)
            (reg.root / "child1" / "c8y_Firmware").unlink()
            await expect(obs, mark, [r114([], "child1")])
    finally:
        await reg.stop()


async def test_an_unusable_operations_directory_is_reported_once_and_survived(
    reg: Registration, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    (reg.config_dir / "operations").write_text("a file where the directory belongs")
    reg.options = RegistrationOptions(resync=0.2)
    async with observer(broker.port, TOPICS) as obs:
        await reg.start()
        await obs.publish(declaration("child1", "firmware_update"), "{}", retain=True)
        await obs.silence(1.0)  # several retries of the directory meanwhile
        assert reg.task is not None and not reg.task.done()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("cannot create" in line and "trying again" in line for line in errors) == 1
    assert any(f"declaring c8y_Firmware for child={te('child1')} failed" in line for line in errors)
    assert sum("cannot read" in r.getMessage() for r in caplog.records) <= 1


# --- the network API -----------------------------------------------------------------------------


async def test_a_child_declares_and_withdraws_over_mqtt(reg: Registration, broker: Broker) -> None:
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        await obs.publish(declaration("child9", "firmware_update"), "{}", retain=True)
        await expect(obs, mark, [r101(te("child9"), "child9"), r114(["c8y_Firmware"], te("child9"))])
        assert (reg.root / te("child9") / "c8y_Firmware").read_bytes() == b""
        mark = len(obs.log)
        for command in ("restart", "c8y_Custom", "log_upload"):
            await obs.publish(declaration("child9", command), '{"types": ["x"]}', retain=True)
        await expect(obs, mark, [r114(["c8y_Custom", "c8y_Firmware", "c8y_LogfileRequest", "c8y_Restart"], te("child9"))])
        await obs.silence(0.5)
        mark = len(obs.log)
        await obs.publish(declaration("child9", "restart"), b"", retain=True)  # withdraw
        await expect(obs, mark, [r114(["c8y_Custom", "c8y_Firmware", "c8y_LogfileRequest"], te("child9"))])
        assert not (reg.root / te("child9") / "c8y_Restart").exists()
        # the main device, as thin-edge 1.x names it
        mark = len(obs.log)
        await obs.publish(declaration("main", "software_update"), "{}", retain=True)
        await expect(obs, mark, [r114(["c8y_Restart", "c8y_SoftwareUpdate"])])
        for command in ("firmware_update", "c8y_Custom", "log_upload"):
            await obs.publish(declaration("child9", command), b"", retain=True)
        await obs.publish(declaration("main", "software_update"), b"", retain=True)


async def test_retained_declarations_are_applied_at_start_and_not_repeated(tmp_path: Path, broker: Broker) -> None:
    reg = Registration(tmp_path, broker, cloud_list_timeout=1)
    try:
        async with observer(broker.port, TOPICS) as obs:
            # declared while the gateway was away
            await obs.publish(declaration("child7", "firmware_update"), "{}", retain=True)
            await obs.publish(declaration("child7", "restart"), "{}", retain=True)
            await reg.start()
            await expect(obs, 0, [r101(te("child7"), "child7"), r114(["c8y_Firmware", "c8y_Restart"], te("child7"))])
            await obs.silence(0.5)
            await reg.stop()
            # a restart: the retained declarations come again, the files are there: no change
            mark = len(obs.log)
            await reg.start()
            await expect(obs, mark, [(US, b"105"), r101(te("child7"), "child7"), r114(["c8y_Firmware", "c8y_Restart"], te("child7"))])
            await obs.silence(0.5)
            for command in ("firmware_update", "restart"):
                await obs.publish(declaration("child7", command), b"", retain=True)
    finally:
        await reg.stop()


HOSTILE_DECLARATIONS = [
    (declaration("..", "firmware_update"), b"{}"),
    (declaration(".", "firmware_update"), b"{}"),
    ("te/device////cmd/firmware_update", b"{}"),
    # (control characters in a topic: mosquitto drops the publisher; the core tests cover them)
    (declaration("back\\slash", "firmware_update"), b"{}"),
    (declaration("x" * 201, "firmware_update"), b"{}"),
    (declaration(DEVICE_ID, "firmware_update"), b"{}"),
    (declaration("child1", "unknown_command"), b"{}"),
    (declaration("child1", "c8y_Bad-Name"), b"{}"),
    (declaration("child1", "c8y_" + "x" * 200), b"{}"),
    (declaration("child1", "firmware_update"), b"[]"),
    (declaration("child1", "firmware_update"), b"null"),
    (declaration("child1", "firmware_update"), b"not json"),
    (declaration("child1", "firmware_update"), b"\xff\xfe"),
    (declaration("child1", "firmware_update"), b"[" * 10_000),
    (declaration("child1", "firmware_update"), b'{"a": "' + b"x" * 20_000 + b'"}'),
]


async def test_hostile_declarations_change_nothing(reg: Registration, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        before = tree(reg.config_dir)
        mark = len(obs.log)
        for topic, payload in HOSTILE_DECLARATIONS:
            await obs.publish(topic, payload)
        # the service is still there and working
        await obs.publish(declaration("child1", "firmware_update"), "{}")
        await expect(obs, mark, [r101(te("child1"), "child1"), r114(["c8y_Firmware"], te("child1"))])
        await obs.silence(0.5)
        assert tree(reg.config_dir) == sorted([*before, f"operations/c8y/{te('child1')}", f"operations/c8y/{te('child1')}/c8y_Firmware"])
    await reg.stop()  # the count of lines left out comes with the stop at the latest
    ignored = [r.getMessage() for r in caplog.records if "ignored a declaration" in r.getMessage()]
    # each kind of error once, then one line with the count of the others (repeated input
    # must not flood the log)
    first = [m for m in ignored if "similar lines left out" not in m]
    left_out = [int(m.split("the latest of ")[1].split()[0]) for m in ignored if m not in first]
    assert len(first) + sum(left_out) == len(HOSTILE_DECLARATIONS)
    assert len(first) < len(HOSTILE_DECLARATIONS)


async def test_a_declaration_through_a_symlinked_child_directory_is_refused(
    reg: Registration, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    outside = tmp_path / "outside"
    outside.mkdir()
    async with observer(broker.port, TOPICS) as obs:
        await started(reg, obs)
        mark = len(obs.log)
        (reg.root / te("linked")).symlink_to(outside)  # a child directory, as far as reading goes
        await expect(obs, mark, [r101(te("linked"), "linked")])
        mark = len(obs.log)
        await obs.publish(declaration("linked", "firmware_update"), "{}")
        await obs.publish(declaration("child1", "firmware_update"), "{}")
        await expect(obs, mark, [r101(te("child1"), "child1"), r114(["c8y_Firmware"], te("child1"))])
        await obs.silence(0.3)
    assert list(outside.iterdir()) == []
    assert "is a symlink, which is never written through" in caplog.text


# --- the command ---------------------------------------------------------------------------------


async def test_registration_command(tmp_path: Path, broker: Broker) -> None:
    reg = Registration(tmp_path, broker, cloud_list_timeout=1)
    reg.child("child-a", "c8y_Firmware")
    async with observer(broker.port, TOPICS) as obs:
        process = subprocess.Popen(
            [sys.executable, "-m", "tedge_firmware", "registration", "--config-dir", str(reg.config_dir)],
            stderr=subprocess.PIPE,
        )
        try:
            await expect(obs, 0, [(US, b"105"), r101("child-a"), r114(["c8y_Firmware"], "child-a")], timeout=20)
            mark = len(obs.log)
            await obs.publish(declaration("child-b", "firmware_update"), "{}")
            await expect(obs, mark, [r101(te("child-b"), "child-b"), r114(["c8y_Firmware"], te("child-b"))])
            started_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 10) == 0
            assert time.monotonic() - started_at < 5
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stderr is not None
            errors = process.stderr.read().decode()
            process.stderr.close()
    assert "Traceback" not in errors


# --- end to end: register over MQTT, then a firmware update -----------------------------------


async def test_a_child_registers_over_mqtt_then_gets_a_firmware_update(tmp_path: Path, broker: Broker) -> None:
    config_dir, data, http_port = tmp_path / "etc", tmp_path / "data", free_port()
    write_config(config_dir, data, broker.port, http_port)
    cloud = FirmwareServer(files={"image.bin": os.urandom(100_000)})
    await cloud.start()
    gateway = Gateway(config_dir, data)
    try:
        async with observer(broker.port) as obs:
            await gateway.start()
            assert await obs.next(US) == b"500"
            mark = len(obs.log)
            await obs.publish(declaration(CHILD, "firmware_update"), "{}", retain=True)
            await obs.next(US)
            assert await obs.next(us(te(CHILD))) == b"114,c8y_Firmware\n"
            assert obs.log[mark : mark + 2] == [r101(te(CHILD), CHILD), r114(["c8y_Firmware"], te(CHILD))]
            assert (config_dir / "operations" / "c8y" / te(CHILD) / "c8y_Firmware").is_file()
            # as thin-edge's python-tedge-agent does: registered over te/, it takes legacy
            # requests addressed to its external id

            url = cloud.url("image.bin")
            await obs.publish("c8y/s/ds", f"515,{te(CHILD)},image,1.0,{url}")
            request = json.loads(await obs.next(req_topic(te(CHILD))))
            async with aiohttp.ClientSession() as http, http.get(request["url"]) as response:
                assert response.status == 200
                body = await response.read()
            assert body == cloud.files["image.bin"] and request["sha256"] == sha256(body)
            await obs.publish(res_topic(te(CHILD)), json.dumps({"id": request["id"], "status": "executing"}))
            await obs.publish(res_topic(te(CHILD)), json.dumps({"id": request["id"], "status": "successful"}))
            assert await obs.sequence(us(te(CHILD)), 3) == [E501, f"115,image,1.0,{url}".encode(), E503]
            await obs.publish(declaration(CHILD, "firmware_update"), b"", retain=True)
            assert await obs.next(us(te(CHILD))) == b"114\n"
    finally:
        with contextlib.suppress(Exception):
            await gateway.stop()
        await cloud.stop()

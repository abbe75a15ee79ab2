"""Wiring: the firmware plugin and the file-transfer service as long-running services.

`serve_plugin` runs the plugin (optionally with the file-transfer service and child
registration in the same process, the all-in-one `tedge-firmware run`); `serve_file_transfer`
runs the HTTP service alone. Both return when `stop` is set, after a bounded graceful shutdown,
and raise when they cannot go on (the CLI turns that into a non-zero exit so that the service
manager restarts us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from tedge_firmware.core import topics
from tedge_firmware.core.config import CONFIG_FILE_NAME, TedgeConfig
from tedge_firmware.core.retry import RetryPolicy
from tedge_firmware.errors import ConfigError
from tedge_firmware.gateway.cache_keeper import CacheKeeper
from tedge_firmware.gateway.lifecycle import cancel_tasks, until_stopped
from tedge_firmware.gateway.plugin import (
    PLUGIN_SUBSCRIPTIONS,
    BrokerSessionLost,
    FirmwarePlugin,
    Incoming,
    PluginOptions,
    PluginPorts,
    PluginSettings,
    health_down,
    health_up,
)
from tedge_firmware.gateway.ports import Publisher
from tedge_firmware.gateway.registration import RegistrationOptions, serve_registration
from tedge_firmware.shell import link_secret
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.config_file import resolve_device_id
from tedge_firmware.shell.downloader import Downloader
from tedge_firmware.shell.file_transfer import FileTransferServer
from tedge_firmware.shell.mqtt import Message, MqttSession, MqttSettings, Will
from tedge_firmware.shell.store import StoreWriter, fetch_store, operation_store
from tedge_firmware.shell.timers import Timers
from tedge_firmware.shell.tls import client_context, trust_cas_in

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
# The systemd units set LimitNOFILE to this too.
OPEN_FILES_WANTED = 65_536


@dataclass(frozen=True)
class ServiceOptions:
    with_file_transfer: bool = False
    plugin: PluginOptions = field(default_factory=PluginOptions)
    client_id: str = topics.PLUGIN_NAME
    # child registration runs in the all-in-one (with_file_transfer), with its own MQTT session
    registration: RegistrationOptions = field(default_factory=RegistrationOptions)


def file_transfer_ssl(config: TedgeConfig) -> ssl.SSLContext | None:
    """TLS for the file-transfer service; with `http.ca_path`, client certificates required."""
    if not config.http_tls:
        if config.http_ca_path is not None:
            raise ConfigError(
                "http.ca_path is set but the file-transfer service has no TLS: "
                "set http.cert_path and http.key_path too"
            )
        return None
    assert config.http_cert_path is not None and config.http_key_path is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.http_cert_path, config.http_key_path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load http.cert_path/http.key_path: {error}") from error
    if config.http_ca_path is not None:
        trust_cas_in(context, config.http_ca_path)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def make_file_transfer(config: TedgeConfig) -> FileTransferServer:
    exposure = config.file_transfer_exposure()
    if exposure is not None:
        log.warning("%s", exposure)
    raise_open_file_limit()
    return FileTransferServer(
        root=config.file_transfer_dir,
        cache_dir=config.cache_dir,
        host=config.http_bind_address,
        port=config.http_bind_port,
        ssl_context=file_transfer_ssl(config),
        max_connections=config.http_max_connections,
        idle_timeout=config.http_idle_timeout,
        main_device_id=_main_device_id(config),
        writes=config.http_writes,
        link_secret=link_secret_of(config),
    )


def link_secret_of(config: TedgeConfig) -> bytes | None:
    """The secret that signs file-transfer links, when `http.signed_links` is on (made on
    first use)."""
    if not config.http_signed_links:
        return None
    return link_secret.load_or_create(link_secret.secret_path(config.data_path))


def _main_device_id(config: TedgeConfig) -> str | None:
    """The gateway's id, whose own certificate may read and write everything; None when it
    cannot be told (then every certificate is a child's)."""
    try:
        return resolve_device_id(config)
    except ConfigError:
        return None


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> None:
    """Raise the soft open-file limit towards `wanted` as far as the hard limit allows: the
    usual soft limit (1024) is below what the file-transfer service may hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, error)


def check_plugin_config(config: TedgeConfig) -> str:
    """What the plugin needs before it starts; returns the main device id."""
    if config.c8y_url is None:
        raise ConfigError(missing_tenant(config.config_dir))
    config.file_transfer_base_url()  # raises for an unusable URL host
    return resolve_device_id(config)


def missing_tenant(config_dir: Path) -> str:
    """What to say when c8y.url is not set: where we looked, and what to do."""
    file = config_dir / CONFIG_FILE_NAME
    set_it = f"tedge-firmware --config-dir {config_dir} config set c8y.url <your tenant host>"
    if not config_dir.is_dir():
        where, fix = (
            f"{file} (the directory {config_dir} does not exist)",
            f"mkdir -p {config_dir} && {set_it}",
        )
    elif not file.is_file():
        where, fix = f"{file} (the file does not exist)", set_it
    else:
        where, fix = str(file), set_it
    return (
        f"A value for 'c8y.url' is missing in {where}: set it with '{fix}', "
        "or point --config-dir at the directory of your tedge.toml"
    )


def create_directories(config: TedgeConfig) -> None:
    for directory in (config.cache_dir, config.firmware_dir, config.file_transfer_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create {directory}: {error.strerror}") from error


def migrate_cache(config: TedgeConfig) -> None:
    """Move a cache of the layout before content addressing into the current one (hashing
    each entry once); links of operations in progress keep working."""
    try:
        FirmwareCache(config.cache_dir, config.file_transfer_dir).migrate()
    except OSError as error:
        raise ConfigError(
            f"cannot move the cache {config.cache_dir} to its new layout: {error}"
        ) from error


async def serve_plugin(config: TedgeConfig, stop: asyncio.Event, options: ServiceOptions) -> None:
    device_id = check_plugin_config(config)
    create_directories(config)
    await asyncio.to_thread(migrate_cache, config)
    file_transfer = make_file_transfer(config) if options.with_file_transfer else None
    downloader = Downloader(
        parallel=config.download_parallel,
        stall_timeout=config.download_stall_timeout,
        retry=RetryPolicy(max_elapsed=config.download_retry_budget),
        # thin-edge's Cumulocity proxy may require a client certificate (`c8y.proxy.ca_path`)
        ssl_context=client_context(
            config.http_ca_path, config.http_client_cert_file, config.http_client_key_file
        ),
        local_hosts=frozenset({config.c8y_proxy_host.strip("[]").lower()}),
        proxy=config.upstream_proxy,
        max_rate=config.download_max_rate,
    )
    session: MqttSession | None = None
    plugin: FirmwarePlugin | None = None
    pump: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if file_transfer is not None:
            await file_transfer.start()

        async def on_connect() -> None:
            # after every (re)connect, as thin-edge does: the retained "up" replaces the will
            await mqtt.publish_now(topics.health_topic(), health_up(), retain=True)
            if mqtt.connections > 1 and not mqtt.session_present and plugin is not None:
                plugin.submit(BrokerSessionLost())  # the first connect follows recover()

        session = mqtt = MqttSession(
            MqttSettings(
                host=config.mqtt_host,
                port=config.mqtt_port,
                client_id=options.client_id,
                auth=config.mqtt_auth,
                will=Will(topics.health_topic(), health_down().encode()),
            ),
            PLUGIN_SUBSCRIPTIONS,
            on_connect=on_connect,
        )
        plugin = build_plugin(
            config,
            device_id,
            session,
            downloader,
            options.plugin,
            plays_mapper=options.with_file_transfer,  # `run`: no thin-edge mapper beside us
        )
        plugin.recover()
        log.info(
            "firmware plugin started: device=%s broker=%s:%d data=%s",
            device_id,
            config.mqtt_host,
            config.mqtt_port,
            config.data_path,
        )
        pump = asyncio.create_task(_pump(session, plugin), name="mqtt-pump")
        tasks = [
            asyncio.create_task(session.run(), name="mqtt-session"),
            pump,
            asyncio.create_task(plugin.run(), name="plugin-loop"),
        ]
        if options.with_file_transfer:  # it stops by itself on `stop`
            registration = serve_registration(config, stop, options.registration)
            tasks.append(asyncio.create_task(registration, name="registration"))
        await until_stopped(stop, tasks)
    finally:
        if pump is not None:
            await cancel_tasks([pump])  # no new work from MQTT while stopping
        await _shutdown(session, plugin, downloader, file_transfer)
        await cancel_tasks(tasks)


def build_plugin(
    config: TedgeConfig,
    device_id: str,
    publisher: Publisher,
    downloader: Downloader,
    options: PluginOptions,
    *,
    plays_mapper: bool = False,
) -> FirmwarePlugin:
    """The plugin and its ports, as `tedge.toml` says (call it on the running event loop)."""
    cache = FirmwareCache(config.cache_dir, config.file_transfer_dir)

    def being_fetched() -> Collection[str]:
        return plugin.pinned_firmware()

    ports = PluginPorts(
        publisher=publisher,
        fetcher=downloader,
        operations=operation_store(config.firmware_dir),
        fetching=fetch_store(config.firmware_dir),
        writer=StoreWriter(),
        cache=cache,
        cache_keeper=CacheKeeper(cache, config.cache_limits, pinned=being_fetched),
        timers=Timers(),
        clock=asyncio.get_running_loop().time,
    )
    settings = PluginSettings.from_tedge(
        config,
        device_id,
        options,
        plays_mapper=plays_mapper,
        link_secret=link_secret_of(config),
    )
    plugin = FirmwarePlugin(settings, ports)
    return plugin


async def _pump(session: MqttSession, plugin: FirmwarePlugin) -> None:
    while True:
        message: Message = await session.messages.get()
        plugin.submit(Incoming(message.topic, message.payload))


async def _shutdown(
    session: MqttSession | None,
    plugin: FirmwarePlugin | None,
    downloader: Downloader,
    file_transfer: FileTransferServer | None,
) -> None:
    """Stop everything within SHUTDOWN_GRACE_S; what does not stop in time is abandoned.

    While the session flushes its outbox, an operation whose last status the broker
    acknowledges is forgotten; one whose status is still waiting (the broker is away) keeps its
    file and is completed by the next start.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_GRACE_S):
            if plugin is not None:
                await plugin.close()
            if session is not None:
                await session.close(
                    final=Message(topics.health_topic(), health_down().encode(), retain=True),
                    timeout=2.0,
                )
            if plugin is not None:
                await plugin.writer.close()  # what the flush acknowledged, on disk
            await downloader.close()
            if file_transfer is not None:
                await file_transfer.stop()
    log.info("stopped")


async def serve_file_transfer(config: TedgeConfig, stop: asyncio.Event) -> None:
    for directory in (config.file_transfer_dir, config.cache_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create {directory}: {error.strerror}") from error
    server = make_file_transfer(config)
    await server.start()
    log.info(
        "file-transfer service listening on %s:%d, serving %s",
        config.http_bind_address,
        server.port,
        config.file_transfer_dir,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()

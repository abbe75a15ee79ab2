"""A locked site on one machine: the demo's `--secure` mode, and what the tests of a locked site
build on.

Everything is made by the project's own code, as `tedge-firmware cert` makes it: a site CA, the
gateway's certificate (CN = the main device id; server certificate of the file-transfer service
and of the broker's TLS listener, and the identity of the gateway's own clients) and a client
certificate per child. The broker gets the TLS listener and ACL of `cert broker-config`; the
gateway's tedge.toml gets HTTPS with client certificates (`http.ca_path`) and its MQTT client
certificate; each child gets its own broker and download settings. Every MQTT client and every
firmware download then goes over TLS with a client certificate, and a child can read and write
only what is its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import tomlkit

from tedge_firmware.connector import BrokerSettings, DownloadSettings
from tedge_firmware.core.broker_acl import mosquitto_acl, mosquitto_fragment
from tedge_firmware.core.config import MqttAuth
from tedge_firmware.shell.certs import SiteCertificates

# what the gateway's certificate is valid for: children reach it on the loopback here
LOCAL_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class LockedSite:
    directory: Path
    main_device_id: str

    @classmethod
    def create(cls, directory: Path, main_device_id: str, children: Iterable[str]) -> LockedSite:
        site = SiteCertificates(directory)
        site.create_ca(f"{main_device_id} local CA")
        site.create_server(LOCAL_NAMES, common_name=main_device_id)
        for child in children:
            site.create_child(child)
        trusted = directory / "trusted"
        trusted.mkdir(exist_ok=True)
        (trusted / "ca.crt").write_bytes(site.ca_cert.read_bytes())
        return cls(directory, main_device_id)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def trusted(self) -> Path:
        """`http.ca_path`: a directory with the site's CA."""
        return self.directory / "trusted"

    @property
    def gateway_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def gateway_key(self) -> Path:
        return self.directory / "server.key"

    def child_cert(self, child: str) -> Path:
        return self.directory / "children" / f"{child}.crt"

    def child_key(self, child: str) -> Path:
        return self.directory / "children" / f"{child}.key"

    def mosquitto_lines(self, port: int, host: str) -> list[str]:
        """The TLS listener and ACL (written beside the certificates) for mosquitto.conf."""
        acl = self.directory / "tedge-firmware.acl"
        acl.write_text(mosquitto_acl(self.main_device_id))
        fragment = mosquitto_fragment(
            bind=host,
            port=port,
            ca_file=self.ca_file.absolute(),
            cert_file=self.gateway_cert.absolute(),
            key_file=self.gateway_key.absolute(),
            acl_file=acl.absolute(),
        )
        return fragment.splitlines()

    def gateway_toml(self) -> str:
        """tedge.toml keys for the gateway (appended to a file that has no `[http]` or
        `[mqtt.client.auth]` table yet): HTTPS requiring client certificates, its own client
        certificate for HTTP and MQTT. The broker's TLS port goes in `mqtt.client.port`."""
        document = {
            "http": {
                "cert_path": str(self.gateway_cert),
                "key_path": str(self.gateway_key),
                "ca_path": str(self.trusted),
                "client": {"auth": self._client_keys()},
            },
            "mqtt": {"client": {"auth": self._mqtt_auth_keys()}},
        }
        return tomlkit.dumps(document)

    def _client_keys(self) -> dict[str, str]:
        return {"cert_file": str(self.gateway_cert), "key_file": str(self.gateway_key)}

    def _mqtt_auth_keys(self) -> dict[str, str]:
        return {"ca_file": str(self.ca_file), **self._client_keys()}

    def gateway_mqtt_auth(self) -> MqttAuth:
        """For in-process clients that act for the gateway (the simulator's bridge)."""
        return MqttAuth(
            ca_file=self.ca_file, cert_file=self.gateway_cert, key_file=self.gateway_key
        )

    def child_broker(self, child: str, host: str, port: int) -> BrokerSettings:
        return BrokerSettings(
            host=host,
            port=port,
            ca_file=self.ca_file,
            cert_file=self.child_cert(child),
            key_file=self.child_key(child),
        )

    def child_download(self, child: str, settings: DownloadSettings) -> DownloadSettings:
        return replace(
            settings,
            ca_path=self.trusted,
            cert_file=self.child_cert(child),
            key_file=self.child_key(child),
        )

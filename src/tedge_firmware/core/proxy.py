"""The upstream HTTP proxy between the gateway and the cloud, as thin-edge configures it:
`proxy.address` (`scheme://host:port`), `proxy.username`/`proxy.password` (Basic), and
`proxy.no_proxy`, a comma-separated list of hosts that are reached directly. Pure, no I/O.

A `no_proxy` entry is `*` (every host), an IP address or network (`192.168.1.0/24`), or a
domain name, which also covers its subdomains (`example.com` and `.example.com` both cover
`a.example.com`). Without `proxy.no_proxy` the `NO_PROXY` environment variable is read, as
thin-edge does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class UpstreamProxy:
    url: str
    username: str | None = None
    password: str | None = None
    no_proxy: tuple[str, ...] = ()

    def bypassed(self, host: str) -> bool:
        """Whether `host` is reached directly rather than through the proxy."""
        host = host.strip("[]").lower().rstrip(".")
        return any(_covers(entry, host) for entry in self.no_proxy)


def parse_no_proxy(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(entry.strip().lower() for entry in text.split(",") if entry.strip())


def proxy_address_problem(address: str) -> str | None:
    """Why `address` cannot be the proxy's, or None."""
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as error:
        return f"not a URL: {error}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http://host:port or https://host:port"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be the proxy's scheme, host and port only"
    if parts.username or parts.password:
        return "credentials go in proxy.username and proxy.password"
    return None if port is None or 0 < port < 65536 else "the port must be 1-65535"


def _covers(entry: str, host: str) -> bool:
    if entry == "*":
        return True
    try:
        network = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        network = None
    if network is not None:
        try:
            return ipaddress.ip_address(host) in network
        except ValueError:
            return False
    domain = entry.lstrip(".").rstrip(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))

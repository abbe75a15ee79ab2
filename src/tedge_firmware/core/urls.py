"""Firmware URLs from outside (a `515`, a request to a child): can they be downloaded at all?

Checked before anything is fetched, so that a hostile or broken URL fails its own operation
with a reason that names the URL's fault, instead of an exception deep inside an HTTP client
or the resolver. The host check is the one the resolver applies: Python's socket layer
encodes a host name with the `idna` codec, which refuses empty labels (`a..b`, `.a`) and
labels over 63 characters.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

MAX_URL_CHARS = 8192
# C0 controls, DEL and C1 controls: never part of a URL, and dangerous in a request line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def firmware_url_problem(url: str) -> str | None:
    """Why `url` cannot be downloaded, as `invalid url: ...`, or None when it can be tried."""
    if not url:
        return "invalid url: it is empty"
    if len(url) > MAX_URL_CHARS:
        return f"invalid url: it is longer than {MAX_URL_CHARS} characters"
    if _CONTROL.search(url):
        return "invalid url: it contains control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port that is not 0-65535)
    except ValueError as error:
        return f"invalid url: {error}"
    if parts.scheme.lower() not in ("http", "https"):
        return "invalid url: not an http or https url"
    if not host:
        return "invalid url: it names no host"
    return _host_problem(host)


def _host_problem(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        host.encode("idna")
    except UnicodeError:
        return f"invalid url: the host name {host[:100]!r} is not a valid DNS name"
    return None


def is_proxy_url_for(tedge_url: str, remote_url: str, proxy_host: str, proxy_port: int) -> bool:
    """Whether `tedge_url` is thin-edge's Cumulocity proxy URL for `remote_url`: the proxy's
    host and port, `/c8y` followed by the remote path, the same query.

    Only such a `tedgeUrl` is fetched in place of `remoteUrl`: the file is cached under
    `remoteUrl`, so a `tedgeUrl` pointing anywhere else could put other bytes under its name.
    """
    try:
        local, remote = urlsplit(tedge_url), urlsplit(remote_url)
        local_port = local.port or (443 if local.scheme == "https" else 80)
    except ValueError:
        return False
    remote_path = remote.path or "/"
    return (
        local.scheme in ("http", "https")
        and (local.hostname or "").lower() == proxy_host.strip("[]").lower()
        and local_port == proxy_port
        and local.path.rstrip("/") == f"/c8y{remote_path}".rstrip("/")
        and local.query == remote.query
    )

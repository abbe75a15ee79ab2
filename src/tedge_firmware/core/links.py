"""Signed, expiring file-transfer links for children without certificates: pure, no I/O.

A link is the file's URL with `?expires=<unix seconds>&signature=<hex>`, the signature being
HMAC-SHA256, keyed by the gateway's secret, over the file's path under the repository (the same
for both routes) and the expiry. The service refuses a read whose signature is missing, forged or
expired (403); Range requests carry the same query, so resuming works while the link lives.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

EXPIRES = "expires"
SIGNATURE = "signature"
SECRET_BYTES = 32


def _signature(secret: bytes, path: str, expires: int) -> str:
    message = f"{path}\n{expires}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def signed_query(secret: bytes, path: str, expires: int) -> str:
    """The query string that signs `path` (relative to the repository) until `expires`."""
    return f"{EXPIRES}={expires}&{SIGNATURE}={_signature(secret, path, expires)}"


def link_problem(secret: bytes, path: str, query: Mapping[str, str], now: float) -> str | None:
    """Why a read of `path` with this query is refused, or None when its link is good."""
    expires_text, given = query.get(EXPIRES), query.get(SIGNATURE)
    if expires_text is None or given is None:
        return "This gateway hands out signed links: the link has no signature.\n"
    if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        return "The link's expiry is not a time.\n"
    expires = int(expires_text)
    if not hmac.compare_digest(
        given.encode("ascii", "replace"), _signature(secret, path, expires).encode()
    ):
        return "The link's signature does not match.\n"
    if expires < now:
        return "The link has expired: the operation has to send the request again.\n"
    return None


@dataclass(frozen=True)
class LinkMaker:
    """The URLs handed to children for files under the repository: `base_url/<path>`, signed
    until `lifetime` seconds from `clock()` when there is a `secret`."""

    base_url: str  # without the trailing /
    secret: bytes | None = None
    lifetime: int = 0
    clock: Callable[[], float] = time.time  # wall-clock seconds: links outlive restarts

    def url(self, path: str) -> str:
        plain = f"{self.base_url}/{path}"
        if self.secret is None:
            return plain
        expires = int(self.clock()) + self.lifetime
        return f"{plain}?{signed_query(self.secret, path, expires)}"


def same_file(url: str, other: str) -> bool:
    """Whether two links name the same file (whatever their signatures)."""
    return url.split("?", 1)[0] == other.split("?", 1)[0]

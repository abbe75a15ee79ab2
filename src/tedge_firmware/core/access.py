"""Who may do what on the file-transfer service: pure, no I/O.

With client certificates (`http.ca_path`), a client is identified by its certificate's common
name. A child reads only its own files: the first path segment must be its name, or the
external id a gateway gives a child registered over `te/` (`<main>:device:<name>`). The main
device (the gateway's own certificate) reads everything. Without client certificates nobody is
identified and reads stay open, as in thin-edge.

Writes (PUT, DELETE) follow `http.file_transfer.writes`:

- `own` (the default): with a certificate, only under the client's own directory; without
  client certificates, anywhere, as before;
- `any`: anywhere; `none`: nowhere.

Whatever the policy, nothing under a child's `firmware_update/` is written over HTTP: that
directory holds the firmware the gateway publishes (as links into its cache), which no one may
replace or remove, and a file put beside it would outlive every operation (clean-up removes the
gateway's links only). The shell also refuses any write on a symbolic link.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from tedge_firmware.core import topics

READS = frozenset({"GET", "HEAD"})
# `<child>/firmware_update/<FILE_ID>`: where the gateway publishes a child's firmware
FIRMWARE_DIR = "firmware_update"


class WritePolicy(enum.StrEnum):
    OWN = "own"
    ANY = "any"
    NONE = "none"


def access_problem(
    method: str,
    segments: Sequence[str],
    client: str | None,
    main_device_id: str | None,
    writes: WritePolicy,
) -> str | None:
    """Why `client` (a certificate's common name, None without one) may not `method` the path
    `segments` (not empty), or None when it may."""
    if method in READS:
        if client is None or _owns(client, segments[0], main_device_id):
            return None
        return f"The certificate of {client!r} opens only its own files, not {segments[0]!r}.\n"
    if writes is WritePolicy.NONE:
        return "Writes are disabled on this gateway (http.file_transfer.writes = none).\n"
    if len(segments) > 1 and segments[1] == FIRMWARE_DIR:
        return (
            f"{segments[0]}/{FIRMWARE_DIR}/ holds the firmware the gateway publishes: "
            "it is not written over HTTP.\n"
        )
    if writes is WritePolicy.ANY or client is None or _owns(client, segments[0], main_device_id):
        return None
    return (
        f"The certificate of {client!r} writes only under its own directory, not "
        f"{segments[0]!r} (http.file_transfer.writes = own).\n"
    )


def _owns(client: str, first: str, main_device_id: str | None) -> bool:
    if main_device_id is not None and client == main_device_id:
        return True  # the gateway's own certificate
    if first == client:
        return True
    return main_device_id is not None and first == topics.te_child_external_id(
        main_device_id, client
    )

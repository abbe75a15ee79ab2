"""A Mosquitto configuration fragment and ACL for the local hop: pure text.

Children connect to a TLS listener that requires a client certificate of the site's CA and takes
the certificate's CN as the user name (`use_identity_as_username`). The ACL then lets a child
read only its own requests and publish only its own responses, command states and capability
declarations, on the legacy and the `te/` topics; its requests also at the external id a
gateway gives a child registered over `te/` (`<main>:device:<child>`). Local clients without a
user name (the gateway's own services, thin-edge's, on the loopback listener) keep full access:
in Mosquitto's ACL file the lines before the first `user` line are for anonymous clients, and a
TLS client here always has a user name. So do the gateway's own clients on the TLS listener,
whose certificate names the main device (`tedge-firmware cert create-server`, which
`create-child` never issues). `pattern` lines apply to every user.
"""

from __future__ import annotations

from pathlib import Path

from tedge_firmware.core import topics
from tedge_firmware.errors import ConfigError


def mosquitto_acl(main_device_id: str) -> str:
    if not main_device_id or any(c.isspace() or c in "#+/" for c in main_device_id):
        # Mosquitto reads `user` up to the first blank; the id is also a topic level
        raise ConfigError(
            f"device id {main_device_id!r} cannot name a broker user: "
            "no blanks, '#', '+' or '/'"
        )
    external = topics.te_child_external_id(main_device_id, "%u")
    lines = [
        "# tedge-firmware: who may read and write what on the local broker",
        "# local clients without a user name (the gateway's services, on the loopback listener)",
        "topic readwrite #",
        "",
        "# children: the user name is the CN of their client certificate",
    ]
    for address in ("%u", external):
        lines += [
            f"pattern read tedge/{address}/commands/req/firmware_update",
            f"pattern write tedge/{address}/commands/res/firmware_update",
        ]
    lines += [
        "pattern readwrite te/device/%u///cmd/firmware_update/+",
        "pattern write te/device/%u///cmd/+",
        "",
        "# the gateway's own clients over TLS: the CN of its certificate is the main device id",
        f"user {main_device_id}",
        "topic readwrite #",
        "",
    ]
    return "\n".join(lines)


def mosquitto_fragment(
    *, bind: str, port: int, ca_file: Path, cert_file: Path, key_file: Path, acl_file: Path
) -> str:
    return "\n".join(
        [
            "# tedge-firmware: children over TLS with client certificates of the site's CA",
            f"listener {port} {bind}",
            f"cafile {ca_file}",
            f"certfile {cert_file}",
            f"keyfile {key_file}",
            "require_certificate true",
            "use_identity_as_username true",
            f"acl_file {acl_file}",
            "",
        ]
    )

"""A Mosquitto configuration fragment and ACL for the local hop: pure text.

Children connect to a TLS listener that requires a client certificate of the site's CA and takes
the certificate's CN as the user name (`use_identity_as_username`). The ACL then lets a child
read only its own requests and publish only its own responses, command states and capability
declarations, on the legacy and the `te/` topics; its requests also at the external id a
gateway gives a child registered over `te/` (`<main>:device:<child>`). Local clients without a
user name (the gateway's own services, thin-edge's, on the loopback listener) keep full access:
in Mosquitto's ACL file the lines before the first `user` line are for anonymous clients, and a
TLS client here always has a user name.
"""

from __future__ import annotations

from pathlib import Path

from tedge_firmware.core import topics


def mosquitto_acl(main_device_id: str) -> str:
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

"""A site's certificates for the local hop, over `cryptography`: a local CA, the gateway's server
certificate (with the names and addresses children use) and a client certificate per child.

Files, in one directory (default `<config-dir>/device-local-certs`):

    ca.crt, ca.key                the local CA (10 years by default)
    server.crt, server.key        the gateway's certificate: its file-transfer service's and
                                  broker's server certificate, and its own clients' identity
                                  (CN = the main device id)
    children/<child>.crt, .key    a child's client certificate, CN = the child id

Private keys are written with mode 0600 (created so, never widened), certificates 0644. A CA
is never replaced unless asked (`force`): every certificate it signed would stop working.
Failures are ConfigError naming the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tedge_firmware.errors import ConfigError

CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf
_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class SiteCertificates:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def create_ca(self, name: str, days: int = CA_DAYS, *, force: bool = False) -> list[Path]:
        if self.ca_cert.exists() and not force:
            raise ConfigError(
                f"a CA exists already in {self.directory}: replacing it would invalidate every "
                "certificate it signed (use --force to replace it anyway)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .sign(key, hashes.SHA256())
        )
        return self._write(self.ca_cert, self.ca_key, certificate, key)

    def create_server(
        self, names: Iterable[str], days: int = LEAF_DAYS, *, common_name: str | None = None
    ) -> list[Path]:
        """The gateway's certificate: every name in the SAN (IP addresses as such); CN =
        `common_name` (the main device id: presented by the gateway's own clients, it opens
        every child's files and topics) or else the first name. Good for server and client
        authentication."""
        listed = [name for name in dict.fromkeys(names) if name]
        if not listed:
            raise ConfigError("a server certificate needs at least one host name or address")
        alternatives = [_alternative_name(name) for name in listed]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        extensions = [
            (x509.SubjectAlternativeName(alternatives), False),
            (x509.ExtendedKeyUsage(usages), False),
        ]
        return self._issue(common_name or listed[0], days, extensions, self.directory / "server")

    def create_child(self, child_id: str, days: int = LEAF_DAYS) -> list[Path]:
        extensions = [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
        return self._issue(child_id, days, extensions, self.directory / "children" / child_id)

    def _issue(
        self,
        common_name: str,
        days: int,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
        stem: Path,
    ) -> list[Path]:
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        certificate = builder.sign(ca_key, hashes.SHA256())
        return self._write(stem.with_suffix(".crt"), stem.with_suffix(".key"), certificate, key)

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            certificate = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        except FileNotFoundError as error:
            raise ConfigError(
                f"no CA in {self.directory} ({error.filename} is missing): create it first "
                "with 'tedge-firmware cert create-ca'"
            ) from error
        except (OSError, ValueError) as error:
            raise ConfigError(f"the CA in {self.directory} cannot be read: {error}") from error
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key} is not an EC key made by tedge-firmware")
        return certificate, key

    def _write(
        self,
        cert_path: Path,
        key_path: Path,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
    ) -> list[Path]:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            cert_path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(key_path, key_pem, 0o600)
            _write_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as error:
            raise ConfigError(f"cannot write {error.filename}: {error.strerror}") from error
        return [cert_path, key_path]


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with `mode`: a key is never readable by others,
    not even for a moment."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _alternative_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)

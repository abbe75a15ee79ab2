"""Certificates for the tests, made by the project's own `shell.certs` (what `tedge-firmware cert`
runs), plus what the command never makes on purpose: an expired client certificate."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tedge_firmware.shell.certs import SiteCertificates


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.site = SiteCertificates(directory)
        self.site.create_ca(name)
        self.cert_path = self.site.ca_cert

    def issue(self, common_name: str, *, server: bool = False, expired: bool = False) -> Issued:
        if expired:
            return self._expired(common_name)
        if server:
            cert, key = self.site.create_server([common_name, "127.0.0.1"])
        else:
            cert, key = self.site.create_child(common_name)
        return Issued(cert, key)

    def _expired(self, common_name: str) -> Issued:
        ca = x509.load_pem_x509_certificate(self.site.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.site.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256())
        )
        stem = self.site.directory / f"{common_name}-expired"
        cert, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(cert, key_path)

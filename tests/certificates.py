"""Throwaway certificates for the TLS tests, made with ``cryptography``: two
CAs, a server certificate for localhost and 127.0.0.1, and client
certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A one-day certificate: a self-signed CA without ``issuer``, else a leaf
    for ``usage``; server leaves name localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


def _write(root: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (root / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (root / f"{name}.key").write_bytes(pem)


@dataclass(frozen=True)
class Pki:
    """Files in ``root``: NAME.pem and NAME.key for ca, server and client (ca
    signed them), other-ca and stranger (a client other-ca signed); token
    (the bearer token), wrong-token, empty-token."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def credentials(self, client: str | None = None) -> grpc.ChannelCredentials:
        """Credentials trusting ca, presenting the certificate ``client`` if named."""
        if client is None:
            return grpc.ssl_channel_credentials(self.read("ca.pem"))
        return grpc.ssl_channel_credentials(
            self.read("ca.pem"), self.read(f"{client}.key"), self.read(f"{client}.pem")
        )


def make_pki(root: Path, token: str) -> Pki:
    """Writes the files :class:`Pki` describes into ``root``; token holds ``token``."""
    cas = {}
    for ca in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas[ca] = (_certificate(f"imago test {ca}", key, None), key)
        _write(root, ca, *cas[ca])
    leaves = [
        ("server", "ca", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", "ca", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("stranger", "other-ca", ExtendedKeyUsageOID.CLIENT_AUTH),
    ]
    for name, ca, usage in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(root, name, _certificate(f"imago {name}", key, cas[ca], usage), key)
    (root / "token").write_text(f"  {token}\n")
    (root / "wrong-token").write_text("not-the-token\n")
    (root / "empty-token").write_text(" \n")
    return Pki(root)

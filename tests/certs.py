"""Self-signed certificates for the TLS tests, made with `cryptography` (no openssl CLI)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(
    directory: Path, name: str = "cert", *, ca: bool = False, passphrase: bytes = b""
) -> tuple[Path, Path, int]:
    """An ECDSA P-256 certificate for 127.0.0.1 and localhost: (certfile, keyfile, serial).

    `ca` marks it a CA, so a client context can trust it as its own root (cafile=...);
    `passphrase` encrypts the key file with it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"echoserver test {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    certificate = builder.sign(key, hashes.SHA256())
    certfile, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return certfile, keyfile, serial


def tls_pair(directory: Path, name: str = "server", passphrase: bytes = b"") -> tuple[str, str]:
    """make_certificate's files as the strings a setting holds: (certfile, keyfile)."""
    certfile, keyfile, _ = make_certificate(directory, name, passphrase=passphrase)
    return str(certfile), str(keyfile)

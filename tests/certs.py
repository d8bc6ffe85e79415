"""Real X.509 certificates made in the test: a CA, server and client certificates, a wrong CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # trusted CA certificate (PEM)
    server: Pair  # for localhost, 127.0.0.1, ::1 and 198.18.0.0/24 hosts
    client: Pair  # signed by the CA
    wrong_ca: Path  # a CA that signed nothing here
    wrong_client: Pair  # signed by the wrong CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pair(path.with_suffix(".pem"), path.with_suffix(".key"))


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        assert issuer is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


def make_pki(directory: Path, extra_ips: tuple[str, ...] = ()) -> Pki:
    """Write a small PKI into `directory`; the server certificate also names `extra_ips`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue("ddump test CA", None, ca=True)
    wrong = _issue("ddump wrong CA", None, ca=True)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(f"198.18.0.{i}")) for i in range(1, 11)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips if ip not in str(sans)]
    server = _issue("localhost", ca, sans=sans, usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client = _issue("ddump-client", ca, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    wrong_client = _issue("ddump-intruder", wrong, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    ca_pair = _write(directory / "ca", *ca)
    wrong_pair = _write(directory / "wrong-ca", *wrong)
    return Pki(
        ca=ca_pair.cert,
        server=_write(directory / "server", *server),
        client=_write(directory / "client", *client),
        wrong_ca=wrong_pair.cert,
        wrong_client=_write(directory / "wrong-client", *wrong_client),
    )

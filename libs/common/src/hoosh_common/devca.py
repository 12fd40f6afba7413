"""A development CA for the internal plane's mutual TLS: one CA, one certificate per
service, written as PEM files (``<dir>/ca.pem``, ``<dir>/<service>.pem``,
``<dir>/<service>-key.pem``). ``hoosh up`` and docker compose's one-shot ``certs``
service (any hoosh image: ``python -m hoosh_common.devca``) make them; on Kubernetes,
cert-manager (deploy/base/tls.yaml) or your own PKI does.

Each service certificate is good for both ends (serverAuth and clientAuth): a service
presents it when it serves and when it calls. Its names are the host names other
services dial (``router``, ``router.<namespace>.svc``, ``localhost``, 127.0.0.1).

    python -m hoosh_common.devca --out DIR [--names router,budget,...] [--dns-suffix hoosh.svc]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("edge", "router", "budget", "inference", "local-inference", "audit", "stt")
CA_DAYS = 365
LEAF_DAYS = 90


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(temporary, flags, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _names(host_names: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys(host_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def make_ca(directory: Path, *, services: Iterable[str] = SERVICES, dns_suffixes: Iterable[str] = ()) -> Path:
    """A fresh CA and a certificate per service under ``directory`` (created 0700)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hoosh development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    suffixes = list(dns_suffixes)
    for service in services:
        key = _key()
        hosts = [service, *(f"{service}.{suffix}" for suffix in suffixes), "localhost", "127.0.0.1", "::1"]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(directory / f"{service}-key.pem", _pem_key(key), private=True)
        _write(directory / f"{service}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    # The CA's key is not kept: nothing else is ever signed with it (a new run makes a new CA).
    return directory


def still_valid(directory: Path, services: Iterable[str], *, margin_days: int = 14) -> bool:
    """Whether ``directory`` holds a certificate for every service, each good for at
    least ``margin_days`` more (else a restart makes fresh ones)."""
    horizon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=margin_days)
    try:
        ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        if ca.not_valid_after_utc < horizon:
            return False
        for name in services:
            cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
            if cert.not_valid_after_utc < horizon:
                return False
            # Signed by this CA, and its key is the one beside it (a run cut short between
            # writes leaves a mixed set, which is made afresh, not kept).
            cert.verify_directly_issued_by(ca)
            key = serialization.load_pem_private_key((directory / f"{name}-key.pem").read_bytes(), password=None)
            public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
                return False
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def tls_environment(directory: Path, service: str) -> dict[str, str]:
    """The HOOSH_GRPC_TLS_* variables of ``service`` for certificates made by :func:`make_ca`."""
    return {
        "HOOSH_GRPC_TLS_CERT": str(directory / f"{service}.pem"),
        "HOOSH_GRPC_TLS_KEY": str(directory / f"{service}-key.pem"),
        "HOOSH_GRPC_TLS_CA": str(directory / "ca.pem"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hoosh_common.devca", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for ca.pem, <service>.pem, <service>-key.pem"
    )
    parser.add_argument("--names", default=",".join(SERVICES), help="comma-separated service names")
    parser.add_argument("--dns-suffix", action="append", default=[], help="also <name>.<suffix> (repeatable)")
    parser.add_argument(
        "--keep", action="store_true", help="do nothing when <out>/ca.pem exists (compose restarts keep their certs)"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.names.split(",") if name.strip()]
    if args.keep and still_valid(args.out, names):
        print(f"certificates kept in {args.out}")
        return 0
    try:
        make_ca(args.out, services=names, dns_suffixes=args.dns_suffix)
    except OSError as error:
        print(f"devca: {error}", file=sys.stderr)
        return 1
    print(f"development CA and certificates for {', '.join(names)} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

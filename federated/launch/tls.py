"""Credentials for a deployment: a CA, a SuperLink certificate for given host names / IPs, SuperNode keys.

By default (loopback demos, tests) the certificate covers 127.0.0.1 and localhost for a
week. For real hosts, name them (every name and address the SuperNodes will dial)::

    python -m federated.launch.tls --hosts superlink.example.org,10.0.0.5 --supernodes site0,site1,site2 --out certs/

writes ``ca.pem`` (give it to every SuperNode: ``--root-certificates``), ``server.pem`` /
``server.key`` (the SuperLink's ``--ssl-certfile`` / ``--ssl-keyfile``, with ``--ssl-ca-certfile ca.pem``),
``ca.key`` (keep it offline: it signs certificates) and one OpenSSH key pair per SuperNode
(``<name>.key`` stays at the site, ``<name>.pub`` is registered with ``flwr supernode register``).
A site with its own PKI uses its certificates instead. Built with ``cryptography`` (a Flower dependency).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ServerCredentials:
    """Files for ``flower-superlink --ssl-*`` and the clients' ``root-certificates``."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_credentials(folder: Path, *, days: int = 7, hosts: tuple[str, ...] = ()) -> ServerCredentials:
    """A self-signed CA and a SuperLink certificate signed by it.

    Parameters
    ----------
    folder : where the files go (created).
    days : validity.
    hosts : host names and IP addresses the certificate is valid for (its subject alternative names),
        in addition to localhost and 127.0.0.1; the first one is its common name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*(h.strip() for h in hosts if h.strip()), "localhost", "127.0.0.1"]))
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auditable-pipeline demo CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([_san(h) for h in names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    creds = ServerCredentials(
        ca_cert=folder / "ca.pem", server_cert=folder / "server.pem", server_key=folder / "server.key"
    )
    creds.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    creds.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(creds.server_key, key)
    _write_key(folder / "ca.key", ca_key)
    return creds


def make_supernode_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication, both in OpenSSH format (what Flower reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def main(argv: list[str] | None = None) -> int:
    """``python -m federated.launch.tls``: issue a CA, a SuperLink certificate for ``--hosts`` and SuperNode keys."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m federated.launch.tls", description=main.__doc__)
    p.add_argument("--hosts", default="", help="comma-separated host names / IPs of the SuperLink (its SANs)")
    p.add_argument("--supernodes", default="", help="comma-separated SuperNode names: one key pair each")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    args = p.parse_args(argv)
    out = Path(args.out)
    creds = make_server_credentials(out, days=args.days, hosts=tuple(h for h in args.hosts.split(",") if h))
    print(f"CA {creds.ca_cert}, SuperLink certificate {creds.server_cert} / key {creds.server_key}")
    for name in (n.strip() for n in args.supernodes.split(",") if n.strip()):
        private, public = make_supernode_keys(out, name)
        print(f"SuperNode {name}: private key {private} (stays at the site), public key {public} (register it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

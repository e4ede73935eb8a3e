"""TLS certificates and SuperNode key pairs for a Flower deployment (``ubsmoe certs``).

:func:`make_certs` writes, into one folder (each file atomically, see :mod:`ubsmoe.io`):

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384);
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the
  CA, with a subject alternative name for every given host (an IP address or a DNS
  name); the SuperLink gets ``--ssl-certfile server.crt --ssl-keyfile server.key
  --ssl-ca-certfile ca.crt``, every SuperNode and ``flwr`` get ``ca.crt`` as their
  root certificate;
- ``node-<i>`` / ``node-<i>.pub`` for i = 0..N-1: SuperNode authentication key
  pairs in the format Flower 1.42 reads: an OpenSSH private key on a NIST curve
  (``flower-supernode --auth-supernode-private-key node-<i>``) and its OpenSSH public
  key (``flwr supernode register node-<i>.pub <connection>`` on the SuperLink side).

Private keys are written unencrypted with mode 0600 (for trying a deployment on one
machine; on real machines each node generates and keeps its own key). Uses the
``cryptography`` package, no ``openssl`` shell-out. No Flower import.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ubsmoe.io import atomic_write_text

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class CertFiles:
    """Paths written by :func:`make_certs`.

    Attributes:
        ca_cert, ca_key: the certificate authority.
        server_cert, server_key: the SuperLink's TLS certificate and key.
        node_keys: ``(private key, public key)`` per node, node 0 first.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[tuple[Path, Path]]


def _san(host: str):
    """A subject alternative name entry: IPAddress for an IP literal, else DNSName."""
    # cryptography: only `ubsmoe certs` needs it, and the CLI imports this module at start-up
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key) -> str:
    # cryptography: see _san
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _write_private(path: Path, text: str) -> None:
    atomic_write_text(path, text, file_mode=0o600)  # never readable by others, not even briefly


def _validate_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an IP address or a DNS name."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", host):
        raise ValueError(f"--host: got {host!r}, expected an IP address or a DNS name")


def make_certs(out: Path, nodes: int = 3, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS,
               valid_days: int = VALID_DAYS) -> CertFiles:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` node key pairs into ``out``.

    Args:
        out: folder (created); existing files of the same names are replaced.
        nodes: number of SuperNode key pairs, >= 0.
        hosts: names and IP addresses the SuperLink is reached at (its certificate's
            subject alternative names; the first is also its common name), >= 1.
        valid_days: validity of the certificates in days, >= 1.

    Returns:
        The written paths.

    Raises:
        ValueError: ``nodes < 0``, no host, a host that is neither an IP address nor a
            DNS name, or ``valid_days < 1`` (one line naming the option).
    """
    # cryptography: only `ubsmoe certs` needs it, and the CLI imports this module at start-up
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0:
        raise ValueError(f"--nodes: got {nodes}, expected an integer >= 0")
    if valid_days < 1:
        raise ValueError(f"valid_days: got {valid_days}, expected an integer >= 1")
    hosts = list(hosts)
    if not hosts:
        raise ValueError("--host: got none, expected at least one IP address or DNS name")
    for host in hosts:
        _validate_host(host)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ubsmoe local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    files = CertFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, [])
    atomic_write_text(files.ca_cert, ca_cert.public_bytes(pem).decode())
    os.chmod(files.ca_cert, 0o644)
    _write_private(files.ca_key, _pem_key(ca_key))
    atomic_write_text(files.server_cert, server_cert.public_bytes(pem).decode())
    os.chmod(files.server_cert, 0o644)
    _write_private(files.server_key, _pem_key(server_key))
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        priv_path, pub_path = out / f"node-{i}", out / f"node-{i}.pub"
        _write_private(priv_path, private)
        atomic_write_text(pub_path, public + f" ubsmoe-node-{i}\n")
        os.chmod(pub_path, 0o644)
        files.node_keys.append((priv_path, pub_path))
    return files

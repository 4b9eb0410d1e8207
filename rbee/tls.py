"""TLS between rbee's programs (S13): the cluster's certificate authority, the
certificates it issues, and gRPC credentials built from them.

The queen is the cluster CA (``$RBEE_HOME/tls/ca.crt`` and ``ca.key`` on the
queen's machine). For each node it issues two certificates, delivered over the
SSH link it already trusts:

- the hive's own certificate (server and client use, its node's names), and
- an issuing certificate (a CA limited to one level below it) with which the
  hive signs a certificate for each worker it starts.

So every daemon's certificate chains to the cluster CA, and every link is
mutual: servers ask for a client certificate from the same CA, and clients
check the server's certificate and name against it. The keeper on the queen's
machine uses the client certificate the queen keeps next to its CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rbee.errors import RbeeError
from rbee.hosts import is_loopback  # noqa: F401 - part of this module's interface

TLS_DIR = "tls"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"
# On a node, below its RBEE_HOME/tls: what the queen delivers.
HIVE_CERT = "hive.crt"
HIVE_KEY = "hive.key"
ISSUER_CERT = "hive-issuer.crt"
ISSUER_KEY = "hive-issuer.key"

CA_DAYS = 3650
LEAF_DAYS = 397
# A node's hive and issuing certificates: short, renewed at each hive start
# (the queen issues and delivers them again then).
NODE_DAYS = 90
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        host = host.strip("[]").strip()
        if not host or host in seen or is_wildcard(host):
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def san_hosts(cert: x509.Certificate) -> list[str]:
    """The names and addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


@dataclass(frozen=True)
class Issued:
    """A certificate (with the chain up to, not including, the cluster CA) and its key, as PEM."""

    chain: bytes
    key: bytes


class Issuer:
    """A certificate that may sign others (the cluster CA, or a hive's issuing certificate)."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, chain: bytes = b"") -> None:
        self.cert = cert
        self.key = key
        # The issuer's own chain below the root (empty for the root itself).
        self.chain = chain

    @classmethod
    def from_pem(cls, cert: bytes, key: bytes) -> "Issuer":
        certs = x509.load_pem_x509_certificates(cert)
        private = serialization.load_pem_private_key(key, password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("the issuing key is not an EC key")
        leaf = certs[0]
        # An issuer that is itself the root adds nothing to its leaves' chains.
        chain = b"" if leaf.issuer == leaf.subject else b"".join(cert_pem(c) for c in certs)
        return cls(leaf, private, chain)

    @classmethod
    def load(cls, cert: Path, key: Path) -> "Issuer":
        """An issuing certificate and its key from files (a hive's --tls-issuer-cert/-key)."""
        try:
            return cls.from_pem(Path(cert).expanduser().read_bytes(), Path(key).expanduser().read_bytes())
        except (OSError, ValueError) as exc:
            raise RbeeError(
                "TLS_FILE_INVALID",
                f"The TLS issuing certificate {cert} or key {key} cannot be used: {exc}",
                {"cert": str(cert), "key": str(key)},
            ) from None

    def _builder(self, subject: str, public_key, days: int) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rbee"), x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )

    def issue_leaf(self, subject: str, hosts: list[str], days: int = LEAF_DAYS) -> Issued:
        """A certificate for a daemon: server and client use, valid for ``hosts`` (and loopback)."""
        key = _new_key()
        return Issued(self.sign_leaf(subject, key.public_key(), hosts, days), key_pem(key))

    def sign_leaf(self, subject: str, public_key, hosts: list[str], days: int = LEAF_DAYS) -> bytes:
        """A leaf certificate (with this issuer's chain) for someone else's key."""
        names = _names([*hosts, *LOOPBACK_NAMES])
        cert = (
            self._builder(subject, public_key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(cert) + self.chain

    def issue_issuer(self, subject: str, hosts: list[str] | None = None, days: int = CA_DAYS) -> Issued:
        """A CA one level below this one, that may sign leaves only (a hive's,
        for its workers). With ``hosts``, host names it may vouch for are
        limited to the node's own and localhost, so one node's issuing
        certificate cannot pass for another node's name. (Addresses cannot be
        limited the same way: the TLS library under gRPC refuses address name
        constraints outright.)"""
        key = _new_key()
        builder = (
            self._builder(subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        )
        if hosts is not None:
            # The node's identity name (rbee/tls_identity.py) is among ``hosts``:
            # its workers' certificates carry names below it.
            permitted = [n for n in _names([*hosts, *LOOPBACK_NAMES]) if isinstance(n, x509.DNSName)]
            builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert_pem(cert) + self.chain, key_pem(key))


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


class ClusterCA:
    """The queen's CA in ``<home>/tls``: created on first use, 0600 key, 0700 folder."""

    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / TLS_DIR
        self._issuer: Issuer | None = None
        self._client: TlsIdentity | None = None

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_CERT

    def issuer(self) -> Issuer:
        if self._issuer is None:
            with self._locked():
                self._issuer = self._load_or_create()
        return self._issuer

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time creates the CA or the client certificate (a
        queen and a keeper of the same home may both get there first)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ca_pem(self) -> bytes:
        return cert_pem(self.issuer().cert)

    def _load_or_create(self) -> Issuer:
        cert_file, key_file = self.dir / CA_CERT, self.dir / CA_KEY
        if cert_file.exists() and key_file.exists():
            try:
                return Issuer.from_pem(cert_file.read_bytes(), key_file.read_bytes())
            except (ValueError, OSError) as exc:
                raise RbeeError(
                    "TLS_FILE_INVALID",
                    f"The cluster CA in {self.dir} cannot be read: {exc}",
                    {"path": str(self.dir)},
                    [f"Restore {cert_file} and {key_file} from a backup; a new CA would need every node re-added"],
                ) from None
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rbee"), x509.NameAttribute(NameOID.COMMON_NAME, "rbee cluster CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        _write_private(key_file, key_pem(key))
        _write_private(cert_file, cert_pem(cert), 0o644)
        return Issuer(cert, key)

    def client_identity(self) -> "TlsIdentity":
        """The certificate the queen (and a keeper on its machine) present to
        daemons: created once, read once per ClusterCA."""
        if self._client is not None:
            return self._client
        cert_file, key_file = self.dir / CLIENT_CERT, self.dir / CLIENT_KEY
        issuer = self.issuer()
        with self._locked():
            if not (cert_file.exists() and key_file.exists()):
                issued = issuer.issue_leaf("rbee client", [socket_hostname()])
                _write_private(key_file, issued.key)
                _write_private(cert_file, issued.chain, 0o644)
        self._client = TlsIdentity.load(cert_file, key_file, self.ca_path)
        return self._client

    def server_identity(self, subject: str, hosts: list[str]) -> "TlsIdentity":
        """A fresh certificate for a daemon on this machine (the queen beyond
        loopback), with the queen's identity name (rbee/tls_identity.py)."""
        from rbee.tls_identity import QUEEN_NAME

        issued = self.issuer().issue_leaf(subject, [*hosts, QUEEN_NAME])
        return TlsIdentity(ca=self.ca_pem(), cert=issued.chain, key=issued.key)

    def node_bundle(self, node: str, hosts: list[str], identity: str | None = None) -> dict[str, tuple[bytes, int]]:
        """What a node's hive needs, by file name below its tls folder, with
        modes: certificates valid for ``hosts`` and the node's ``identity``
        name (rbee/tls_identity.py; by default that of the node's name alone)."""
        from rbee.tls_identity import node_identity

        names = [*hosts, identity or node_identity(node)]
        issuer = self.issuer()
        hive = issuer.issue_leaf(f"rbee-hive {node}", names, NODE_DAYS)
        signer = issuer.issue_issuer(f"rbee-hive {node} issuer", names, NODE_DAYS)
        return {
            CA_CERT: (self.ca_pem(), 0o644),
            HIVE_CERT: (hive.chain, 0o644),
            HIVE_KEY: (hive.key, 0o600),
            ISSUER_CERT: (signer.chain, 0o644),
            ISSUER_KEY: (signer.key, 0o600),
        }


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


@dataclass(frozen=True)
class TlsIdentity:
    """What one program needs for mutual TLS: the cluster CA to check peers
    against, and its own certificate chain and key (None for a client that
    only checks servers)."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    # The identity name (rbee/tls_identity.py) the server must prove, checked
    # instead of the address dialled; None: the address is checked.
    peer: str | None = None
    # A server that asks no client certificate: the queen's enrolment port
    # alone (rbee_queen/enrol.py), where a joining keeper has none yet.
    client_optional: bool = False

    def for_peer(self, name: str | None) -> "TlsIdentity":
        """This identity, checking that the server is ``name`` whatever its address."""
        import dataclasses

        return dataclasses.replace(self, peer=name)

    @classmethod
    def load(cls, cert: Path | None, key: Path | None, ca: Path, flag: str = "--tls") -> "TlsIdentity":
        """Read and check the files; TLS_FILE_INVALID naming the file otherwise."""

        def read(path: Path, what: str, private: bool = False) -> bytes:
            path = Path(path).expanduser()
            try:
                data = path.read_bytes()
                mode = path.stat().st_mode & 0o777
            except OSError as exc:
                raise RbeeError(
                    "TLS_FILE_INVALID",
                    f"Cannot read the TLS {what} {path}: {exc.strerror or exc}",
                    {"path": str(path), "what": what},
                    [f"Check the path given to {flag}-{what.split()[0]}"],
                ) from None
            if private and mode & 0o077:
                raise RbeeError(
                    "TLS_FILE_INVALID",
                    f"The TLS key {path} is readable by other users (mode {mode:03o})",
                    {"path": str(path), "mode": f"{mode:03o}"},
                    [f"Run `chmod 600 {path}`"],
                )
            try:
                if private:
                    serialization.load_pem_private_key(data, password=None)
                else:
                    x509.load_pem_x509_certificates(data)
            except (ValueError, TypeError) as exc:
                raise RbeeError(
                    "TLS_FILE_INVALID",
                    f"The TLS {what} {path} is not a PEM {'private key' if private else 'certificate'}: {exc}",
                    {"path": str(path), "what": what},
                ) from None
            return data

        if (cert is None) != (key is None):
            raise RbeeError(
                "TLS_FILE_INVALID",
                "A TLS certificate needs its key and a key its certificate",
                {"cert": str(cert or ""), "key": str(key or "")},
                [f"Pass both {flag}-cert and {flag}-key"],
            )
        return cls(
            ca=read(ca, "ca certificate"),
            cert=read(cert, "cert") if cert else None,
            key=read(key, "key", private=True) if key else None,
        )

    def server_credentials(self):
        import grpc

        if not (self.cert and self.key):
            raise RbeeError("TLS_FILE_INVALID", "A TLS server needs a certificate and its key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=not self.client_optional
        )

    def channel_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def certificate(self) -> x509.Certificate | None:
        return x509.load_pem_x509_certificates(self.cert)[0] if self.cert else None



def write_identity(folder: Path, issued: Issued, ca: bytes) -> tuple[Path, Path, Path]:
    """Write a certificate, its key (0600) and the CA into ``folder`` (0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = (folder / "tls.crt", folder / "tls.key", folder / CA_CERT)
    _write_private(paths[0], issued.chain, 0o644)
    _write_private(paths[1], issued.key)
    _write_private(paths[2], ca, 0o644)
    return paths

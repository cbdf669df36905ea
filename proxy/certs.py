"""Development PKI built with ``cryptography``: a CA, a server certificate, client certificates
and a certificate revocation list.

Everything lands in one directory (``certs/dev`` by convention, never committed): ``ca.pem`` /
``ca.key`` (the CA, which also signs the CRL), ``server.pem`` / ``server.key`` (SANs localhost,
127.0.0.1, ::1 plus any names given), ``crl.pem`` (starts empty, extended by ``revoke``) and one
``NAME.pem`` / ``NAME.key`` pair per client. Keys are ECDSA P-256 unless RSA is asked for, are
written unencrypted with mode 0600, and no existing file is overwritten unless ``force=True``.
This is tooling for development and tests; a production deployment should use its own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CRL",
    "DEV_CLIENT",
    "SERVER_CERT",
    "SERVER_KEY",
    "PKIError",
    "ensure_dev_pki",
    "init_ca_and_server",
    "issue_client",
    "load_cert",
    "refresh_crl",
    "revoke",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CRL = "crl.pem"
DEV_CLIENT = "dev-client"

CA_MIN_DAYS = 3650
CRL_DAYS = 30
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PKIError(Exception):
    """A development-PKI operation could not be carried out (file exists, wrong CA, ...)."""


@dataclass(frozen=True)
class _CA:
    cert: x509.Certificate
    key: PrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(key_type: str, rsa_bits: int) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits not in (2048, 3072, 4096):
            raise PKIError(f"RSA key size must be 2048, 3072 or 4096, got {rsa_bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise PKIError(f"key type must be 'ec' or 'rsa', got {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Fail before writing anything if any target exists and ``force`` is not set."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise PKIError(
            f"refusing to overwrite existing {', '.join(existing)} (use --force)"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never world-readable, even briefly).

    An existing file is removed first (callers checked ``force``), so the new file never
    inherits the old file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask may have cleared bits we want (e.g. 0644 for certs)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def _write_replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` (used for the CRL, which a running proxy may be reading)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write(tmp, data, mode)
    os.replace(tmp, path)


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load the first certificate of a PEM file, or a DER certificate."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(f"{path} is not a valid PEM or DER certificate: {exc}") from None


def _load_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{path}: only EC and RSA keys are supported")
    return key


def _load_ca(ca_dir: Path) -> _CA:
    cert = load_cert(ca_dir / CA_CERT)
    key = _load_key(ca_dir / CA_KEY)
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PKIError(f"{ca_dir / CA_KEY} does not match {ca_dir / CA_CERT}")
    return _CA(cert=cert, key=key)


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(ca: _CA) -> x509.AuthorityKeyIdentifier:
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(ca: _CA, days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise PKIError(f"days must be at least 1, got {days}")
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    return now - BACKDATE, not_after


def _leaf_builder(
    ca: _CA, subject: x509.Name, key: PrivateKey, days: int, usage: x509.ObjectIdentifier
) -> x509.CertificateBuilder:
    """A leaf certificate signed by ``ca``: not a CA, key usage fitting the key, one EKU."""
    not_before, not_after = _validity(ca, days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_ski(key), critical=False)
        .add_extension(_aki(ca), critical=False)
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_ca(key_type: str, rsa_bits: int, days: int) -> _CA:
    key = _new_key(key_type, rsa_bits)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "beanstalk-proxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "beanstalk-proxy dev CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=max(days, CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
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
        .add_extension(_ski(key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _CA(cert=cert, key=key)


def _make_server(
    ca: _CA, names: Sequence[str], days: int, key_type: str, rsa_bits: int
) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key(key_type, rsa_bits)
    all_names: list[str] = []
    for n in (*names, *DEFAULT_SERVER_NAMES):
        n = n.strip()
        if n and n not in all_names:
            all_names.append(n)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])])
    cert = (
        _leaf_builder(ca, subject, key, days, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in all_names]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def _build_crl(ca: _CA, revoked: Sequence[x509.RevokedCertificate], number: int) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def _load_crl(ca: _CA, path: Path) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot load existing CRL {path}: {exc}") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        raise PKIError(f"{path} was not issued by the CA in {path.parent / CA_CERT}")
    return crl


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def init_ca_and_server(
    directory: str | os.PathLike[str],
    server_names: Sequence[str] = (),
    days: int = 825,
    force: bool = False,
    key_type: str = "ec",
    rsa_bits: int = 2048,
) -> list[Path]:
    """Create a new CA and a server certificate signed by it, plus an empty ``crl.pem``.

    The server certificate is valid for ``days`` and carries the SANs localhost, 127.0.0.1 and
    ::1 plus ``server_names`` (IP literals become IP SANs); the CA is valid for at least ten
    years. Returns the files written."""
    d = Path(directory)
    targets = [d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY, d / CRL]
    _refuse_existing(targets, force)
    ca = _make_ca(key_type, rsa_bits, days)
    server_cert, server_key = _make_server(ca, server_names, days, key_type, rsa_bits)
    _write(d / CA_KEY, _key_pem(ca.key), 0o600)
    _write(d / CA_CERT, _cert_pem(ca.cert), 0o644)
    _write(d / SERVER_KEY, _key_pem(server_key), 0o600)
    _write(d / SERVER_CERT, _cert_pem(server_cert), 0o644)
    _write_replace(d / CRL, _build_crl(ca, [], 1), 0o644)
    return targets


def issue_server(
    ca_dir: str | os.PathLike[str],
    server_names: Sequence[str] = (),
    days: int = 825,
    force: bool = False,
    key_type: str = "ec",
    rsa_bits: int = 2048,
) -> list[Path]:
    """(Re)issue ``server.pem`` / ``server.key`` from the existing CA in ``ca_dir``."""
    d = Path(ca_dir)
    targets = [d / SERVER_CERT, d / SERVER_KEY]
    _refuse_existing(targets, force)
    ca = _load_ca(d)
    cert, key = _make_server(ca, server_names, days, key_type, rsa_bits)
    _write(d / SERVER_KEY, _key_pem(key), 0o600)
    _write(d / SERVER_CERT, _cert_pem(cert), 0o644)
    return targets


def issue_client(
    ca_dir: str | os.PathLike[str],
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    ous: Sequence[str] = (),
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
    key_type: str = "ec",
    rsa_bits: int = 2048,
    ips: Sequence[str] = (),
    cn: str | None = None,
) -> list[Path]:
    """Issue a client certificate ``CN=name`` (``CN=cn`` when given; no CN when ``cn`` is
    empty), one OU attribute per ``ous`` entry, URI, DNS and IP SANs from ``uris``/``dns``/
    ``ips``, EKU clientAuth, into ``out_dir`` (default: ``ca_dir``) as ``NAME.pem`` and
    ``NAME.key``. Returns the files written."""
    if not _SAFE_NAME.match(name):
        raise PKIError(
            f"client name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
            f"and start with a letter or digit (it is also the file name)"
        )
    if name in ("ca", "server", "crl"):
        raise PKIError(f"client name {name!r} would clash with the CA's own files")
    addresses: list[x509.GeneralName] = []
    for ip in ips:
        try:
            addresses.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PKIError(f"--ip {ip!r} is not an IPv4 or IPv6 address") from None
    d = Path(ca_dir)
    out = Path(out_dir) if out_dir is not None else d
    targets = [out / f"{name}.pem", out / f"{name}.key"]
    _refuse_existing(targets, force)
    ca = _load_ca(d)
    key = _new_key(key_type, rsa_bits)

    common_name = name if cn is None else cn
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    if common_name:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans.extend(x509.DNSName(n) for n in dns)
    sans.extend(addresses)
    if not attrs and not sans:
        raise PKIError(
            f"certificate {name!r} would name nobody: with an empty --cn give --ou, --uri, "
            "--dns or --ip"
        )
    builder = _leaf_builder(ca, x509.Name(attrs), key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
    if sans:
        # RFC 5280 4.2.1.6: with an empty subject the subjectAltName must be critical
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not attrs)
    try:
        cert = builder.sign(ca.key, hashes.SHA256())
    except ValueError as exc:  # e.g. a non-ASCII DNS name
        raise PKIError(f"cannot issue certificate for {name!r}: {exc}") from None
    _write(targets[1], _key_pem(key), 0o600)
    _write(targets[0], _cert_pem(cert), 0o644)
    return targets


def revoke(ca_dir: str | os.PathLike[str], cert_path: str | os.PathLike[str]) -> bool:
    """Add the serial of the certificate at ``cert_path`` to ``ca_dir/crl.pem``.

    The CRL is created if missing, otherwise extended; it is re-signed with a fresh
    next-update 30 days ahead and an incremented CRL number. Returns False when the serial was
    already listed (the CRL is still re-signed). The certificate must have been issued by this
    CA."""
    d = Path(ca_dir)
    ca = _load_ca(d)
    cert = load_cert(cert_path)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{cert_path} was not issued by the CA in {d / CA_CERT}") from None

    revoked: list[x509.RevokedCertificate] = []
    number = 0
    crl_path = d / CRL
    if crl_path.exists():
        crl = _load_crl(ca, crl_path)
        revoked = list(crl)
        number = _crl_number(crl)
    added = all(r.serial_number != cert.serial_number for r in revoked)
    if added:
        revoked.append(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_now())
            .build()
        )
    _write_replace(crl_path, _build_crl(ca, revoked, number + 1), 0o644)
    return added


def refresh_crl(ca_dir: str | os.PathLike[str], min_days_left: float = 7.0) -> bool:
    """Re-sign ``ca_dir/crl.pem`` (creating it empty if missing) when it expires within
    ``min_days_left`` days. Returns True if it was written. A proxy checking an expired CRL
    refuses every client, so long-lived development setups call this now and then."""
    d = Path(ca_dir)
    ca = _load_ca(d)
    crl_path = d / CRL
    revoked: list[x509.RevokedCertificate] = []
    number = 0
    if crl_path.exists():
        crl = _load_crl(ca, crl_path)
        next_update = crl.next_update_utc
        if next_update is not None and next_update - _now() > dt.timedelta(days=min_days_left):
            return False
        revoked = list(crl)
        number = _crl_number(crl)
    _write_replace(crl_path, _build_crl(ca, revoked, number + 1), 0o644)
    return True


def ensure_dev_pki(directory: str | os.PathLike[str]) -> list[Path]:
    """Create whatever is missing of: the CA, the server certificate, ``crl.pem`` and a client
    certificate ``dev-client`` (OU ``dev``). Existing files are kept; a CRL close to expiry is
    re-signed. A half-present pair (only the certificate or only the key) is an error, never
    silently replaced. Returns the files written (empty when everything was there)."""
    d = Path(directory)
    written: list[Path] = []
    if not (d / CA_CERT).exists() or not (d / CA_KEY).exists():
        return init_ca_and_server(d) + issue_client(d, DEV_CLIENT, ous=["dev"])
    if not (d / SERVER_CERT).exists() or not (d / SERVER_KEY).exists():
        written += issue_server(d)
    if not (d / f"{DEV_CLIENT}.pem").exists() or not (d / f"{DEV_CLIENT}.key").exists():
        written += issue_client(d, DEV_CLIENT, ous=["dev"])
    if refresh_crl(d):
        written.append(d / CRL)
    return written

"""Certificates the ``certs`` command never makes (expired, not yet valid, wrong or no EKU,
expiring in a few seconds, several CNs, raw non-ASCII or dot-segment SANs, intermediate CAs),
built with ``cryptography`` directly and signed by a test CA directory (``ca.pem`` / ``ca.key``
as written by ``proxy.certs.init_ca_and_server`` or ``make_ca``); and ``identity``, the
``Identity`` the proxy would read from a certificate, for tests without one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from proxy.identity import Identity


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def identity(
    *,
    cn: str | None = None,
    ous: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    subject: str = "",
    fingerprint: str = "sha256:" + "cd" * 32,
    spki: str = "sha256:" + "34" * 32,
    issuer: str | None = None,
    issuer_fingerprint: str | None = None,
    refusal: str | None = None,
) -> Identity:
    """A certificate's ``Identity`` made directly (serial 1, valid until 2030), for the pure
    ACL, lookup and explain tests."""
    return Identity(
        subject=subject,
        cn=cn,
        ous=ous,
        dns=dns,
        uris=uris,
        ips=ips,
        fingerprint=fingerprint,
        spki=spki,
        serial=1,
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        issuer=issuer,
        issuer_fingerprint=issuer_fingerprint,
        refusal=refusal,
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The certificate and key of the CA directory ``ca_dir`` (``ca.pem``, ``ca.key``)."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return ca_cert, ca_key


def _key_usage(ca: bool) -> x509.KeyUsage:
    """digitalSignature, plus keyCertSign and cRLSign for a CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_client_cert(
    ca_dir: Path,
    out_dir: Path,
    file_name: str,
    *,
    cn: str,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    san_der: bytes | None = None,
    extra_cns: Sequence[str] = (),
    ous: Sequence[str] = (),
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> tuple[str, str]:
    """Write ``out_dir/file_name.pem`` and ``.key`` (ECDSA P-256) for ``CN=cn`` signed by the CA
    in ``ca_dir``; ``eku=None`` leaves the EKU extension out, ``extra_cns`` adds more CN
    attributes after the first, ``ous`` OU attributes, ``dns``/``uris`` SANs written as given
    (no IDNA or URI validation: non-ASCII and dot segments go in raw). ``san_der`` is the DER
    value of a subjectAltName extension written as given, unchecked (``cryptography`` would
    refuse to build a malformed one); it replaces ``dns``/``uris``. Validity defaults to five
    minutes ago .. thirty days ahead. Returns (cert path, key path)."""
    now = utcnow()
    not_before = not_before or now - dt.timedelta(minutes=5)
    not_after = not_after or now + dt.timedelta(days=30)
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in (cn, *extra_cns)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san_der is not None:
        raw = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san_der)
        builder = builder.add_extension(raw, critical=False)
    else:
        sans: list[x509.GeneralName] = [x509.DNSName._init_without_validation(d) for d in dns]
        sans += [x509.UniformResourceIdentifier._init_without_validation(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / f"{file_name}.pem"
    key_path = out_dir / f"{file_name}.key"
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_crl(
    ca_dir: Path,
    path: Path,
    *,
    last_update: dt.datetime,
    next_update: dt.datetime,
    revoked_serials: Sequence[int] = (),
) -> None:
    """Write a PEM CRL signed by the CA in ``ca_dir`` (for instance an already expired one)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(next_update)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(last_update)
            .build()
        )
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def make_ca(
    out_dir: Path,
    cn: str,
    *,
    issuer_dir: Path | None = None,
    path_length: int | None = None,
) -> x509.Certificate:
    """Write a CA directory ``out_dir`` (``ca.pem``, ``ca.key``; ECDSA P-256) for ``CN=cn``:
    a self-signed root, or with ``issuer_dir`` an intermediate signed by that directory's CA.
    ``make_client_cert``, ``make_crl`` and ``proxy.certs.issue_client`` can sign with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signing_key, issuer_public = name, key, key.public_key()
    if issuer_dir is not None:
        parent, parent_key = _load_ca(issuer_dir)
        issuer_name, signing_key = parent.subject, parent_key
        issuer_public = parent_key.public_key()
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
        .sign(signing_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ca.key").write_bytes(_key_pem(key))
    (out_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert

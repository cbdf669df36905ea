"""Tests for proxy.identity: real certificates built in-test with ``cryptography``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.identity import Identity, identity_from_der

NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2034, 1, 1, 12, 30, tzinfo=dt.UTC)

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])


def make_cert(
    *,
    attrs: list[tuple[x509.ObjectIdentifier, str]] | None = None,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    serial: int = 4242,
) -> tuple[bytes, x509.Certificate]:
    """A CA-signed client certificate; returns (DER, parsed)."""
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(oid, value) for oid, value in (attrs or [])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(_CA_NAME)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(_CA_KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER), cert


def spki_pin(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def test_full_identity() -> None:
    der, cert = make_cert(
        attrs=[
            (NameOID.COUNTRY_NAME, "DE"),
            (NameOID.ORGANIZATION_NAME, "Example"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "eng"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
            (NameOID.COMMON_NAME, "billing"),
        ],
        dns=("billing.example.com", "billing.internal"),
        uris=("spiffe://example.org/ns/prod/sa/billing",),
        ips=("10.1.2.3", "2001:db8::1"),
        serial=123456789,
    )
    ident = identity_from_der(der)
    assert ident.cn == "billing"
    assert ident.ous == ("eng", "payments")
    assert ident.dns == ("billing.example.com", "billing.internal")
    assert ident.uris == ("spiffe://example.org/ns/prod/sa/billing",)
    assert ident.ips == ("10.1.2.3", "2001:db8::1")
    assert ident.subject == cert.subject.rfc4514_string()
    assert "CN=billing" in ident.subject and "OU=payments" in ident.subject
    assert ident.serial == 123456789
    assert ident.not_after == NOT_AFTER
    assert ident.not_after.utcoffset() == dt.timedelta(0)
    assert ident.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ident.fingerprint == "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    assert ident.spki == spki_pin(cert)


def test_rsa_key_spki_matches_reencoding() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der, cert = make_cert(attrs=[(NameOID.COMMON_NAME, "rsa")], key=key)
    ident = identity_from_der(der)
    assert ident.spki == spki_pin(cert)
    assert ident.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()


def test_reissued_cert_keeps_spki_changes_fingerprint() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der1, _ = make_cert(attrs=[(NameOID.COMMON_NAME, "a")], key=key, serial=1)
    der2, _ = make_cert(attrs=[(NameOID.COMMON_NAME, "a")], key=key, serial=2)
    one, two = identity_from_der(der1), identity_from_der(der2)
    assert one.spki == two.spki
    assert one.fingerprint != two.fingerprint


def test_no_subject_no_sans() -> None:
    ident = identity_from_der(make_cert()[0])
    assert ident.cn is None
    assert ident.ous == ()
    assert ident.dns == ident.uris == ident.ips == ()
    assert ident.subject == ""


def test_first_cn_wins_and_sans_without_cn() -> None:
    ident = identity_from_der(
        make_cert(attrs=[(NameOID.COMMON_NAME, "first"), (NameOID.COMMON_NAME, "second")])[0]
    )
    assert ident.cn == "first"
    assert ident.refusal is not None and "2 common names" in ident.refusal  # names no one
    only_uri = identity_from_der(make_cert(uris=("spiffe://example.org/w",))[0])
    assert only_uri.cn is None and only_uri.uris == ("spiffe://example.org/w",)


def test_pins_are_lowercase_hex() -> None:
    ident = identity_from_der(make_cert(attrs=[(NameOID.COMMON_NAME, "x")])[0])
    for pin in (ident.fingerprint, ident.spki):
        prefix, digest = pin.split(":")
        assert prefix == "sha256"
        assert len(digest) == 64 and digest == digest.lower()
        int(digest, 16)


def test_describe() -> None:
    ident = identity_from_der(
        make_cert(
            attrs=[
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "eng"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"),
                (NameOID.COMMON_NAME, "billing"),
            ]
        )[0]
    )
    text = ident.describe()
    assert text == f"CN=billing OU=eng,ops {ident.fingerprint[:23]}..."


def test_describe_falls_back_to_sans_and_escapes() -> None:
    uri_only = identity_from_der(make_cert(uris=("spiffe://example.org/a",))[0])
    assert uri_only.describe().startswith("URI=spiffe://example.org/a sha256:")
    dns_only = identity_from_der(make_cert(dns=("w.example.com",))[0])
    assert dns_only.describe().startswith("DNS=w.example.com sha256:")
    ip_only = identity_from_der(make_cert(ips=("10.0.0.9",))[0])
    assert ip_only.describe().startswith("IP=10.0.0.9 sha256:")
    bare = identity_from_der(make_cert()[0])
    assert bare.describe().startswith("sha256:")
    hostile = identity_from_der(make_cert(attrs=[(NameOID.COMMON_NAME, "evil\nCN=admin é\\")])[0])
    text = hostile.describe()
    assert "\n" not in text and " CN=admin" not in text
    assert text.startswith("CN=evil\\x0aCN=admin\\x20\\xe9\\\\ ")


def test_identity_is_frozen() -> None:
    ident = identity_from_der(make_cert(attrs=[(NameOID.COMMON_NAME, "x")])[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.cn = "y"  # type: ignore[misc]
    assert isinstance(ident, Identity)


@pytest.mark.parametrize("junk", [b"", b"\x30\x03\x02\x01", b"not a certificate", b"\x00" * 64])
def test_garbage_raises_value_error(junk: bytes) -> None:
    with pytest.raises(ValueError):
        identity_from_der(junk)


def test_truncated_der_raises_value_error() -> None:
    der, _ = make_cert(attrs=[(NameOID.COMMON_NAME, "x")])
    with pytest.raises(ValueError):
        identity_from_der(der[:-10])

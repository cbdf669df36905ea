"""Tests for proxy.certs: the development PKI is loadable, verifiable by OpenSSL, revocable,
and careful with private keys and existing files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs
from proxy.certs import (
    PKIError,
    ensure_dev_pki,
    init_ca_and_server,
    issue_client,
    load_cert,
    refresh_crl,
    revoke,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")


def openssl_verify(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", *args], capture_output=True, text=True, check=False, timeout=60
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_key(path: Path) -> object:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def spki(key_or_cert: object) -> bytes:
    public = key_or_cert.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_ca_and_server(d, ["proxy.example.org", "10.1.2.3"])
    return d


def test_init_writes_ca_server_and_empty_crl(ca_dir: Path) -> None:
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "crl.pem"):
        assert (ca_dir / name).is_file(), name
    ca = load_cert(ca_dir / "ca.pem")
    server = load_cert(ca_dir / "server.pem")
    assert isinstance(load_key(ca_dir / "ca.key"), ec.EllipticCurvePrivateKey)
    assert spki(load_key(ca_dir / "ca.key")) == spki(ca)
    assert spki(load_key(ca_dir / "server.key")) == spki(server)

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign

    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "proxy.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 824 <= days <= 826
    assert ca.not_valid_after_utc >= server.not_valid_after_utc

    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_private_keys_are_mode_0600_and_certs_0644(ca_dir: Path) -> None:
    issue_client(ca_dir, "alice")
    for name in ("ca.key", "server.key", "alice.key"):
        assert mode(ca_dir / name) == 0o600, name
    for name in ("ca.pem", "server.pem", "alice.pem", "crl.pem"):
        assert mode(ca_dir / name) == 0o644, name


def test_forced_overwrite_does_not_inherit_loose_permissions(ca_dir: Path) -> None:
    os.chmod(ca_dir / "server.key", 0o666)
    init_ca_and_server(ca_dir, [], force=True)
    assert mode(ca_dir / "server.key") == 0o600


def test_keys_are_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_ca_and_server(tmp_path / "u", [])
    finally:
        os.umask(old)
    assert mode(tmp_path / "u" / "ca.key") == 0o600
    assert mode(tmp_path / "u" / "server.key") == 0o600


def test_init_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    with pytest.raises(PKIError, match="refusing to overwrite") as info:
        init_ca_and_server(ca_dir, [])
    assert "ca.pem" in str(info.value)
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


def test_init_refuses_if_any_single_target_exists(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    (d / "server.key").write_text("precious")
    with pytest.raises(PKIError, match=r"server\.key"):
        init_ca_and_server(d, [])
    assert (d / "server.key").read_text() == "precious"
    assert not (d / "ca.pem").exists()  # nothing written before the check failed


def test_init_force_replaces_the_ca(ca_dir: Path) -> None:
    old = load_cert(ca_dir / "ca.pem")
    init_ca_and_server(ca_dir, [], force=True)
    new = load_cert(ca_dir / "ca.pem")
    assert old.serial_number != new.serial_number
    assert spki(old) != spki(new)


def test_issue_client_subject_sans_and_eku(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clients"
    written = issue_client(
        ca_dir,
        "billing",
        out_dir=out,
        ous=["eng", "payments"],
        uris=["spiffe://example.org/billing/api"],
        dns=["billing.internal"],
        days=30,
    )
    assert written == [out / "billing.pem", out / "billing.key"]
    cert = load_cert(out / "billing.pem")
    assert spki(load_key(out / "billing.key")) == spki(cert)
    assert mode(out / "billing.key") == 0o600
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    subject = cert.subject
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["billing"]
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [
        "eng",
        "payments",
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/billing/api"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["billing.internal"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (29, 30)
    assert not (ca_dir / "billing.pem").exists()


def test_issue_client_without_sans_has_no_san_extension(ca_dir: Path) -> None:
    issue_client(ca_dir, "plain")
    cert = load_cert(ca_dir / "plain.pem")
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issue_client_rsa(ca_dir: Path) -> None:
    issue_client(ca_dir, "legacy", key_type="rsa")
    key = load_key(ca_dir / "legacy.key")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    ku = load_cert(ca_dir / "legacy.pem").extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment


def test_rsa_pki(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path / "r", [], key_type="rsa", rsa_bits=3072)
    key = load_key(tmp_path / "r" / "server.key")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072


def test_bad_key_parameters_rejected(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="RSA key size"):
        init_ca_and_server(tmp_path / "a", [], key_type="rsa", rsa_bits=1024)
    with pytest.raises(PKIError, match="key type"):
        init_ca_and_server(tmp_path / "b", [], key_type="dsa")


def test_client_validity_never_exceeds_the_ca(ca_dir: Path) -> None:
    issue_client(ca_dir, "forever", days=100000)
    ca = load_cert(ca_dir / "ca.pem")
    assert load_cert(ca_dir / "forever.pem").not_valid_after_utc <= ca.not_valid_after_utc


def test_issue_client_refuses_to_overwrite(ca_dir: Path) -> None:
    issue_client(ca_dir, "bob")
    first = (ca_dir / "bob.pem").read_bytes()
    with pytest.raises(PKIError, match="refusing to overwrite"):
        issue_client(ca_dir, "bob")
    assert (ca_dir / "bob.pem").read_bytes() == first
    issue_client(ca_dir, "bob", force=True)
    assert (ca_dir / "bob.pem").read_bytes() != first


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", ".hidden", "x" * 65, "ca", "server", "sp ace"]
)
def test_issue_client_rejects_unsafe_names(ca_dir: Path, name: str) -> None:
    with pytest.raises(PKIError):
        issue_client(ca_dir, name)


def test_issue_client_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="cannot read certificate"):
        issue_client(tmp_path / "nothing", "alice")


def test_issue_client_rejects_mismatched_ca_key(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    (ca_dir / "ca.key").unlink()
    shutil.copy(other / "ca.key", ca_dir / "ca.key")
    with pytest.raises(PKIError, match="does not match"):
        issue_client(ca_dir, "alice")


def test_revoke_adds_serial_and_extends_crl(ca_dir: Path) -> None:
    issue_client(ca_dir, "a")
    issue_client(ca_dir, "b")
    ca = load_cert(ca_dir / "ca.pem")
    a, b = load_cert(ca_dir / "a.pem"), load_cert(ca_dir / "b.pem")

    assert revoke(ca_dir, ca_dir / "a.pem") is True
    crl1 = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl1.get_revoked_certificate_by_serial_number(a.serial_number) is not None
    assert crl1.get_revoked_certificate_by_serial_number(b.serial_number) is None

    assert revoke(ca_dir, ca_dir / "b.pem") is True
    crl2 = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert {r.serial_number for r in crl2} == {a.serial_number, b.serial_number}
    assert crl2.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl2.issuer == ca.subject
    number = crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > crl1.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl2.next_update_utc is not None
    left = crl2.next_update_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < left <= dt.timedelta(days=30)
    assert mode(ca_dir / "crl.pem") == 0o644

    # revoking again is idempotent
    assert revoke(ca_dir, ca_dir / "a.pem") is False
    crl3 = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl3) == 2


def test_revoke_creates_missing_crl(ca_dir: Path) -> None:
    issue_client(ca_dir, "a")
    (ca_dir / "crl.pem").unlink()
    assert revoke(ca_dir, ca_dir / "a.pem") is True
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl) == 1


def test_revoke_refuses_foreign_certificate(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    issue_client(other, "stranger")
    before = (ca_dir / "crl.pem").read_bytes()
    with pytest.raises(PKIError, match="not issued by the CA"):
        revoke(ca_dir, other / "stranger.pem")
    assert (ca_dir / "crl.pem").read_bytes() == before


def test_revoke_refuses_crl_of_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    shutil.copy(other / "crl.pem", ca_dir / "crl.pem")
    issue_client(ca_dir, "a")
    with pytest.raises(PKIError, match=r"crl\.pem was not issued"):
        revoke(ca_dir, ca_dir / "a.pem")


def test_load_cert_pem_der_and_garbage(ca_dir: Path, tmp_path: Path) -> None:
    pem = load_cert(ca_dir / "ca.pem")
    der_path = tmp_path / "ca.der"
    der_path.write_bytes(pem.public_bytes(serialization.Encoding.DER))
    assert load_cert(der_path) == pem
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(PKIError, match="not a valid PEM or DER"):
        load_cert(junk)
    with pytest.raises(PKIError, match="cannot read"):
        load_cert(tmp_path / "missing.pem")


def test_ensure_dev_pki_creates_everything_once(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    written = ensure_dev_pki(d)
    names = {p.name for p in written}
    assert names == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "crl.pem",
        "dev-client.pem",
        "dev-client.key",
    }
    client = load_cert(d / "dev-client.pem")
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-client"
    assert client.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "dev"
    snapshot = {p.name: p.read_bytes() for p in d.iterdir()}
    assert ensure_dev_pki(d) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == snapshot


def test_ensure_dev_pki_fills_in_missing_parts(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    ensure_dev_pki(d)
    ca_before = (d / "ca.pem").read_bytes()
    (d / "dev-client.pem").unlink()
    (d / "dev-client.key").unlink()
    (d / "server.pem").unlink()
    (d / "server.key").unlink()
    written = {p.name for p in ensure_dev_pki(d)}
    assert written == {"server.pem", "server.key", "dev-client.pem", "dev-client.key"}
    assert (d / "ca.pem").read_bytes() == ca_before
    load_cert(d / "server.pem").verify_directly_issued_by(load_cert(d / "ca.pem"))


def test_ensure_dev_pki_refuses_half_a_pair(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    ensure_dev_pki(d)
    (d / "dev-client.key").unlink()
    with pytest.raises(PKIError, match=r"dev-client\.pem"):
        ensure_dev_pki(d)


def test_refresh_crl_only_when_close_to_expiry(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issue_client(ca_dir, "a")
    revoke(ca_dir, ca_dir / "a.pem")
    before = (ca_dir / "crl.pem").read_bytes()
    assert refresh_crl(ca_dir) is False
    assert (ca_dir / "crl.pem").read_bytes() == before

    real_now = certs._now
    monkeypatch.setattr(certs, "_now", lambda: real_now() + dt.timedelta(days=25))
    assert refresh_crl(ca_dir) is True
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl) == 1  # revocations survive re-signing
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > real_now() + dt.timedelta(days=54)


@needs_openssl
def test_openssl_verifies_chain_and_honours_revocation(ca_dir: Path) -> None:
    issue_client(ca_dir, "client", ous=["dev"], uris=["spiffe://x/y"])
    ca, client, crl = (str(ca_dir / n) for n in ("ca.pem", "client.pem", "crl.pem"))

    ok = openssl_verify("-CAfile", ca, client)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    server = openssl_verify("-CAfile", ca, "-purpose", "sslserver", str(ca_dir / "server.pem"))
    assert server.returncode == 0, server.stderr
    as_client = openssl_verify("-CAfile", ca, "-purpose", "sslclient", client)
    assert as_client.returncode == 0, as_client.stderr

    before = openssl_verify("-crl_check", "-CRLfile", crl, "-CAfile", ca, client)
    assert before.returncode == 0, before.stderr

    revoke(ca_dir, client)
    after = openssl_verify("-crl_check", "-CRLfile", crl, "-CAfile", ca, client)
    assert after.returncode != 0
    assert "revoked" in (after.stdout + after.stderr)

    # an unrelated certificate of the same CA is still fine with the same CRL
    issue_client(ca_dir, "other")
    other = openssl_verify("-crl_check", "-CRLfile", crl, "-CAfile", ca, str(ca_dir / "other.pem"))
    assert other.returncode == 0, other.stderr


@needs_openssl
def test_openssl_rejects_client_of_other_ca(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    issue_client(other, "stranger")
    res = openssl_verify("-CAfile", str(ca_dir / "ca.pem"), str(other / "stranger.pem"))
    assert res.returncode != 0

"""Tests for proxy.tlsctx: hardened contexts that really handshake (in memory, no sockets),
refuse the clients they must refuse, and report file problems by config key."""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import certs
from proxy.certs import init_ca_and_server, issue_client, refresh_crl, revoke
from proxy.config import TLSConfig
from proxy.errors import ConfigError
from proxy.tlsctx import client_context, server_context

SOURCE = "proxy.yaml"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_ca_and_server(d, [])
    issue_client(d, "alice", ous=["dev"])
    return d


def tls_for(d: Path, **changes: object) -> TLSConfig:
    base = TLSConfig(
        cert=str(d / "server.pem"),
        key=str(d / "server.key"),
        client_ca=str(d / "ca.pem"),
        crl=(),
        min_version="1.2",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def client_for(d: Path, name: str = "alice") -> ssl.SSLContext:
    return client_context(str(d / "ca.pem"), str(d / f"{name}.pem"), str(d / f"{name}.key"))


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Complete a handshake over memory BIOs and move one application byte string each way
    (in TLS 1.3 the server checks the client certificate after the client thinks it is done).
    Raises ssl.SSLError from whichever side fails."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)

    def pump() -> None:
        if data := c_out.read():
            s_in.write(data)
        if data := s_out.read():
            c_in.write(data)

    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        pump()
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    client.write(b"ping")
    pump()
    assert server.read(4) == b"ping"
    server.write(b"pong")
    pump()
    assert client.read(4) == b"pong"
    return server, client


def expect(tls: TLSConfig, key: str, fragment: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        server_context(tls, source=SOURCE)
    assert info.value.source == SOURCE
    assert info.value.key == key
    assert fragment in info.value.reason
    return info.value


# ------------------------------------------------------------------------------ good contexts


def test_server_context_settings(pki: Path) -> None:
    ctx = server_context(tls_for(pki), source=SOURCE)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert not ctx.check_hostname
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for name in tls12:
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_tls13_minimum(pki: Path) -> None:
    ctx = server_context(tls_for(pki, min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    old_client = client_for(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(ctx, old_client)
    server, _ = handshake(ctx, client_for(pki))
    assert server.version() == "TLSv1.3"


def test_mutual_tls_handshake_gives_the_client_certificate(pki: Path) -> None:
    server, client = handshake(server_context(tls_for(pki)), client_for(pki))
    der = server.getpeercert(binary_form=True)
    assert der is not None
    assert x509.load_der_x509_certificate(der) == certs.load_cert(pki / "alice.pem")
    assert client.version() == "TLSv1.3"


def test_tls12_uses_forward_secret_aead(pki: Path) -> None:
    client = client_for(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    server, _ = handshake(server_context(tls_for(pki)), client)
    assert server.version() == "TLSv1.2"
    cipher = server.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-ECDSA-")


@pytest.mark.parametrize(
    "suite",
    [
        "AES128-GCM-SHA256",  # static RSA key exchange: no forward secrecy
        "ECDHE-RSA-AES128-SHA256",  # forward secret but CBC, not AEAD (Python's default allows it)
    ],
)
def test_tls12_weak_suites_refused(tmp_path: Path, suite: str) -> None:
    d = tmp_path / "rsa"
    init_ca_and_server(d, [], key_type="rsa")
    issue_client(d, "alice", key_type="rsa")
    client = client_for(d)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(suite)
    with pytest.raises(ssl.SSLError):
        handshake(server_context(tls_for(d)), client)
    good = client_for(d)
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    server, _ = handshake(server_context(tls_for(d)), good)
    cipher = server.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-RSA-")


def test_client_without_certificate_refused(pki: Path) -> None:
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with pytest.raises(ssl.SSLError):
        handshake(server_context(tls_for(pki)), anonymous)


def test_client_of_another_ca_refused(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    issue_client(other, "mallory")
    mallory = client_context(
        str(pki / "ca.pem"), str(other / "mallory.pem"), str(other / "mallory.key")
    )
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(server_context(tls_for(pki)), mallory)


def test_revoked_client_refused_with_pem_crl(pki: Path) -> None:
    issue_client(pki, "bob")
    revoke(pki, pki / "bob.pem")
    ctx = server_context(tls_for(pki, crl=(str(pki / "crl.pem"),)))
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(ctx, client_for(pki, "bob"))
    handshake(ctx, client_for(pki, "alice"))  # not revoked: fine


def test_revoked_client_refused_with_der_crl(pki: Path, tmp_path: Path) -> None:
    issue_client(pki, "bob")
    revoke(pki, pki / "bob.pem")
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    der = tmp_path / "crl.der"
    der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    ctx = server_context(tls_for(pki, crl=(str(der),)))
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(ctx, client_for(pki, "bob"))
    handshake(ctx, client_for(pki, "alice"))


def test_revocation_is_not_checked_without_crl(pki: Path) -> None:
    issue_client(pki, "bob")
    revoke(pki, pki / "bob.pem")
    handshake(server_context(tls_for(pki)), client_for(pki, "bob"))


def test_crl_check_fails_closed_for_issuer_without_crl(pki: Path, tmp_path: Path) -> None:
    # Two client CAs, a CRL for the first only, leaf checks: clients of the second are refused.
    # (With the default crl_check: chain the same configuration does not load at all:
    # tests/test_identity_exact.py.)
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    issue_client(other, "carol")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    ctx = server_context(
        tls_for(pki, client_ca=str(bundle), crl=(str(pki / "crl.pem"),), crl_check="leaf")
    )
    handshake(ctx, client_for(pki, "alice"))
    carol = client_context(str(pki / "ca.pem"), str(other / "carol.pem"), str(other / "carol.key"))
    with pytest.raises(ssl.SSLError, match="CRL"):
        handshake(ctx, carol)


def test_client_context_checks_hostname(pki: Path) -> None:
    server_ctx = server_context(tls_for(pki))
    with pytest.raises(ssl.SSLError, match=r"match|mismatch"):
        handshake(server_ctx, client_for(pki), hostname="not-the-server.example")
    lax = client_context(
        str(pki / "ca.pem"),
        str(pki / "alice.pem"),
        str(pki / "alice.key"),
        server_hostname_check=False,
    )
    assert lax.check_hostname is False
    handshake(server_ctx, lax, hostname="not-the-server.example")


def test_client_context_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        client_context(str(pki / "ca.pem"), str(tmp_path / "none.pem"), str(pki / "alice.key"))
    assert info.value.key == "--cert"
    with pytest.raises(ConfigError) as info:
        client_context(str(pki / "ca.pem"), str(pki / "alice.pem"), str(pki / "server.key"))
    assert info.value.key == "--key" and "does not match" in info.value.reason
    with pytest.raises(ConfigError) as info:
        client_context(str(tmp_path / "ca.pem"), str(pki / "alice.pem"), str(pki / "alice.key"))
    assert info.value.key == "--ca"


# ------------------------------------------------------------------------------ errors


def test_missing_files_name_their_key(pki: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    expect(tls_for(pki, cert=missing), "tls.cert", "does not exist")
    expect(tls_for(pki, key=missing), "tls.key", "does not exist")
    expect(tls_for(pki, client_ca=missing), "tls.client_ca", "does not exist")
    expect(tls_for(pki, crl=(missing,)), "tls.crl", "does not exist")
    expect(tls_for(pki, crl=(str(pki / "crl.pem"), missing)), "tls.crl[1]", "does not exist")


def test_missing_file_message_mentions_working_directory(pki: Path) -> None:
    err = expect(tls_for(pki, cert="relative/nowhere.pem"), "tls.cert", "relative/nowhere.pem")
    assert "working directory" in err.reason


def test_directory_instead_of_file(pki: Path) -> None:
    expect(tls_for(pki, client_ca=str(pki)), "tls.client_ca", "is a directory")


def test_key_not_matching_cert(pki: Path) -> None:
    err = expect(tls_for(pki, key=str(pki / "alice.key")), "tls.key", "does not match")
    assert "server.pem" in err.reason


def test_key_file_given_as_cert_and_vice_versa(pki: Path) -> None:
    expect(tls_for(pki, cert=str(pki / "server.key")), "tls.cert", "no PEM certificate")
    expect(tls_for(pki, key=str(pki / "server.pem")), "tls.key", "no PEM private key")


def test_malformed_pem(pki: Path, tmp_path: Path) -> None:
    bad_cert = tmp_path / "bad.pem"
    bad_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    expect(tls_for(pki, cert=str(bad_cert)), "tls.cert", "malformed")
    expect(tls_for(pki, client_ca=str(bad_cert)), "tls.client_ca", "malformed")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    expect(tls_for(pki, key=str(bad_key)), "tls.key", "malformed")
    bad_crl = tmp_path / "bad.crl"
    bad_crl.write_bytes(b"\x30\x03garbage")
    expect(tls_for(pki, crl=(str(bad_crl),)), "tls.crl", "not a valid PEM or DER CRL")


def test_encrypted_key_rejected(pki: Path, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    expect(tls_for(pki, key=str(enc)), "tls.key", "encrypted")


def test_unsupported_key_type(pki: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    raw = tmp_path / "x.key"
    raw.write_bytes(
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    expect(tls_for(pki, key=str(raw)), "tls.key", "unsupported")


def test_expired_server_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = certs._now
    monkeypatch.setattr(certs, "_now", lambda: real_now() - dt.timedelta(days=100))
    d = tmp_path / "old"
    init_ca_and_server(d, [], days=10)
    monkeypatch.setattr(certs, "_now", real_now)
    expect(tls_for(d), "tls.cert", "expired")


def test_not_yet_valid_server_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = certs._now
    monkeypatch.setattr(certs, "_now", lambda: real_now() + dt.timedelta(days=3))
    d = tmp_path / "future"
    init_ca_and_server(d, [])
    monkeypatch.setattr(certs, "_now", real_now)
    expect(tls_for(d), "tls.cert", "not valid before")


def test_expired_crl(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = certs._now
    monkeypatch.setattr(certs, "_now", lambda: real_now() - dt.timedelta(days=40))
    assert refresh_crl(pki, min_days_left=10000)
    monkeypatch.setattr(certs, "_now", real_now)
    expect(tls_for(pki, crl=(str(pki / "crl.pem"),)), "tls.crl", "expired")


def test_crl_of_unrelated_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca_and_server(other, [])
    # Same subject name as our CA (both are "beanstalk-proxy dev CA") but another key:
    expect(tls_for(pki, crl=(str(other / "crl.pem"),)), "tls.crl", "does not verify")


def test_crl_issuer_not_in_client_ca(pki: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Somebody Else CA")])
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "foreign.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    expect(tls_for(pki, crl=(str(path),)), "tls.crl", "not a certificate in tls.client_ca")


def test_bad_min_version(pki: Path) -> None:
    expect(tls_for(pki, min_version="1.1"), "tls.min_version", "1.2")


def test_cert_chain_file_with_intermediate_accepted(pki: Path, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes((pki / "server.pem").read_bytes() + (pki / "ca.pem").read_bytes())
    handshake(server_context(tls_for(pki, cert=str(chain))), client_for(pki))


def test_reloaded_files_take_effect(pki: Path, tmp_path: Path) -> None:
    """A second server_context() call reads the files again (what SIGHUP relies on)."""
    issue_client(pki, "bob")
    crl_path = str(pki / "crl.pem")
    first = server_context(tls_for(pki, crl=(crl_path,)))
    revoke(pki, pki / "bob.pem")
    handshake(first, client_for(pki, "bob"))  # the old context still has the old CRL
    second = server_context(tls_for(pki, crl=(crl_path,)))
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(second, client_for(pki, "bob"))
    shutil.rmtree(tmp_path / "pki")

"""Identities compared as the standards say, and revocation along the whole chain (issue 10,
items 3 and 4).

Pure tests (``proxy.identity``, the matching part of ``proxy.acl``, ``proxy.tlsctx``'s chain
rebuilding and CRL checks) on certificates made here, then the same cases through a running
proxy with real TLS and a real beanstalkd: a DNS SAN spelled with the Kelvin sign, IDNA names,
two CNs, no EKU (refused, unless ``tls.require_client_auth_eku: false``), URIs with dot
segments and percent-encoded dots, principals bound to one of two CAs with ``issuer``, and a
leaf under an intermediate that the root's CRL revokes (refused at the handshake, and a live
connection closed by the CRL reload), cross-checked with ``openssl verify -crl_check_all``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import (
    PKI,
    Beanstalkd,
    LogWatch,
    RunningProxy,
    make_config,
    server_stats,
    tls_attempt,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pki_helpers import make_ca, make_client_cert, make_crl, utcnow

from proxy.acl import parse_acl
from proxy.certs import ensure_dev_pki
from proxy.cli import main
from proxy.config import Config, TLSConfig, parse_config
from proxy.errors import ConfigError
from proxy.identity import Identity, dns_match_form, identity_from_der, uri_match_form
from proxy.relay import PolicyHolder, ProxyServer
from proxy.tlsctx import rebuild_chain, revocation_check, server_context

KELVIN = "\u212a"  # KELVIN SIGN; Python's str.lower() turns it into an ASCII "k"


def load(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def der(path: str | Path) -> bytes:
    return load(path).public_bytes(serialization.Encoding.DER)


def fp(path: str | Path) -> str:
    return "sha256:" + load(path).fingerprint(hashes.SHA256()).hex()


def acl_for(*principals: dict[str, Any]) -> dict[str, Any]:
    """Each principal may do everything on every tube."""
    return {
        "principals": list(principals),
        "rules": [{"principal": p["name"], "tubes": ["*"], "allow": ["all"]} for p in principals],
    }


def principal_of(ident: Identity, *principals: dict[str, Any]) -> str | None:
    return parse_acl(acl_for(*principals), "<test>").principal_for(ident)


def ident_of(cert: str, issuer: str | Path | None = None, **kwargs: Any) -> Identity:
    issuer_der = None if issuer is None else der(issuer)
    return identity_from_der(der(cert), issuer_der=issuer_der, **kwargs)


# --------------------------------------------------------------------------------------------
# DNS names
# --------------------------------------------------------------------------------------------


def test_kelvin_sign_dns_san_does_not_match(pki: PKI, tmp_path: Path) -> None:
    spoof, _ = make_client_cert(pki.dir, tmp_path, "k", cn="x", dns=[f"wor{KELVIN}er.x.com"])
    real, _ = make_client_cert(pki.dir, tmp_path, "r", cn="x", dns=["WORKER.x.com"])
    worker = {"name": "worker", "match": {"dns": "worker.x.com"}}
    star = {"name": "any-x", "match": {"dns": "*.x.com"}}
    assert ident_of(spoof).dns == (f"wor{KELVIN}er.x.com",)  # what the certificate says
    assert principal_of(ident_of(spoof), worker) is None
    assert principal_of(ident_of(spoof), star) is None  # non-ASCII never matches, not even '*'
    assert principal_of(ident_of(real), worker) == "worker"  # ASCII case folding stays
    assert principal_of(ident_of(real), star) == "any-x"


def test_dns_match_form_folds_ascii_only() -> None:
    assert dns_match_form("Worker.X.COM") == "worker.x.com"
    assert dns_match_form(f"wor{KELVIN}er.x.com") is None
    assert dns_match_form("bücher.example") is None
    assert dns_match_form("İ.example") is None  # U+0130 lowers to "i̇" in Python


def test_non_ascii_dns_pattern_is_rejected_naming_its_a_label() -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(acl_for({"name": "w", "match": {"dns": f"wor{KELVIN}er.x.com"}}), "<t>")
    assert info.value.key == "principals[0].match.dns"
    assert "not ASCII" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_acl(acl_for({"name": "b", "match": {"dns": "bücher.example"}}), "<t>")
    assert "'xn--bcher-kva.example'" in str(info.value)


def test_idna_names_compare_as_a_labels(pki: PKI, tmp_path: Path) -> None:
    alabel, _ = make_client_cert(pki.dir, tmp_path, "a", cn="x", dns=["XN--BCHER-KVA.example"])
    ulabel, _ = make_client_cert(pki.dir, tmp_path, "u", cn="x", dns=["bücher.example"])
    exact = {"name": "buecher", "match": {"dns": "xn--bcher-kva.example"}}
    star = {"name": "example", "match": {"dns": "*.example"}}
    assert principal_of(ident_of(alabel), exact) == "buecher"
    assert principal_of(ident_of(alabel), star) == "example"
    # a U-label written raw into the certificate (IA5String must be ASCII) matches nothing
    assert principal_of(ident_of(ulabel), exact) is None
    assert principal_of(ident_of(ulabel), star) is None


# --------------------------------------------------------------------------------------------
# Common names, organizational units, EKU
# --------------------------------------------------------------------------------------------


def test_two_common_names_are_refused(pki: PKI, tmp_path: Path) -> None:
    cert, _ = make_client_cert(pki.dir, tmp_path, "two", cn="admin", extra_cns=["stranger"])
    ident = ident_of(cert)
    assert ident.refusal is not None and "2 common names" in ident.refusal
    for cn in ("admin", "stranger", "*"):
        assert principal_of(ident, {"name": "p", "match": {"cn": cn}}) is None
    # nor by any other key: a refused certificate names no principal
    assert principal_of(ident, {"name": "p", "match": {"fingerprint": ident.fingerprint}}) is None


def test_several_ous_stay_allowed_and_any_ou_matches(pki: PKI, tmp_path: Path) -> None:
    cert, _ = make_client_cert(pki.dir, tmp_path, "ous", cn="worker", ous=["eng", "jobs"])
    ident = ident_of(cert)
    assert ident.refusal is None and ident.ous == ("eng", "jobs")
    assert principal_of(ident, {"name": "w", "match": {"cn": "worker", "ou": "jobs"}}) == "w"
    assert principal_of(ident, {"name": "w", "match": {"ou": "eng"}}) == "w"
    assert principal_of(ident, {"name": "w", "match": {"ou": "ops"}}) is None


def test_client_auth_eku_is_required_unless_turned_off(pki: PKI, tmp_path: Path) -> None:
    none, _ = make_client_cert(pki.dir, tmp_path, "none", cn="admin", eku=None)
    anyeku, _ = make_client_cert(
        pki.dir, tmp_path, "any", cn="admin", eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
    )
    good, _ = make_client_cert(pki.dir, tmp_path, "good", cn="admin")
    admin = {"name": "admin", "match": {"cn": "admin"}}
    for cert in (none, anyeku):
        ident = ident_of(cert)
        assert ident.refusal is not None and "clientAuth" in ident.refusal
        assert principal_of(ident, admin) is None
        assert principal_of(ident_of(cert, require_client_auth_eku=False), admin) == "admin"
    assert ident_of(good).refusal is None
    assert principal_of(ident_of(good), admin) == "admin"


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------

BILLING = {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}}
BILLING_ANY = {"name": "billing", "match": {"uri": "spiffe://example.org/billing/**"}}

REFUSED_URIS = [
    "spiffe://example.org/billing/..",
    "spiffe://example.org/billing/../ops",
    "spiffe://example.org/billing/.",
    "spiffe://example.org/billing/./api",
    "spiffe://example.org/billing/%2e%2e",
    "spiffe://example.org/billing/%2E%2E/ops",
    "spiffe://example.org/billing/%2e",
    "spiffe://example.org/billing/.%2e/ops",
    "spiffe://example.org/billing/%61pi",  # %61 = "a", an unreserved character
    "spiffe://example.org/billing/api%7e",  # %7e = "~"
    "spiffe://example.org/billing/a%zz",  # malformed escape
    "spiffe://example.org/billing/a%2",
    "spiffe://evil@example.org/billing/api",  # userinfo
    "spiffe://example.org/billing/api?x=1",  # query
    "spiffe://example.org/billing/api#frag",  # fragment
    "spiffe://example.org/billing/a b",  # not a URI character
    "spiffe://example.org/billing/ä",
    "example.org/billing/api",  # no scheme
]


@pytest.mark.parametrize("uri", REFUSED_URIS)
def test_uri_with_dot_segments_or_ambiguous_parts_never_matches(uri: str) -> None:
    assert uri_match_form(uri) is None
    ident = Identity(
        subject="", cn=None, ous=(), dns=(), uris=(uri,), ips=(), fingerprint="sha256:00",
        spki="sha256:00", serial=1, not_after=utcnow(),
    )  # fmt: skip
    assert principal_of(ident, BILLING) is None
    assert principal_of(ident, BILLING_ANY) is None
    assert principal_of(ident, {"name": "any", "match": {"uri": "**"}}) is None


def test_uri_dot_segment_certificate_does_not_match(pki: PKI, tmp_path: Path) -> None:
    for i, uri in enumerate(
        ["spiffe://example.org/billing/..", "spiffe://example.org/billing/%2e%2e/ops"]
    ):
        cert, _ = make_client_cert(pki.dir, tmp_path, f"u{i}", cn="x", uris=[uri])
        assert principal_of(ident_of(cert), BILLING) is None
        assert principal_of(ident_of(cert), BILLING_ANY) is None
    good, _ = make_client_cert(
        pki.dir, tmp_path, "g", cn="x", uris=["spiffe://example.org/billing/api"]
    )
    assert principal_of(ident_of(good), BILLING) == "billing"


def test_uri_scheme_and_host_fold_path_does_not() -> None:
    assert uri_match_form("SPIFFE://Example.ORG/Billing/Api") == "spiffe://example.org/Billing/Api"
    assert uri_match_form("spiffe://example.org/a%2fb") == "spiffe://example.org/a%2Fb"

    def ident(uri: str) -> Identity:
        return Identity(
            subject="", cn=None, ous=(), dns=(), uris=(uri,), ips=(), fingerprint="sha256:00",
            spki="sha256:00", serial=1, not_after=utcnow(),
        )  # fmt: skip

    assert principal_of(ident("SPIFFE://EXAMPLE.org/billing/api"), BILLING) == "billing"
    assert principal_of(ident("spiffe://example.org/Billing/api"), BILLING) is None
    upper = {"name": "b", "match": {"uri": "Spiffe://Example.Org/billing/*"}}
    assert principal_of(ident("spiffe://example.org/billing/api"), upper) == "b"


@pytest.mark.parametrize(
    "pattern",
    [
        "spiffe://example.org/billing/../*",
        "spiffe://example.org/billing/%2e%2e/*",
        "spiffe://user@example.org/*",
        "spiffe://example.org/*?x",
        "spiffe://example.org/*#f",
        "example.org/billing",
    ],
)
def test_uri_pattern_that_could_never_match_is_an_error(pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(acl_for({"name": "b", "match": {"uri": pattern}}), "<t>")
    assert info.value.key == "principals[0].match.uri"
    assert "not a plain URI" in str(info.value)


# --------------------------------------------------------------------------------------------
# issuer: DN or fingerprint of the CA that issued the certificate
# --------------------------------------------------------------------------------------------


def test_issuer_matches_dn_or_fingerprint(pki: PKI, tmp_path: Path) -> None:
    ca_c = make_ca(tmp_path / "c", "Ops CA")
    cert, _ = make_client_cert(tmp_path / "c", tmp_path, "ops", cn="ops")
    ident = ident_of(cert, issuer=tmp_path / "c" / "ca.pem")
    assert ident.issuer == "CN=Ops CA"
    assert ident.issuer_fingerprint == fp(tmp_path / "c" / "ca.pem")
    by_dn = {"name": "ops", "match": {"cn": "ops", "issuer": "CN=Ops CA"}}
    by_fp = {"name": "ops", "match": {"cn": "ops", "issuer": ident.issuer_fingerprint.upper()}}
    other_fp = {"name": "ops", "match": {"cn": "ops", "issuer": fp(pki.ca)}}
    other_dn = {"name": "ops", "match": {"issuer": ca_c.issuer.rfc4514_string() + "X"}}
    assert principal_of(ident, by_dn) == "ops"
    assert principal_of(ident, by_fp) == "ops"
    assert principal_of(ident, other_fp) is None
    assert principal_of(ident, other_dn) is None
    # without a verified issuer (None) the key never holds: fail closed
    assert principal_of(ident_of(cert), by_dn) is None
    assert principal_of(ident_of(cert), by_fp) is None


@pytest.mark.parametrize("bad", ["Ops CA", "cn=Ops CA", "sha256:1234", "CN=a, O=b", ""])
def test_issuer_pattern_errors(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_acl(acl_for({"name": "p", "match": {"issuer": bad}}), "<t>")
    assert info.value.key == "principals[0].match.issuer"


def test_rebuild_chain_tells_same_named_cas_apart_by_signature(pki: PKI, tmp_path: Path) -> None:
    # pki.dir and pki.other are two CAs with the same subject DN and different keys
    assert load(pki.ca).subject == load(pki.other / "ca.pem").subject
    cas = [load(pki.ca), load(pki.other / "ca.pem")]
    mine, _ = make_client_cert(pki.other, tmp_path, "b-ops", cn="ops")
    chain = rebuild_chain(load(mine), cas)
    assert chain is not None and chain[1] == cas[1]
    assert rebuild_chain(load(mine), cas[:1]) is None  # its CA is not trusted: no chain


def test_rebuild_chain_takes_intermediates_only_below_a_trusted_root(tmp_path: Path) -> None:
    root = make_ca(tmp_path / "root", "Root", path_length=1)
    inter = make_ca(tmp_path / "inter", "Inter", issuer_dir=tmp_path / "root", path_length=0)
    leaf, _ = make_client_cert(tmp_path / "inter", tmp_path, "leaf", cn="w")
    assert rebuild_chain(load(leaf), [root], [inter]) == [load(leaf), inter, root]
    assert rebuild_chain(load(leaf), [root, inter]) == [load(leaf), inter, root]
    assert rebuild_chain(load(leaf), [root]) is None  # intermediate neither trusted nor sent
    # a sent self-signed "root" is never an anchor
    fake = make_ca(tmp_path / "fake", "Root")
    make_ca(tmp_path / "inter2", "Inter", issuer_dir=tmp_path / "fake", path_length=0)
    leaf2, _ = make_client_cert(tmp_path / "inter2", tmp_path, "leaf2", cn="w")
    inter2 = load(tmp_path / "inter2" / "ca.pem")
    assert rebuild_chain(load(leaf2), [root], [inter2, fake]) is None


# --------------------------------------------------------------------------------------------
# Configuration: the new tls keys
# --------------------------------------------------------------------------------------------


def test_new_tls_keys_parse_with_safe_defaults() -> None:
    base: dict[str, Any] = {
        "upstream": "127.0.0.1:11300",
        "tls": {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"},
        "acl": "acl.yaml",
    }
    config = parse_config(base, "t.yaml")
    assert config.tls.crl_check == "chain"
    assert config.tls.require_client_auth_eku is True
    base["tls"] |= {"crl_check": "leaf", "require_client_auth_eku": False}
    config = parse_config(base, "t.yaml")
    assert (config.tls.crl_check, config.tls.require_client_auth_eku) == ("leaf", False)
    for key, value in (("crl_check", "all"), ("require_client_auth_eku", "no")):
        bad = {**base, "tls": {**base["tls"], key: value}}
        with pytest.raises(ConfigError) as info:
            parse_config(bad, "t.yaml")
        assert info.value.key == f"tls.{key}"


@pytest.fixture
def chain_pki(tmp_path: Path, pki: PKI) -> ChainPKI:
    return ChainPKI.make(tmp_path / "chain", pki)


class ChainPKI:
    """Root -> intermediate -> leaf ``admin`` (and a leaf ``admin`` straight under the root),
    a client_ca bundle holding both CAs, and an (initially empty) CRL for each CA."""

    def __init__(self, d: Path, pki: PKI) -> None:
        self.d = d
        self.pki = pki
        self.root_dir, self.inter_dir = d / "root", d / "inter"
        self.bundle = d / "client_ca.pem"
        self.root_crl, self.inter_crl = d / "root.crl", d / "inter.crl"

    @classmethod
    def make(cls, d: Path, pki: PKI) -> ChainPKI:
        self = cls(d, pki)
        root = make_ca(self.root_dir, "Test Root", path_length=1)
        self.inter = make_ca(self.inter_dir, "Test Intermediate", issuer_dir=self.root_dir)
        self.bundle.write_bytes(
            root.public_bytes(serialization.Encoding.PEM)
            + self.inter.public_bytes(serialization.Encoding.PEM)
        )
        self.leaf = make_client_cert(self.inter_dir, d, "admin-inter", cn="admin")
        self.direct = make_client_cert(self.root_dir, d, "admin-root", cn="admin")
        self.revoke_intermediate(False)
        self.write_crl(self.inter_dir, self.inter_crl, ())
        return self

    def write_crl(self, ca_dir: Path, path: Path, serials: Sequence[int]) -> None:
        now = utcnow()
        tmp = path.with_suffix(".tmp")
        make_crl(
            ca_dir,
            tmp,
            last_update=now - dt.timedelta(minutes=5),
            next_update=now + dt.timedelta(days=1),
            revoked_serials=serials,
        )
        tmp.replace(path)

    def revoke_intermediate(self, revoked: bool = True) -> None:
        serials = [self.inter.serial_number] if revoked else []
        self.write_crl(self.root_dir, self.root_crl, serials)

    def tls(self, base: TLSConfig, **changes: Any) -> TLSConfig:
        settings: dict[str, Any] = {
            "client_ca": str(self.bundle),
            "crl": (str(self.root_crl), str(self.inter_crl)),
        }
        return replace(base, **(settings | changes))

    def openssl_verify(self, leaf: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *("openssl", "verify", "-crl_check_all", "-CAfile", str(self.bundle)),
                *("-CRLfile", str(self.root_crl), "-CRLfile", str(self.inter_crl), leaf),
            ],
            capture_output=True,
            text=True,
            check=False,
        )


def test_chain_mode_needs_a_crl_for_every_ca(chain_pki: ChainPKI, pki: PKI) -> None:
    base = make_config(pki, 1).tls
    server_context(chain_pki.tls(base))  # both CRLs: loads
    only_root = chain_pki.tls(base, crl=(str(chain_pki.root_crl),))
    with pytest.raises(ConfigError) as info:
        server_context(only_root)
    assert info.value.key == "tls.crl"
    assert "no CRL in tls.crl is issued by CN=Test Intermediate" in str(info.value)
    assert "tls.crl_check: leaf" in str(info.value)
    server_context(replace(only_root, crl_check="leaf"))  # leaf checks only: loads


def test_revocation_check_covers_intermediates_in_chain_mode(chain_pki: ChainPKI, pki: PKI) -> None:
    base = make_config(pki, 1).tls
    leaf, direct = der(chain_pki.leaf[0]), der(chain_pki.direct[0])
    chain_pki.revoke_intermediate()
    check = revocation_check(chain_pki.tls(base))
    assert check is not None and check(leaf) and not check(direct)
    leaf_only = revocation_check(chain_pki.tls(base, crl_check="leaf"))
    assert leaf_only is not None and not leaf_only(leaf)
    chain_pki.revoke_intermediate(False)
    check = revocation_check(chain_pki.tls(base))
    assert check is not None and not check(leaf)


# --------------------------------------------------------------------------------------------
# Through a running proxy: real TLS, real beanstalkd
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    pki: PKI, beanstalkd: Beanstalkd, acl: dict[str, Any], tls: TLSConfig | None = None
) -> AsyncIterator[tuple[RunningProxy, Config]]:
    config = make_config(pki, beanstalkd.port)
    if tls is not None:
        config = replace(config, tls=tls)
    server = ProxyServer(config, server_context(config.tls), PolicyHolder(parse_acl(acl, "<t>")))
    await server.start()
    try:
        yield RunningProxy(server, pki), config
    finally:
        await server.close()


def ctx_for(pki: PKI, cert: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(*cert)
    return ctx


async def session(
    proxy: RunningProxy, pki: PKI, cert: tuple[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An accepted connection (it answers ``list-tube-used``)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=ctx_for(pki, cert), server_hostname="localhost"
    )
    writer.write(b"list-tube-used\r\n")
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n") == b"USING default\r\n"
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ssl.SSLError, OSError):
        await writer.wait_closed()


async def accepted_as(proxy: RunningProxy, pki: PKI, cert: tuple[str, str]) -> str | None:
    _, writer = await session(proxy, pki, cert)
    try:
        (conn,) = proxy.server.connections
        return conn.principal
    finally:
        await close(writer)
        async with asyncio.timeout(10):
            while proxy.server.connections:
                await asyncio.sleep(0.01)


async def refused(
    proxy: RunningProxy, pki: PKI, cert: tuple[str, str], conn_log: LogWatch, reason: str
) -> None:
    await tls_attempt(proxy.port, ctx_for(pki, cert))
    line = await conn_log.wait_for(lambda m: m.startswith(("handshake failed", "refused")))
    assert reason in line, line
    assert proxy.server.connections == set()
    conn_log.messages.clear()


async def test_two_cns_kelvin_and_dot_segments_refused_at_handshake(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, tmp_path: Path
) -> None:
    acl = acl_for(
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "worker", "match": {"dns": "worker.x.com"}},
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "jobs", "match": {"cn": "jobs", "ou": "jobs"}},
    )
    d = pki.dir
    two_cn = make_client_cert(d, tmp_path, "two", cn="admin", extra_cns=["stranger"])
    kelvin = make_client_cert(d, tmp_path, "kelvin", cn="k", dns=[f"wor{KELVIN}er.x.com"])
    dots = make_client_cert(d, tmp_path, "dots", cn="d", uris=["spiffe://example.org/billing/.."])
    pct = make_client_cert(d, tmp_path, "pct", cn="p", uris=["spiffe://example.org/billing/%2e%2e"])
    before = int((await server_stats(beanstalkd.port))["total-connections"])
    async with running(pki, beanstalkd, acl) as (proxy, _):
        await refused(proxy, pki, two_cn, conn_log, "2 common names")
        for cert in (kelvin, dots, pct):
            await refused(proxy, pki, cert, conn_log, "no principal matches")
        after = int((await server_stats(beanstalkd.port))["total-connections"])
        assert after == before + 1  # only the stats probe: nothing went upstream
        # controls: the honest spellings are accepted
        worker = make_client_cert(d, tmp_path, "worker", cn="w", dns=["Worker.X.com"])
        billing = make_client_cert(
            d, tmp_path, "bill", cn="b", uris=["spiffe://Example.org/billing/api"]
        )
        jobs = make_client_cert(d, tmp_path, "jobs", cn="jobs", ous=["eng", "jobs"])
        assert await accepted_as(proxy, pki, worker) == "worker"
        assert await accepted_as(proxy, pki, billing) == "billing"
        assert await accepted_as(proxy, pki, jobs) == "jobs"


async def test_certificate_without_eku_accepted_only_with_the_option(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, tmp_path: Path
) -> None:
    acl = acl_for({"name": "admin", "match": {"cn": "admin"}})
    no_eku = make_client_cert(pki.dir, tmp_path, "no-eku", cn="admin", eku=None)
    async with running(pki, beanstalkd, acl) as (proxy, config):
        await refused(proxy, pki, no_eku, conn_log, "no clientAuth extended key usage")
        legacy = replace(config.tls, require_client_auth_eku=False)
    async with running(pki, beanstalkd, acl, legacy) as (proxy, _):
        assert await accepted_as(proxy, pki, no_eku) == "admin"


async def test_issuer_binds_a_principal_to_one_of_two_cas(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, tmp_path: Path
) -> None:
    """pki.dir and pki.other have the same subject DN: only the fingerprint tells them apart.
    A third CA with its own DN is bound by DN."""
    make_ca(tmp_path / "c", "Ops CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        Path(pki.ca).read_bytes()
        + (pki.other / "ca.pem").read_bytes()
        + (tmp_path / "c" / "ca.pem").read_bytes()
    )
    acl = acl_for(
        {"name": "ops", "match": {"cn": "ops", "issuer": fp(pki.ca)}},
        {"name": "deploy", "match": {"cn": "deploy", "issuer": "CN=Ops CA"}},
    )
    ops_a = make_client_cert(pki.dir, tmp_path, "ops-a", cn="ops")
    ops_b = make_client_cert(pki.other, tmp_path, "ops-b", cn="ops")
    deploy_c = make_client_cert(tmp_path / "c", tmp_path, "deploy-c", cn="deploy")
    deploy_a = make_client_cert(pki.dir, tmp_path, "deploy-a", cn="deploy")
    tls = replace(make_config(pki, beanstalkd.port).tls, client_ca=str(bundle))
    async with running(pki, beanstalkd, acl, tls) as (proxy, _):
        assert await accepted_as(proxy, pki, ops_a) == "ops"
        assert await accepted_as(proxy, pki, deploy_c) == "deploy"
        await refused(proxy, pki, ops_b, conn_log, "no principal matches")  # the second CA's ops
        await refused(proxy, pki, deploy_a, conn_log, "no principal matches")


async def test_leaf_under_revoked_intermediate_refused_at_handshake(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, chain_pki: ChainPKI
) -> None:
    acl = acl_for({"name": "admin", "match": {"cn": "admin"}})
    base = make_config(pki, beanstalkd.port).tls
    assert chain_pki.openssl_verify(chain_pki.leaf[0]).returncode == 0
    async with running(pki, beanstalkd, acl, chain_pki.tls(base)) as (proxy, _):
        assert await accepted_as(proxy, pki, chain_pki.leaf) == "admin"  # control
    chain_pki.revoke_intermediate()
    verdict = chain_pki.openssl_verify(chain_pki.leaf[0])
    assert verdict.returncode != 0 and "certificate revoked" in verdict.stdout + verdict.stderr
    async with running(pki, beanstalkd, acl, chain_pki.tls(base)) as (proxy, _):
        await refused(proxy, pki, chain_pki.leaf, conn_log, "certificate revoked")
        assert await accepted_as(proxy, pki, chain_pki.direct) == "admin"  # not under it
    # crl_check: leaf is the old behaviour: the intermediate's revocation is not looked at
    leaf_only = chain_pki.tls(base, crl_check="leaf")
    async with running(pki, beanstalkd, acl, leaf_only) as (proxy, _):
        assert await accepted_as(proxy, pki, chain_pki.leaf) == "admin"


async def test_crl_reload_closes_live_connection_under_revoked_intermediate(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, chain_pki: ChainPKI
) -> None:
    acl = acl_for({"name": "admin", "match": {"cn": "admin"}})
    tls = chain_pki.tls(make_config(pki, beanstalkd.port).tls)
    async with running(pki, beanstalkd, acl, tls) as (proxy, config):
        under, w_under = await session(proxy, pki, chain_pki.leaf)
        direct, w_direct = await session(proxy, pki, chain_pki.direct)
        try:
            chain_pki.revoke_intermediate()
            # what proxy.reloading.reload does on SIGHUP or a CRL change on disk
            proxy.server.reload_tls(server_context(config.tls), revocation_check(config.tls))
            async with asyncio.timeout(10):
                assert await under.read() == b""  # closed by the proxy
            await conn_log.wait_for(
                lambda m: 'reason="client certificate revoked" closed_by=proxy' in m
            )
            w_direct.write(b"list-tube-used\r\n")
            async with asyncio.timeout(10):
                assert await direct.readuntil(b"\r\n") == b"USING default\r\n"
            assert len(proxy.server.connections) == 1
        finally:
            await close(w_under)
            await close(w_direct)
        conn_log.messages.clear()
        await refused(proxy, pki, chain_pki.leaf, conn_log, "certificate revoked")


# --------------------------------------------------------------------------------------------
# check-config and explain
# --------------------------------------------------------------------------------------------


def write_setup(tmp_path: Path, acl: str, *, extra_ca: bool, crl: bool = False) -> Path:
    d = tmp_path / "pki"
    ensure_dev_pki(d)
    bundle = d / "bundle.pem"
    data = (d / "ca.pem").read_bytes()
    if extra_ca:
        make_ca(tmp_path / "second", "Second CA")
        data += (tmp_path / "second" / "ca.pem").read_bytes()
    bundle.write_bytes(data)
    (tmp_path / "acl.yaml").write_text(acl)
    crl_line = f"\n  crl: {d}/crl.pem" if crl else ""
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:0\nupstream: 127.0.0.1:1\ntls:\n  cert: {d}/server.pem\n"
        f"  key: {d}/server.key\n  client_ca: {bundle}{crl_line}\nacl: {tmp_path}/acl.yaml\n"
    )
    return cfg


UNBOUND_ACL = """\
principals:
  - {name: ops, match: {cn: ops}}
  - name: dev
    match:
      cn: dev-client
      issuer: "CN=beanstalk-proxy dev CA,O=beanstalk-proxy development"
rules:
  - {principal: ops, tubes: ["*"], allow: [all]}
  - {principal: dev, tubes: ["*"], allow: [all]}
"""


def test_check_config_warns_about_unbound_principals_with_several_cas(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, UNBOUND_ACL, extra_ca=True)
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "holds 2 CA certificates and principal(s) ops are not bound" in result.stderr
    bound = UNBOUND_ACL.replace("{cn: ops}", '{cn: ops, issuer: "CN=Second CA"}')
    cfg = write_setup(tmp_path / "b", bound, extra_ca=True)
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "not bound" not in result.stderr
    cfg = write_setup(tmp_path / "c", UNBOUND_ACL, extra_ca=False)  # one CA: nothing to say
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 0 and "not bound" not in result.stderr


def test_check_config_refuses_chain_mode_with_a_ca_without_crl(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, UNBOUND_ACL, extra_ca=True, crl=True)
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "tls.crl: tls.crl_check is chain, but no CRL in tls.crl is issued by CN=Second CA" in (
        result.stderr
    )


def test_explain_shows_issuer_and_refusal(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, UNBOUND_ACL, extra_ca=False)
    d = tmp_path / "pki"
    result = CliRunner().invoke(
        main, ["explain", "--config", str(cfg), "--cert", str(d / "dev-client.pem"), "stats"]
    )
    assert "issuer: CN=beanstalk-proxy dev CA,O=beanstalk-proxy development (sha256:" in (
        result.output
    )
    assert "principal: dev" in result.output
    two, _ = make_client_cert(d, tmp_path, "two", cn="ops", extra_cns=["dev-client"])
    result = CliRunner().invoke(main, ["explain", "--config", str(cfg), "--cert", two, "stats"])
    assert result.exit_code == 1
    assert "refused: the subject has 2 common names" in result.output


def test_example_acl_binds_deploy_to_its_ca() -> None:
    import yaml

    path = Path(__file__).resolve().parent.parent / "config" / "acl.example.yaml"
    policy = parse_acl(yaml.safe_load(path.read_text()), str(path))

    def ident(issuer: str | None) -> Identity:
        return Identity(
            subject="CN=deploy", cn="deploy", ous=(), dns=(), uris=(), ips=(),
            fingerprint="sha256:00", spki="sha256:00", serial=1, not_after=utcnow(),
            issuer=issuer,
        )  # fmt: skip

    assert policy.principal_for(ident("CN=Deploy CA,O=Example")) == "deploy"
    assert policy.principal_for(ident("CN=Other CA,O=Example")) is None
    assert policy.principal_for(ident(None)) is None


async def test_issuer_is_an_intermediate_the_client_sends(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, tmp_path: Path
) -> None:
    """client_ca holds only the root; the client sends its intermediate after its leaf. The
    issuer is the intermediate (checked by signature below the trusted root); a leaf straight
    under the root has the root as issuer and is not ops."""
    make_ca(tmp_path / "root", "Sent Root", path_length=1)
    make_ca(tmp_path / "inter", "Sent Intermediate", issuer_dir=tmp_path / "root")
    acl = acl_for({"name": "ops", "match": {"cn": "ops", "issuer": "CN=Sent Intermediate"}})
    cert, key = make_client_cert(tmp_path / "inter", tmp_path, "ops", cn="ops")
    Path(cert).write_bytes(Path(cert).read_bytes() + (tmp_path / "inter" / "ca.pem").read_bytes())
    direct = make_client_cert(tmp_path / "root", tmp_path, "ops-root", cn="ops")
    tls = replace(make_config(pki, beanstalkd.port).tls, client_ca=str(tmp_path / "root/ca.pem"))
    async with running(pki, beanstalkd, acl, tls) as (proxy, _):
        assert await accepted_as(proxy, pki, (cert, key)) == "ops"
        await refused(proxy, pki, direct, conn_log, "no principal matches")  # issuer: the root


async def test_chain_mode_refuses_an_intermediate_without_crl_that_the_client_sends(
    pki: PKI, beanstalkd: Beanstalkd, conn_log: LogWatch, chain_pki: ChainPKI, tmp_path: Path
) -> None:
    """The documented choice for a CA that has no CRL under crl_check: chain: in client_ca it
    is a startup error (test_chain_mode_needs_a_crl_for_every_ca); sent only by the client, it
    cannot have a CRL loaded, so its clients are refused at the handshake."""
    acl = acl_for({"name": "admin", "match": {"cn": "admin"}})
    cert, key = chain_pki.leaf
    with_chain = tmp_path / "admin-with-chain.pem"
    with_chain.write_bytes(Path(cert).read_bytes() + (chain_pki.inter_dir / "ca.pem").read_bytes())
    tls = replace(
        make_config(pki, beanstalkd.port).tls,
        client_ca=str(chain_pki.root_dir / "ca.pem"),
        crl=(str(chain_pki.root_crl),),
    )
    async with running(pki, beanstalkd, acl, tls) as (proxy, _):
        await refused(proxy, pki, (str(with_chain), key), conn_log, "unable to get certificate CRL")
        assert await accepted_as(proxy, pki, chain_pki.direct) == "admin"  # control

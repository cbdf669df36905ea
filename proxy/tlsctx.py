"""TLS contexts: ``TLSConfig`` -> a hardened server-side ``ssl.SSLContext``, and the matching
client-side context used by the producer-side tunnel and the tests.

The server context requires a client certificate chaining to ``tls.client_ca``, negotiates TLS
1.2 or newer (1.3 when configured), restricts TLS 1.2 to forward-secret AEAD suites, disables
compression and renegotiation and, when CRLs are configured, checks every certificate of the
client's chain against them (``tls.crl_check: chain``; every CA in ``tls.client_ca`` must then
have its CRL, else ``ConfigError``) or only the leaf (``leaf``; a client whose issuer has no
CRL loaded is refused: fail closed). ``peer_identity`` turns a completed handshake into an
``Identity``: it finds the CA that issued the client's certificate in the verified chain
(``get_verified_chain()`` from Python 3.13; before that the chain is rebuilt from
``tls.client_ca`` and the certificates the client sent, by issuer name and signature, ending at
a CA of ``tls.client_ca``) and applies ``tls.require_client_auth_eku``. ``revocation_check``
is the CRL re-check of live connections on reload. Before handing the files to OpenSSL every
one of them is read and checked with ``cryptography`` so a problem is reported as
``ConfigError`` naming the config key (``tls.key``, ``tls.crl[1]``, ...) and a plain reason,
instead of OpenSSL's generic ``[SSL] PEM lib``. Python's ``ssl`` module then reads the files itself.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from proxy.config import TLSConfig
from proxy.errors import ConfigError
from proxy.identity import Identity, identity_from_der

__all__ = [
    "TLS12_CIPHERS",
    "ServerContext",
    "client_context",
    "load_client_cas",
    "peer_identity",
    "rebuild_chain",
    "refuse_all_context",
    "revocation_check",
    "server_context",
]

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_IssuerKey = (
    rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | dsa.DSAPublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)


def _read(path: str, source: str, key: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            source,
            key,
            f"{what} file {path} does not exist (relative paths are resolved "
            f"against the working directory {os.getcwd()})",
        ) from None
    except IsADirectoryError:
        raise ConfigError(source, key, f"{path} is a directory, not a {what} file") from None
    except OSError as exc:
        raise ConfigError(
            source, key, f"cannot read {what} file {path}: {exc.strerror or exc}"
        ) from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_certs(path: str, source: str, key: str, what: str) -> list[x509.Certificate]:
    data = _read(path, source, key, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            source,
            key,
            f"{path} contains no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(source, key, f"{path} has a malformed PEM certificate: {exc}") from None


def _load_key(path: str, source: str, key: str) -> _SigningKey:
    data = _read(path, source, key, "private key")
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise ConfigError(
            source,
            key,
            f"{path} contains no PEM private key (expected -----BEGIN ... PRIVATE KEY-----)",
        )
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            source,
            key,
            f"{path} is encrypted; the proxy needs an unencrypted "
            f"key (protect it with file permissions)",
        ) from None
    except ValueError as exc:
        raise ConfigError(source, key, f"{path} has a malformed private key: {exc}") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise ConfigError(source, key, f"{path}: unsupported private key: {exc}") from None
    if not isinstance(loaded, _SigningKey):
        raise ConfigError(
            source, key, f"{path}: unsupported private key type {type(loaded).__name__}"
        )
    return loaded


def _check_validity(cert: x509.Certificate, path: str, source: str, key: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise ConfigError(
            source,
            key,
            f"the certificate in {path} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            source,
            key,
            f"the certificate in {path} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        )


def _check_pair(
    cert_path: str,
    key_path: str,
    source: str,
    cert_key: str,
    key_key: str,
    *,
    server: bool,
) -> None:
    chain = _load_certs(cert_path, source, cert_key, "certificate")
    private_key = _load_key(key_path, source, key_key)
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(private_key.public_key()):
        raise ConfigError(
            source,
            key_key,
            f"the private key in {key_path} does not match the certificate "
            f"in {cert_path} (the first certificate of {cert_key})",
        )
    if server:
        _check_validity(leaf, cert_path, source, cert_key)


def _parse_crl(data: bytes) -> tuple[x509.CertificateRevocationList, bool]:
    """The CRL in ``data`` (PEM or DER) and whether it is PEM; ``ValueError`` when it is
    neither. The one CRL parser: the context and the revocation check read files alike."""
    is_pem = b"-----BEGIN X509 CRL-----" in data
    crl = x509.load_pem_x509_crl(data) if is_pem else x509.load_der_x509_crl(data)
    return crl, is_pem


def _load_crl(path: str, source: str, key: str) -> tuple[x509.CertificateRevocationList, bool]:
    """Returns the CRL and whether the file is PEM."""
    data = _read(path, source, key, "CRL")
    try:
        return _parse_crl(data)
    except ValueError as exc:
        raise ConfigError(source, key, f"{path} is not a valid PEM or DER CRL: {exc}") from None


def _check_crl(
    crl: x509.CertificateRevocationList,
    cas: Sequence[x509.Certificate],
    path: str,
    source: str,
    key: str,
) -> None:
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not issuers:
        raise ConfigError(
            source,
            key,
            f"{path} was issued by {crl.issuer.rfc4514_string()}, "
            f"which is not a certificate in tls.client_ca",
        )
    valid = False
    for ca in issuers:
        public_key = ca.public_key()
        if isinstance(public_key, _IssuerKey) and crl.is_signature_valid(public_key):
            valid = True
    if not valid:
        raise ConfigError(
            source,
            key,
            f"the signature of {path} does not verify against "
            f"{crl.issuer.rfc4514_string()} in tls.client_ca",
        )
    next_update = crl.next_update_utc
    if next_update is not None and next_update < dt.datetime.now(dt.UTC):
        raise ConfigError(
            source,
            key,
            f"{path} expired on {next_update:%Y-%m-%d %H:%M:%S} UTC; every client "
            f"would be refused until it is re-issued",
        )


def _load_verify_file(ctx: ssl.SSLContext, path: str, source: str, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(source, key, f"OpenSSL could not load {path}: {exc}") from None


class ServerContext(ssl.SSLContext):
    """The proxy's server context, carrying what ``peer_identity`` needs after a handshake."""

    client_cas: tuple[x509.Certificate, ...] = ()  # the certificates of tls.client_ca
    chains: ChainBuilder | None = None  # rebuilds chains up to client_cas (Python < 3.13)
    require_client_auth_eku: bool = True
    # peer_identity's answers for (certificate chain as presented or verified), bounded; a
    # context lives until the next TLS reload, so a new CA bundle never sees an old answer
    identities: dict[tuple[bytes, ...], Identity] | None = None


#: TLS 1.3 session tickets sent after each full handshake (resumption stays possible).
SESSION_TICKETS = 1


def _bare_server_context(tls: TLSConfig, source: str) -> ServerContext:
    """The server side without any trusted client CA: every client certificate fails."""
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.require_client_auth_eku = tls.require_client_auth_eku
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    # One TLS 1.3 session ticket per handshake instead of OpenSSL's two: a client keeps only
    # the last one anyway, and OpenSSL 3.0 copies the whole session (re-parsing the client's
    # certificate) for every ticket after the first, about 0.3 ms of CPU per handshake.
    ctx.num_tickets = SESSION_TICKETS
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            source, "tls.cert", f"OpenSSL could not load {tls.cert} with {tls.key}: {exc}"
        ) from None
    return ctx


def refuse_all_context(tls: TLSConfig, source: str = "config") -> ServerContext:
    """A server context that completes no client handshake (it trusts no client CA): what
    ``tls.crl_failure: refuse`` installs while the configured CRL cannot be used."""
    _check_pair(tls.cert, tls.key, source, "tls.cert", "tls.key", server=True)
    return _bare_server_context(tls, source)


def server_context(tls: TLSConfig, source: str = "config") -> ServerContext:
    """Build the proxy's server-side context from ``tls``.

    ``source`` names the configuration file for error messages. Raises ``ConfigError`` with the
    key path (``tls.cert``, ``tls.key``, ``tls.client_ca``, ``tls.crl``/``tls.crl[i]``,
    ``tls.min_version``, ``tls.crl_check``) on any problem, including, with ``tls.crl_check:
    chain``, a CA certificate in ``tls.client_ca`` that no configured CRL covers."""
    if tls.crl_check not in ("chain", "leaf"):
        raise ConfigError(
            source, "tls.crl_check", f'must be "chain" or "leaf", got {tls.crl_check!r}'
        )
    if tls.min_version not in _VERSIONS:
        raise ConfigError(
            source, "tls.min_version", f'must be "1.2" or "1.3", got {tls.min_version!r}'
        )
    _check_pair(tls.cert, tls.key, source, "tls.cert", "tls.key", server=True)
    cas = _load_certs(tls.client_ca, source, "tls.client_ca", "client CA")
    crls: list[tuple[str, str, x509.CertificateRevocationList, bool]] = []
    for i, path in enumerate(tls.crl):
        key = "tls.crl" if len(tls.crl) == 1 else f"tls.crl[{i}]"
        crl, is_pem = _load_crl(path, source, key)
        _check_crl(crl, cas, path, source, key)
        crls.append((key, path, crl, is_pem))
    if crls and tls.crl_check == "chain":
        _check_chain_coverage(cas, [crl for _, _, crl, _ in crls], tls, source)

    ctx = _bare_server_context(tls, source)
    ctx.client_cas = tuple(cas)
    ctx.chains = ChainBuilder(cas)
    _load_verify_file(ctx, tls.client_ca, source, "tls.client_ca")

    for key, path, crl, is_pem in crls:
        if is_pem:
            _load_verify_file(ctx, path, source, key)
            continue
        # OpenSSL's file loader wants PEM for CRLs and cadata= takes only certificates, so a
        # DER CRL is converted and loaded from a private temporary file.
        with tempfile.TemporaryDirectory(prefix="beanstalk-proxy-crl-") as tmp:
            pem_path = os.path.join(tmp, "crl.pem")
            with open(pem_path, "wb") as f:
                f.write(crl.public_bytes(serialization.Encoding.PEM))
            _load_verify_file(ctx, pem_path, source, key)
    if crls:
        # CHAIN = CRL_CHECK | CRL_CHECK_ALL: every certificate of the verified chain.
        chain = tls.crl_check == "chain"
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN if chain else ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _check_chain_coverage(
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    tls: TLSConfig,
    source: str,
) -> None:
    """Under ``crl_check: chain`` OpenSSL needs a CRL from the issuer of every certificate of a
    chain: a CA of ``client_ca`` without one would refuse every client below it. Say so now."""
    for i, ca in enumerate(cas):
        public_key = ca.public_key()
        covered = any(
            crl.issuer == ca.subject
            and isinstance(public_key, _IssuerKey)
            and crl.is_signature_valid(public_key)
            for crl in crls
        )
        if not covered:
            raise ConfigError(
                source,
                "tls.crl",
                f"tls.crl_check is chain, but no CRL in tls.crl is issued by "
                f"{ca.subject.rfc4514_string()} (certificate {i + 1} of tls.client_ca "
                f"{tls.client_ca}); add that CA's CRL to tls.crl, or set tls.crl_check: leaf "
                f"to check client certificates only",
            )


def load_client_cas(tls: TLSConfig, source: str = "config") -> list[x509.Certificate]:
    """The certificates of ``tls.client_ca`` (``ConfigError`` naming the key on a problem)."""
    return _load_certs(tls.client_ca, source, "tls.client_ca", "client CA")


# --------------------------------------------------------------------------------------------
# After the handshake: the verified chain, the peer's identity, revocation of live connections
# --------------------------------------------------------------------------------------------

_MAX_CHAIN = 10  # certificates in a rebuilt chain, leaf included (OpenSSL's default is 100)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """``ca`` is a CA certificate whose key signed ``cert`` under ``cert``'s issuer name."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if not constraints.ca:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class ChainBuilder:
    """Rebuilds verified chains up to the trusted CAs ``cas`` (see ``rebuild_chain``),
    remembering the chain above each trusted CA, so a leaf costs one signature check."""

    def __init__(self, cas: Sequence[x509.Certificate]) -> None:
        self.cas = tuple(cas)
        self._ders = [ca.public_bytes(serialization.Encoding.DER) for ca in self.cas]
        self._above: dict[bytes, list[x509.Certificate] | None] = {}

    def candidates(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """Trusted CAs named as ``cert``'s issuer, in file order."""
        return [ca for ca in self.cas if ca.subject == cert.issuer]

    def above(self, ca: x509.Certificate) -> list[x509.Certificate] | None:
        """``[ca, ..., anchor]`` for a CA of ``cas``, or None when it reaches no anchor."""
        der = ca.public_bytes(serialization.Encoding.DER)
        if der not in self._above:
            self._above[der] = None  # a loop back to this CA finds no anchor
            self._above[der] = self._walk([ca], ())
        return self._above[der]

    def build(
        self, leaf: x509.Certificate, sent: Sequence[x509.Certificate] = ()
    ) -> list[x509.Certificate] | None:
        return self._walk([leaf], sent)

    def _walk(
        self, chain: list[x509.Certificate], sent: Sequence[x509.Certificate]
    ) -> list[x509.Certificate] | None:
        current = chain[-1]
        while len(chain) <= _MAX_CHAIN:
            der = current.public_bytes(serialization.Encoding.DER)
            if der in self._ders and _self_signed(current):
                return chain
            for cand in self.candidates(current):
                if cand not in chain and _issued_by(current, cand):
                    rest = self.above(cand)
                    if rest is not None and not any(c in chain for c in rest):
                        return chain + rest
            nxt = next(
                (
                    c
                    for c in sent
                    if c.subject == current.issuer and c not in chain and _issued_by(current, c)
                ),
                None,
            )
            if nxt is None:
                return None
            chain = [*chain, nxt]
            current = nxt
        return None


def rebuild_chain(
    leaf: x509.Certificate,
    cas: Sequence[x509.Certificate],
    sent: Sequence[x509.Certificate] = (),
) -> list[x509.Certificate] | None:
    """The chain ``[leaf, issuer, ..., anchor]`` from ``leaf`` to a self-signed CA of ``cas``,
    each link checked by issuer name and signature; ``None`` when there is none.

    ``sent`` (certificates the client sent) may only provide intermediate links; a chain must
    end at a trusted CA of ``cas``, so nothing unverified is ever trusted. Where several CAs
    fit a link (two CAs with the same name and key), those of ``cas`` come first, in file
    order. Used before Python 3.13, which has no public ``get_verified_chain()``; after a
    handshake OpenSSL has already verified a chain, this only finds which CAs it went through.
    """
    return ChainBuilder(cas).build(leaf, sent)


def _der_list(items: Sequence[Any]) -> list[bytes]:
    """DER bytes of certificates from ``ssl`` (bytes from 3.13's public API, ``_ssl``
    Certificate objects from the private one before)."""
    out: list[bytes] = []
    for item in items:
        out.append(item if isinstance(item, bytes) else item.public_bytes(_ssl_der_encoding()))
    return out


def _ssl_der_encoding() -> int:
    import _ssl

    return int(_ssl.ENCODING_DER)


def verified_issuer(ssl_object: Any, leaf: x509.Certificate) -> x509.Certificate | None:
    """The CA certificate that issued ``leaf`` in the chain the handshake verified, or None.

    Python 3.13+: ``get_verified_chain()``. Python 3.11/3.12: rebuilt by ``rebuild_chain`` from
    the context's ``client_cas`` and the certificates the client sent (read with the private
    ``get_unverified_chain`` where it exists; without it only ``client_cas`` are used)."""
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is not None:  # Python 3.13+
        chain = [x509.load_der_x509_certificate(d) for d in _der_list(getter())]
    else:
        ctx = getattr(ssl_object, "context", None)
        chains = ctx.chains if isinstance(ctx, ServerContext) else None
        if chains is None:
            return None
        sent: list[x509.Certificate] = []
        try:
            raw = ssl_object._sslobj.get_unverified_chain() or []
            sent = [x509.load_der_x509_certificate(d) for d in _der_list(raw)]
            sent = [c for c in sent if c != leaf]
        except (AttributeError, ValueError, TypeError):
            sent = []
        rebuilt = chains.build(leaf, sent)
        if rebuilt is None:
            return None
        chain = rebuilt
    if len(chain) >= 2:
        return chain[1]
    return chain[0] if chain and _self_signed(chain[0]) else None


def peer_identity(ssl_object: Any, der: bytes) -> Identity:
    """The ``Identity`` of the client of a completed handshake (``der``: its certificate).

    Adds the issuing CA (for the ACL's ``issuer`` key) and applies the context's
    ``require_client_auth_eku`` (a ``ServerContext``; any other context: required). Raises
    ``ValueError`` when the certificate cannot be parsed, like ``identity_from_der``."""
    ctx = getattr(ssl_object, "context", None)
    server = ctx if isinstance(ctx, ServerContext) else None
    require = server.require_client_auth_eku if server is not None else True
    cache: dict[tuple[bytes, ...], Identity] | None = None
    key: tuple[bytes, ...] = ()
    if server is not None:
        # A reconnecting client presents the same chain: its identity (the issuer lookup is a
        # signature check, parsing the certificate more) is computed once per context.
        cache = server.identities
        if cache is None:
            cache = server.identities = {}
        key = (der, *_presented_chain(ssl_object))
        hit = cache.get(key)
        if hit is not None:
            return hit
    issuer = verified_issuer(ssl_object, x509.load_der_x509_certificate(der))
    identity = identity_from_der(
        der,
        issuer_der=None if issuer is None else issuer.public_bytes(serialization.Encoding.DER),
        require_client_auth_eku=require,
    )
    if cache is not None:
        if len(cache) >= IDENTITY_CACHE_SIZE:
            cache.clear()
        cache[key] = identity
    return identity


#: Identities remembered per server context (see ``peer_identity``).
IDENTITY_CACHE_SIZE = 4096


def _presented_chain(ssl_object: Any) -> list[bytes]:
    """DER of the chain behind the leaf: verified (3.13+) or as the client sent it (before;
    private API), or nothing when neither can be read."""
    try:
        getter = getattr(ssl_object, "get_verified_chain", None)
        raw = getter() if getter is not None else ssl_object._sslobj.get_unverified_chain()
        return _der_list(raw or [])
    except (AttributeError, ValueError, TypeError):
        return []


def revocation_check(tls: TLSConfig) -> Callable[[bytes], bool] | None:
    """A predicate over DER client certificates: is it, or (``crl_check: chain``) a CA
    certificate of its chain to ``tls.client_ca``, listed in one of the configured CRLs?
    ``None`` without CRLs. Raises ``OSError``/``ValueError`` when a file cannot be read."""
    if not tls.crl:
        return None
    revoked: set[tuple[bytes, int]] = set()
    for path in tls.crl:
        crl, _ = _parse_crl(Path(path).read_bytes())
        issuer = crl.issuer.public_bytes()
        revoked.update((issuer, entry.serial_number) for entry in crl)
    chain_mode = tls.crl_check == "chain"
    cas = x509.load_pem_x509_certificates(Path(tls.client_ca).read_bytes()) if chain_mode else []
    chains = ChainBuilder(cas)

    def listed(cert: x509.Certificate) -> bool:
        return (cert.issuer.public_bytes(), cert.serial_number) in revoked

    def issuing_chain(leaf: x509.Certificate) -> list[x509.Certificate]:
        """``[issuer, ..., anchor]`` of a leaf the handshake verified. With one CA of that
        name in client_ca it is that CA (no signature check: a live connection's leaf was
        verified at its handshake, and the chain above each CA is computed once per reload);
        CAs sharing a name are told apart by signature."""
        named = chains.candidates(leaf)
        if len(named) == 1:
            return chains.above(named[0]) or []
        full = chains.build(leaf)
        return full[1:] if full else []

    def is_revoked(der: bytes) -> bool:
        leaf = x509.load_der_x509_certificate(der)
        if listed(leaf):
            return True
        if not chain_mode:
            return False
        # every CA of the chain but the self-signed anchor (which no CRL can revoke)
        return any(listed(ca) for ca in issuing_chain(leaf)[:-1])

    return is_revoked


def client_context(
    ca: str, cert: str, key: str, server_hostname_check: bool = True
) -> ssl.SSLContext:
    """A mutual-TLS client context: trusts ``ca``, presents ``cert``/``key``, TLS 1.2+.

    With ``server_hostname_check`` the server certificate must name the host being connected
    to (pass ``server_hostname`` when wrapping). Errors are ``ConfigError("command line",
    "--ca" | "--cert" | "--key", reason)``."""
    source = "command line"
    _check_pair(cert, key, source, "--cert", "--key", server=False)
    _load_certs(ca, source, "--ca", "CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = server_hostname_check
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_verify_file(ctx, ca, source, "--ca")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            source, "--cert", f"OpenSSL could not load {cert} with {key}: {exc}"
        ) from None
    return ctx

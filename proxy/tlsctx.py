"""TLS contexts: ``TLSConfig`` -> a hardened server-side ``ssl.SSLContext``, and the matching
client-side context used by the producer-side tunnel and the tests.

The server context requires a client certificate chaining to ``tls.client_ca``, negotiates TLS
1.2 or newer (1.3 when configured), restricts TLS 1.2 to forward-secret AEAD suites, disables
compression and renegotiation and, when CRLs are configured, checks the client's leaf
certificate against them (a client whose issuer has no CRL loaded is then refused: fail
closed). Before handing the files to OpenSSL every one of them is read and checked with
``cryptography`` so a problem is reported as ``ConfigError`` naming the config key
(``tls.key``, ``tls.crl[1]``, ...) and a plain reason, instead of OpenSSL's generic
``[SSL] PEM lib``. Python's ``ssl`` module then reads the files itself.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from proxy.config import TLSConfig
from proxy.errors import ConfigError

__all__ = ["TLS12_CIPHERS", "client_context", "refuse_all_context", "server_context"]

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


def _load_crl(path: str, source: str, key: str) -> tuple[x509.CertificateRevocationList, bool]:
    """Returns the CRL and whether the file is PEM."""
    data = _read(path, source, key, "CRL")
    is_pem = b"-----BEGIN X509 CRL-----" in data
    try:
        crl = x509.load_pem_x509_crl(data) if is_pem else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ConfigError(source, key, f"{path} is not a valid PEM or DER CRL: {exc}") from None
    return crl, is_pem


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


def _bare_server_context(tls: TLSConfig, source: str) -> ssl.SSLContext:
    """The server side without any trusted client CA: every client certificate fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            source, "tls.cert", f"OpenSSL could not load {tls.cert} with {tls.key}: {exc}"
        ) from None
    return ctx


def refuse_all_context(tls: TLSConfig, source: str = "config") -> ssl.SSLContext:
    """A server context that completes no client handshake (it trusts no client CA): what
    ``tls.crl_failure: refuse`` installs while the configured CRL cannot be used."""
    _check_pair(tls.cert, tls.key, source, "tls.cert", "tls.key", server=True)
    return _bare_server_context(tls, source)


def server_context(tls: TLSConfig, source: str = "config") -> ssl.SSLContext:
    """Build the proxy's server-side context from ``tls``.

    ``source`` names the configuration file for error messages. Raises ``ConfigError`` with the
    key path (``tls.cert``, ``tls.key``, ``tls.client_ca``, ``tls.crl``/``tls.crl[i]``,
    ``tls.min_version``) on any problem."""
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

    ctx = _bare_server_context(tls, source)
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
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


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

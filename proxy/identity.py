"""Certificate -> identity facts: the pure bridge between a verified TLS peer and the ACL.

``identity_from_der`` takes the DER bytes of a client certificate that the TLS layer has already
verified (and, when known, the CA certificate that verifiably issued it) and extracts everything
the ACL can match on: the RFC 4514 subject, the common name, every organizational unit, the DNS,
URI (SPIFFE IDs) and IP subject alternative names, two SHA-256 pins, one over the whole
certificate and one over its SubjectPublicKeyInfo (exactly as encoded in the certificate, so the
pin survives re-issuing a certificate for the same key), and the issuing CA's subject and
fingerprint. A certificate that must not name anyone (several CNs, no clientAuth EKU when that
is required) gets a ``refusal`` reason, and no principal ever matches it. ``dns_match_form`` and
``uri_match_form`` give the exact forms DNS names and URIs are compared in (ASCII case folding
only, parsed URIs without dot segments or ambiguous encodings). The module does no verification
and no I/O; it never imports asyncio, socket or ssl.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Identity", "dns_match_form", "identity_from_der", "normalize_dn", "uri_match_form"]

# How many hex digits of the fingerprint ``Identity.describe`` shows. 16 hex digits = 64 bits:
# enough to tell certificates apart in a log, short enough to read.
_DESCRIBE_FP_DIGITS = 16


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified client certificate says about its holder."""

    subject: str  # RFC 4514 string of the subject
    cn: str | None  # the CN, if any (with several CNs, the first, and ``refusal`` is set)
    ous: tuple[str, ...]  # every OU in the subject, in certificate order
    dns: tuple[str, ...]  # DNS SANs
    uris: tuple[str, ...]  # URI SANs (SPIFFE IDs live here)
    ips: tuple[str, ...]  # IP SANs, as text (ipaddress' canonical form)
    fingerprint: str  # "sha256:" + lowercase hex of SHA-256(DER certificate)
    spki: str  # "sha256:" + lowercase hex of SHA-256(DER SubjectPublicKeyInfo)
    serial: int
    not_after: datetime  # timezone-aware UTC
    # The CA certificate that verifiably issued this one (None when not known): its RFC 4514
    # subject and "sha256:" fingerprint, what the ACL's ``issuer`` key matches.
    issuer: str | None = None
    issuer_fingerprint: str | None = None
    # Why no principal may match this certificate (None: it may name one).
    refusal: str | None = None

    def describe(self) -> str:
        """A short, log-safe one-liner such as ``CN=billing OU=eng sha256:ab12cd34...``.

        Shows the CN and OUs when present, else the first URI or DNS SAN, and a shortened
        certificate fingerprint. Control characters, spaces and non-ASCII characters in
        certificate values are escaped, so a hostile subject cannot forge log lines.
        """
        parts: list[str] = []
        if self.cn is not None:
            parts.append("CN=" + _log_safe(self.cn))
        if self.ous:
            parts.append("OU=" + ",".join(_log_safe(ou) for ou in self.ous))
        if not parts:
            if self.uris:
                parts.append("URI=" + _log_safe(self.uris[0]))
            elif self.dns:
                parts.append("DNS=" + _log_safe(self.dns[0]))
            elif self.ips:
                parts.append("IP=" + self.ips[0])
        prefix, _, digest = self.fingerprint.partition(":")
        parts.append(f"{prefix}:{digest[:_DESCRIBE_FP_DIGITS]}...")
        return " ".join(parts)


def identity_from_der(
    der: bytes, *, issuer_der: bytes | None = None, require_client_auth_eku: bool = True
) -> Identity:
    """Parse a DER certificate into an ``Identity``.

    ``issuer_der`` is the CA certificate that issued it, when the caller has verified that
    (``proxy.tlsctx`` rebuilds the verified chain); it fills ``issuer`` and
    ``issuer_fingerprint``. The result carries a ``refusal`` when the subject has more than one
    common name (tools disagree on which one names the holder) or, with
    ``require_client_auth_eku``, when the certificate has no extended key usage including
    clientAuth. Raises ``ValueError`` when the bytes are not a parseable X.509 certificate
    (including a malformed subjectAltName extension). It does not check validity, chains or
    revocation: that is the TLS layer's job, done before this is called.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject
        cns = [_attr_text(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ous = tuple(
            _attr_text(a.value)
            for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        )
        dns: tuple[str, ...] = ()
        uris: tuple[str, ...] = ()
        ips: tuple[str, ...] = ()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            pass
        else:
            dns = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        subject_text = subject.rfc4514_string()
        serial = cert.serial_number
        not_after = cert.not_valid_after_utc
        spki_der = _spki_der(cert.tbs_certificate_bytes)
        refusal: str | None = None
        if len(cns) > 1:
            refusal = (
                f"the subject has {len(cns)} common names (CN); a client certificate may "
                f"carry at most one"
            )
        elif require_client_auth_eku and not _has_client_auth(cert):
            refusal = (
                "the certificate has no clientAuth extended key usage (tls.require_client_auth_eku)"
            )
        issuer: str | None = None
        issuer_fp: str | None = None
        if issuer_der is not None:
            issuer = x509.load_der_x509_certificate(issuer_der).subject.rfc4514_string()
            issuer_fp = "sha256:" + hashlib.sha256(issuer_der).hexdigest()
    except ValueError:
        raise
    except Exception as exc:  # be defensive: any other parse failure is still "bad input"
        raise ValueError(f"cannot parse certificate: {exc}") from exc
    return Identity(
        subject=subject_text,
        cn=cns[0] if cns else None,
        ous=ous,
        dns=dns,
        uris=uris,
        ips=ips,
        fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
        spki="sha256:" + hashlib.sha256(spki_der).hexdigest(),
        serial=serial,
        not_after=not_after,
        issuer=issuer,
        issuer_fingerprint=issuer_fp,
        refusal=refusal,
    )


def _has_client_auth(cert: x509.Certificate) -> bool:
    """The certificate has an EKU extension listing clientAuth (anyExtendedKeyUsage alone is
    not enough, as for OpenSSL's client purpose check)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


def normalize_dn(text: str) -> str:
    """An RFC 4514 distinguished name in the form ``cryptography`` renders it (the form
    ``Identity.subject`` and ``Identity.issuer`` have). Raises ``ValueError`` if unparseable."""
    return x509.Name.from_rfc4514_string(text).rfc4514_string()


# --------------------------------------------------------------------------------------------
# The forms DNS names and URIs are compared in
# --------------------------------------------------------------------------------------------


def dns_match_form(name: str) -> str | None:
    """A DNS name folded to ASCII lower case, or ``None`` when it contains any non-ASCII
    character (such a name is never folded and never matches: internationalized names are
    compared as IDNA A-labels, ``xn--...``, which are ASCII). Only A-Z are folded: Python's
    Unicode ``lower()`` would turn the Kelvin sign U+212A into ``k``."""
    if not name.isascii():
        return None
    return name.encode("ascii").lower().decode("ascii")


_ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_UNRESERVED = frozenset(_ALPHA + "0123456789-._~")
_SCHEME_CHARS = frozenset(_ALPHA + "0123456789+-.")
# RFC 3986 characters allowed in a URI: unreserved, gen-delims, sub-delims and '%'.
_URI_CHARS = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=%")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def uri_match_form(uri: str, *, pattern: bool = False) -> str | None:
    """The form a URI SAN (or an ACL ``uri`` pattern) is compared in, or ``None`` when it is
    refused and never matches.

    The URI is parsed (RFC 3986): it must have a scheme, and it is refused when it has
    characters outside RFC 3986, userinfo (``user@host``), a query (``?``), a fragment
    (``#``), a dot segment (``.`` or ``..``; their percent-encoded spellings ``%2e`` are
    refused as percent-encoded unreserved characters), a malformed ``%`` escape or a
    percent-encoded unreserved character (``%41`` for ``A``, ``%7e`` for ``~``). Scheme and
    host are folded to ASCII lower case, percent escapes to upper-case hex; the path keeps its
    case. ``*`` is an ordinary sub-delimiter, so patterns use the same function; with
    ``pattern`` a glob before the scheme's ``:`` (or with no ``:`` at all) is allowed too, and
    such a pattern is checked by the same rules but compared as written."""
    if not uri.isascii() or any(ch not in _URI_CHARS for ch in uri):
        return None
    scheme, sep, rest = uri.partition(":")
    if pattern and "*" in uri and (not sep or "*" in scheme or "/" in scheme):
        return _percent_form(uri) if _plain_path(uri) else None
    if not sep or not scheme or scheme[0] not in _ALPHA or set(scheme) - _SCHEME_CHARS:
        return None
    authority: str | None = None
    path = rest
    if rest.startswith("//"):
        end = rest.find("/", 2)
        authority, path = (rest[2:], "") if end < 0 else (rest[2:end], rest[end:])
        if "@" in authority:
            return None
    if not _plain_path(rest):
        return None
    out = scheme.encode("ascii").lower().decode("ascii") + ":"
    if authority is not None:
        host = _percent_form(authority.encode("ascii").lower().decode("ascii"))
        if host is None:
            return None
        out += "//" + host
    tail = _percent_form(path)
    return None if tail is None else out + tail


def _plain_path(text: str) -> bool:
    """No query, fragment, userinfo-like ``@`` before the path, or dot segment."""
    if "?" in text or "#" in text:
        return False
    return not any(seg in (".", "..") for seg in text.split("/"))


def _percent_form(text: str) -> str | None:
    """Percent escapes with upper-case hex; ``None`` for a malformed escape or one that encodes
    an unreserved character (which has a plain spelling: two spellings, one meaning)."""
    if "%" not in text:
        return text
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEXDIGITS or part[1] not in _HEXDIGITS:
            return None
        if chr(int(part[:2], 16)) in _UNRESERVED:
            return None
        out.append("%" + part[:2].upper() + part[2:])
    return "".join(out)


def _attr_text(value: str | bytes) -> str:
    """Name attribute values are text except for a few bit-string types; never fail on them."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _log_safe(text: str) -> str:
    """Escape backslashes, spaces, control characters and non-ASCII characters."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0x21 <= code <= 0x7E and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _der_header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """Read one DER tag + length at ``pos``: returns (tag, content start, content end)."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag = buf[pos]
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(buf):
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, end


def _spki_der(tbs: bytes) -> bytes:
    """The SubjectPublicKeyInfo exactly as encoded inside a TBSCertificate.

    TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity, subject, subjectPublicKeyInfo, ... } -- SPKI is the 6th element after version.
    Hashing the original bytes (not a re-encoding of the parsed key) is what key pins mean.
    """
    tag, pos, end = _der_header(tbs, 0)
    if tag != 0x30:
        raise ValueError("TBSCertificate is not a SEQUENCE")
    tag, _, nxt = _der_header(tbs, pos)
    if tag == 0xA0:  # explicit version
        pos = nxt
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _der_header(tbs, pos)
    tag, _, spki_end = _der_header(tbs, pos)
    if tag != 0x30 or spki_end > end:
        raise ValueError("SubjectPublicKeyInfo not found")
    return tbs[pos:spki_end]

"""Certificate -> identity facts: the pure bridge between a verified TLS peer and the ACL.

``identity_from_der`` takes the DER bytes of a client certificate that the TLS layer has already
verified and extracts everything the ACL can match on: the RFC 4514 subject, the first common
name, every organizational unit, the DNS, URI (SPIFFE IDs) and IP subject alternative names,
and two SHA-256 pins, one over the whole certificate and one over its SubjectPublicKeyInfo
(exactly as encoded in the certificate, so the pin survives re-issuing a certificate for the
same key). The module does no verification and no I/O; it never imports asyncio, socket or ssl.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["Identity", "identity_from_der"]

# How many hex digits of the fingerprint ``Identity.describe`` shows. 16 hex digits = 64 bits:
# enough to tell certificates apart in a log, short enough to read.
_DESCRIBE_FP_DIGITS = 16


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified client certificate says about its holder."""

    subject: str  # RFC 4514 string of the subject
    cn: str | None  # first CN, if any
    ous: tuple[str, ...]  # every OU in the subject, in certificate order
    dns: tuple[str, ...]  # DNS SANs
    uris: tuple[str, ...]  # URI SANs (SPIFFE IDs live here)
    ips: tuple[str, ...]  # IP SANs, as text (ipaddress' canonical form)
    fingerprint: str  # "sha256:" + lowercase hex of SHA-256(DER certificate)
    spki: str  # "sha256:" + lowercase hex of SHA-256(DER SubjectPublicKeyInfo)
    serial: int
    not_after: datetime  # timezone-aware UTC

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


def identity_from_der(der: bytes) -> Identity:
    """Parse a DER certificate into an ``Identity``.

    Raises ``ValueError`` when the bytes are not a parseable X.509 certificate (including a
    malformed subjectAltName extension). It does not check validity, chains or revocation:
    that is the TLS layer's job, done before this is called.
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
    )


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

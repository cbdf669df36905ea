"""Is this certificate fit to be the proxy's server certificate? Pure checks for check-config.

``server_cert_problem`` answers two questions a TLS client will ask: may the certificate be
used by a TLS server (its extended key usage, when present, must include serverAuth or
anyExtendedKeyUsage, as ``openssl verify -purpose sslserver`` demands), and, when a name is
given, does a subjectAltName cover it. Names follow RFC 6125 as OpenSSL applies it for Python's
``ssl`` module: an IP address matches only IP SANs; a DNS name matches DNS SANs case-insensitively
(ASCII; an internationalized name in its IDNA form), a wildcard only as the whole left-most label
(``*.example.com`` covers ``a.example.com``, not ``example.com`` nor ``a.b.example.com``) with at
least two labels after it; the subject CN is not consulted (clients that follow RFC 6125 and
every current browser ignore it when SANs are present, and Go ignores it always). No I/O.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["name_covered", "server_cert_problem"]

_ANY_EKU = x509.ObjectIdentifier("2.5.29.37.0")  # anyExtendedKeyUsage


def _eku_problem(cert: x509.Certificate) -> str | None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None  # no EKU extension: any purpose
    usages = list(eku)
    if ExtendedKeyUsageOID.SERVER_AUTH in usages or _ANY_EKU in usages:
        return None
    names = ", ".join(getattr(u, "_name", None) or u.dotted_string for u in usages) or "none"
    return (
        f"is not a server certificate: its extended key usage ({names}) lacks serverAuth, so "
        "TLS clients refuse it (is this a client certificate?)"
    )


def _dns_form(name: str) -> str | None:
    """Lowercase ASCII form of a DNS name (IDNA for non-ASCII), without a trailing dot."""
    name = name.rstrip(".")
    if not name:
        return None
    try:
        ascii_name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return ascii_name.lower()


def _dns_covers(pattern: str, name: str) -> bool:
    form = _dns_form(pattern)
    if form is None:
        return False
    if form == name:
        return True
    left, _, rest = form.partition(".")
    if left != "*" or rest.count(".") < 1:  # wildcard: whole left-most label, 2+ labels after
        return False
    head, _, tail = name.partition(".")
    return bool(head) and tail == rest


def name_covered(cert: x509.Certificate, name: str) -> bool:
    """Whether a subjectAltName of ``cert`` covers ``name`` (DNS name or IP address)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        addr = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        addr = None
    if addr is not None:
        return addr in sans.get_values_for_type(x509.IPAddress)
    form = _dns_form(name)
    if form is None:
        return False
    return any(_dns_covers(p, form) for p in sans.get_values_for_type(x509.DNSName))


def _san_summary(cert: x509.Certificate) -> str:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName"
    dns = sans.get_values_for_type(x509.DNSName)
    ips = [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    listed = [f"DNS:{d}" for d in dns] + [f"IP:{a}" for a in ips]
    return "its names are " + (", ".join(listed) if listed else "none (no DNS or IP SAN)")


def server_cert_problem(cert: x509.Certificate, name: str | None = None) -> str | None:
    """Why ``cert`` cannot serve TLS (for ``name``, when given), or None when it can."""
    problem = _eku_problem(cert)
    if problem is not None:
        return problem
    if name is not None and not name_covered(cert, name):
        return (
            f"does not cover the name {name!r} clients connect to ({_san_summary(cert)}); "
            f"issue it with that name, e.g. certs init --name {name}"
        )
    return None

"""Loading what ``serve`` and the other commands read: the config, the ACLs (enforced and
shadow), the server's TLS context and (for ``explain`` and ``acl test``) the identity a client
certificate file stands for, every config failure a ``ConfigError`` with a key path.

YAML is read with a ``yaml.SafeLoader`` subclass that also rejects duplicate keys, through
``proxy.yamlpos``, which remembers where each key path is, so that ``describe_config_error``
can add the line and column of a key path to its message. Together with ``proxy.reloading``
this is the only place that reads the config and ACL files.
"""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.acl import Policy, parse_acl
from proxy.certs import load_cert
from proxy.config import Config, parse_config
from proxy.errors import ConfigError
from proxy.identity import Identity, identity_from_der
from proxy.tlsctx import load_client_cas, rebuild_chain, server_context
from proxy.yamlpos import compose_with_positions, position, remember

__all__ = [
    "case_identity",
    "certificate_identity",
    "describe_config_error",
    "load_acl",
    "load_config",
    "load_server_context",
    "load_shadow",
    "load_yaml",
]


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (a silent last-one-wins would
    hide a second ``tls:`` section or a repeated rule key)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key; construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined on line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str) -> object:
    """Read and parse the YAML file at ``path``; every failure is a ``ConfigError(path, ...)``.
    The position of every key path is remembered (``proxy.yamlpos``) for error messages."""
    text = _read_text(path)
    try:
        data, positions = compose_with_positions(text, _StrictLoader)  # SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(path, "", f"invalid YAML: {problem}", line, column) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"invalid YAML: {exc}") from None
    remember(path, positions)
    return data


def _read_text(path: str) -> str:
    """The UTF-8 text of ``path``; a failure is a ``ConfigError(path, "", reason)``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", f"file not found (working directory {Path.cwd()})") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, "", f"not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None


def load_config(path: str) -> Config:
    """Load and validate the proxy configuration file."""
    return parse_config(load_yaml(path), source=path)


def load_acl(path: str, config_source: str | None = None) -> Policy:
    """Load and compile the ACL file named by the config's ``acl`` key. With
    ``config_source`` (the config file), a file that cannot be read is reported against the
    config's ``acl`` key: ``proxy.yaml: acl: nope.yaml: file not found``."""
    if config_source is not None:
        try:
            _read_text(path)
        except ConfigError as exc:
            raise ConfigError(config_source, "acl", f"{path}: {exc.reason}") from None
    return parse_acl(load_yaml(path), source=path)


def load_shadow(config: Config) -> Policy | None:
    """The shadow ACL named by ``acl_shadow`` (``None`` when the key is absent); a file that
    cannot be read is reported against that key."""
    path = config.acl_shadow
    if path is None:
        return None
    try:
        _read_text(path)
    except ConfigError as exc:
        raise ConfigError(config.source, "acl_shadow", f"{path}: {exc.reason}") from None
    return parse_acl(load_yaml(path), source=path)


def describe_config_error(exc: ConfigError) -> str:
    """``str(exc)`` followed by the line and column of the error (a YAML syntax error) or of
    its key path when the file was loaded here: ``proxy.yaml: tls.cert: ... (line 5, column
    3)``."""
    if exc.line is not None:
        return f"{exc} (line {exc.line}, column {exc.column})"
    if not exc.key:
        return str(exc)
    found = position(exc.source, exc.key)
    if found is None:
        return str(exc)
    return f"{exc} (line {found[0]}, column {found[1]})"


def load_server_context(config: Config) -> ssl.SSLContext:
    """The server's TLS context from the files ``config.tls`` names."""
    return server_context(config.tls, source=config.source)


def certificate_identity(path: str, config: Config | None) -> tuple[Identity, bool]:
    """The identity of the certificate at ``path`` (with ``config``: its issuer from
    tls.client_ca), and whether ``config`` is given and it does not chain to one of those CAs."""
    cert = load_cert(path)
    issuer_der: bytes | None = None
    unchained = False
    if config is not None:
        try:  # intermediates may follow the leaf in the file, as a client would send them
            sent = x509.load_pem_x509_certificates(Path(path).read_bytes())[1:]
        except (OSError, ValueError):
            sent = []
        chain = rebuild_chain(cert, load_client_cas(config.tls, config.source), sent)
        unchained = chain is None
        if chain is not None and len(chain) > 1:
            issuer_der = chain[1].public_bytes(Encoding.DER)
    identity = identity_from_der(
        cert.public_bytes(Encoding.DER),
        issuer_der=issuer_der,
        require_client_auth_eku=config is None or config.tls.require_client_auth_eku,
    )
    return identity, unchained


def case_identity(path: str, config: Config | None) -> Identity:
    """The identity the proxy would see for the certificate at ``path`` (with ``config``: its
    issuer from tls.client_ca, and a refusal when it does not chain to one of those CAs)."""
    identity, unchained = certificate_identity(path, config)
    if unchained and identity.refusal is None:
        assert config is not None
        reason = f"no chain to a CA of tls.client_ca ({config.tls.client_ca}): TLS handshake fails"
        identity = replace(identity, refusal=reason)
    return identity

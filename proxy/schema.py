"""One wording for the schema errors of every YAML document the proxy reads.

The configuration file (``proxy.config``) and the ACL (``proxy.acl.parse``) report the same
three kinds of mistake the same way, as ``ConfigError(source, key_path, reason)`` with the path
of the offending key: a value of the wrong type (``expected a mapping, got a list``), an
unknown key (``unknown key 'crls' (did you mean 'crl'?); expected one of ...``, at the path of
that key) and a missing key (``missing required key``). ``describe`` names a value's type, and
its value when that helps (``an integer (5)``, ``a string ('x')``). Pure: no I/O imports; the
CLI adds the line and column.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from proxy.errors import ConfigError

__all__ = ["describe", "join", "mapping", "missing_key", "suggest", "unknown_key", "wrong_type"]

_SHOWN = 40  # characters of a wrong string value quoted in a message


def join(path: str, key: str) -> str:
    """The key path of ``key`` inside the mapping at ``path`` (``""`` is the top level)."""
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """A value's YAML type for an error message, with the value itself for scalars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def wrong_type(source: str, path: str, expected: str, value: object) -> ConfigError:
    """``expected <expected>, got <describe(value)>`` at ``path``."""
    return ConfigError(source, path, f"expected {expected}, got {describe(value)}")


def unknown_key(source: str, path: str, key: object, allowed: Iterable[str]) -> ConfigError:
    """An unknown ``key`` of the mapping at ``path``, reported at the key's own path."""
    names = list(allowed)
    text = str(key)
    return ConfigError(
        source,
        join(path, text),
        f"unknown key {text!r}{suggest(text, names)}; expected one of {', '.join(names)}",
    )


def missing_key(source: str, path: str, what: str = "") -> ConfigError:
    """A required key absent at ``path``; ``what`` says what it should hold."""
    return ConfigError(
        source, path, f"missing required key ({what})" if what else "missing required key"
    )


def mapping(
    source: str, path: str, value: object, allowed: Iterable[str], what: str = "a mapping"
) -> Mapping[str, object]:
    """``value`` as a mapping whose keys are all in ``allowed``, or the error for the first
    problem (wrong type, then the first unknown or non-string key)."""
    if not isinstance(value, Mapping):
        raise wrong_type(source, path, what, value)
    names = tuple(allowed)
    for key in value:
        if not isinstance(key, str) or key not in names:
            raise unknown_key(source, path, key, names)
    return value

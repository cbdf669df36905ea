"""The ACL file format: already-parsed YAML data -> a compiled ``Policy`` (``parse_acl``).

Validates strictly -- unknown keys, wrong types, bad patterns and unknown principals are
errors -- and reports the first problem as ``ConfigError(source, key_path, reason)``, worded
through ``proxy.schema`` like the configuration file's errors. Each match pattern is normalized
(lowercase DNS names and pins, URI match form, canonical networks, RFC 4514 issuer DNs) and
compiled into its matcher; each rule's tube patterns into the cheapest test for their shape.
The format is documented in ``config/ACL.md``. Pure: no asyncio, socket, ssl, click or yaml.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from proxy import schema
from proxy.acl.globs import StarGlob, exact_matcher, segment_matcher, star_matcher
from proxy.acl.policy import Condition, Policy, Principal, PutLimits, Rule
from proxy.acl.verbs import (
    ALL,
    ALWAYS,
    ANY,
    COMMAND_VERBS,
    MATCH_KEYS,
    MAX_TUBE_PATTERN,
    TUBE_CHARS,
    VERBS,
)
from proxy.errors import ConfigError
from proxy.identity import normalize_dn, uri_match_form
from proxy.schema import suggest

__all__ = ["parse_acl"]

_U32_MAX: Final = 2**32 - 1
_MAX_RATE: Final = 1e9  # commands per second; far beyond what a proxy process can relay
_PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@:/+-]{0,99}")
_DNS_PATTERN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._*")
_HEX: Final = frozenset("0123456789abcdef")


def _one_of(names: Iterable[str]) -> str:
    return ", ".join(names)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def mapping(self, value: object, key: str, allowed: tuple[str, ...]) -> Mapping[str, object]:
        return schema.mapping(self.source, key, value, allowed)

    def missing(self, key: str) -> ConfigError:
        return schema.missing_key(self.source, key)

    def seq(self, value: object, key: str, what: str) -> list[object]:
        if not isinstance(value, list | tuple):
            raise schema.wrong_type(self.source, key, f"a list of {what}", value)
        return list(value)

    def string(self, value: object, key: str, what: str) -> str:
        if not isinstance(value, str):
            raise schema.wrong_type(self.source, key, f"{what} (a string)", value)
        if not value:
            raise self.fail(key, f"{what} must not be empty")
        return value

    def integer(self, value: object, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise schema.wrong_type(self.source, key, "an integer", value)
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range [{low}, {high}]")
        return value

    # -- document -----------------------------------------------------------------------------

    def document(self, data: object) -> Policy:
        if data is None:
            raise self.fail(
                "", "the ACL is empty; expected a mapping with 'principals' and 'rules'"
            )
        doc = self.mapping(data, "", ("principals", "rules"))
        for required in ("principals", "rules"):
            if required not in doc:
                raise self.missing(required)
        raw_principals = self.seq(doc["principals"], "principals", "principal definitions")
        principals: list[Principal] = []
        first_index: dict[str, int] = {}
        for i, raw in enumerate(raw_principals):
            p = self.principal(raw, i)
            if p.name in first_index:
                raise self.fail(
                    f"principals[{i}].name",
                    f"duplicate principal name {p.name!r} (first defined at "
                    f"principals[{first_index[p.name]}])",
                )
            first_index[p.name] = i
            principals.append(p)
        raw_rules = self.seq(doc["rules"], "rules", "rules")
        rules = [self.rule(raw, i, first_index) for i, raw in enumerate(raw_rules)]
        return Policy(principals, rules, self.source)

    # -- principals ---------------------------------------------------------------------------

    def principal(self, raw: object, index: int) -> Principal:
        key = f"principals[{index}]"
        body = self.mapping(raw, key, ("name", "match", "rate"))
        for required in ("name", "match"):
            if required not in body:
                raise self.missing(f"{key}.{required}")
        name = self.string(body["name"], f"{key}.name", "a principal name")
        if name == "*":
            raise self.fail(f"{key}.name", "'*' is reserved for rules that apply to everyone")
        if not _PRINCIPAL_NAME.fullmatch(name):
            raise self.fail(
                f"{key}.name",
                f"invalid principal name {name!r}: use 1-100 characters from A-Z a-z 0-9 "
                "_ . @ : / + -, starting with a letter, digit or _",
            )
        match = self.mapping(body["match"], f"{key}.match", MATCH_KEYS)
        if not match:
            raise self.fail(f"{key}.match", f"must name at least one of {_one_of(MATCH_KEYS)}")
        conditions = tuple(
            self.condition(k, match[k], f"{key}.match.{k}") for k in MATCH_KEYS if k in match
        )
        rate = self.rate(body["rate"], f"{key}.rate") if "rate" in body else None
        return Principal(index, name, conditions, rate)

    def rate(self, raw: object, key: str) -> tuple[float, int]:
        body = self.mapping(raw, key, ("per_second", "burst"))
        if "per_second" not in body:
            raise self.missing(f"{key}.per_second")
        per_second = self.positive_number(body["per_second"], f"{key}.per_second")
        if "burst" in body:
            burst = self.integer(body["burst"], f"{key}.burst", 1, _U32_MAX)
        else:
            burst = max(1, math.ceil(per_second))
        return per_second, burst

    def positive_number(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = " (unquote it; YAML reads 1e3 as a string: write 1000 or 1.0e+3)"
                except ValueError:
                    pass
            raise self.fail(key, f"expected a number > 0, got {schema.describe(value)}{hint}")
        number = float(value)
        if not math.isfinite(number) or not 0 < number <= _MAX_RATE:
            raise self.fail(key, f"expected a number > 0 (at most {_MAX_RATE:.0f}), got {value}")
        return number

    def condition(self, mkey: str, raw: object, key: str) -> Condition:
        items: list[tuple[object, str]]
        if isinstance(raw, list | tuple):
            if not raw:
                raise self.fail(key, "the list of patterns is empty")
            items = [(v, f"{key}[{i}]") for i, v in enumerate(raw)]
        else:
            items = [(raw, key)]
        patterns: list[str] = []
        matchers: list[Callable[[str], bool]] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for value, vkey in items:
            text = self.string(value, vkey, f"a {mkey} pattern")
            if mkey in ("cn", "ou"):
                patterns.append(text)
                matchers.append(star_matcher(text))
            elif mkey == "dns":
                if not text.isascii():
                    raise self.fail(vkey, _non_ascii_dns(text))
                text = text.encode("ascii").lower().decode("ascii")
                bad = sorted(set(text) - _DNS_PATTERN_CHARS)
                if bad:
                    raise self.fail(vkey, f"invalid character {bad[0]!r} in DNS pattern {text!r}")
                self.no_triple_star(text, vkey)
                patterns.append(text)
                matchers.append(segment_matcher(text, "."))
            elif mkey == "uri":
                if any(ch.isspace() or not ch.isprintable() for ch in text):
                    raise self.fail(vkey, f"URI pattern {text!r} contains whitespace or controls")
                self.no_triple_star(text, vkey)
                form = uri_match_form(text, pattern=True)
                if form is None:
                    raise self.fail(
                        vkey,
                        f"URI pattern {text!r} is not a plain URI: it needs a scheme and must "
                        f"have no userinfo, query, fragment, '.' or '..' segment, malformed "
                        f"'%' escape or percent-encoded unreserved character (no certificate "
                        f"URI of that form ever matches)",
                    )
                patterns.append(form)
                matchers.append(segment_matcher(form, "/"))
            elif mkey == "ip":
                try:
                    net = ipaddress.ip_network(text, strict=True)
                except ValueError as exc:
                    raise self.fail(
                        vkey, f"expected an IP address or CIDR network: {exc}"
                    ) from None
                networks.append(net)
                patterns.append(str(net))
            elif mkey == "issuer" and not text.lower().startswith("sha256:"):
                try:
                    dn = normalize_dn(text)
                except ValueError:
                    raise self.fail(
                        vkey,
                        f"expected the CA's subject as an RFC 4514 string (e.g. "
                        f"'CN=Example CA,O=Example', attribute names in upper case, no space "
                        f"after ',') or 'sha256:' and the CA certificate's fingerprint, "
                        f"got {text!r}",
                    ) from None
                patterns.append(dn)
                matchers.append(exact_matcher(dn))
            else:  # fingerprint, spki, issuer as sha256: pin
                pin = _normalize_pin(text)
                if pin is None:
                    raise self.fail(
                        vkey,
                        f"expected 'sha256:' followed by 64 hex digits (colons between pairs "
                        f"allowed), got {text!r}",
                    )
                patterns.append(pin)
                matchers.append(exact_matcher(pin))
        return Condition(mkey, tuple(patterns), tuple(matchers), tuple(networks))

    def no_triple_star(self, text: str, key: str) -> None:
        if "***" in text:
            raise self.fail(key, f"'***' is ambiguous in {text!r}; use '*' (one segment) or '**'")

    # -- rules --------------------------------------------------------------------------------

    def rule(self, raw: object, index: int, principals: Mapping[str, int]) -> Rule:
        key = f"rules[{index}]"
        body = self.mapping(raw, key, ("principal", "tubes", "allow", "deny", "put"))
        if "principal" not in body:
            raise self.missing(f"{key}.principal")
        principal = self.string(body["principal"], f"{key}.principal", "a principal name or '*'")
        if principal != "*" and principal not in principals:
            defined = _one_of(principals) or "none"
            raise self.fail(
                f"{key}.principal",
                f"unknown principal {principal!r}{suggest(principal, list(principals))}; "
                f"defined principals: {defined} (or '*' for everyone)",
            )
        tubes = self.tubes(body.get("tubes", ["*"]), f"{key}.tubes")
        has_allow, has_deny = "allow" in body, "deny" in body
        if has_allow == has_deny:
            raise self.fail(
                key,
                "a rule needs exactly one of 'allow' or 'deny' (write two rules for both)"
                if has_allow
                else "a rule needs exactly one of 'allow' or 'deny'",
            )
        effect = "allow" if has_allow else "deny"
        entries = self.entries(body[effect], f"{key}.{effect}")
        verbs: set[str] = set()
        commands: set[str] = set()
        for entry in entries:
            if entry == ALL:
                verbs.update(VERBS)
            elif entry in VERBS:
                verbs.add(entry)
            else:
                commands.add(entry)
        limits: PutLimits | None = None
        if "put" in body:
            if effect == "deny":
                raise self.fail(f"{key}.put", "producer constraints belong on allow rules")
            if "produce" not in verbs and "put" not in commands:
                raise self.fail(
                    f"{key}.put",
                    "producer constraints need a rule that allows put (produce, put or all)",
                )
            limits = self.put_limits(body["put"], f"{key}.put")
        # Precompile the tube patterns into the cheapest test for each shape.
        exact: set[str] = set()
        prefixes: list[str] = []
        globs: list[StarGlob] = []
        for t in tubes:
            if "*" not in t:
                exact.add(t)
            elif t != "*" and t.index("*") == len(t) - 1:
                prefixes.append(t[:-1])
            elif t != "*":
                globs.append(StarGlob(t))
        text = f"{key} ({effect} {','.join(entries)} on {','.join(tubes)})"
        return Rule(
            index=index,
            principal=principal,
            tubes=tubes,
            deny=effect == "deny",
            entries=entries,
            verbs=frozenset(verbs),
            commands=frozenset(commands),
            limits=limits,
            any_tube="*" in tubes,
            exact=frozenset(exact),
            prefixes=tuple(prefixes),
            globs=tuple(globs),
            text=text,
        )

    def tubes(self, raw: object, key: str) -> tuple[str, ...]:
        items = self.seq(raw, key, "tube patterns")
        if not items:
            raise self.fail(key, 'must list at least one tube pattern (use "*" for every tube)')
        out: list[str] = []
        for i, value in enumerate(items):
            ikey = f"{key}[{i}]"
            pattern = self.string(value, ikey, "a tube pattern")
            if len(pattern) > MAX_TUBE_PATTERN:
                raise self.fail(
                    ikey, f"tube pattern is {len(pattern)} characters; at most {MAX_TUBE_PATTERN}"
                )
            for ch in pattern:
                if ch != "*" and ch not in TUBE_CHARS:
                    raise self.fail(
                        ikey,
                        f"invalid character {ch!r} in tube pattern {pattern!r}; tube names use "
                        "A-Z a-z 0-9 - + / ; . $ _ ( ) and patterns add '*'",
                    )
            if pattern.startswith("-"):
                raise self.fail(
                    ikey, f"tube names never begin with '-', so {pattern!r} never matches"
                )
            # Normalize runs of stars: "a**b" means the same as "a*b".
            while "**" in pattern:
                pattern = pattern.replace("**", "*")
            out.append(pattern)
        return tuple(out)

    def entries(self, raw: object, key: str) -> tuple[str, ...]:
        items = self.seq(raw, key, "verbs or command names")
        if not items:
            raise self.fail(key, "must name at least one verb or command")
        out: list[str] = []
        choices = (*VERBS, ALL)
        for i, value in enumerate(items):
            ikey = f"{key}[{i}]"
            entry = self.string(value, ikey, "a verb or command name")
            if entry in choices:
                out.append(entry)
                continue
            verb = COMMAND_VERBS.get(entry)
            if verb == ALWAYS:
                raise self.fail(
                    ikey,
                    f"{entry!r} is always allowed (it only touches the connection's own state) "
                    "and cannot be named in a rule",
                )
            if verb == ANY:
                raise self.fail(
                    ikey,
                    f"{entry!r} cannot be named in a rule: it is allowed on any tube where the "
                    "principal holds some right (produce, consume, inspect or manage)",
                )
            if verb is None:
                named = [c for c, v in COMMAND_VERBS.items() if v not in (ALWAYS, ANY)]
                raise self.fail(
                    ikey,
                    f"unknown verb {entry!r}{suggest(entry, [*choices, *named])}; expected one "
                    f"of {_one_of(choices)} or a command name ({_one_of(named)})",
                )
            out.append(entry)
        return tuple(out)

    def put_limits(self, raw: object, key: str) -> PutLimits:
        body = self.mapping(raw, key, ("max_body", "priority", "delay", "ttr"))
        if not body:
            raise self.fail(key, "empty producer constraints; set max_body, priority, delay or ttr")
        max_body = None
        if "max_body" in body:
            max_body = self.integer(body["max_body"], f"{key}.max_body", 0, _U32_MAX)
        ranges: dict[str, tuple[int, int] | None] = {}
        for name in ("priority", "delay", "ttr"):
            ranges[name] = None
            if name not in body:
                continue
            rkey = f"{key}.{name}"
            items = self.seq(body[name], rkey, "two integers [low, high]")
            if len(items) != 2:
                raise self.fail(rkey, f"expected [low, high], got {len(items)} values")
            low = self.integer(items[0], f"{rkey}[0]", 0, _U32_MAX)
            high = self.integer(items[1], f"{rkey}[1]", 0, _U32_MAX)
            if low > high:
                raise self.fail(rkey, f"low {low} is greater than high {high}")
            ranges[name] = (low, high)
        return PutLimits(max_body, ranges["priority"], ranges["delay"], ranges["ttr"])


def _non_ascii_dns(text: str) -> str:
    """The error for a DNS pattern with non-ASCII characters, naming its A-label form."""
    try:
        alabel = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return f"DNS pattern {text!r} is not ASCII; write internationalized names as IDNA A-labels"
    return (
        f"DNS pattern {text!r} is not ASCII; names are compared as IDNA A-labels, write {alabel!r}"
    )


def _normalize_pin(text: str) -> str | None:
    """``sha256:<64 hex>`` (any case, optional colons between hex pairs) -> lowercase form."""
    prefix, sep, digest = text.partition(":")
    if not sep or prefix.lower() != "sha256":
        return None
    digest = digest.lower()
    if ":" in digest:
        pairs = digest.split(":")
        if any(len(p) != 2 for p in pairs):
            return None
        digest = "".join(pairs)
    if len(digest) != 64 or not set(digest) <= _HEX:
        return None
    return "sha256:" + digest


def parse_acl(data: object, source: str) -> Policy:
    """Validate and compile an ACL document (already-parsed YAML data) into a ``Policy``.

    Raises ``ConfigError(source, key_path, reason)`` on the first problem, e.g.
    ``rules[2].allow[0]: unknown verb 'produse' (did you mean 'produce'?) ...``.
    """
    return _Parser(source).document(data)

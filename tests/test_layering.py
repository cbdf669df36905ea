"""The layering rule, checked over the source: a pure module does no I/O, not even indirectly.

A module of ``proxy/`` is pure when it belongs to the sans-I/O core (``CORE``, every module of
the ``proxy.acl`` package) or declares itself pure in its docstring: in its summary line, or
in a sentence such as "Pure: ..." or "This module is pure". No pure module may import
``asyncio``, ``socket``, ``ssl``, ``click`` or ``yaml``, directly or through any module of
``proxy`` it imports (importing ``proxy.a.b`` also runs ``proxy/__init__.py`` and
``proxy/a/__init__.py``). A module that calls itself clock-free must not import ``time``
either. Imports are read with ``ast`` (including those inside functions and under
``TYPE_CHECKING``), so nothing is executed.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "click", "yaml"})
# Modules that must stay pure whatever their docstrings say (the core of docs/ARCHITECTURE.md).
CORE = frozenset(
    {
        "proxy.protocol",
        "proxy.session",
        "proxy.identity",
        "proxy.config",
        "proxy.ratelimit",
        "proxy.logsummary",
        "proxy.acltest",
        "proxy.acldiff",
    }
)
_DECLARED = re.compile(r"\bPure[:;,]|\bmodule is pure\b|\bis pure\b")


def _name(path: Path) -> str:
    parts = path.relative_to(PROXY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_name(p): p for p in sorted(PROXY.rglob("*.py"))}


@cache
def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def _with_parents(module: str) -> list[str]:
    """``proxy.a.b`` -> the modules importing it runs: ``proxy``, ``proxy.a``, ``proxy.a.b``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _direct_imports(name: str) -> frozenset[str]:
    """Every module ``name`` imports (absolute names; ``from x import y`` counts ``x.y`` too
    when that is a module of ``proxy``)."""
    out: set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return frozenset(out)


@cache
def _reach(name: str) -> dict[str, str]:
    """Every module ``name`` imports directly or transitively -> the ``proxy`` module that
    imports it (for the failure message)."""
    seen: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for imported in _direct_imports(current):
            for module in _with_parents(imported) if imported.startswith("proxy") else [imported]:
                if module in seen:
                    continue
                seen[module] = current
                if module in MODULES:
                    todo.append(module)
    return seen


def _docstring(name: str) -> str:
    return ast.get_docstring(_tree(name)) or ""


def _declared_pure(name: str) -> bool:
    doc = _docstring(name)
    summary = doc.split("\n\n", 1)[0]
    return bool(re.search(r"\bpure\b", summary, re.IGNORECASE) or _DECLARED.search(doc))


PURE = sorted(
    n
    for n in MODULES
    if n in CORE or n.startswith("proxy.acl.") or n == "proxy.acl" or _declared_pure(n)
)


def test_the_pure_set_holds_the_core_and_the_acl_package() -> None:
    assert set(MODULES) >= CORE, sorted(CORE - set(MODULES))
    assert {"proxy.acl", "proxy.acl.policy", "proxy.acl.parse"} <= set(PURE)
    # The shell is not pure: the rule would catch it if it were declared so.
    assert {"proxy.relay", "proxy.cli", "proxy.tunnel"}.isdisjoint(PURE)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_reaches_no_io_module(module: str) -> None:
    reached = _reach(module)
    forbidden = FORBIDDEN | ({"time"} if "clock-free" in _docstring(module) else set())
    bad = {m: via for m, via in reached.items() if m.split(".")[0] in forbidden}
    assert not bad, f"{module} imports " + ", ".join(
        f"{m} (via {v})" for m, v in sorted(bad.items())
    )


@pytest.mark.parametrize("module", ["proxy.relay", "proxy.cli", "proxy.watch"])
def test_the_rule_sees_io_in_the_shell(module: str) -> None:
    """The check can fail: shell modules do reach asyncio (directly or transitively)."""
    assert any(m.split(".")[0] in FORBIDDEN for m in _reach(module))


def test_the_rule_follows_imports_through_proxy_modules() -> None:
    """Transitive: ``proxy.acl`` reaches ``proxy.identity`` only through its submodules, and
    importing a submodule runs its packages' ``__init__`` files."""
    assert "proxy.identity" not in _direct_imports("proxy.acl")
    assert "proxy.identity" in _reach("proxy.acl")
    assert {"proxy", "proxy.acl", "proxy.acl.lint"} <= set(_reach("proxy.acl.policy"))

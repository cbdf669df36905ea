"""Where each key sits in a YAML file: a side table from key path to (line, column).

The pure modules (``proxy.config``, ``proxy.acl``) report problems as ``ConfigError(source,
key_path, reason)`` with key paths such as ``tls.cert`` or ``rules[3].allow[0]`` and never see
YAML. This loader layer composes the document (``yaml.compose`` keeps every node's
``start_mark``), constructs the data from that same node tree with the caller's loader class,
and records, for every mapping key and every list item, the 1-based line and column where it
starts. ``remember`` keeps the table of the last load of each file, and ``position`` answers
"where is this key path in that file", falling back to the nearest enclosing key that exists
(a *missing* key is reported at the mapping that lacks it).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["Positions", "compose_with_positions", "position", "remember"]

Positions = dict[str, tuple[int, int]]
"""Key path -> (line, column), both counted from 1."""

_MERGE = "tag:yaml.org,2002:merge"
_LAST_STEP = re.compile(r"(\[\d+\]|\.[^.\[\]]*)$")

_tables: dict[str, Positions] = {}


def compose_with_positions(text: str, loader: type[Any]) -> tuple[object, Positions]:
    """Parse ``text`` with ``loader`` (a ``yaml.SafeLoader`` subclass) and return the data and
    the position of every key path. YAML errors propagate as ``yaml.YAMLError``."""
    instance = loader(text)
    try:
        node = instance.get_single_node()
        if node is None:
            return None, {}
        data = instance.construct_document(node)
    finally:
        instance.dispose()
    table: Positions = {}
    _walk(node, "", table, set())
    return data, table


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: str, table: Positions, active: set[int]) -> None:
    if id(node) in active:  # a recursive alias: its paths are endless, stop here
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                continue
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            table.setdefault(sub, _mark(key_node))
            _walk(value_node, sub, table, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            table.setdefault(sub, _mark(item))
            _walk(item, sub, table, active)
    active.discard(id(node))


def remember(source: str, table: Positions) -> None:
    """Keep ``table`` as the positions of the file ``source`` (replacing an older load)."""
    _tables[source] = table


def position(source: str, key: str) -> tuple[int, int] | None:
    """(line, column) of ``key`` in the last load of ``source``, or of the nearest enclosing
    key path that exists there; None when the file or every enclosing path is unknown."""
    table = _tables.get(source)
    if table is None:
        return None
    while key:
        found = table.get(key)
        if found is not None:
            return found
        stripped = _LAST_STEP.sub("", key)
        if stripped == key:
            return None
        key = stripped
    return None

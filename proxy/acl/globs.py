"""Tube and certificate-name glob matchers, hand-written so matching is linear in the input.

``StarGlob``: ``*`` matches any run (tube patterns, ``cn``, ``ou``). ``SegmentGlob``: ``*``
stays within one segment and ``**`` crosses them (``dns`` with ``.``, ``uri`` with ``/``).
Neither backtracks. ``glob_regex`` writes a ``StarGlob`` pattern as a regex with atomic groups,
for the compiled per-principal tube visibility. Pure: no I/O imports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Final


class StarGlob:
    """``*`` matches any run of characters (including none); everything else is literal.

    Matching splits the pattern at the stars and finds the pieces left to right; the leftmost
    occurrence of each middle piece is always the best choice, so this is exact and linear-ish.
    """

    __slots__ = ("_head", "_literal", "_middle", "_tail")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("*")
        self._literal = len(parts) == 1
        self._head = parts[0]
        self._tail = parts[-1] if len(parts) > 1 else ""
        self._middle = tuple(p for p in parts[1:-1] if p)

    def __call__(self, text: str) -> bool:
        head, tail = self._head, self._tail
        if self._literal:
            return text == head
        if len(text) < len(head) + len(tail):
            return False
        if not text.startswith(head) or not text.endswith(tail):
            return False
        pos, end = len(head), len(text) - len(tail)
        for piece in self._middle:
            found = text.find(piece, pos, end)
            if found < 0:
                return False
            pos = found + len(piece)
        return True


class SegmentGlob:
    """``*`` matches within one segment (never ``sep``), ``**`` matches any run.

    Matching simulates the pattern's NFA over a set of positions: O(len(text) * len(pattern)),
    with no backtracking whatever the input.
    """

    __slots__ = ("_n", "_sep", "_tokens")

    _ONE: Final = 1  # token kinds: literal characters are plain strings
    _MANY: Final = 2

    def __init__(self, pattern: str, sep: str) -> None:
        tokens: list[str | int] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                tokens.append(self._MANY)
                i += 2
            elif pattern[i] == "*":
                tokens.append(self._ONE)
                i += 1
            else:
                tokens.append(pattern[i])
                i += 1
        self._tokens = tuple(tokens)
        self._n = len(tokens)
        self._sep = sep

    def _closure(self, states: Iterable[int]) -> set[int]:
        out: set[int] = set()
        for i in states:
            while i not in out:
                out.add(i)
                if i < self._n and isinstance(self._tokens[i], int):
                    i += 1
                else:
                    break
        return out

    def __call__(self, text: str) -> bool:
        tokens, n, sep = self._tokens, self._n, self._sep
        states = self._closure((0,))
        for ch in text:
            nxt: list[int] = []
            for i in states:
                if i == n:
                    continue
                tok = tokens[i]
                if tok == self._MANY or (tok == self._ONE and ch != sep):
                    nxt.append(i)
                elif tok == ch:
                    nxt.append(i + 1)
            if not nxt:
                return False
            states = self._closure(nxt)
        return n in states


def exact_matcher(pattern: str) -> Callable[[str], bool]:
    """Equality with ``pattern`` (no glob characters)."""
    return pattern.__eq__


def star_matcher(pattern: str) -> Callable[[str], bool]:
    """A ``StarGlob`` for ``pattern``, or plain equality when it has no ``*``."""
    return StarGlob(pattern) if "*" in pattern else exact_matcher(pattern)


def segment_matcher(pattern: str, sep: str) -> Callable[[str], bool]:
    """A ``SegmentGlob`` for ``pattern``, or plain equality when it has no ``*``."""
    return SegmentGlob(pattern, sep) if "*" in pattern else exact_matcher(pattern)


def glob_regex(pattern: str) -> str:
    """A tube glob as a linear-time regex: ``*`` is any run; each middle piece is found at its
    leftmost place inside an atomic group (as ``StarGlob`` does), the tail at the end."""
    if pattern == "*":
        return ".*"
    parts = pattern.split("*")
    if len(parts) == 1:
        return re.escape(pattern)
    head, *middle, tail = parts
    out = [re.escape(head)]
    out.extend(f"(?>.*?{re.escape(piece)})" for piece in middle if piece)
    out.append(f".*{re.escape(tail)}")
    return "".join(out)

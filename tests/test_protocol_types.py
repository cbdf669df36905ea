"""The wire vocabulary narrows under ``mypy --strict``: ``NEED_DATA`` is a one-member enum, so
``if cmd is NEED_DATA`` leaves a ``Command``, and a command is a tagged union of tuples, so
``if cmd[0] is OP_PUT`` leaves a ``PutCmd``. Each case is type-checked by mypy itself (the same
mypy CI runs); the rejection cases show the checks can fail."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from mypy import api

import proxy
from proxy.protocol import NEED_DATA, OP_PUT, ClientParser, Op

HEADER = """
from typing import Literal, assert_type
from proxy.protocol import (
    NEED_DATA, OP_ERROR, OP_PUT, OP_RELEASE, ClientParser, Command, ErrorCmd, NeedData,
    PutCmd, ReleaseCmd, ReplyParser,
)
p = ClientParser()
cmd = p.next_command()
"""

ACCEPTED = {
    "need-data narrows": """
        if cmd is not NEED_DATA:
            assert_type(cmd, Command)
        """,
    "need-data narrows the other way": """
        if cmd is NEED_DATA:
            assert_type(cmd, Literal[NeedData.NEED_DATA])
        """,
    "op tag narrows a put": """
        if cmd is not NEED_DATA and cmd[0] is OP_PUT:
            assert_type(cmd, PutCmd)
            body: bytes | None = cmd[4]
        """,
    "op tag narrows release and error": """
        if cmd is not NEED_DATA:
            if cmd[0] is OP_RELEASE:
                assert_type(cmd, ReleaseCmd)
                job, pri, delay = cmd[1], cmd[2], cmd[3]
            elif cmd[0] is OP_ERROR:
                assert_type(cmd, ErrorCmd)
                reply: bytes = cmd[1]
        """,
    "reply narrows": """
        reply = ReplyParser().next_reply()
        if reply is not NEED_DATA:
            line, body = reply
            assert_type(body, bytes | None)
        """,
}

#: name: (snippet, a fragment of the error mypy must report)
REJECTED = {
    "indexing before the NEED_DATA check": (
        """
        op = cmd[0]
        """,
        "is not indexable  [index]",
    ),
    "a put's body without the op check": (
        """
        if cmd is not NEED_DATA:
            body = cmd[4]
        """,
        "Tuple index out of range",
    ),
    "a release taken for a put": (
        """
        if cmd is not NEED_DATA and cmd[0] is OP_RELEASE:
            assert_type(cmd, PutCmd)
        """,
        "[assert-type]",
    ),
    "unpacking a reply before the NEED_DATA check": (
        """
        line, body = ReplyParser().next_reply()
        """,
        '"NeedData" object is not iterable',
    ),
}


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], tuple[str, int]]:
    """mypy --strict over HEADER + a snippet: (its report, its exit status)."""
    monkeypatch.setenv("MYPYPATH", str(Path(proxy.__file__).parent.parent))

    def run(snippet: str) -> tuple[str, int]:
        source = HEADER + textwrap.dedent(snippet)
        # no config file: pyproject's ``files`` would clash with ``-c``
        out, err, status = api.run(["--config-file=", "--strict", "-c", source])
        return out + err, status

    return run


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_narrowing_type_checks(check: Callable[[str], tuple[str, int]], name: str) -> None:
    out, status = check(ACCEPTED[name])
    assert status == 0, out


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_unnarrowed_use_is_a_type_error(
    check: Callable[[str], tuple[str, int]], name: str
) -> None:
    snippet, error = REJECTED[name]
    out, status = check(snippet)
    assert status == 1 and error in out, out


def test_runtime_values_are_the_typed_ones() -> None:
    """What mypy is told is what the parser returns: enum members, the one NEED_DATA."""
    p = ClientParser()
    assert p.next_command() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    p.feed(b"put 1 2 3 2\r\nhi\r\nquit\r\n")
    put = p.next_command()
    assert put == (OP_PUT, 1, 2, 3, b"hi") and put[0] is Op.PUT
    quit_ = p.next_command()
    assert quit_ != NEED_DATA and quit_[0] is Op.QUIT and int(quit_[0]) == 24
    assert p.next_command() is NEED_DATA

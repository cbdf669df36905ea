"""Which error replies does each beanstalkd client library notice?

Starts a tiny fake beanstalkd on 127.0.0.1 that answers every command with one chosen reply
line (reading a ``put``'s body by its byte count, so the stream stays framed), except ``stats``,
which it answers with a small valid body whose ``uptime`` is the number of commands the
connection sent before it: the drivers send ``stats`` after each operation on the same
connection, so ``uptime >= 1`` with the fake's pid proves the library stayed in sync. Each
library (tests/clients/libdrivers.py: Python ones in-process, PHP/Ruby/Node as driver scripts)
runs every operation against every reply, and the result is printed as a Markdown matrix.

    python scripts/denial_matrix.py > docs/denial-matrix.md.new
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "clients"))

import libdrivers
from fakeserver import FAKE_PID, FakeServer
from libdrivers import OPS, Result

REPLIES: tuple[str, ...] = (
    "NOT_PERMITTED", "NOT_FOUND", "UNKNOWN_COMMAND", "INTERNAL_ERROR", "OUT_OF_MEMORY",
    "BAD_FORMAT", "RATE_LIMITED", "NOT_PERMITTED extra words",
)  # fmt: skip


def in_sync(result: Result) -> bool | None:
    """Did the ``stats`` after the op get the fake's own reply on the same connection?"""
    if not result.sync:
        return None
    fields = dict(w.split("=", 1) for w in result.sync.split()[1:] if "=" in w)
    return (
        result.sync.startswith("stats ")
        and fields.get("pid") == str(FAKE_PID)
        and fields.get("uptime", "0").isdigit()
        and int(fields["uptime"]) >= 1
    )


def measure(
    libraries: list[str], replies: list[str], timeout: float
) -> dict[tuple[str, str], list[Result]]:
    out: dict[tuple[str, str], list[Result]] = {}
    with FakeServer() as server:
        for reply in replies:
            server.reply = reply
            for lib in libraries:
                out[lib, reply] = libdrivers.run(
                    lib, server.port, list(OPS), timeout, server.drop_all
                )
                print(f"measured {lib} / {reply}", file=sys.stderr)
    return out


def _flat(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _kind(result: Result) -> str:
    """The error class (or, for fivebeans, the error word) a raised result names."""
    head = result.detail.split(": ", 1)[0]
    return head.removeprefix("error ").strip('"')


def _cell(results: list[Result]) -> str:
    applicable = [r for r in results if r.outcome != "n/a"]
    silent = [r for r in applicable if r.outcome != "raised"]
    desync = [r.op for r in applicable if in_sync(r) is False]
    text = (
        f"raises for all {len(applicable)}"
        if not silent
        else f"**{len(silent)} of {len(applicable)} do not raise**"
    )
    if desync:
        text += f"; out of sync after {', '.join(desync)}"
    return text


def render(
    results: dict[tuple[str, str], list[Result]], libraries: list[str], replies: list[str],
    command: str,
) -> str:  # fmt: skip
    lines = [
        "## Measured matrix",
        "",
        f"Produced by `{command}` against a fake server that answers every command with the "
        "reply in the column (and `stats` with a valid body, to check the connection is still "
        "in sync afterwards). Each operation runs on a fresh connection. Library versions:",
        "",
    ]
    lines += [f"- {lib}: {libdrivers.version(lib)}" for lib in libraries]
    lines += ["", "| library | " + " | ".join(f"`{r}`" for r in replies) + " |",
              "|---|" + "---|" * len(replies)]  # fmt: skip
    for lib in libraries:
        lines.append(f"| {lib} | " + " | ".join(_cell(results[lib, r]) for r in replies) + " |")
    lines += ["", "Operations a library has no call for (not counted): "]
    na = {lib: [r.op for r in results[lib, replies[0]] if r.outcome == "n/a"] for lib in libraries}
    lines += [f"- {lib}: {', '.join(ops)}" for lib, ops in na.items() if ops]
    lines += ["", "### Where a library does not raise", ""]
    for lib in libraries:
        for reply in replies:
            bad = [r for r in results[lib, reply] if r.outcome not in ("raised", "n/a")]
            if bad:
                detail = "; ".join(f"`{r.op}` {r.outcome} {_flat(r.detail)}" for r in bad)
                lines.append(f"- **{lib}**, `{reply}`: {detail}")
    lines += ["", "### Connection still in sync after the reply", ""]
    bad_sync = [
        f"- {lib}, `{reply}`: `{r.op}` -> {r.sync or 'not probed (' + r.outcome + ')'}"
        for (lib, reply), rs in results.items()
        for r in rs
        if r.outcome != "n/a" and not in_sync(r)
    ]
    lines += bad_sync or [
        "Every library answered the `stats` sent after every reply with the fake server's own "
        "`stats` body on the same connection: no reply desynchronised any library."
    ]
    lines += ["", "### What each library raises", "",
              "| library | " + " | ".join(f"`{r}`" for r in replies) + " |",
              "|---|" + "---|" * len(replies)]  # fmt: skip
    for lib in libraries:
        cells = []
        for reply in replies:
            kinds = sorted({_kind(r) for r in results[lib, reply] if r.outcome == "raised"})
            cells.append(", ".join(f"`{k}`" for k in kinds) or "-")
        lines.append(f"| {lib} | " + " | ".join(cells) + " |")
    lines += ["", "### Per operation: how many libraries raise", "",
              "| operation | " + " | ".join(f"`{r}`" for r in replies) + " |",
              "|---|" + "---|" * len(replies)]  # fmt: skip
    for i, op in enumerate(OPS):
        cells = []
        for reply in replies:
            rs = [results[lib, reply][i] for lib in libraries]
            applicable = [r for r in rs if r.outcome != "n/a"]
            raised = sum(r.outcome == "raised" for r in applicable)
            cells.append(
                f"{raised}/{len(applicable)}" + ("" if raised == len(applicable) else " ✗")
            )
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--library",
        action="append",
        choices=libdrivers.LIBRARIES,
        help="only this library (repeatable; default: every installed one)",
    )
    parser.add_argument("--reply", action="append", help="only this reply (repeatable)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help="seconds before an operation counts as hung (default 3)",
    )
    args = parser.parse_args()
    libraries = args.library or list(libdrivers.LIBRARIES)
    missing = {lib: why for lib in libraries if (why := libdrivers.missing(lib))}
    for lib, why in missing.items():
        print(f"skipping {lib}: {why}", file=sys.stderr)
    libraries = [lib for lib in libraries if lib not in missing]
    replies = args.reply or list(REPLIES)
    results = measure(libraries, replies, args.timeout)
    command = "python scripts/denial_matrix.py" + "".join(f" {a}" for a in sys.argv[1:])
    sys.stdout.write(render(results, libraries, replies, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

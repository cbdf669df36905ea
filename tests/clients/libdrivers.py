"""Drive real beanstalkd client libraries one operation at a time and say what each did.

Every library gets the same list of operations (``OPS``); each operation runs on a fresh
connection to ``127.0.0.1:PORT`` and is reported as ``raised`` (the library's own error),
``returned <repr>`` (the call came back normally), ``crashed`` (a language-level error such as
a PHP ``TypeError``), ``hung`` (no answer within the timeout) or ``n/a`` (the library has no such
call). After the operation the driver sends ``stats`` on the same connection and reports what
came back, so a caller can tell whether the library stayed in sync with the server. The Python
libraries (greenstalk, pystalk, pystalkd) run in-process; Pheanstalk, beaneater, fivebeans and
jackd run as the small driver scripts next to this file, which print one JSON line per
operation. An operation token is ``NAME`` or ``NAME:ARG``: ARG is the tube of a tube command,
the id of a job command (``ignore`` defaults to ``default``, the one tube a fresh connection
watches, so libraries that track their watch list send it), the tube to ``use`` first for
put/kick/peek-ready/-delayed/-buried, and the tube to ``watch`` first (``default`` then
ignored) for reserve and reserve-with-timeout. Used by scripts/denial_matrix.py and
tests/test_client_libraries.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"

#: Every operation the matrix measures, in the order it is printed.
OPS: tuple[str, ...] = (
    "use", "watch", "ignore", "put", "reserve", "reserve-with-timeout", "delete", "release",
    "bury", "touch", "kick", "kick-job", "peek", "peek-ready", "peek-buried", "stats-job",
    "stats-tube", "pause-tube", "reserve-job", "peek-delayed", "list-tubes",
)  # fmt: skip

#: Operations whose ARG is a tube to ``use`` first.
USE_FIRST = ("put", "kick", "peek-ready", "peek-buried", "peek-delayed")
DEFAULT_TUBE = "jobs"
DEFAULT_JOB = 1


@dataclass(frozen=True)
class Result:
    """What one operation did: outcome word, a short detail, and the ``stats`` probe after it."""

    op: str
    outcome: str  # raised | returned | crashed | hung | n/a
    detail: str
    sync: str  # "stats pid=N uptime=N", "stats failed: ...", or "" when not probed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(str(data["op"]), str(data["outcome"]), str(data["detail"]), str(data["sync"]))


def split_op(token: str) -> tuple[str, str | None]:
    name, _, arg = token.partition(":")
    return name, (arg or None)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- Python libraries, in-process -------------------------------------------------------------


#: (client, op(client, name, arg), stats(client), the library's base error class)
Driver = tuple[Any, Callable[[Any, str, str | None], Any], Callable[[Any], Any], type[Exception]]


class _NA(Exception):
    """The library has no call for this operation."""


def _prelude(
    c: Any,
    name: str,
    arg: str | None,
    reserves: tuple[str, ...] = ("reserve", "reserve-with-timeout"),
    ignore_default: bool = True,
) -> tuple[str, int]:
    """What every library's ``op`` does first: the tube and job id ``arg`` names (or the
    defaults), ``use`` of that tube before a command that acts on the used tube, and ``watch``
    of it (and ``ignore default`` unless the library does so itself) before one of the
    library's ``reserves``."""
    if name in USE_FIRST and arg:
        c.use(arg)
    if name in reserves and arg:
        c.watch(arg)
        if ignore_default:
            c.ignore("default")
    return arg or DEFAULT_TUBE, int(arg) if arg and arg.isdigit() else DEFAULT_JOB


def _greenstalk(port: int) -> Driver:
    import greenstalk

    def op(c: Any, name: str, arg: str | None) -> Any:
        tube, job = _prelude(c, name, arg)
        calls: dict[str, Callable[[], Any]] = {
            "use": lambda: c.use(tube),
            "watch": lambda: c.watch(tube),
            "ignore": lambda: c.ignore(arg or "default"),
            "put": lambda: c.put(b"x"),
            "reserve": lambda: c.reserve(),
            "reserve-with-timeout": lambda: c.reserve(timeout=0),
            "delete": lambda: c.delete(job),
            "release": lambda: c.release(greenstalk.Job(job, b"")),
            "bury": lambda: c.bury(greenstalk.Job(job, b"")),
            "touch": lambda: c.touch(greenstalk.Job(job, b"")),
            "kick": lambda: c.kick(1),
            "kick-job": lambda: c.kick_job(job),
            "peek": lambda: c.peek(job),
            "peek-ready": lambda: c.peek_ready(),
            "peek-buried": lambda: c.peek_buried(),
            "stats-job": lambda: c.stats_job(job),
            "stats-tube": lambda: c.stats_tube(tube),
            "pause-tube": lambda: c.pause_tube(tube, 0),
            "reserve-job": lambda: c.reserve_job(job),
            "peek-delayed": lambda: c.peek_delayed(),
            "list-tubes": lambda: c.tubes(),
        }
        return calls[name]()

    client = greenstalk.Client(("127.0.0.1", port), encoding=None)
    return client, op, lambda c: c.stats(), greenstalk.Error


def _pystalk(port: int) -> Driver:
    import pystalk  # type: ignore[import-untyped]
    from pystalk.client import BeanstalkError  # type: ignore[import-untyped]

    def op(c: Any, name: str, arg: str | None) -> Any:
        # pystalk has no plain reserve, and ignores default itself on the first watch
        tube, job = _prelude(c, name, arg, ("reserve-with-timeout",), ignore_default=False)
        calls: dict[str, Callable[[], Any]] = {
            "use": lambda: c.use(tube),
            "watch": lambda: c.watch(tube),
            "ignore": lambda: c.ignore(arg or "default"),
            "put": lambda: c.put_job(b"x"),
            "reserve-with-timeout": lambda: c.reserve_job(0),
            "delete": lambda: c.delete_job(job),
            "release": lambda: c.release_job(job),
            "bury": lambda: c.bury_job(job),
            "kick": lambda: c.kick_jobs(1),
            "kick-job": lambda: c.kick_job(job),
            "peek-ready": lambda: c.peek_ready(),
            "peek-buried": lambda: c.peek_buried(),
            "stats-job": lambda: c.stats_job(job),
            "stats-tube": lambda: c.stats_tube(tube),
            "pause-tube": lambda: c.pause_tube(tube, 0),
            "peek-delayed": lambda: c.peek_delayed(),
            "list-tubes": lambda: c.list_tubes(),
        }
        if name not in calls:
            raise _NA(name)
        return calls[name]()

    client = pystalk.BeanstalkClient("127.0.0.1", port)
    return client, op, lambda c: c.stats(), BeanstalkError


def _pystalkd(port: int) -> Driver:
    from pystalkd.Beanstalkd import (  # type: ignore[import-untyped]
        BeanstalkdException,
        Connection,
    )

    def op(c: Any, name: str, arg: str | None) -> Any:
        tube, job = _prelude(c, name, arg)
        calls: dict[str, Callable[[], Any]] = {
            "use": lambda: c.use(tube),
            "watch": lambda: c.watch(tube),
            "ignore": lambda: c.ignore(arg or "default"),
            "put": lambda: c.put("x"),
            "reserve": lambda: c.reserve(),
            "reserve-with-timeout": lambda: c.reserve(timeout=0),
            "delete": lambda: c.delete(job),
            "release": lambda: c.release(job),
            "bury": lambda: c.bury(job),
            "touch": lambda: c.touch(job),
            "kick": lambda: c.kick(1),
            "kick-job": lambda: c.kick_job(job),
            "peek": lambda: c.peek(job),
            "peek-ready": lambda: c.peek_ready(),
            "peek-buried": lambda: c.peek_buried(),
            "stats-job": lambda: c.stats_job(job),
            "stats-tube": lambda: c.stats_tube(tube),
            "pause-tube": lambda: c.pause_tube(tube, 0),
            "peek-delayed": lambda: c.peek_delayed(),
            "list-tubes": lambda: c.tubes(),
        }
        if name not in calls:
            raise _NA(name)
        return calls[name]()

    client = Connection("127.0.0.1", port)
    return client, op, lambda c: c.stats(), BeanstalkdException


PY_FACTORIES: dict[str, Callable[[int], Driver]] = {
    "greenstalk": _greenstalk,
    "pystalk": _pystalk,
    "pystalkd": _pystalkd,
}


def _probe_text(stats: Any) -> str:
    def get(key: str) -> Any:
        if isinstance(stats, dict):
            return stats.get(key)
        return getattr(stats, key, None)

    return f"stats pid={get('pid')} uptime={get('uptime')}"


def _python_one(lib: str, port: int, token: str) -> Result:
    name, arg = split_op(token)
    client, op, stats, lib_error = PY_FACTORIES[lib](port)
    try:
        try:
            value = op(client, name, arg)
        except _NA:
            return Result(token, "n/a", "no such call", "")
        except lib_error as exc:
            outcome, detail = "raised", f"{type(exc).__name__}: {_short(str(exc), 50)}"
        except Exception as exc:
            outcome, detail = "crashed", f"{type(exc).__name__}: {_short(str(exc), 50)}"
        else:
            outcome, detail = "returned", _short(value)
        try:
            sync = _probe_text(stats(client))
        except Exception as exc:
            sync = f"stats failed: {type(exc).__name__}: {_short(str(exc), 40)}"
        return Result(token, outcome, detail, sync)
    finally:
        with contextlib.suppress(Exception):
            client.close()


def run_python(
    lib: str, port: int, ops: list[str], timeout: float, on_hang: Callable[[], None]
) -> list[Result]:
    """Each op in a thread; one that does not finish in ``timeout`` is ``hung`` and
    ``on_hang`` is called (it should close the server side so the thread ends)."""
    results = []
    for token in ops:
        box: queue.Queue[Result | BaseException] = queue.Queue()

        def work(token: str = token, box: queue.Queue[Result | BaseException] = box) -> None:
            try:
                box.put(_python_one(lib, port, token))
            except BaseException as exc:  # connect failure and the like
                box.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            got = box.get(timeout=timeout)
        except queue.Empty:
            results.append(Result(token, "hung", f"no answer in {timeout:g} s", ""))
            on_hang()
            thread.join(timeout)
            continue
        if isinstance(got, BaseException):
            results.append(Result(token, "crashed", f"{type(got).__name__}: {got}", ""))
        else:
            results.append(got)
    return results


# --- external libraries: driver scripts -------------------------------------------------------

EXTERNAL: dict[str, list[str]] = {
    "pheanstalk": ["php", str(HERE / "pheanstalk_driver.php")],
    "beaneater": ["ruby", str(HERE / "beaneater_driver.rb")],
    "fivebeans": ["node", str(NODE_DIR / "fivebeans_driver.js")],
    "jackd": ["node", str(NODE_DIR / "jackd_driver.js")],
}

LIBRARIES: tuple[str, ...] = (*PY_FACTORIES, *EXTERNAL)


def missing(lib: str) -> str | None:
    """Why ``lib`` cannot run here (None when it can)."""
    if lib in PY_FACTORIES:
        module = {"greenstalk": "greenstalk", "pystalk": "pystalk", "pystalkd": "pystalkd"}[lib]
        try:
            __import__(module)
        except ImportError:
            return f"Python package {module} is not installed (pip install -e '.[dev]')"
        return None
    exe = EXTERNAL[lib][0]
    if shutil.which(exe) is None:
        return f"{exe} is not installed (bash .ci/run installs it)"
    checks = {
        "pheanstalk": Path("/usr/share/php/Pheanstalk/autoload.php"),
        "beaneater": Path("/usr/lib/ruby/vendor_ruby/beaneater.rb"),
        "fivebeans": NODE_DIR / "node_modules" / "fivebeans",
        "jackd": NODE_DIR / "node_modules" / "jackd",
    }
    if not checks[lib].exists():
        return f"{checks[lib]} is missing (bash .ci/run installs it)"
    return None


def version(lib: str) -> str:
    """The installed version of ``lib`` (for the matrix header)."""
    from importlib.metadata import version as pyversion

    if lib in PY_FACTORIES:
        return pyversion(lib)
    if lib in ("pheanstalk", "beaneater"):
        pkg = {"pheanstalk": "php-pda-pheanstalk", "beaneater": "ruby-beaneater"}[lib]
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True
        )
        return f"{pkg} {out.stdout.strip() or '?'}"
    data = json.loads((NODE_DIR / "node_modules" / lib / "package.json").read_text())
    return str(data["version"])


def _reader(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _collect(stream: Any, into: list[str]) -> None:
    into.extend(stream or [])


def run_external(
    lib: str, port: int, ops: list[str], timeout: float, on_hang: Callable[[], None]
) -> list[Result]:
    """Run the driver script; an op with no JSON line within ``timeout`` is ``hung``: the
    driver is killed and started again for the remaining ops."""
    results: list[Result] = []
    todo = list(ops)
    env = {**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")}
    while todo:
        proc = subprocess.Popen(
            [*EXTERNAL[lib], str(port), *todo],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        errors: list[str] = []
        threading.Thread(target=_collect, args=(proc.stderr, errors), daemon=True).start()
        try:
            while todo:
                try:
                    line = lines.get(timeout=timeout)
                except queue.Empty:
                    results.append(Result(todo.pop(0), "hung", f"no answer in {timeout:g} s", ""))
                    on_hang()
                    break
                if line is None:  # the driver died without reporting this op
                    proc.wait()
                    detail = f"driver exited {proc.returncode}: {''.join(errors)[-200:]!r}"
                    results.append(Result(todo.pop(0), "crashed", detail, ""))
                    break
                if not line.startswith("{"):
                    continue  # a library printing something of its own
                result = Result.from_json(json.loads(line))
                assert result.op == todo[0], (result, todo)
                todo.pop(0)
                results.append(result)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
    return results


def run(
    lib: str, port: int, ops: list[str], timeout: float = 3.0,
    on_hang: Callable[[], None] = lambda: None,
) -> list[Result]:  # fmt: skip
    """Drive ``lib`` against 127.0.0.1:``port`` through ``ops``; one Result per op."""
    if lib in PY_FACTORIES:
        return run_python(lib, port, ops, timeout, on_hang)
    return run_external(lib, port, ops, timeout, on_hang)

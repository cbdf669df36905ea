"""The file watcher reloads only whole files, per kind, and counts real changes once.

The settle rule is tested as pure logic with a fake clock; the asyncio watcher runs for real
(real files, the CLI's reload path, a real proxy and beanstalkd) with its sleep replaced by a
tick the test gives, so "a pause shorter than the settle period" is a fact of the test, not a
timing bet: an ACL rewritten in place in two writes, the first without its trailing ``"*"``
deny rule, is never in force; a broken file flips ``config_last_reload_successful`` to 0 until
it is fixed; SIGHUP and the watcher seeing the same edit reload once; touching a file or
changing one kind reloads nothing of another kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PKI, TEST_ACL, Beanstalkd, Client, RunningProxy, make_config, start_proxy

from proxy.acl import Policy
from proxy.certs import issue_server
from proxy.config import Config
from proxy.logs import render_text
from proxy.reloading import files_changed, kind_files, reload, watched_files
from proxy.watch import FileState, Kinds, Settle, file_state, snapshot, watch


def events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of every captured event record."""
    return [r.fields for r in caplog.records if "event" in getattr(r, "fields", {})]  # type: ignore[attr-defined]


# --- the settle rule, with a fake clock ------------------------------------------------------


def snap(*digests: bytes | None) -> dict[str, FileState]:
    return {
        f"f{i}": FileState(None if d is None else (1, i, len(d), 0), d)
        for i, d in enumerate(digests)
    }


def test_a_change_is_reported_only_when_seen_unchanged_for_the_settle_period() -> None:
    s = Settle(snap(b"a"), settle=5.0)
    assert s.observe(0.0, snap(b"a")) is None  # nothing changed
    assert s.observe(5.0, snap(b"half")) is None  # first sight of a change
    assert s.observe(9.9, snap(b"half")) is None  # identical, but not for long enough
    assert s.observe(10.0, snap(b"half")) == snap(b"half")  # settled
    assert s.current == snap(b"half")
    assert s.observe(15.0, snap(b"half")) is None  # reported once


def test_a_file_still_being_written_never_settles() -> None:
    s = Settle(snap(b"a"), settle=2.0)
    for t in range(10):  # a slow writer: different content at every poll
        assert s.observe(float(t), snap(b"x" * t)) is None
    assert s.observe(10.0, snap(b"x" * 9)) is None  # the period runs from the last change
    assert s.observe(10.5, snap(b"x" * 9)) is None
    assert s.observe(11.0, snap(b"x" * 9)) == snap(b"x" * 9)


def test_the_next_poll_settles_with_a_zero_period_but_never_the_same_poll() -> None:
    s = Settle(snap(b"a"), settle=0.0)
    assert s.observe(1.0, snap(b"b")) is None
    assert s.observe(1.0, snap(b"b")) == snap(b"b")


def test_a_change_undone_before_it_settled_is_nothing() -> None:
    s = Settle(snap(b"a", b"k"), settle=1.0)
    assert s.observe(0.0, snap(b"b", b"k")) is None
    assert s.observe(1.0, snap(b"a", b"k")) is None  # back to what was loaded
    assert s.observe(5.0, snap(b"a", b"k")) is None


def test_a_new_stat_alone_is_a_change_to_settle_but_not_a_content_change() -> None:
    s = Settle(snap(b"a"), settle=1.0)
    touched = {"f0": FileState((1, 0, 1, 99), b"a")}
    assert s.observe(0.0, touched) is None
    assert s.observe(1.0, touched) == touched
    kinds = Kinds({"acl": ["f0"]}, snap(b"a"))
    assert kinds.changed(touched) == []


def test_file_state_reads_stat_and_content(tmp_path: Path) -> None:
    f = tmp_path / "acl.yaml"
    assert file_state(str(f)) == FileState(None, None)
    f.write_bytes(b"one")
    first = file_state(str(f))
    assert first.stat is not None and first.digest is not None
    os.utime(f, ns=(1, 1))
    touched = file_state(str(f))
    assert touched.stat != first.stat and touched.digest == first.digest
    f.write_bytes(b"two")  # same size
    assert file_state(str(f)).digest != first.digest
    assert file_state(str(tmp_path)).digest is None  # a directory: stat, but no content


def test_kinds_count_a_real_change_once_per_kind(tmp_path: Path) -> None:
    acl, cert, key = (tmp_path / n for n in ("acl.yaml", "cert.pem", "key.pem"))
    for f in (acl, cert, key):
        f.write_text(f.name)
    kinds = Kinds({"acl": [str(acl)], "tls": [str(cert), str(key), str(cert)]})
    assert kinds.paths == [str(acl), str(cert), str(key)]
    base = snapshot(kinds.paths)
    kinds = Kinds(kinds.groups, base)
    assert kinds.changed(base) == []
    acl.write_text("new")
    now = snapshot(kinds.paths)
    assert kinds.changed(now) == ["acl"]
    assert kinds.attempt("acl") is True  # a real change: counted
    assert kinds.attempt("acl") is False  # the same content again (SIGHUP, then the watcher)
    assert kinds.changed(now) == []
    assert kinds.attempt("tls") is False
    key.unlink()
    assert kinds.changed(snapshot(kinds.paths)) == ["tls"]
    assert kinds.attempt("tls") is True
    key.write_text("key.pem")  # back, with the content it was loaded from before
    assert kinds.changed(snapshot(kinds.paths)) == ["tls"]  # differs from the failed attempt


# --- the real watcher, driven tick by tick ---------------------------------------------------


class Ticker:
    """Replaces the watcher's ``asyncio.sleep``: each ``tick()`` lets exactly one poll run
    and returns once it has been handled (the watcher is asleep again)."""

    def __init__(self) -> None:
        self.asleep = 0
        self._cond = asyncio.Condition()
        self._go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, _interval: float) -> None:
        async with self._cond:
            self.asleep += 1
            self._cond.notify_all()
        await self._go.get()

    async def _wait_asleep(self, n: int) -> None:
        async with asyncio.timeout(10), self._cond:
            await self._cond.wait_for(lambda: self.asleep >= n)

    async def tick(self) -> None:
        await self._wait_asleep(1)
        n = self.asleep
        self._go.put_nowait(None)
        await self._wait_asleep(n + 1)


@dataclass
class Watched:
    proxy: RunningProxy
    config: Config
    kinds: Kinds
    acl: Path
    ca: Path
    ticker: Ticker

    @property
    def policy(self) -> Policy:
        current = self.proxy.server.policy.current
        assert isinstance(current, Policy)
        return current

    def sighup(self) -> None:
        """What the SIGHUP handler calls."""
        reload(self.config, self.proxy.server, self.kinds)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.proxy.server.metrics.registry.get_sample_value(name, labels)

    def reloads(self, kind: str, result: str) -> float:
        return self.sample("beanstalk_proxy_reloads_total", kind=kind, result=result) or 0.0

    def ok(self, kind: str) -> float | None:
        return self.sample("beanstalk_proxy_config_last_reload_successful", kind=kind)

    def ok_time(self, kind: str) -> float | None:
        return self.sample(
            "beanstalk_proxy_config_last_reload_success_timestamp_seconds", kind=kind
        )


def acl_text(extra_rule: dict[str, Any] | None = None) -> str:
    """TEST_ACL as block YAML; ``extra_rule`` goes before the final ``"*"`` deny rule."""
    data = copy.deepcopy(TEST_ACL)
    if extra_rule is not None:
        data["rules"].insert(-1, extra_rule)
    assert data["rules"][-1] == {"principal": "*", "tubes": ["secrets.*"], "deny": ["all"]}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


WORKER_REPORTS = {"principal": "worker", "tubes": ["reports"], "allow": ["produce"]}


@contextlib.asynccontextmanager
async def watched(pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path) -> AsyncIterator[Watched]:
    """A real proxy whose policy came from ``acl.yaml``, with the CLI's watcher, reload and
    SIGHUP paths wired as ``serve`` wires them."""
    acl = tmp_path / "acl.yaml"
    acl.write_text(acl_text())
    ca = tmp_path / "ca"
    shutil.copytree(pki.dir, ca)  # the TLS files of this proxy: a private copy
    config = make_config(pki, beanstalkd.port)
    tls = dataclasses.replace(
        config.tls,
        cert=str(ca / "server.pem"),
        key=str(ca / "server.key"),
        client_ca=str(ca / "ca.pem"),
    )
    config = dataclasses.replace(config, acl=str(acl), tls=tls)
    baseline = snapshot(watched_files(config))
    proxy = await start_proxy(pki, beanstalkd.port, acl=yaml.safe_load(acl.read_text()))
    kinds = Kinds(kind_files(config), baseline)
    for kind in kinds.groups:  # what _serve does at start-up
        proxy.server.metrics.reload_result(kind, True, counted=False)
    ticker = Ticker()

    def changed(old: Any, new: Any) -> None:
        files_changed(config, proxy.server, kinds, old, new)

    task = asyncio.get_running_loop().create_task(
        watch(kinds.paths, 5.0, baseline, changed, sleep=ticker.sleep)
    )
    try:
        yield Watched(proxy, config, kinds, acl, ca, ticker)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.server.close()


async def use(c: Client, tube: bytes) -> bytes:
    return await c.line(b"use " + tube)


async def test_an_acl_written_in_place_in_two_steps_is_never_half_in_force(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    async with watched(pki, beanstalkd, tmp_path) as w:
        admin = await w.proxy.connect("admin")
        worker = await w.proxy.connect("worker")
        old = w.policy
        await w.ticker.tick()  # nothing changed
        assert w.policy is old

        full = acl_text(WORKER_REPORTS)
        cut = full.index("- principal: '*'")
        with open(w.acl, "w") as f:  # in place, like `cat > acl.yaml` or a slow config tool
            f.write(full[:cut])  # a valid ACL without its "*" deny rule
            f.flush()
            await w.ticker.tick()  # the watcher sees the half file...
            assert w.policy is old  # ...and does not load it
            assert await use(admin, b"secrets.x") == b"NOT_PERMITTED"
            assert await admin.put(b"x") == b"NOT_PERMITTED"  # refused after a denied use
            assert await use(admin, b"default") == b"USING default"
            assert await admin.put(b"x") == b"INSERTED 1"
            f.write(full[cut:])  # the rest, less than a settle period later
        await w.ticker.tick()  # the whole file, first seen: not yet settled
        assert w.policy is old
        assert await use(admin, b"secrets.x") == b"NOT_PERMITTED"
        assert await use(worker, b"reports") == b"NOT_PERMITTED"  # the new rule: not yet
        await w.ticker.tick()  # unchanged for a poll interval: loaded
        assert w.policy is not old
        assert await use(worker, b"reports") == b"USING reports"
        assert await worker.put(b"r") == b"INSERTED 2"
        assert await use(admin, b"secrets.x") == b"NOT_PERMITTED"
        assert w.reloads("acl", "success") == 1  # the whole file, once
        assert w.reloads("acl", "failure") == 0
        assert w.reloads("tls", "success") == 0  # no TLS file changed
        await w.ticker.tick()
        assert w.reloads("acl", "success") == 1
        for c in (admin, worker):
            await c.close()


async def test_broken_file_flips_the_gauge_until_fixed_and_counts_once(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def errors() -> list[str]:
        return [render_text(r) for r in caplog.records if r.levelno >= logging.ERROR]

    async with watched(pki, beanstalkd, tmp_path) as w:
        worker = await w.proxy.connect("worker")
        old = w.policy
        assert (w.ok("acl"), w.ok("tls")) == (1, 1)
        started = w.ok_time("acl")
        assert started is not None and started > 0

        tmp = w.acl.with_name(".acl.tmp")
        tmp.write_text(acl_text().replace("allow:\n  - produce", "allow:\n  - produse", 1))
        os.replace(tmp, w.acl)  # atomically, as documented
        await w.ticker.tick()
        assert w.ok("acl") == 1  # not settled yet
        await w.ticker.tick()
        assert w.ok("acl") == 0  # visible until fixed
        assert w.ok("tls") == 1
        assert w.ok_time("acl") == started
        assert w.policy is old
        assert w.reloads("acl", "failure") == 1
        assert len(errors()) == 1 and "produse" in errors()[0]

        # the broken file stays: the watcher does not retry it, SIGHUP does (not counted again)
        for _ in range(2):
            await w.ticker.tick()
        assert len(errors()) == 1
        w.sighup()
        assert len(errors()) == 2
        assert w.reloads("acl", "failure") == 1
        assert w.ok("acl") == 0
        assert w.reloads("tls", "success") == 0  # SIGHUP reloaded TLS, but nothing changed

        # fixed, and SIGHUP sent at once: loaded once, although the watcher sees it too
        tmp.write_text(acl_text(WORKER_REPORTS))
        os.replace(tmp, w.acl)
        w.sighup()
        fixed = w.policy
        assert fixed is not old
        assert w.ok("acl") == 1
        fixed_at = w.ok_time("acl")
        assert fixed_at is not None and fixed_at >= started
        for _ in range(3):
            await w.ticker.tick()
        assert w.policy is fixed  # not loaded a second time
        assert w.reloads("acl", "success") == 1
        assert w.reloads("acl", "failure") == 1
        assert w.ok_time("acl") == fixed_at
        assert await use(worker, b"reports") == b"USING reports"
        assert await worker.put(b"r") == b"INSERTED 1"

        # a touch is no change: nothing reloaded
        os.utime(w.acl, ns=(1, 1))
        for _ in range(3):
            await w.ticker.tick()
        assert w.policy is fixed
        assert w.reloads("acl", "success") == 1
        assert w.reloads("tls", "success") == w.reloads("tls", "failure") == 0
        assert len(errors()) == 2
        await worker.close()


async def test_each_kind_reloads_only_for_its_own_files(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def reloaded(what: str) -> int:
        fields = [getattr(r, "fields", {}) for r in caplog.records]
        return sum(1 for f in fields if f.get("event") == "reload" and f.get("what") == what)

    async with watched(pki, beanstalkd, tmp_path) as w:
        policy = w.policy
        # an ACL change reloads the ACL only
        tmp = w.acl.with_name(".acl.tmp")
        tmp.write_text(acl_text(WORKER_REPORTS))
        os.replace(tmp, w.acl)
        for _ in range(2):
            await w.ticker.tick()
        assert (reloaded("acl"), reloaded("tls")) == (1, 0)
        assert (w.reloads("acl", "success"), w.reloads("tls", "success")) == (1, 0)
        changed = [f for f in events(caplog) if f["event"] == "files_changed"]
        assert changed == [{"event": "files_changed", "what": ["acl"], "paths": [str(w.acl)]}]
        policy = w.policy

        # the same certificate written again (new inode, same bytes) is no change
        cert = w.ca / "server.pem"
        same = cert.read_bytes()
        tmp = cert.with_name(".server.tmp")
        tmp.write_bytes(same)
        os.replace(tmp, cert)
        for _ in range(2):
            await w.ticker.tick()
        assert (reloaded("acl"), reloaded("tls")) == (1, 0)

        # a new server certificate and key reload TLS only
        issue_server(w.ca, force=True)
        assert cert.read_bytes() != same
        for _ in range(2):
            await w.ticker.tick()
        assert (reloaded("acl"), reloaded("tls")) == (1, 1)
        assert (w.reloads("acl", "success"), w.reloads("tls", "success")) == (1, 1)
        assert w.policy is policy
        changed = [f for f in events(caplog) if f["event"] == "files_changed"]
        assert changed[1:] == [
            {
                "event": "files_changed",
                "what": ["tls"],
                "paths": [str(cert), str(w.ca / "server.key")],
            }
        ]
        c = await w.proxy.connect("admin")
        assert await c.line(b"list-tube-used") == b"USING default"
        await c.close()

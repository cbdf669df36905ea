"""The shadow policy (``acl_shadow``) with live mutual-TLS connections and a real beanstalkd:
every difference is counted in /metrics and logged as ``shadow_mismatch`` while what clients
get stays what the enforced ACL decides; a certificate the shadow maps elsewhere is counted;
the shadow file reloads on SIGHUP, a broken one keeps the previous shadow and never touches
enforcement; ``explain --shadow`` prints both decisions."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import (
    PKI,
    TEST_ACL,
    Beanstalkd,
    Client,
    RunningProxy,
    free_port,
    serve_process,
    serving,
    status_listener,
    write_serve_config,
)
from test_metrics import scrape, value

from proxy.acl import parse_acl
from proxy.cli import main
from proxy.httpd import StatusServer

pytestmark = pytest.mark.integration

#: TEST_ACL with the proposed change: billing loses produce on "invoices" itself (keeps
#: "invoices.*"), gains produce on "secrets.x" (the enforced "*" deny still wins there, so the
#: shadow drops that deny), and the worker certificate maps to a new principal "consumer".
SHADOW: dict[str, Any] = {
    "principals": [
        {"name": "admin", "match": {"cn": "admin"}},
        {"name": "billing", "match": {"uri": "spiffe://example.org/billing/*"}},
        {"name": "consumer", "match": {"cn": "worker", "ou": "jobs"}},
    ],
    "rules": [
        {"principal": "admin", "tubes": ["*"], "allow": ["all"]},
        {"principal": "billing", "tubes": ["invoices.*", "secrets.x"], "allow": ["produce"]},
        {"principal": "billing", "tubes": ["invoices"], "allow": ["inspect"]},
        {"principal": "consumer", "tubes": ["invoices"], "allow": ["consume"]},
    ],
}
MISMATCH = "beanstalk_proxy_shadow_mismatch_total"


class Shadowed:
    def __init__(self, proxy: RunningProxy, status: StatusServer) -> None:
        self.proxy = proxy
        self.status = status

    async def metrics(self) -> dict[Any, float]:
        assert self.status.port is not None
        return await scrape(self.status.port)


@pytest.fixture
async def shadowed(pki: PKI, beanstalkd: Beanstalkd) -> AsyncIterator[Shadowed]:
    async with serving(pki, beanstalkd.port) as running:
        running.server.reload_shadow(parse_acl(SHADOW, "shadow.yaml"))
        async with status_listener(running) as listener:
            yield Shadowed(running, listener.server)


@pytest.fixture
def shadow_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="beanstalk_proxy.audit")
    return caplog


def mismatch_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "shadow_mismatch"
    ]


async def test_allowed_put_the_shadow_would_deny_is_counted_logged_and_still_runs(
    shadowed: Shadowed, shadow_log: pytest.LogCaptureFixture
) -> None:
    c = await shadowed.proxy.connect("billing")
    assert await c.line(b"use invoices") == b"USING invoices"
    reply = await c.put(b"hello")
    assert reply.startswith(b"INSERTED ")  # enforcement unchanged
    await c.close()
    m = await shadowed.metrics()
    labels = {"principal": "billing", "command": "put", "enforced": "allow", "shadow": "deny"}
    assert value(m, MISMATCH, **labels) == 1
    (event,) = mismatch_events(shadow_log)
    assert event["enforced_rule"] == "rules[1] (allow produce on invoices,invoices.*)"
    assert event["shadow_rule"].startswith("default deny")
    assert (event["tube"], event["shadow_principal"]) == ("invoices", "billing")


async def test_denied_put_the_shadow_would_allow_is_counted_and_still_denied(
    shadowed: Shadowed, shadow_log: pytest.LogCaptureFixture
) -> None:
    c = await shadowed.proxy.connect("billing")
    assert await c.line(b"use secrets.x") == b"NOT_PERMITTED"
    assert await c.put(b"secret") == b"NOT_PERMITTED"
    await c.close()
    m = await shadowed.metrics()
    for command in ("use", "put"):
        labels = {"principal": "billing", "command": command, "enforced": "deny"}
        assert value(m, MISMATCH, **labels, shadow="allow") == 1
    events = mismatch_events(shadow_log)
    assert [e["command"] for e in events] == ["use", "put"]
    assert all("secrets.*" in e["enforced_rule"] for e in events[:1])


async def test_agreeing_commands_count_nothing(shadowed: Shadowed) -> None:
    c = await shadowed.proxy.connect("admin")
    assert await c.line(b"use anything") == b"USING anything"
    assert (await c.put(b"x")).startswith(b"INSERTED ")
    await c.close()
    c = await shadowed.proxy.connect("billing")
    assert await c.line(b"use invoices.eu") == b"USING invoices.eu"
    assert (await c.put(b"x")).startswith(b"INSERTED ")
    await c.close()
    m = await shadowed.metrics()
    assert not [k for k in m if k[0] == MISMATCH]


async def test_certificate_mapped_to_another_principal_is_counted(shadowed: Shadowed) -> None:
    c = await shadowed.proxy.connect("worker")
    assert await c.line(b"watch invoices") == b"WATCHING 2"
    await c.close()
    m = await shadowed.metrics()
    name = "beanstalk_proxy_shadow_principal_mismatch_total"
    assert value(m, name, principal="worker", shadow_principal="consumer") == 1
    assert value(m, name, principal="admin", shadow_principal="admin") == 0


async def test_certificate_the_shadow_refuses_counts_refused(shadowed: Shadowed) -> None:
    c = await shadowed.proxy.connect("inspector")  # enforced: inspector; shadow: no principal
    ok = await c.call(b"stats-tube default")
    assert ok[0].startswith(b"OK ")
    await c.close()
    m = await shadowed.metrics()
    name = "beanstalk_proxy_shadow_principal_mismatch_total"
    assert value(m, name, principal="inspector", shadow_principal="-") == 1
    labels = {"principal": "inspector", "command": "stats-tube", "enforced": "allow"}
    assert value(m, MISMATCH, **labels, shadow="refused") == 1


async def test_dropping_the_shadow_stops_counting(shadowed: Shadowed) -> None:
    c = await shadowed.proxy.connect("billing")
    assert await c.line(b"use invoices") == b"USING invoices"
    shadowed.proxy.server.reload_shadow(None)
    assert (await c.put(b"x")).startswith(b"INSERTED ")
    await c.close()
    m = await shadowed.metrics()
    assert not [k for k in m if k[0] == MISMATCH]


# --- the serve command: acl_shadow loads, reloads on SIGHUP, a broken file changes nothing ----


async def tls_client(pki: PKI, port: int, name: str) -> Client:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context(name), server_hostname="localhost"
    )
    return Client(reader, writer)


async def test_serve_reloads_the_shadow_and_survives_a_broken_one(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    shadow_file = tmp_path / "acl.shadow.yaml"
    # the serve ACL lets admin do all; the first shadow denies admin "put" on "alpha"
    shadow_doc = {
        "principals": [{"name": "admin", "match": {"cn": "admin"}}],
        "rules": [
            {"principal": "admin", "allow": ["all"]},
            {"principal": "admin", "tubes": ["alpha"], "deny": ["put"]},
        ],
    }
    shadow_file.write_text(yaml.safe_dump(shadow_doc))
    cfg = write_serve_config(
        tmp_path,
        pki,
        beanstalkd.port,
        port,
        acl_shadow=str(shadow_file),
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    with serve_process(cfg) as log:
        proc = log.proc
        await log.wait_for(r"shadow ACL loaded")
        await log.wait_for(r"ready: listening")
        c = await tls_client(pki, port, "admin")
        assert await c.line(b"use alpha") == b"USING alpha"
        assert (await c.put(b"one")).startswith(b"INSERTED ")
        await log.wait_for(r"event=shadow_mismatch principal=admin .*command=put .*enforced=allow")

        # a broken shadow file: error logged, the old shadow and the enforced ACL stay
        shadow_file.write_text("rules: [\n")
        proc.send_signal(signal.SIGHUP)
        await log.wait_for(r"shadow ACL not loaded, keeping the previous shadow")
        assert (await c.put(b"two")).startswith(b"INSERTED ")
        await log.wait_for(r"event=shadow_mismatch principal=admin .*command=put", count=2)
        samples = await scrape(metrics_port)
        assert value(samples, "beanstalk_proxy_config_last_reload_successful", kind="shadow") == 0
        assert value(samples, "beanstalk_proxy_config_last_reload_successful", kind="acl") == 1

        # a fixed shadow (admin may put on alpha): the live connection follows it
        shadow_file.write_text(yaml.safe_dump({**shadow_doc, "rules": shadow_doc["rules"][:1]}))
        proc.send_signal(signal.SIGHUP)
        await log.wait_for(r"shadow ACL loaded", count=2)
        assert (await c.put(b"three")).startswith(b"INSERTED ")
        samples = await scrape(metrics_port)
        labels = {"principal": "admin", "command": "put", "enforced": "allow", "shadow": "deny"}
        assert value(samples, MISMATCH, **labels) == 2  # not 3
        assert value(samples, "beanstalk_proxy_config_last_reload_successful", kind="shadow") == 1
        await c.close()


async def test_file_watcher_reloads_the_shadow_alone(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    port = free_port()
    shadow_file = tmp_path / "acl.shadow.yaml"
    doc = {
        "principals": [{"name": "admin", "match": {"cn": "admin"}}],
        "rules": [{"principal": "admin", "allow": ["all"]}],
    }
    shadow_file.write_text(yaml.safe_dump(doc))
    cfg = write_serve_config(
        tmp_path,
        pki,
        beanstalkd.port,
        port,
        acl_shadow=str(shadow_file),
        reload={"watch": True, "interval": "200ms"},
    )
    with serve_process(cfg) as log:
        await log.wait_for(r"ready: listening")
        c = await tls_client(pki, port, "admin")
        assert await c.line(b"use beta") == b"USING beta"
        deny = {"principal": "admin", "tubes": ["beta"], "deny": ["put"]}
        shadow_file.write_text(yaml.safe_dump({**doc, "rules": [*doc["rules"], deny]}))
        await log.wait_for(r"files changed on disk, reloading .*what=\[\"shadow\"\]")
        await log.wait_for(r"shadow ACL loaded", count=2)
        assert (await c.put(b"x")).startswith(b"INSERTED ")  # enforced: allowed
        await log.wait_for(r"event=shadow_mismatch principal=admin .*command=put .*enforced=allow")
        assert not [ln for ln in log.lines if "reload: ACL" in ln]  # the ACL was not reloaded
        await c.close()


async def test_serve_starts_with_a_broken_shadow_and_enforces(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    port = free_port()
    shadow_file = tmp_path / "acl.shadow.yaml"
    shadow_file.write_text("principals: nope\n")
    cfg = write_serve_config(tmp_path, pki, beanstalkd.port, port, acl_shadow=str(shadow_file))
    with serve_process(cfg) as log:
        await log.wait_for(r"shadow ACL not loaded")
        await log.wait_for(r"ready: listening")
        c = await tls_client(pki, port, "admin")
        assert await c.line(b"use alpha") == b"USING alpha"
        await c.close()


# --- check-config and explain --shadow ------------------------------------------------------


def explain_config(pki: PKI, tmp_path: Path, shadow: object) -> Path:
    shadow_file = tmp_path / "acl.shadow.yaml"
    shadow_file.write_text(shadow if isinstance(shadow, str) else yaml.safe_dump(shadow))
    acl = tmp_path / "enforced.yaml"
    acl.write_text(yaml.safe_dump(TEST_ACL))
    cfg = write_serve_config(tmp_path, pki, 11300, 11400, acl_shadow=str(shadow_file))
    data = yaml.safe_load(cfg.read_text())
    data["acl"] = str(acl)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_explain_shadow_shows_both_decisions_and_the_mismatch(pki: PKI, tmp_path: Path) -> None:
    cfg = explain_config(pki, tmp_path, SHADOW)
    args = ["explain", "--config", str(cfg), "--principal", "billing", "--shadow"]
    result = CliRunner().invoke(main, [*args, "--tube", "invoices", "put 0 0 60 5"])
    assert result.exit_code == 0, result.output  # the enforced answer
    out = result.output
    assert "== enforced" in out and "== shadow" in out
    assert "decision: ALLOW by rules[1]" in out
    assert "decision: DENY by default deny" in out
    assert "MISMATCH: enforced ALLOW, shadow DENY" in out


@pytest.mark.parametrize(
    ("tube", "code", "expected"),
    [
        ("invoices.eu", 0, "same decision: ALLOW"),
        ("secrets.x", 1, "MISMATCH: enforced DENY or refused, shadow ALLOW"),
    ],
    ids=["same-decision", "enforced-deny-exits-1"],
)
def test_explain_shadow_decision(
    pki: PKI, tmp_path: Path, tube: str, code: int, expected: str
) -> None:
    cfg = explain_config(pki, tmp_path, SHADOW)
    args = ["explain", "--config", str(cfg), "--principal", "billing", "--shadow"]
    result = CliRunner().invoke(main, [*args, "--tube", tube, "put 0 0 60 5"])
    assert result.exit_code == code, result.output
    assert expected in result.output


def test_explain_shadow_without_the_key_is_a_usage_error(pki: PKI, tmp_path: Path) -> None:
    cfg = write_serve_config(tmp_path, pki, 11300, 11400)
    result = CliRunner().invoke(
        main, ["explain", "--config", str(cfg), "--principal", "admin", "--shadow", "stats"]
    )
    assert result.exit_code == 2 and "no acl_shadow key" in result.output


def test_check_config_rejects_a_broken_shadow(pki: PKI, tmp_path: Path) -> None:
    cfg = explain_config(pki, tmp_path, "rules: [\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "acl.shadow.yaml" in result.output


def test_check_config_reports_a_missing_shadow_against_its_key(pki: PKI, tmp_path: Path) -> None:
    cfg = write_serve_config(tmp_path, pki, 11300, 11400, acl_shadow=str(tmp_path / "nope.yaml"))
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "acl_shadow: " in result.output and "file not found" in result.output

"""ACL reload with live connections: every command is decided under the current policy.

A permission granted by a reload works on the very next command of a connection opened
before it; a revoked one is denied on the next command; a broken ACL document is rejected
whole (``parse_acl`` raises ``ConfigError`` with a key path) and the old policy stays in force,
both through the same parse-then-swap path the CLI's SIGHUP handler takes and through the
CLI's own reload function reading a file; a connection whose certificate no longer maps to any
principal is closed (both sides) while the others stay open; a certificate that now maps to a
different principal gets that principal's rights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PKI,
    Beanstalkd,
    direct,
    make_config,
    parse_yaml_map,
    serving,
)

from proxy.acl import Policy, parse_acl
from proxy.errors import ConfigError
from proxy.relay import ProxyServer

pytestmark = pytest.mark.integration

TENANT = {"name": "tenant", "match": {"cn": "worker", "ou": "jobs"}}
OPS = {"name": "ops", "match": {"cn": "admin"}}
AUDITOR = {"name": "auditor", "match": {"cn": "inspector"}}


def doc(*tenant_rules: dict[str, Any], principals: list[Any] | None = None) -> dict[str, Any]:
    return {
        "principals": principals if principals is not None else [TENANT, OPS, AUDITOR],
        "rules": [
            {"principal": "ops", "tubes": ["*"], "allow": ["all"]},
            {"principal": "auditor", "tubes": ["*"], "allow": ["inspect"]},
            *({"principal": "tenant", **r} for r in tenant_rules),
        ],
    }


ALPHA_ALL = {"tubes": ["alpha"], "allow": ["all"]}
BETA_ALL = {"tubes": ["beta"], "allow": ["all"]}


def reload_like_cli(server: ProxyServer, data: object) -> ConfigError | None:
    """What SIGHUP does: parse the new document; on any error keep the old policy (and say
    why); only a document that parsed completely is swapped in."""
    try:
        policy = parse_acl(data, "acl.yaml")
    except ConfigError as exc:
        return exc
    server.reload_policy(policy)
    return None


async def put_direct(port: int, tube: bytes, body: bytes) -> int:
    c = await direct(port)
    try:
        assert await c.line(b"use " + tube) == b"USING " + tube
        line = await c.put(body)
        assert line.startswith(b"INSERTED ")
        return int(line.split()[1])
    finally:
        await c.close()


async def job_state(port: int, job: int) -> str:
    c = await direct(port)
    try:
        line, body = await c.call(b"stats-job %d" % job)
        return "gone" if line == b"NOT_FOUND" else parse_yaml_map(body or b"")["state"]
    finally:
        await c.close()


async def tube_jobs(port: int, tube: bytes) -> str | None:
    c = await direct(port)
    try:
        line, body = await c.call(b"stats-tube " + tube)
        return None if line == b"NOT_FOUND" else parse_yaml_map(body or b"")["total-jobs"]
    finally:
        await c.close()


async def test_grant_applies_to_the_next_command(pki: PKI, beanstalkd: Beanstalkd) -> None:
    beta_job = await put_direct(beanstalkd.port, b"beta", b"beta job")
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        # denied (and the denials are cached by the session for this policy)
        assert await c.line(b"use beta") == b"NOT_PERMITTED"
        assert await c.line(b"watch beta") == b"NOT_PERMITTED"
        assert await c.line(b"peek %d" % beta_job) == b"NOT_FOUND"
        assert await c.line(b"stats-tube beta") == b"NOT_PERMITTED"
        _, body = await c.call(b"list-tubes")
        assert b"beta" not in (body or b"")
        assert reload_like_cli(proxy.server, doc(ALPHA_ALL, BETA_ALL)) is None
        # the very next commands of the same connection run under the new policy
        assert await c.line(b"use beta") == b"USING beta"
        assert await c.put(b"hello") == b"INSERTED %d" % (beta_job + 1)
        assert await c.line(b"peek %d" % beta_job) == b"FOUND %d 8" % beta_job
        assert await c.line(b"watch beta") == b"WATCHING 2"
        assert await c.line(b"ignore default") == b"WATCHING 1"
        assert await c.line(b"reserve") == b"RESERVED %d 8" % beta_job
        assert await c.line(b"delete %d" % beta_job) == b"DELETED"
        _, body = await c.call(b"list-tubes")
        assert b"- beta\n" in (body or b"")
        await c.close()


async def test_revoke_applies_to_the_next_command(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        assert await c.line(b"use alpha") == b"USING alpha"
        assert await c.put(b"first") == b"INSERTED 1"
        assert await c.put(b"second") == b"INSERTED 2"
        assert await c.line(b"watch alpha") == b"WATCHING 2"
        assert await c.line(b"ignore default") == b"WATCHING 1"
        assert await c.line(b"reserve") == b"RESERVED 1 5"
        # revoke everything but inspect
        inspect_only = {"tubes": ["alpha"], "allow": ["inspect"]}
        assert reload_like_cli(proxy.server, doc(inspect_only)) is None
        caplog.clear()
        assert await c.put(b"SECRET third") == b"NOT_PERMITTED"
        assert await c.line(b"reserve-with-timeout 0") == b"NOT_PERMITTED"
        assert await c.line(b"release 1 0 0") == b"NOT_PERMITTED"
        assert await c.line(b"delete 1") == b"NOT_PERMITTED"
        assert await c.line(b"kick 1") == b"NOT_PERMITTED"
        assert await c.line(b"pause-tube alpha 10") == b"NOT_PERMITTED"
        assert await c.line(b"peek 1") == b"FOUND 1 5"  # inspect is still granted
        assert await c.line(b"list-tube-used") == b"USING alpha"
        records = [r.fields for r in caplog.records if r.name.endswith("audit")]  # type: ignore[attr-defined]
        assert [r["command"] for r in records] == [
            "put",
            "reserve-with-timeout",
            "release",
            "delete",
            "kick",
            "pause-tube",
        ]
        assert all("SECRET" not in r.getMessage() for r in caplog.records)
        # nothing happened on the server
        assert await tube_jobs(beanstalkd.port, b"alpha") == "2"
        assert await job_state(beanstalkd.port, 1) == "reserved"
        assert await job_state(beanstalkd.port, 2) == "ready"
        # revoke the last right: the tube's jobs vanish from this principal's view
        assert reload_like_cli(proxy.server, doc({"tubes": ["gamma"], "allow": ["all"]})) is None
        assert await c.line(b"peek 1") == b"NOT_FOUND"
        assert await c.line(b"stats-job 2") == b"NOT_FOUND"
        assert await c.line(b"release 1 0 0") == b"NOT_FOUND"
        assert await c.line(b"peek-ready") == b"NOT_PERMITTED"
        assert await c.line(b"use alpha") == b"NOT_PERMITTED"
        assert await job_state(beanstalkd.port, 1) == "reserved"
        await c.close()


async def test_revoke_is_seen_by_every_live_connection(pki: PKI, beanstalkd: Beanstalkd) -> None:
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        conns = [await proxy.connect("worker") for _ in range(3)]
        for c in conns:
            assert await c.line(b"use alpha") == b"USING alpha"
            assert (await c.put(b"x")).startswith(b"INSERTED")
        assert reload_like_cli(proxy.server, doc(BETA_ALL)) is None
        for c in conns:
            assert await c.put(b"x") == b"NOT_PERMITTED"
        assert await tube_jobs(beanstalkd.port, b"alpha") == "3"
        for c in conns:
            await c.close()


BROKEN: list[tuple[object, str]] = [
    (
        {
            "principals": [TENANT],
            "rules": [{"principal": "tenant", "tubes": ["beta"], "allow": ["produse"]}],
        },
        "rules[0].allow[0]",
    ),
    (
        {
            "principals": [TENANT],
            "rules": [{"principal": "tenent", "tubes": ["beta"], "allow": ["all"]}],
        },
        "rules[0].principal",
    ),
    (
        {
            "principals": [TENANT],
            "rules": [{"principal": "tenant", "tubes": ["beta gamma"], "allow": ["all"]}],
        },
        "rules[0].tubes[0]",
    ),
    (
        {"principals": [{"name": "tenant", "match": {"cnn": "worker"}}], "rules": []},
        "principals[0].match.cnn",
    ),
    ({"principals": [TENANT]}, "rules"),
    (
        {
            "principals": [TENANT],
            "rules": [
                {"principal": "tenant", "tubes": ["beta"], "allow": ["all"]},
                {"principal": "tenant", "tubes": ["b"], "allow": ["put"], "put": {"ttr": [9, 1]}},
            ],
        },
        "rules[1].put.ttr",
    ),
    (["not", "a", "mapping"], ""),
]


@pytest.mark.parametrize("data,key", BROKEN, ids=[k or "not-a-mapping" for _, k in BROKEN])
async def test_broken_acl_is_rejected_and_the_old_policy_stays(
    data: object, key: str, pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        other = await proxy.connect("inspector")
        assert await c.line(b"use alpha") == b"USING alpha"
        old = proxy.server.policy.current
        exc = reload_like_cli(proxy.server, data)
        assert isinstance(exc, ConfigError)
        assert exc.key == key
        assert exc.source == "acl.yaml"
        assert str(exc).startswith(f"acl.yaml: {key}: " if key else "acl.yaml: ")
        assert proxy.server.policy.current is old
        # the old policy keeps working, for allowed and denied commands alike, on live
        # connections and new ones
        assert await c.put(b"still allowed") == b"INSERTED 1"
        assert await c.line(b"use beta") == b"NOT_PERMITTED"
        assert await c.line(b"list-tube-used") == b"USING alpha"
        assert (await other.call(b"stats-tube alpha"))[0].startswith(b"OK")
        fresh = await proxy.connect("worker")
        assert await fresh.line(b"use beta") == b"NOT_PERMITTED"
        assert await fresh.line(b"use alpha") == b"USING alpha"
        for x in (c, other, fresh):
            await x.close()


async def test_cli_reload_reads_the_file_and_keeps_the_old_policy_on_error(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The CLI's own SIGHUP handler: reads the ACL file named in the config."""
    from proxy.reloading import reload

    caplog.set_level(logging.INFO)
    acl_file = tmp_path / "acl.yaml"
    config = dataclasses.replace(make_config(pki, beanstalkd.port), acl=str(acl_file))
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        old = proxy.server.policy.current
        for text in (
            "principals: [\n",  # not YAML
            yaml.safe_dump(BROKEN[0][0]),  # YAML, but not a valid ACL
            "principals:\n  - {name: tenant, match: {cn: worker}}\n"
            "  - {name: tenant, match: {cn: admin}}\nrules: []\n",  # duplicate principal
        ):
            acl_file.write_text(text)
            caplog.clear()
            reload(config, proxy.server)
            assert proxy.server.policy.current is old
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert any(
                "keeping the previous policy" in r.getMessage()
                and r.fields["event"] == "reload_failed"  # type: ignore[attr-defined]
                and r.fields["file"] == str(acl_file)  # type: ignore[attr-defined]
                for r in errors
            )
            assert await c.line(b"use beta") == b"NOT_PERMITTED"
            assert await c.line(b"use alpha") == b"USING alpha"
        acl_file.write_text(yaml.safe_dump(doc(ALPHA_ALL, BETA_ALL)))
        reload(config, proxy.server)
        assert proxy.server.policy.current is not old
        assert isinstance(proxy.server.policy.current, Policy)
        assert await c.line(b"use beta") == b"USING beta"
        await c.close()


async def test_connection_of_a_removed_principal_is_closed(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        tenant = await proxy.connect("worker")
        tenant2 = await proxy.connect("worker")
        ops = await proxy.connect("admin")
        auditor = await proxy.connect("inspector")
        assert await tenant.line(b"use alpha") == b"USING alpha"
        assert await tenant.put(b"job") == b"INSERTED 1"
        assert await tenant.line(b"watch alpha") == b"WATCHING 2"
        assert await tenant.line(b"ignore default") == b"WATCHING 1"
        assert await tenant.line(b"reserve") == b"RESERVED 1 3"
        assert reload_like_cli(proxy.server, doc(principals=[OPS, AUDITOR])) is None
        # both connections of the removed principal end, without a reply
        assert await tenant.closed() == b""
        assert await tenant2.closed() == b""
        # ... and so do their upstream connections: beanstalkd gives the reservation back
        for _ in range(2000):  # round trips, until beanstalkd has seen the close
            if await job_state(beanstalkd.port, 1) == "ready":
                break
        assert await job_state(beanstalkd.port, 1) == "ready"
        # the others stay open and keep their rights
        assert await ops.line(b"use alpha") == b"USING alpha"
        assert await ops.line(b"peek 1") == b"FOUND 1 3"
        assert (await auditor.call(b"stats-tube alpha"))[0].startswith(b"OK")
        assert await auditor.line(b"use alpha") == b"USING alpha"
        assert await auditor.put(b"x") == b"NOT_PERMITTED"
        # a new connection with that certificate is refused
        again = await proxy.connect("worker")
        assert await again.closed() == b""
        assert len(proxy.server.connections) == 2
        for c in (tenant, tenant2, ops, auditor, again):
            await c.close()


async def test_certificate_mapped_to_another_principal_gets_its_rights(
    pki: PKI, beanstalkd: Beanstalkd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        assert await c.line(b"use alpha") == b"USING alpha"
        assert await c.put(b"one") == b"INSERTED 1"
        assert await c.line(b"stats-tube beta") == b"NOT_PERMITTED"
        # the worker certificate now matches "watcher" first (inspect everywhere, nothing else)
        watcher = {"name": "watcher", "match": {"ou": "jobs"}}
        new = doc(ALPHA_ALL, principals=[watcher, TENANT, OPS, AUDITOR])
        new["rules"].append({"principal": "watcher", "tubes": ["*"], "allow": ["inspect"]})
        assert reload_like_cli(proxy.server, new) is None
        caplog.clear()
        assert await c.put(b"two") == b"NOT_PERMITTED"
        (line, _) = await c.call(b"stats-tube default")
        assert line.startswith(b"OK")
        records = [r.fields for r in caplog.records if r.name.endswith("audit")]  # type: ignore[attr-defined]
        assert [(r["principal"], r["command"]) for r in records] == [("watcher", "put")]
        # and back
        assert reload_like_cli(proxy.server, doc(ALPHA_ALL)) is None
        assert await c.put(b"three") == b"INSERTED 2"
        assert await c.line(b"stats-tube beta") == b"NOT_PERMITTED"
        await c.close()


async def test_reload_between_pipelined_commands_is_in_order(
    pki: PKI, beanstalkd: Beanstalkd
) -> None:
    """Commands already decided keep their decision; the ones after the reload get the new
    policy. A lookup waiting for beanstalkd is decided under the policy current when its
    answer arrives."""
    job = await put_direct(beanstalkd.port, b"beta", b"beta job")
    async with serving(pki, beanstalkd.port, doc(ALPHA_ALL)) as proxy:
        c = await proxy.connect("worker")
        # allowed now; sent and answered before the reload
        await c.send(b"use alpha\r\nput 0 0 60 1\r\na\r\n")
        assert (await c.reply())[0] == b"USING alpha"
        assert (await c.reply())[0] == b"INSERTED 2"
        assert reload_like_cli(proxy.server, doc(BETA_ALL)) is None
        await c.send(b"put 0 0 60 1\r\nb\r\npeek %d\r\nuse beta\r\nput 0 0 60 1\r\nc\r\n" % job)
        assert [(await c.reply())[0] for _ in range(4)] == [
            b"NOT_PERMITTED",
            b"FOUND %d 8" % job,
            b"USING beta",
            b"INSERTED 3",
        ]
        assert await tube_jobs(beanstalkd.port, b"alpha") == "1"
        await c.close()

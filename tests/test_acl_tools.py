"""``acl test`` (decision tables), ``acl diff`` and the ``acl_reload_diff`` reload event.

The shipped example table runs against the shipped example ACL through the CLI and passes; a
changed ACL makes a case fail (exit 1, a failure line naming case, expected, got and rule);
malformed case files exit 2 with a key path; certificate cases map real certificates made at
test time (one from an untrusted CA is refused). ``acl diff`` reports grants, revocations, new
denies, match changes, rate and put-limit changes in words, and nothing for an equivalent
file. A reload through the CLI's reload path logs one ``acl_reload_diff`` event that counts
the live connections whose rights changed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import PKI, TEST_ACL, Beanstalkd, make_config, serving, start_proxy

from proxy.acl import parse_acl
from proxy.acldiff import diff_policies, render
from proxy.acltest import parse_cases, run_cases
from proxy.cli import main
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ACL = ROOT / "config" / "acl.example.yaml"
EXAMPLE_CASES = ROOT / "config" / "acl.example.test.yaml"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write(path: Path, data: object) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------ acl test


def test_the_example_table_passes_against_the_example_acl() -> None:
    result = run("acl", "test", "--acl", str(EXAMPLE_ACL), str(EXAMPLE_CASES))
    assert result.exit_code == 0, result.output
    cases = yaml.safe_load(EXAMPLE_CASES.read_text())["cases"]
    assert result.output.splitlines()[-1].startswith(f"{len(cases)} passed, 0 failed")
    assert "FAIL" not in result.output


def test_the_example_table_covers_every_principal_and_outcome() -> None:
    policy = parse_acl(yaml.safe_load(EXAMPLE_ACL.read_text()), str(EXAMPLE_ACL))
    cases = parse_cases(yaml.safe_load(EXAMPLE_CASES.read_text()), str(EXAMPLE_CASES))
    report = run_cases(policy, cases)
    assert not report.failures
    assert {r.principal for r in report.results} - {None} == set(policy.principals)
    assert {r.outcome for r in report.results} == {
        "allow",
        "deny",
        "not_found",
        "refused",
        "rejected",
    }


def test_a_changed_rule_fails_the_case_it_breaks(tmp_path: Path) -> None:
    text = EXAMPLE_ACL.read_text()
    old = '  - principal: invoice-worker\n    tubes: ["invoices"]\n    allow: [consume]'
    assert old in text
    broken = tmp_path / "acl.yaml"
    broken.write_text(text.replace(old, old.replace("[consume]", "[watch, reserve]")))
    result = run("acl", "test", "--acl", str(broken), str(EXAMPLE_CASES))
    assert result.exit_code == 1, result.output
    fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL")]
    assert fails == [
        "FAIL cases[11] 'worker deletes the job it reserved': 'delete 42' as invoice-worker: "
        "expected allow, got deny by default deny (no rule allows consume on 'invoices' for "
        "invoice-worker)",
        "FAIL cases[12] 'worker deletes a job it reserved and buried': 'delete 42' as "
        "invoice-worker: expected allow, got deny by default deny (no rule allows consume on "
        "'invoices' for invoice-worker)",
    ]
    assert result.output.splitlines()[-1].startswith("32 passed, 2 failed")


def test_a_wrong_deciding_rule_fails_even_with_the_right_outcome(tmp_path: Path) -> None:
    cases = write(
        tmp_path / "cases.yaml",
        {
            "cases": [
                {"principal": "ops", "command": "watch secrets.x", "expect": "deny"},
                {
                    "principal": "ops",
                    "command": "watch secrets.x",
                    "expect": "deny",
                    "rule": "rules[1]",
                },
                {
                    "principal": "ops",
                    "command": "watch secrets.x",
                    "expect": "deny",
                    "rule": "rules[11]",
                },
            ]
        },
    )
    result = run("acl", "test", "--acl", str(EXAMPLE_ACL), cases)
    assert result.exit_code == 1
    (fail,) = [ln for ln in result.output.splitlines() if ln.startswith("FAIL")]
    assert fail.startswith("FAIL cases[1] 'watch secrets.x' as ops: ")
    assert "expected deny by rules[1], got deny by rules[11] (deny all on secrets.*)" in fail


def test_the_config_names_the_acl_and_max_job_size(tmp_path: Path) -> None:
    acl = write(tmp_path / "acl.yaml", TEST_ACL)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"upstream: 127.0.0.1:11300\nacl: {acl}\nlimits: {{max_job_size: 100}}\n"
        "tls: {cert: s.pem, key: s.key, client_ca: ca.pem}\n"
    )
    cases = write(
        tmp_path / "cases.yaml",
        {
            "cases": [
                {"principal": "admin", "command": "put 0 0 1 100", "expect": "allow"},
                {"principal": "admin", "command": "put 0 0 1 101", "expect": "rejected"},
                {"principal": "worker", "command": "reserve", "expect": "deny"},
                {
                    "principal": "worker",
                    "command": "reserve",
                    "watched": ["invoices"],
                    "expect": "allow",
                },
            ]
        },
    )
    result = run("acl", "test", "--config", str(config), cases)
    assert result.exit_code == 0, result.output
    assert "4 passed, 0 failed" in result.output


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ([], "", "expected a mapping with one key, 'cases'"),
        ({"cases": []}, "cases", "non-empty list"),
        ({"cases": ["put"]}, "cases[0]", "expected a mapping"),
        ({"cases": [{"principal": "ops", "expect": "allow"}]}, "cases[0].command", "missing"),
        ({"cases": [{"principal": "ops", "command": "stats"}]}, "cases[0].expect", "missing"),
        (
            {"cases": [{"principal": "ops", "command": "stats", "expect": "allowed"}]},
            "cases[0].expect",
            "unknown outcome 'allowed'",
        ),
        (
            {"cases": [{"principal": "ops", "command": "stats", "expect": "allow", "tube": "x"}]},
            "cases[0].tube",
            "unknown key",
        ),
        (
            {"cases": [{"command": "stats", "expect": "allow"}]},
            "cases[0]",
            "exactly one of principal, cert or identity",
        ),
        (
            {
                "cases": [
                    {
                        "principal": "ops",
                        "identity": {"cn": "ops-a"},
                        "command": "stats",
                        "expect": "allow",
                    }
                ]
            },
            "cases[0]",
            "exactly one of principal, cert or identity",
        ),
        (
            {"cases": [{"identity": {"cm": "x"}, "command": "stats", "expect": "refused"}]},
            "cases[0].identity.cm",
            "unknown key",
        ),
        (
            {
                "cases": [
                    {"identity": {"fingerprint": "md5:00"}, "command": "stats", "expect": "refused"}
                ]
            },
            "cases[0].identity.fingerprint",
            "sha256",
        ),
        (
            {
                "cases": [
                    {"principal": "ops", "command": "put 0 0 1 1", "used": "a b", "expect": "allow"}
                ]
            },
            "cases[0].used",
            "not a valid tube name",
        ),
        (
            {
                "cases": [
                    {
                        "principal": "ops",
                        "command": "delete 1",
                        "reserved": "yes",
                        "expect": "allow",
                    }
                ]
            },
            "cases[0].reserved",
            "true or false",
        ),
        (
            {"cases": [{"principal": "ops", "command": "stats", "expect": "refused"}]},
            "cases[0].expect",
            "refused needs a cert or identity",
        ),
        (
            {"cases": [{"principal": "nobody", "command": "stats", "expect": "deny"}]},
            "cases[0].principal",
            "unknown principal 'nobody'",
        ),
        (
            {"cases": [{"principal": "invoice-worker", "command": "peek 3", "expect": "deny"}]},
            "cases[0].job_tube",
            "give job_tube",
        ),
        (
            {"cases": [{"cert": "missing.pem", "command": "stats", "expect": "refused"}]},
            "cases[0].cert",
            "cannot read certificate",
        ),
    ],
)
def test_malformed_case_files_exit_2_with_a_key_path(
    tmp_path: Path, doc: Any, key: str, reason: str
) -> None:
    cases = write(tmp_path / "cases.yaml", doc)
    result = CliRunner().invoke(main, ["acl", "test", "--acl", str(EXAMPLE_ACL), cases])
    assert result.exit_code == 2, result.output
    prefix = f"error: {cases}: {key}: " if key else f"error: {cases}: "
    assert result.stderr.startswith(prefix), result.stderr
    assert reason in result.stderr


def test_a_case_file_that_is_not_yaml_or_missing_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "cases.yaml"
    bad.write_text("cases: [\n")
    result = CliRunner().invoke(main, ["acl", "test", "--acl", str(EXAMPLE_ACL), str(bad)])
    assert result.exit_code == 2 and "invalid YAML" in result.stderr
    result = CliRunner().invoke(
        main, ["acl", "test", "--acl", str(EXAMPLE_ACL), str(tmp_path / "none.yaml")]
    )
    assert result.exit_code == 2 and "file not found" in result.stderr
    result = CliRunner().invoke(main, ["acl", "test", str(bad)])
    assert result.exit_code == 2 and "--config" in result.output


def test_certificate_cases_map_real_certificates(pki: PKI, tmp_path: Path) -> None:
    """Certificates made at test time: each maps to its principal through the ACL, the
    stranger (trusted, no principal) and a look-alike from an untrusted CA are refused."""
    acl = write(tmp_path / "acl.yaml", TEST_ACL)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"upstream: 127.0.0.1:11300\nacl: {acl}\n"
        f"tls: {{cert: {pki.dir}/server.pem, key: {pki.dir}/server.key, client_ca: {pki.ca}}}\n"
    )

    def case(cert: str, command: str, expect: str, **state: Any) -> dict[str, Any]:
        return {"cert": cert, "command": command, "expect": expect, **state}

    rows = [
        case(f"{pki.dir}/admin.pem", "pause-tube anything 1", "allow", rule="rules[0]"),
        case(f"{pki.dir}/billing.pem", "put 0 0 1 3", "allow", used="invoices.eu"),
        case(f"{pki.dir}/billing.pem", "watch invoices", "deny"),
        case(f"{pki.dir}/worker.pem", "reserve", "allow", watched=["invoices"]),
        case(f"{pki.dir}/worker.pem", "use secrets.x", "deny", rule="rules[5]"),
        case(f"{pki.dir}/stranger.pem", "stats", "refused", rule="no principal matches"),
        case(f"{pki.other}/admin.pem", "stats", "refused"),
    ]
    cases = write(tmp_path / "cases.yaml", {"cases": rows})
    result = run("acl", "test", "--config", str(config), cases)
    assert result.exit_code == 0, result.output
    assert "7 passed, 0 failed" in result.output

    # The same certificates, expectations swapped: every case fails, naming what happened.
    flipped = [{**r, "expect": "refused" if r["expect"] != "refused" else "allow"} for r in rows]
    cases = write(tmp_path / "cases.yaml", {"cases": flipped})
    result = run("acl", "test", "--config", str(config), cases)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[-1].startswith("0 passed, 7 failed")
    assert lines[0] == (
        "FAIL cases[0] 'pause-tube anything 1' as admin: expected refused by rules[0], "
        "got allow by rules[0] (allow all on *)"
    )
    assert "expected allow, got refused by no chain to a CA of tls.client_ca" in lines[6]


def test_job_state_decides_like_the_session() -> None:
    """The same command with different connection state: reserved, buried, neither."""
    policy = parse_acl(TEST_ACL, "<acl>")
    rows: list[dict[str, Any]] = [
        {"principal": "worker", "command": "release 5 0 0", "job_tube": "invoices"},
        {"principal": "worker", "command": "release 5 0 0", "job_tube": "invoices", "reserved": 1},
        {"principal": "worker", "command": "delete 5", "job_tube": "invoices", "buried": 1},
        {"principal": "worker", "command": "delete 5", "job_tube": "invoices"},
        {"principal": "worker", "command": "peek 5", "job_tube": "secrets.a"},
        {"principal": "inspector", "command": "peek 5", "job_tube": "secrets.a"},
        {"principal": "inspector", "command": "peek 5", "job_tube": "other"},
        {"principal": "admin", "command": "peek 5", "job_tube": "x"},
        {"principal": "billing", "command": "list-tubes"},
    ]
    for row in rows:
        for flag in ("reserved", "buried"):
            if flag in row:
                row[flag] = True
        row["expect"] = "allow"
    cases = parse_cases({"cases": rows}, "<cases>")
    got = [(r.outcome, r.rule.split(" (")[0]) for r in run_cases(policy, cases).results]
    assert got == [
        ("not_found", "NOT_FOUND: this connection has not reserved the job"),
        ("allow", "rules[3]"),
        ("allow", "rules[3]"),
        ("deny", "default deny"),
        ("not_found", "rules[5]"),
        ("not_found", "rules[5]"),
        ("allow", "rules[4]"),
        ("allow", "rules[0]"),
        ("allow", "default deny"),  # forwarded; the reply is filtered to visible tubes
    ]


def test_parse_cases_errors_carry_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_cases({"cases": [{"principal": 1, "command": "x", "expect": "allow"}]}, "c.yaml")
    assert (info.value.source, info.value.key) == ("c.yaml", "cases[0].principal")


# ------------------------------------------------------------------------------ acl diff

BASE: dict[str, Any] = {
    "principals": [
        {"name": "billing", "match": {"cn": "billing"}, "rate": {"per_second": 10}},
        {"name": "worker", "match": {"cn": "worker", "ou": "jobs"}},
    ],
    "rules": [
        {
            "principal": "billing",
            "tubes": ["invoices", "invoices.*"],
            "allow": ["produce"],
            "put": {"max_body": 100},
        },
        {"principal": "worker", "tubes": ["invoices"], "allow": ["consume"]},
    ],
}


def changed(**edits: Any) -> dict[str, Any]:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in edits.items():
        doc[key] = value(doc[key]) if callable(value) else value
    return doc  # type: ignore[no-any-return]


def diff_lines(new: dict[str, Any], old: dict[str, Any] = BASE) -> list[str]:
    return render(diff_policies(parse_acl(old, "old"), parse_acl(new, "new")))


def test_diff_of_an_equivalent_acl_is_empty() -> None:
    # reordered keys, duplicated rule, "**" spelled differently: same rights
    same = changed(rules=lambda r: [*r, r[1]])
    assert diff_lines(same) == ["no change in effective rights"]


def test_diff_reports_a_grant() -> None:
    new = changed(
        rules=lambda r: [*r, {"principal": "worker", "tubes": ["*"], "allow": ["inspect"]}]
    )
    assert diff_lines(new) == [
        "principal worker:",
        '  gains inspect on any tube ("*")',
        "1 principal(s) changed, 1 right(s) gained, 0 right(s) lost",
    ]


def test_diff_reports_a_revoke_and_a_partial_class() -> None:
    new = changed(rules=lambda r: [r[0], {**r[1], "allow": ["reserve"]}])
    assert diff_lines(new) == [
        "principal worker:",
        "  loses watch, reserve-with-timeout, release, bury, touch, delete (jobs it holds) on "
        "tube invoices",
        "1 principal(s) changed, 0 right(s) gained, 6 right(s) lost",
    ]
    # naming the command `delete` allows deleting any job, not only those it holds
    new = changed(rules=lambda r: [*r, {**r[1], "allow": ["delete"]}])
    assert diff_lines(new)[1] == "  gains delete (any job) on tube invoices"


def test_diff_reports_an_added_deny_with_its_exception() -> None:
    new = changed(
        rules=lambda r: [
            *r,
            {"principal": "worker", "tubes": ["invoices.*"], "allow": ["consume"]},
            {"principal": "*", "tubes": ["invoices.audit"], "deny": ["delete"]},
        ]
    )
    assert diff_lines(new) == [
        "principal worker:",
        "  gains consume on tubes invoices.* (but not delete (jobs it holds) on invoices.audit)",
        "1 principal(s) changed, 1 right(s) gained, 0 right(s) lost",
    ]
    # a deny for everyone on a tube billing produces into
    new = changed(rules=lambda r: [*r, {"principal": "*", "tubes": ["invoices"], "deny": ["all"]}])
    assert diff_lines(new) == [
        "principal billing:",
        "  loses produce on tube invoices",
        "principal worker:",
        "  loses consume on tube invoices",
        "2 principal(s) changed, 0 right(s) gained, 2 right(s) lost",
    ]


def test_diff_reports_match_changes_and_principals_added_and_removed() -> None:
    new = changed(
        principals=lambda p: [
            p[0],
            {"name": "worker", "match": {"cn": ["worker", "worker-2"]}},
            {"name": "ops", "match": {"cn": "ops"}},
        ]
    )
    assert diff_lines(new) == [
        "principal worker:",
        "  match: cn now also accepts worker-2",
        "  match: no longer requires ou (jobs)",
        "principal ops: added, matching cn ops",
        "2 principal(s) changed, 0 right(s) gained, 0 right(s) lost",
    ]
    removed = changed(principals=lambda p: p[:1], rules=lambda r: r[:1])
    assert diff_lines(removed) == [
        "principal worker: removed (was matching cn worker and ou jobs); its live "
        "connections are closed on reload",
        "  loses consume on tube invoices",
        "1 principal(s) changed, 0 right(s) gained, 1 right(s) lost",
    ]
    swapped = changed(principals=lambda p: [p[1], p[0]])
    assert diff_lines(swapped)[1].startswith("  match order: 1 -> 2")


def test_diff_reports_rate_and_put_limit_changes() -> None:
    new = changed(
        principals=lambda p: [{**p[0], "rate": {"per_second": 5, "burst": 20}}, p[1]],
        rules=lambda r: [{**r[0], "put": {"max_body": 200, "ttr": [1, 60]}}, r[1]],
    )
    assert diff_lines(new) == [
        "principal billing:",
        "  rate limit: 10/s burst 10 -> 5/s burst 20",
        "  put limits on tubes invoices, invoices.* (also bind release and bury): "
        "max_body 100 -> 200; ttr none -> [1, 60]",
        "1 principal(s) changed, 0 right(s) gained, 0 right(s) lost",
    ]
    unlimited = changed(
        principals=lambda p: [{"name": "billing", "match": {"cn": "billing"}}, p[1]]
    )
    assert diff_lines(unlimited)[1] == "  rate limit: 10/s burst 10 -> no limit"


def test_acl_diff_cli_and_its_exit_codes(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", BASE)
    same = write(tmp_path / "same.yaml", BASE)
    new = write(tmp_path / "new.yaml", changed(rules=lambda r: r[:1]))
    result = run("acl", "diff", old, new)
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "principal worker:",
        "  loses consume on tube invoices",
        "1 principal(s) changed, 0 right(s) gained, 1 right(s) lost",
    ]
    assert run("acl", "diff", "--exit-code", old, new).exit_code == 1
    result = run("acl", "diff", "--exit-code", old, same)
    assert (result.exit_code, result.output) == (0, "no change in effective rights\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("principals: []\nrules: [{principal: nobody, allow: [all]}]\n")
    result = CliRunner().invoke(main, ["acl", "diff", old, str(bad)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: rules[0].principal: unknown principal")


# ------------------------------------------------------------------------------ reload event


@pytest.mark.integration
async def test_reload_logs_the_diff_and_counts_affected_connections(
    pki: PKI, beanstalkd: Beanstalkd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.reloading import reload

    caplog.set_level(logging.INFO)
    acl_file = tmp_path / "acl.yaml"
    config = dataclasses.replace(make_config(pki, beanstalkd.port), acl=str(acl_file))
    async with serving(pki, beanstalkd.port) as proxy:
        worker = await proxy.connect("worker")
        worker2 = await proxy.connect("worker")
        admin = await proxy.connect("admin")
        for c in (worker, worker2, admin):
            assert await c.line(b"list-tube-used") == b"USING default"

        def events() -> list[dict[str, Any]]:
            return [
                r.fields  # type: ignore[attr-defined]
                for r in caplog.records
                if getattr(r, "fields", {}).get("event") == "acl_reload_diff"
            ]

        # worker may now consume invoices.*: two live connections of that principal
        grant = yaml.safe_load(yaml.safe_dump(TEST_ACL))
        grant["rules"].append(
            {"principal": "worker", "tubes": ["invoices.*"], "allow": ["consume"]}
        )
        write(acl_file, grant)
        reload(config, proxy.server, only=("acl",))
        (event,) = events()
        assert event["principals_changed"] == ["worker"]
        assert (event["rights_gained"], event["rights_lost"]) == (1, 0)
        assert event["connections_affected"] == 2
        assert "  gains consume on tubes invoices.*" in event["summary"]
        assert await worker.line(b"watch invoices.eu") == b"WATCHING 2"

        # the same file again: an event with nothing changed
        caplog.clear()
        reload(config, proxy.server, only=("acl",))
        (event,) = events()
        assert event["principals_changed"] == [] and event["connections_affected"] == 0
        assert event["summary"] == ["no change in effective rights"]

        # admin loses stats: one connection
        caplog.clear()
        revoke = yaml.safe_load(yaml.safe_dump(grant))
        revoke["rules"].append({"principal": "admin", "deny": ["server"]})
        write(acl_file, revoke)
        reload(config, proxy.server, only=("acl",))
        (event,) = events()
        assert event["principals_changed"] == ["admin"]
        assert event["rights_lost"] == 1 and event["connections_affected"] == 1

        # a broken file: no diff event
        caplog.clear()
        acl_file.write_text("principals: [\n")
        reload(config, proxy.server, only=("acl",))
        assert events() == []
        for c in (worker, worker2, admin):
            await c.close()


# ------------------------------------------------------------------------------ agreement

#: (certificate, command, used tube, job's tube): each is run by ``acl test`` and by the live
#: proxy (explicit denial replies), and the outcomes must be the same.
LIVE_CASES: list[tuple[str, str, str, str | None]] = [
    ("billing", "put 0 0 60 3", "invoices", None),
    ("billing", "put 0 0 60 3", "default", None),
    ("billing", "use reports", "default", None),
    ("billing", "use invoices.eu", "default", None),
    ("billing", "peek-ready", "invoices", None),
    ("billing", "stats-tube invoices", "default", None),
    ("billing", "pause-tube invoices 0", "default", None),
    ("billing", "peek {job}", "default", "invoices"),
    ("billing", "peek {job}", "default", "elsewhere"),
    ("worker", "watch invoices", "default", None),
    ("worker", "watch secrets.x", "default", None),
    ("worker", "kick 1", "default", None),
    ("worker", "delete {job}", "default", "invoices"),
    ("worker", "release {job} 0 0", "default", "invoices"),
    ("inspector", "peek {job}", "default", "secrets.a"),
    ("inspector", "stats-job {job}", "default", "other"),
    ("inspector", "put 0 0 60 3", "default", None),
    ("admin", "kick-job {job}", "default", "secrets.b"),
    ("admin", "pause-tube default 0", "default", None),
]


@pytest.mark.integration
async def test_acl_test_agrees_with_the_live_proxy(pki: PKI, beanstalkd: Beanstalkd) -> None:
    from conftest import direct

    policy = parse_acl(TEST_ACL, "<acl>")
    proxy = await start_proxy(pki, beanstalkd.port)
    plain = await direct(beanstalkd.port)
    try:
        for name, template, used, job_tube in LIVE_CASES:
            job = 0
            if job_tube is not None:
                assert (await plain.line(f"use {job_tube}".encode())).startswith(b"USING")
                inserted = await plain.put(b"job")
                job = int(inserted.split()[1])
            command = template.format(job=job)
            client = await proxy.connect(name)
            if used != "default":
                assert await client.line(f"use {used}".encode()) == f"USING {used}".encode()
            if command.startswith("put"):
                reply = await client.line(command.encode(), b"abc")
            else:
                reply = (await client.call(command.encode()))[0]
            await client.close()
            live = {b"NOT_PERMITTED": "deny", b"NOT_FOUND": "not_found"}.get(reply, "allow")
            row: dict[str, Any] = {"principal": name, "command": command, "expect": live}
            if used != "default":
                row["used"] = used
            if job_tube is not None:
                row["job_tube"] = job_tube
            (result,) = run_cases(policy, parse_cases({"cases": [row]}, "<live>")).results
            assert (name, command, result.outcome) == (name, command, live), reply
    finally:
        await plain.close()
        await proxy.server.close()

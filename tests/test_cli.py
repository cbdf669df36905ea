"""Tests for proxy.cli: check-config, explain, certs and the serve signal wiring."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from proxy.app import LoopUnavailable, fd_limit_problem, loop_factory
from proxy.certs import ensure_dev_pki, load_cert
from proxy.cli import load_yaml, main
from proxy.errors import ConfigError
from proxy.logs import AUDIT_LOGGER, CONN_LOGGER, LOGGER, setup_logging

ROOT = Path(__file__).resolve().parent.parent

ACL = """\
principals:
  - name: billing
    match: {cn: "billing"}
  - name: dev
    match: {cn: "dev-client"}
rules:
  - principal: billing
    tubes: ["invoices", "invoices.*"]
    allow: [produce]
  - principal: dev
    tubes: ["*"]
    allow: [all]
  - principal: "*"
    tubes: ["secrets.*"]
    deny: [all]
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A complete, valid configuration in tmp_path, with absolute paths. Returns the config."""
    pki = tmp_path / "pki"
    ensure_dev_pki(pki)
    (tmp_path / "acl.yaml").write_text(ACL)
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"""\
listen: 127.0.0.1:0
upstream: 127.0.0.1:1
tls:
  cert: {pki}/server.pem
  key: {pki}/server.key
  client_ca: {pki}/ca.pem
  crl: {pki}/crl.pem
acl: {tmp_path}/acl.yaml
log: {{format: json, level: debug}}
"""
    )
    return cfg


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# ------------------------------------------------------------------------------ check-config


def config_error(setup: Path, at: tuple[int, int] | None = None) -> str:
    """``check-config`` on ``setup``, which must fail (exit code 2, no "ok") with an error
    ending with its position ``at`` (line, column); returns the error output."""
    result = run("check-config", "--config", str(setup))
    assert result.exit_code == 2, result.output
    assert "ok" not in result.stdout
    if at is not None:
        assert result.stderr.endswith(f"(line {at[0]}, column {at[1]})\n"), result.stderr
    return result.stderr


def test_check_config_ok(setup: Path) -> None:
    result = run("check-config", "--config", str(setup))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "ok"
    # (the default limits may need more descriptors than this machine's hard limit allows)
    warnings = [ln for ln in result.output.splitlines() if "warning" in ln]
    assert all("RLIMIT_NOFILE" in ln for ln in warnings), warnings


def test_check_config_warns_when_the_fd_limit_is_below_the_fd_budget(setup: Path) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with setup.open("a") as f:
        f.write(f"limits: {{max_connections: {hard}, max_handshakes: 10}}\n")
    result = run("check-config", "--config", str(setup))
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.output.splitlines() if "RLIMIT_NOFILE" in ln]
    assert line.startswith("warning: ") and f"{2 * hard + 10 + 32} descriptors" in line, line

    setup.write_text(setup.read_text().replace(f"max_connections: {hard}", "max_connections: 8"))
    result = run("check-config", "--config", str(setup))
    assert result.exit_code == 0, result.output
    assert "RLIMIT_NOFILE" not in result.output


def test_serve_raises_the_soft_fd_limit_towards_the_budget(setup: Path) -> None:
    import resource

    from proxy.cli import load_config

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 300:
        pytest.skip("needs a finite hard limit on open files of at least 300")
    config = load_config(str(setup))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        small = replace(config, limits=replace(config.limits, max_connections=8))
        assert fd_limit_problem(small, raise_soft=True) is None  # 8*2 + 8 + 32 fits in 256
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256
        fits = replace(config, limits=replace(config.limits, max_connections=100))
        assert fd_limit_problem(fits, raise_soft=True) is None  # 332 > 256: raised to it
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 2 * 100 + 100 + 32
        huge = replace(config, limits=replace(config.limits, max_connections=hard))
        problem = fd_limit_problem(huge, raise_soft=True)  # raised to the hard limit only
        assert problem is not None and f"soft limit {hard})" in problem
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_shipped_configs_pass_check_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config/proxy.yaml and config/proxy.example.yaml work as documented: from a directory
    holding config/acl.yaml and the PKI made by `certs dev certs/dev`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "acl.yaml", tmp_path / "config" / "acl.yaml")
    made = run("certs", "dev", "certs/dev")
    assert made.exit_code == 0, made.output
    for name in ("proxy.yaml", "proxy.example.yaml"):
        result = run("check-config", "--config", str(ROOT / "config" / name))
        assert result.exit_code == 0, (name, result.output)
        assert result.stdout.strip().endswith("ok")


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = run("check-config", "--config", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: file not found")


def test_check_config_bad_key_reports_file_and_key_path(setup: Path) -> None:
    edit(setup, "listen: 127.0.0.1:0", "listen: 127.0.0.1:0\nlimits: {max_connections: 0}")
    err = config_error(setup)
    assert err == (
        f"error: {setup}: limits.max_connections: must be at least 1, got 0 (line 2, column 10)\n"
    )


def test_check_config_unknown_key(setup: Path) -> None:
    edit(setup, "  crl:", "  crls:")
    err = config_error(setup, at=(7, 3))
    assert f"error: {setup}: tls.crls: unknown key" in err
    assert "did you mean 'crl'" in err


def test_check_config_yaml_syntax_error_has_line_and_column(setup: Path) -> None:
    edit(setup, "upstream: 127.0.0.1:1", "upstream: [127.0.0.1:1")
    err = config_error(setup, at=(3, 4))
    assert err.startswith(f"error: {setup}: invalid YAML: ")


def test_check_config_duplicate_key(setup: Path) -> None:
    setup.write_text(setup.read_text() + "upstream: 127.0.0.1:2\n")
    err = config_error(setup)
    assert "duplicate key 'upstream' (first defined on line 2)" in err
    assert "line 10" in err


def test_load_yaml_keeps_merge_keys_working(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n")
    assert load_yaml(str(path)) == {"base": {"a": 1, "b": 2}, "derived": {"a": 1, "b": 3}}


def test_load_yaml_rejects_binary(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(str(path))


def test_check_config_missing_certificate(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "pki" / "server.pem").unlink()
    err = config_error(setup, at=(4, 3))
    assert f"error: {setup}: tls.cert: certificate file " in err
    assert "does not exist" in err


def test_check_config_key_mismatch(setup: Path, tmp_path: Path) -> None:
    edit(setup, "pki/server.key", "pki/dev-client.key")
    err = config_error(setup, at=(5, 3))
    assert f"error: {setup}: tls.key: the private key in " in err
    assert "does not match" in err


def test_check_config_missing_acl(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "acl.yaml").unlink()
    err = config_error(setup, at=(8, 1))
    assert err.startswith(
        f"error: {setup}: acl: {tmp_path / 'acl.yaml'}: file not found"
    )


def test_check_config_invalid_acl_names_acl_file_and_key(setup: Path, tmp_path: Path) -> None:
    edit(tmp_path / "acl.yaml", "allow: [produce]", "allow: [produse]")
    err = config_error(setup, at=(9, 13))
    assert err.startswith(
        f"error: {tmp_path / 'acl.yaml'}: rules[0].allow[0]: unknown verb"
    )


def test_check_config_prints_acl_warnings(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "acl.yaml").write_text(
        "principals:\n  - name: lonely\n    match: {cn: lonely}\nrules: []\n"
    )
    result = run("check-config", "--config", str(setup))
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr
    assert "lonely" in result.stderr
    assert result.stdout.strip() == "ok"


def test_check_config_refuses_a_client_only_server_certificate(
    setup: Path, tmp_path: Path
) -> None:
    edit(setup, "pki/server.pem", "pki/dev-client.pem")
    edit(setup, "pki/server.key", "pki/dev-client.key")
    err = config_error(setup, at=(4, 3))
    assert err.startswith(f"error: {setup}: tls.cert: the certificate in ")
    assert "is not a server certificate" in err
    assert "clientAuth" in err


def test_check_config_name_must_be_covered_by_a_san(setup: Path, tmp_path: Path) -> None:
    # the dev server certificate carries localhost, 127.0.0.1 and ::1
    for name in ("localhost", "LOCALHOST", "127.0.0.1", "::1"):
        ok = run("check-config", "--config", str(setup), "--name", name)
        assert ok.exit_code == 0, (name, ok.output)
    for name in ("beanstalk-proxy.jobs.svc", "10.0.0.1", "localhost.example", "::2"):
        bad = run("check-config", "--config", str(setup), "--name", "localhost", "--name", name)
        assert bad.exit_code == 2, name
        assert f"tls.cert: the certificate in {tmp_path}" in bad.stderr
        assert bad.stderr.endswith("(line 4, column 3)\n")
        assert f"does not cover the name {name!r}" in bad.stderr
        assert "DNS:localhost" in bad.stderr


def test_check_config_name_wildcard_follows_rfc6125(setup: Path, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert run("certs", "init", str(pki), "--force", "--name", "*.jobs.example").exit_code == 0
    run("certs", "issue", "--ca", str(pki), "dev-client", "--force")
    (pki / "crl.pem").unlink()
    assert run("certs", "dev", str(pki)).exit_code == 0  # a CRL of the new CA
    assert run("check-config", "--config", str(setup), "--name", "a.jobs.example").exit_code == 0
    for name in ("jobs.example", "a.b.jobs.example", ".jobs.example", "a.jobs.example.org"):
        bad = run("check-config", "--config", str(setup), "--name", name)
        assert bad.exit_code == 2, name
        assert "does not cover the name" in bad.stderr


def test_server_cert_wildcards_need_two_labels_and_a_whole_label(tmp_path: Path) -> None:
    from proxy.certs import init_ca_and_server
    from proxy.servercert import name_covered, server_cert_problem

    init_ca_and_server(tmp_path, ["*.com", "f*.example.org", "xn--bcher-kva.example"])
    cert = load_cert(tmp_path / "server.pem")
    assert server_cert_problem(cert) is None
    assert not name_covered(cert, "example.com")
    assert not name_covered(cert, "foo.example.org")
    assert name_covered(cert, "xn--bcher-kva.example")
    assert name_covered(cert, "b\u00fccher.example")  # IDNA form of the U-label
    assert name_covered(cert, "localhost.")  # a trailing dot is the same name
    assert not name_covered(cert, "")


def test_check_config_semantic_errors_carry_line_and_column(setup: Path, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    # a missing key is reported at the mapping that lacks it
    acl.write_text("principals:\n  - name: a\n    match: {cn: a}\n  - name: b\nrules: []\n")
    err = config_error(setup)
    assert err == (
        f"error: {acl}: principals[1].match: missing required key (line 4, column 5)\n"
    )
    # a nested key of the proxy config
    edit(setup, "log: {format: json, level: debug}", "log:\n  format: json\n  level: loud")
    err = config_error(setup, at=(11, 3))
    assert err.startswith(f"error: {setup}: log.level: must be one of")


def test_missing_acl_names_the_acl_key_for_serve_and_explain(setup: Path, tmp_path: Path) -> None:
    edit(setup, f"acl: {tmp_path}/acl.yaml", "acl: nope.yaml")
    for args in (("serve",), ("explain", "--principal", "dev", "stats")):
        result = run(*args[:1], "--config", str(setup), *args[1:])
        assert result.exit_code == 2
        assert result.stderr.startswith(
            f"error: {setup}: acl: nope.yaml: file not found"
        ), result.stderr
        assert result.stderr.endswith("(line 8, column 1)\n")


def test_yaml_positions_survive_aliases_merges_and_recursion(tmp_path: Path) -> None:
    from proxy.yamlpos import position

    path = tmp_path / "p.yaml"
    path.write_text("base: &b {a: 1}\nitems:\n  - x\n  - {<<: *b, c: 2}\nalias: *b\n")
    data = load_yaml(str(path))
    assert isinstance(data, dict) and data["items"][1] == {"a": 1, "c": 2}
    assert position(str(path), "items[1]") == (4, 5)
    assert position(str(path), "items[1].c") == (4, 14)
    assert position(str(path), "items[1].a") == (1, 11)  # merged in: where it is written
    assert position(str(path), "items[7].zzz") == (2, 1)
    assert position(str(path), "alias.a") == (1, 11)  # the aliased node's own position
    assert position(str(tmp_path / "other.yaml"), "items") is None
    path.write_text("loop: &l [*l]\n")
    with pytest.raises(ConfigError, match="invalid YAML: found unconstructable recursive") as info:
        load_yaml(str(path))
    assert (info.value.line, info.value.column) == (1, 7)


# ------------------------------------------------------------------------------ explain


@pytest.mark.parametrize(
    ("tube", "code", "expected"),
    [
        ("invoices", 0, ["principal: billing", "decision: ALLOW by rules[0]"]),
        (
            "payroll",
            1,
            # acl_denial_reply: compatible
            ["decision: DENY by default deny", "the client gets UNKNOWN_COMMAND"],
        ),
    ],
    ids=["allowed", "denied-by-default"],
)
def test_explain_principal(setup: Path, tube: str, code: int, expected: list[str]) -> None:
    args = ["--config", str(setup), "--principal", "billing", "--tube", tube, "put 0 0 60 5"]
    result = run("explain", *args)
    assert result.exit_code == code, result.output
    for line in expected:
        assert line in result.output


def test_explain_shows_a_principals_rate_limit(setup: Path, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    before = run("explain", "--config", str(setup), "--principal", "billing", "stats")
    assert "rate limit" not in before.output
    edit(acl, "- name: billing\n", "- name: billing\n    rate: {per_second: 2.5, burst: 7}\n")
    result = run("explain", "--config", str(setup), "--principal", "billing", "stats")
    assert "rate limit: 2.5 commands/s, burst 7" in result.output, result.output


def test_explain_deny_beats_allow(setup: Path) -> None:
    result = run("explain", "--config", str(setup), "--principal", "dev", "watch secrets.db")
    assert result.exit_code == 1
    assert "DENY by rules[2]" in result.output


def test_explain_with_certificate(setup: Path, tmp_path: Path) -> None:
    result = run(
        "explain",
        "--config",
        str(setup),
        "--cert",
        str(tmp_path / "pki" / "dev-client.pem"),
        "stats",
    )
    assert result.exit_code == 0, result.output
    assert "CN=dev-client" in result.output
    assert "principal: dev (principals[1])" in result.output
    assert "ALLOW" in result.output


def test_explain_certificate_without_principal(setup: Path, tmp_path: Path) -> None:
    run("certs", "issue", "--ca", str(tmp_path / "pki"), "nobody")
    result = run(
        "explain",
        "--config",
        str(setup),
        "--cert",
        str(tmp_path / "pki" / "nobody.pem"),
        "stats",
    )
    assert result.exit_code == 1
    assert "no principal matches: connection refused" in result.output
    assert "  principals[0] billing: cn billing did not match any of [nobody]" in result.output
    assert "  principals[1] dev: cn dev-client did not match any of [nobody]" in result.output


def test_explain_lists_every_failed_condition(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "acl.yaml").write_text(
        """\
principals:
  - name: billing
    match: {uri: "spiffe://example.org/billing/*", ou: [eng]}
  - name: web
    match: {dns: "*.web.internal", ip: 10.0.0.0/8}
  - name: ops
    match: {ou: [ops], cn: ops}
rules: []
"""
    )
    pki = tmp_path / "pki"
    issued = run(
        "certs", "issue", "--ca", str(pki), "w", "--ou", "ops", "--uri", "spiffe://example.org/w"
    )
    assert issued.exit_code == 0, issued.output
    result = run("explain", "--config", str(setup), "--cert", str(pki / "w.pem"), "stats")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    start = lines.index("no principal matches: connection refused")
    assert lines[start + 1 :] == [
        "  principals[0] billing: ou eng did not match any of [ops]; "
        "uri spiffe://example.org/billing/* did not match any of [spiffe://example.org/w]",
        "  principals[1] web: dns *.web.internal: the certificate has no dns; "
        "ip 10.0.0.0/8: the certificate has no ip",
        "  principals[2] ops: cn ops did not match any of [w]",
    ]


def test_explain_job_id_command_needs_tube_unless_uniform(setup: Path) -> None:
    needs = run("explain", "--config", str(setup), "--principal", "billing", "delete 5")
    assert needs.exit_code == 2
    assert "--tube" in needs.output
    denied = run(
        "explain",
        "--config",
        str(setup),
        "--principal",
        "billing",
        "--tube",
        "invoices",
        "delete 5",
    )
    assert denied.exit_code == 1
    assert "NOT_FOUND" in denied.output


def test_explain_rejects_malformed_line(setup: Path) -> None:
    result = run("explain", "--config", str(setup), "--principal", "dev", "put 0 0 60")
    assert result.exit_code == 1
    assert "rejected" in result.output


def test_explain_needs_exactly_one_identity(setup: Path, tmp_path: Path) -> None:
    neither = run("explain", "--config", str(setup), "stats")
    assert neither.exit_code == 2
    both = run(
        "explain",
        "--config",
        str(setup),
        "--principal",
        "dev",
        "--cert",
        str(tmp_path / "pki" / "dev-client.pem"),
        "stats",
    )
    assert both.exit_code == 2


# ------------------------------------------------------------------------------ certs


def test_certs_init_issue_revoke(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    init = run("certs", "init", str(d), "--name", "proxy.example.org")
    assert init.exit_code == 0, init.output
    assert f"wrote {d / 'ca.pem'}" in init.output
    san = load_cert(d / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "proxy.example.org" in san.value.get_values_for_type(x509.DNSName)

    issue = run(
        "certs",
        "issue",
        "--ca",
        str(d),
        "billing",
        "--ou",
        "eng",
        "--uri",
        "spiffe://example.org/billing/api",
        "--dns",
        "billing.internal",
        "--days",
        "10",
    )
    assert issue.exit_code == 0, issue.output
    assert "fingerprint: sha256:" in issue.output
    assert "spki: sha256:" in issue.output
    cert = load_cert(d / "billing.pem")
    assert cert.subject.rfc4514_string() == "CN=billing,OU=eng"
    assert (d / "billing.key").stat().st_mode & 0o777 == 0o600

    revoked = run("certs", "revoke", "--ca", str(d), str(d / "billing.pem"))
    assert revoked.exit_code == 0, revoked.output
    assert f"serial {cert.serial_number:x}" in revoked.output
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    again = run("certs", "revoke", "--ca", str(d), str(d / "billing.pem"))
    assert "already revoked" in again.output


def test_certs_refuse_overwrite_exit_1(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("certs", "init", str(d)).exit_code == 0
    before = (d / "ca.pem").read_bytes()
    again = run("certs", "init", str(d))
    assert again.exit_code == 1
    assert again.stderr.startswith("error: refusing to overwrite")
    assert again.stderr.rstrip().endswith("(use --force)")
    assert (d / "ca.pem").read_bytes() == before
    forced = run("certs", "init", str(d), "--force", "--rsa")
    assert forced.exit_code == 0
    assert (d / "ca.pem").read_bytes() != before


def test_certs_issue_ip_sans_and_cn(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    run("certs", "init", str(d))
    issued = run(
        "certs", "issue", "--ca", str(d), "w1", "--ip", "10.1.2.3", "--ip", "::1", "--cn", "w-one"
    )
    assert issued.exit_code == 0, issued.output
    cert = load_cert(d / "w1.pem")
    assert cert.subject.rfc4514_string() == "CN=w-one"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "::1"]
    assert not san.critical

    bare = run("certs", "issue", "--ca", str(d), "w2", "--cn", "", "--uri", "spiffe://x/w2")
    assert bare.exit_code == 0, bare.output
    cert = load_cert(d / "w2.pem")
    assert cert.subject.rfc4514_string() == ""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # RFC 5280: an empty subject makes the SAN critical

    nobody = run("certs", "issue", "--ca", str(d), "w3", "--cn", "")
    assert nobody.exit_code == 1
    assert "would name nobody" in nobody.stderr
    bad_ip = run("certs", "issue", "--ca", str(d), "w4", "--ip", "10.1.2")
    assert bad_ip.exit_code == 1
    assert "--ip '10.1.2' is not an IPv4 or IPv6 address" in bad_ip.stderr
    assert not (d / "w3.pem").exists() and not (d / "w4.pem").exists()


def test_help_texts_for_repeatable_and_logging_options() -> None:
    issue = run("certs", "issue", "--help").output
    for option in ("--uri", "--dns", "--ip", "--ou"):
        text = issue.split(option, 1)[1].split("\n  -", 1)[0]
        assert "repeatable" in " ".join(text.split()), option
    client = run("client", "--help").output
    assert "--log-format [text|json]" in client
    assert "JSON object per line" in " ".join(client.split())
    assert "--log-level [debug|info|warning|error]" in client
    serve = run("serve", "--help").output
    assert "overrides the config's log.level" in " ".join(serve.split())


def test_certs_issue_out_dir_and_bad_name(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    run("certs", "init", str(d))
    out = tmp_path / "out"
    assert run("certs", "issue", "--ca", str(d), "w1", "--out", str(out)).exit_code == 0
    assert (out / "w1.pem").exists() and (out / "w1.key").exists()
    bad = run("certs", "issue", "--ca", str(d), "../escape")
    assert bad.exit_code == 1
    assert "client name" in bad.stderr


def test_certs_dev_is_idempotent(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    first = run("certs", "dev", str(d))
    assert first.exit_code == 0
    assert "dev-client.pem" in first.output
    second = run("certs", "dev", str(d))
    assert second.exit_code == 0
    assert "nothing to do" in second.output


def test_certs_revoke_foreign_cert(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run("certs", "dev", str(a))
    run("certs", "dev", str(b))
    result = run("certs", "revoke", "--ca", str(a), str(b / "dev-client.pem"))
    assert result.exit_code == 1
    assert "not issued by the CA" in result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert "beanstalk-proxy" in result.output


# ------------------------------------------------------------------------------ serve


class _Lines:
    """Collects a subprocess's stderr lines on a thread, so the test can wait for a line with
    a timeout instead of sleeping."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr

        def pump() -> None:
            for line in stream:
                self.queue.put(line)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def wait_for(self, fragment: str, timeout: float = 20.0) -> str:
        while True:
            try:
                line = self.queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {fragment!r}; got {self.seen}") from None
            self.seen.append(line)
            if fragment in line:
                return line


def test_serve_reload_and_terminate(setup: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(setup)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    lines = _Lines(proc)
    try:
        ready = lines.wait_for('"event":"ready"')
        assert '"listen":"127.0.0.1:' in ready and '"upstream":"127.0.0.1:1"' in ready

        # a broken ACL is refused with the precise error and the old policy stays
        acl = tmp_path / "acl.yaml"
        acl.write_text(ACL.replace("allow: [produce]", "allow: [produse]"))
        proc.send_signal(signal.SIGHUP)
        err = json.loads(lines.wait_for("ACL not reloaded"))
        assert err["event"] == "reload_failed" and err["key"] == "rules[0].allow[0]", err
        assert err["file"] == str(acl) and err["line"] > 1 and err["column"] > 1, err
        lines.wait_for("TLS certificate, key, CA and CRL reloaded")

        # a fixed ACL is picked up
        acl.write_text(ACL)
        proc.send_signal(signal.SIGHUP)
        lines.wait_for(f'"event":"reload","what":"acl","file":"{acl}","principals":2')

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.thread.join(timeout=20)  # EOF after exit; then the pipe can be closed
        assert proc.stderr is not None
        proc.stderr.close()


def test_serve_log_level_overrides_the_config(setup: Path, tmp_path: Path) -> None:
    from conftest import free_port, wait_for_port

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for option, config_level, shown in (("info", "error", True), ("warning", "debug", False)):
        port = free_port()
        text = re.sub(r"listen: .*", f"listen: 127.0.0.1:{port}", setup.read_text(), count=1)
        setup.write_text(re.sub(r"level: \w+", f"level: {config_level}", text))
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(setup), "--log-level", option],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
        )
        try:
            wait_for_port(port, proc, timeout=20)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert (b'"event":"ready"' in err) is shown, err


# ------------------------------------------------------------------------------ logging
# (proxy.logs is wired up by the CLI; its formats are checked here)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(LOGGER).setLevel(logging.NOTSET)


def test_json_logs_one_object_per_line(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    logging.getLogger(AUDIT_LOGGER).warning(
        "denied %s", "put", extra={"fields": {"principal": "billing", "tube": "x", "time": 1}}
    )
    logging.getLogger(CONN_LOGGER).debug("not shown at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "warning"
    assert obj["logger"] == "beanstalk_proxy.audit"
    assert obj["message"] == "denied put"
    assert obj["principal"] == "billing" and obj["tube"] == "x"
    assert obj["field_time"] == 1  # a field cannot overwrite a core key
    stamp = dt.datetime.fromisoformat(obj["time"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 60


def test_json_logs_include_exceptions(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", "debug", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger(LOGGER).exception("failed")
    obj = json.loads(out.getvalue())
    assert "RuntimeError: boom" in obj["exception"]


def test_text_logs_append_fields(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("text", "debug", stream=out)
    logging.getLogger(CONN_LOGGER).info(
        "open", extra={"fields": {"peer": "1.2.3.4:5", "subject": "CN=a b"}}
    )
    line = out.getvalue().rstrip("\n")
    assert ' INFO beanstalk_proxy.conn open peer=1.2.3.4:5 subject="CN=a b"' in line
    assert "\n" not in line


def test_setup_logging_is_idempotent_and_validates(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("text", "info", stream=first)
    setup_logging("json", "warning", stream=second)
    logging.getLogger(LOGGER).warning("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
    with pytest.raises(ValueError):
        setup_logging("xml", "info")
    with pytest.raises(ValueError):
        setup_logging("text", "loud")


# --------------------------------------------------------------------------------------------
# serve --loop


def test_serve_loop_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if uvloop were not installed
    assert loop_factory("auto") is None
    with pytest.raises(LoopUnavailable, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_serve_loop_uvloop_without_uvloop_fails_before_reading_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    result = CliRunner().invoke(
        main, ["serve", "--config", str(tmp_path / "absent.yaml"), "--loop", "uvloop"]
    )
    assert result.exit_code == 2, result.output
    assert "uvloop is not installed" in result.output
    bad = CliRunner().invoke(main, ["serve", "--config", "x.yaml", "--loop", "trio"])
    assert bad.exit_code == 2 and "'trio' is not one of" in bad.output

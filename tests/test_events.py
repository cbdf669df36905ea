"""Every log line is one event, said once: a stable ``event`` name, a constant message and
structured fields, flat in JSON and ``key=value`` in text, never repeated. The README's table
of events and the names the code logs are the same set, every log call in proxy/ carries an
event, and each class of event (refusal with the identity no principal matched, handshake
failure, reload failure with its key path, line and column, and every way a connection
closes, with who closed it) is checked against real TLS and a real beanstalkd, parsed from
the JSON log."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PKI, Beanstalkd, RunningProxy, serving, start_proxy, tls_attempt

from proxy.certs import issue_client
from proxy.loading import load_config
from proxy.logs import TextFormatter, setup_logging
from proxy.relay import PolicyHolder, ProxyServer
from proxy.reloading import reload
from proxy.tlsctx import server_context

ROOT = Path(__file__).resolve().parent.parent
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
LOGGERS = {"log", "conn_log", "audit_log"}
CORE = ("time", "level", "logger", "message")


# --------------------------------------------------------------------------------------------
# The code and the README table agree
# --------------------------------------------------------------------------------------------


def code_events() -> set[str]:
    """Event names used in proxy/: ``event("name", ...)`` and ``"event": "name"``."""
    names: set[str] = set()
    for path in sorted((ROOT / "proxy").glob("*.py")):
        text = path.read_text()
        names.update(re.findall(r'\bevent\(\s*"([a-z_]+)"', text))
        names.update(re.findall(r'"event":\s*"([a-z_]+)"', text))
    return names


def readme_events() -> dict[str, tuple[str, str]]:
    """The README's Logs table: event -> (level column, logger column)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| `([a-z_.]+)` \|", section, re.M)
    assert len(rows) == len({r[0] for r in rows}), "an event is listed twice"
    return {name: (level.strip(), logger) for name, level, logger in rows}


def test_readme_lists_exactly_the_events_the_code_logs() -> None:
    documented, used = set(readme_events()), code_events()
    assert used, "no event found in proxy/: the pattern is out of date"
    assert used - documented == set(), "events missing from the README's Logs table"
    assert documented - used == set(), "README lists events the code never logs"


def test_readme_levels_and_loggers_are_real() -> None:
    for name, (level, logger) in readme_events().items():
        assert logger in ("beanstalk_proxy", "beanstalk_proxy.conn", "beanstalk_proxy.audit")
        assert set(re.findall(r"debug|info|warning|error", level)), (name, level)


def test_every_log_call_in_proxy_carries_an_event() -> None:
    """A call on the proxy's loggers without ``extra=`` would be a line with no event."""
    bare: list[str] = []
    calls = 0
    for path in sorted((ROOT / "proxy").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in LOGGERS
            ):
                calls += 1
                if not any(k.arg == "extra" for k in node.keywords):
                    bare.append(f"{path.name}:{node.lineno}")
                message = node.args[1 if node.func.attr == "log" else 0]
                # a constant, or passed through from a helper's caller (_peer_event)
                if not isinstance(message, ast.Constant | ast.Name):
                    bare.append(f"{path.name}:{node.lineno} (message is not a constant)")
                elif len(node.args) > (2 if node.func.attr == "log" else 1):
                    bare.append(f"{path.name}:{node.lineno} (%-arguments in the message)")
    assert calls > 20
    assert bare == []


# --------------------------------------------------------------------------------------------
# Capturing the JSON log
# --------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return dict(pairs)


class JsonLog:
    """The root logger's output as JSON objects (via ``setup_logging``), each checked to be
    one flat object with no duplicate key and no field repeated inside its message."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.stream.getvalue().splitlines():
            obj = json.loads(line, object_pairs_hook=_no_duplicates)
            assert "event" in obj, obj  # every line of the proxy is an event
            nested = [k for k, v in obj.items() if isinstance(v, dict)]
            assert set(nested) <= {"by_reason", "by_command"}, obj  # flat, but for counts
            for key, value in obj.items():
                if key in CORE or key == "event":
                    continue
                assert f"{key}=" not in obj["message"], (key, obj)
                # data (addresses, paths, numbers, names with punctuation) is never in the
                # message; plain words such as "previous" may be
                if isinstance(value, str) and re.search(r"[0-9/:.=@]", value):
                    assert value not in obj["message"], (key, obj)
            if name is None or obj["event"] == name:
                out.append(obj)
        return out

    async def wait(
        self, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True, n: int = 1
    ) -> list[dict[str, Any]]:
        """Bounded polling: the first ``n`` events ``name`` that satisfy ``where``."""
        async with asyncio.timeout(10):
            while True:
                found = [e for e in self.events(name) if where(e)]
                if len(found) >= n:
                    return found
                await asyncio.sleep(0.01)


@pytest.fixture
def json_log() -> Iterator[JsonLog]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    try:
        yield JsonLog(stream)
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def text_line(fields: dict[str, Any], message: str) -> str:
    """The text rendering of one event, as ``TextFormatter`` writes it."""
    record = logging.LogRecord("beanstalk_proxy.conn", logging.INFO, __file__, 0, message, (), None)
    record.fields = fields
    return TextFormatter().format(record)


def fingerprint_of(pem_path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(pem_path.read_text())
    return "sha256:" + hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


async def test_no_principal_refusal_logs_the_identity_it_failed_to_match(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog, tmp_path: Path
) -> None:
    issue_client(
        pki.dir,
        "outsider",
        out_dir=tmp_path,
        ous=["web"],
        dns=["outsider.example.org"],
        uris=["spiffe://example.org/web"],
        ips=["10.1.2.3"],
    )
    async with serving(pki, beanstalkd.port) as running:
        how = await tls_attempt(running.port, pki.client_context("outsider", ca_dir=tmp_path))
        (refused,) = await json_log.wait("refused")
        # the refused connection is gone: its socket closed, nothing counts against the limits
        async with asyncio.timeout(10):
            while running.server.client_sockets:
                await asyncio.sleep(0.01)
    assert how in ("closed without a reply",) or how.startswith("first read failed"), how
    assert refused["level"] == "info" and refused["logger"] == "beanstalk_proxy.conn"
    assert refused["message"] == "refused"
    assert refused["reason"] == "no_principal"
    assert refused["detail"] == "no principal matches"
    assert refused["cn"] == "outsider" and refused["ou"] == ["web"]
    assert refused["dns"] == ["outsider.example.org"]
    assert refused["uri"] == ["spiffe://example.org/web"]
    assert refused["ip"] == ["10.1.2.3"]
    assert refused["fingerprint"] == fingerprint_of(tmp_path / "outsider.pem")
    assert refused["subject"] == "CN=outsider,OU=web" or "CN=outsider" in refused["subject"]
    assert refused["issuer"]  # the CA that issued it
    assert refused["peer"].startswith("127.0.0.1:")
    # the proxy refused it: no close line pretends the client went away
    assert json_log.events("close") == []
    assert json_log.events("open") == []
    # the text form says each field once
    line = text_line({k: v for k, v in refused.items() if k not in CORE}, refused["message"])
    for key in refused:
        if key not in CORE:
            assert line.count(f" {key}=") == 1, (key, line)
    assert ' dns=["outsider.example.org"] ' in line, line


async def test_refused_without_a_principal_match_is_not_a_client_close(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog
) -> None:
    """The stock "stranger" (valid, no SAN, no principal): one refused event, no close."""
    async with serving(pki, beanstalkd.port) as running:
        await tls_attempt(running.port, pki.client_context("stranger"))
        await json_log.wait("refused")
        ok = await running.connect("admin")  # a later close is logged for that one only
        assert await ok.line(b"list-tube-used") == b"USING default"
        await ok.close()
        (close,) = await json_log.wait("close")
    assert close["principal"] == "admin" and close["closed_by"] == "client"
    (refused,) = json_log.events("refused")
    assert refused["cn"] == "stranger" and refused["dns"] == [] and refused["uri"] == []


async def test_limit_refusal_is_a_warning_with_the_limit_named(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog
) -> None:
    async with serving(pki, beanstalkd.port, max_connections_per_principal=1) as running:
        first = await running.connect("admin")
        assert await first.line(b"list-tube-used") == b"USING default"
        await tls_attempt(running.port, pki.client_context("admin"))
        (refused,) = await json_log.wait("refused")
        await first.close()
    assert refused["level"] == "warning"
    assert refused["reason"] == "max_connections_per_principal"
    assert refused["limit"] == "limits.max_connections_per_principal" and refused["max"] == 1
    assert refused["principal"] == "admin"


# --------------------------------------------------------------------------------------------
# Handshake failures
# --------------------------------------------------------------------------------------------


async def test_handshake_failure_names_its_reason(
    pki: PKI, proxy: RunningProxy, json_log: JsonLog
) -> None:
    """A client certificate from a CA the proxy does not trust, and no certificate at all."""
    await tls_attempt(proxy.port, pki.client_context("admin", ca_dir=pki.other))
    (untrusted,) = await json_log.wait("handshake_failed")
    assert untrusted["level"] == "info" and untrusted["logger"] == "beanstalk_proxy.conn"
    assert untrusted["message"] == "handshake failed"
    assert untrusted["reason"] == "verify_failed", untrusted
    assert untrusted["error"].startswith("certificate verify failed: "), untrusted
    assert untrusted["peer"].startswith("127.0.0.1:")

    await tls_attempt(proxy.port, pki.client_context(None))
    (missing,) = await json_log.wait("handshake_failed", lambda e: e["reason"] != "verify_failed")
    assert missing["reason"] == "no_certificate" and missing["level"] == "info", missing
    assert json_log.events("close") == json_log.events("refused") == []


# --------------------------------------------------------------------------------------------
# Close reasons: who closed
# --------------------------------------------------------------------------------------------


async def test_close_says_who_closed(pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog) -> None:
    async with serving(pki, beanstalkd.port, idle_timeout=0.3) as running:
        # the client closes
        c = await running.connect("admin")
        assert await c.line(b"list-tube-used") == b"USING default"
        await c.close()
        (by_client,) = await json_log.wait("close")

        # the client says quit
        c = await running.connect("inspector")
        await c.send(b"quit\r\n")
        assert await c.closed() == b""
        await c.close()
        (by_quit,) = await json_log.wait("close", lambda e: e["principal"] == "inspector")

        # the proxy closes an idle connection: a drain, then the close
        c = await running.connect("worker")
        assert await c.line(b"list-tube-used") == b"USING default"
        assert await c.closed() == b""
        await c.close()
        (by_proxy,) = await json_log.wait("close", lambda e: e["principal"] == "worker")
        (drain,) = json_log.events("drain")

        # a protocol error: the proxy closes
        c = await running.connect("admin")
        await c.send(b"put 0 0 60 x\r\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await c.closed()
        await c.close()
        bad = (await json_log.wait("close", lambda e: e["principal"] == "admin", n=2))[1]

    assert by_client["reason"] == "client closed" and by_client["closed_by"] == "client"
    assert by_client["level"] == "info" and by_client["message"] == "close"
    assert by_client["bytes_in"] > 0 and by_client["bytes_out"] > 0
    assert by_quit["reason"] == "quit" and by_quit["closed_by"] == "client"
    assert by_proxy["reason"] == "idle timeout" and by_proxy["closed_by"] == "proxy"
    assert drain["reason"] == "idle timeout" and drain["limit"] == "limits.idle_timeout"
    assert drain["principal"] == "worker" and drain["level"] == "info"
    assert bad["closed_by"] == "proxy" and bad["reason"] != "client closed", bad


async def test_upstream_closing_is_logged_as_upstream(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog
) -> None:
    async with serving(pki, beanstalkd.port) as running:
        c = await running.connect("admin")
        assert await c.line(b"list-tube-used") == b"USING default"
        beanstalkd.stop()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await c.closed()
        await c.close()
        (close,) = await json_log.wait("close")
        (lost,) = json_log.events("upstream_lost")
    assert close["closed_by"] == "upstream" and close["reason"].startswith("upstream"), close
    assert lost["level"] == "warning" and lost["principal"] == "admin"
    assert lost["logger"] == "beanstalk_proxy"


async def test_shutdown_drain_is_summarised(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog
) -> None:
    running = await start_proxy(pki, beanstalkd.port)
    c = await running.connect("admin")
    assert await c.line(b"list-tube-used") == b"USING default"
    await running.server.close(grace=5.0)
    await c.close()
    (drained,) = json_log.events("shutdown_drained")
    assert (drained["drained"], drained["cut"]) == (1, 0), drained
    (close,) = json_log.events("close")
    assert close["reason"] == "proxy shutting down" and close["closed_by"] == "proxy"


# --------------------------------------------------------------------------------------------
# Reload failures: file, key path, line and column
# --------------------------------------------------------------------------------------------

BROKEN_ACL = """\
principals:
  - name: admin
    match: {cn: admin}
rules:
  - principal: admin
    tubes: ["*"]
    allow:
      - produce
      - produse
"""


def _serving_config(tmp_path: Path, pki: PKI, upstream: int) -> Path:
    """proxy.yaml and acl.yaml in ``tmp_path``, with the server certificate copied there so
    the test can break it."""
    shutil.copy(pki.dir / "server.pem", tmp_path / "server.pem")
    acl = tmp_path / "acl.yaml"
    acl.write_text(
        yaml.safe_dump(
            {
                "principals": [{"name": "admin", "match": {"cn": "admin"}}],
                "rules": [{"principal": "admin", "allow": ["all"]}],
            }
        )
    )
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\n"
        f"upstream: 127.0.0.1:{upstream}\n"
        "tls:\n"
        f"  cert: {tmp_path / 'server.pem'}\n"
        f"  key: {pki.dir / 'server.key'}\n"
        f"  client_ca: {pki.ca}\n"
        f"acl: {acl}\n"
        "reload: {watch: false}\n"
    )
    return cfg


async def test_reload_failures_carry_file_key_line_and_column(
    pki: PKI, beanstalkd: Beanstalkd, json_log: JsonLog, tmp_path: Path
) -> None:
    from proxy.loading import load_acl

    config = load_config(str(_serving_config(tmp_path, pki, beanstalkd.port)))
    server = ProxyServer(config, server_context(config.tls), PolicyHolder(load_acl(config.acl)))
    await server.start()
    try:
        acl = Path(config.acl)
        # a semantic error: the key path and where it is
        acl.write_text(BROKEN_ACL)
        reload(config, server, only=("acl",))
        # a YAML syntax error: no key path, but the line and column of the error
        acl.write_text("principals:\n  - name: admin\n    match: {cn: admin\nrules: []\n")
        reload(config, server, only=("acl",))
        # a missing ACL file: reported against the config's acl key
        acl.unlink()
        reload(config, server, only=("acl",))
        # a broken server certificate: the config's tls.cert key
        (tmp_path / "server.pem").write_text("not a certificate\n")
        reload(config, server, only=("tls",))
        failures = json_log.events("reload_failed")
        reloads = json_log.events("reload")
    finally:
        await server.close()

    assert reloads == []
    semantic, syntax, missing, tls = failures
    for f in failures:
        assert f["level"] == "error" and f["logger"] == "beanstalk_proxy"
        assert f["kept"] == "previous"
    assert semantic["what"] == "acl" and semantic["file"] == str(acl)
    assert semantic["key"] == "rules[0].allow[1]", semantic
    assert (semantic["line"], semantic["column"]) == (9, 9), semantic
    assert "produse" in semantic["error"] and str(acl) not in semantic["error"]

    assert syntax["file"] == str(acl) and "key" not in syntax
    assert syntax["line"] == 4 and syntax["column"] >= 1, syntax
    assert syntax["error"].startswith("invalid YAML"), syntax

    assert missing["file"] == config.source and missing["key"] == "acl", missing
    assert (missing["line"], missing["column"]) == (7, 1), missing
    assert "file not found" in missing["error"]

    assert tls["what"] == "tls" and tls["file"] == config.source, tls
    assert tls["key"] == "tls.cert" and (tls["line"], tls["column"]) == (4, 3), tls

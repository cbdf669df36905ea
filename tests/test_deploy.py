"""The deployment examples in deploy/: every YAML file parses, the proxy and ACL configs they
carry pass ``check-config`` (with the certificate paths pointed at a test PKI, since no keys
are in the repository), the pieces agree with each other (socket path, ports, timeouts), and
the pod's pre-stop hook really waits for the proxy's upstream connections to close."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from conftest import BEANSTALKD, PKI

from proxy import cli
from proxy.acl import lint_acl, parse_acl
from proxy.config import Config, Limits, parse_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes" / "beanstalk-proxy.yaml"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose" / "config"
SOCKET = "/run/beanstalkd/beanstalkd.sock"

#: The same loader ``check-config`` uses (a SafeLoader that also rejects duplicate keys).
Loader: Any = getattr(cli, "_StrictLoader", yaml.SafeLoader)


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=Loader) if d]


def _k8s() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _load_all(K8S)}


def _k8s_config_texts() -> tuple[str, str]:
    data = _k8s()["ConfigMap"]["data"]
    return data["proxy.yaml"], data["acl.yaml"]


def _compose() -> dict[str, Any]:
    (doc,) = _load_all(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def _containers() -> dict[str, dict[str, Any]]:
    spec = _k8s()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


# --------------------------------------------------------------------------------------------
# every YAML file parses


def test_every_yaml_file_in_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {K8S, COMPOSE, COMPOSE_CONFIG / "proxy.yaml", COMPOSE_CONFIG / "acl.yaml"} <= set(files)
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert any(d is not None for d in docs), path
        _load_all(path)  # and no duplicate keys


def test_kubernetes_manifest_objects() -> None:
    docs = _load_all(K8S)
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"]
    )
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
    # No Secret with key material in the repository: it is created with kubectl.
    assert "Secret" not in kinds


# --------------------------------------------------------------------------------------------
# check-config semantics for the shipped configs


def _validate(proxy_text: str, acl_text: str, source: str) -> Config:
    config = parse_config(yaml.load(proxy_text, Loader=Loader), source=f"{source}:proxy.yaml")
    policy = parse_acl(yaml.load(acl_text, Loader=Loader), source=f"{source}:acl.yaml")
    assert lint_acl(policy) == [], lint_acl(policy)
    return config


@pytest.mark.parametrize("where", ["kubernetes", "compose"])
def test_shipped_configs_parse_and_agree(where: str) -> None:
    if where == "kubernetes":
        proxy_text, acl_text = _k8s_config_texts()
    else:
        proxy_text = (COMPOSE_CONFIG / "proxy.yaml").read_text(encoding="utf-8")
        acl_text = (COMPOSE_CONFIG / "acl.yaml").read_text(encoding="utf-8")
    config = _validate(proxy_text, acl_text, where)
    assert str(config.upstream) == f"unix:{SOCKET}"
    assert str(config.listen) == "0.0.0.0:11400"
    assert config.acl == "/config/acl.yaml"
    tls = config.tls
    for path in (tls.cert, tls.key, tls.client_ca, *tls.crl):
        assert path.startswith("/certs/"), path
    # The image's HEALTHCHECK asks 127.0.0.1:9400; inside a pod/container 0.0.0.0 covers it.
    assert str(config.metrics_listen) == "0.0.0.0:9400"
    # ... so the live-sessions list (peers, principals, subjects) stays off on it.
    assert config.metrics_connections is False
    assert config.limits.max_job_size <= 65535  # beanstalkd -z 65535
    assert config.log.format == "json"


def _rewrite_for_check(text: str, pki: PKI, config_dir: Path) -> str:
    """The deploy config with its mount points pointed at the test PKI and ``config_dir``."""
    return text.replace("/certs/", f"{pki.dir}/").replace("/config/", f"{config_dir}/")


@pytest.mark.parametrize("where", ["kubernetes", "compose"])
def test_shipped_configs_pass_check_config(where: str, pki: PKI, tmp_path: Path) -> None:
    """The real ``check-config`` command, certificate files included (from the test PKI, which
    has the same file names as ``beanstalk-proxy certs init`` writes)."""
    if where == "kubernetes":
        proxy_text, acl_text = _k8s_config_texts()
    else:
        proxy_text = (COMPOSE_CONFIG / "proxy.yaml").read_text(encoding="utf-8")
        acl_text = (COMPOSE_CONFIG / "acl.yaml").read_text(encoding="utf-8")
    assert (pki.dir / "crl.pem").exists()
    (tmp_path / "acl.yaml").write_text(acl_text)
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(_rewrite_for_check(proxy_text, pki, tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    # (the shipped limits may need more open files than this machine's hard limit allows)
    warnings = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert all("RLIMIT_NOFILE" in ln for ln in warnings), warnings


# --------------------------------------------------------------------------------------------
# kubernetes: the pieces fit together


def test_kubernetes_pod_layout() -> None:
    objs = _k8s()
    containers = _containers()
    assert set(containers) == {"beanstalkd", "proxy"}
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    # beanstalkd listens on the socket only (no -p, no TCP address), in an emptyDir that only
    # these two containers mount.
    args = containers["beanstalkd"]["args"]
    assert args[args.index("-l") + 1] == f"unix:{SOCKET}"
    assert "-p" not in args
    assert "ports" not in containers["beanstalkd"]
    sock_dir = str(Path(SOCKET).parent)
    mounts = {
        name: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for name, c in containers.items()
    }
    socket_volume = mounts["beanstalkd"][sock_dir]
    assert mounts["proxy"][sock_dir] == socket_volume
    assert "emptyDir" in volumes[socket_volume]

    # One uid for both (the socket is srwxr-xr-x), never root.
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["fsGroup"] == 10001
    for c in containers.values():
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in c["securityContext"]

    # Certificates from a Secret at /certs, config + ACL from the ConfigMap at /config.
    assert volumes[mounts["proxy"]["/certs"]]["secret"]["secretName"] == "beanstalk-proxy-tls"
    assert (
        volumes[mounts["proxy"]["/config"]]["configMap"]["name"]
        == (objs["ConfigMap"]["metadata"]["name"])
    )
    for m in containers["proxy"]["volumeMounts"]:
        assert "subPath" not in m  # subPath mounts never see ConfigMap/Secret updates
        if m["mountPath"] in ("/certs", "/config"):
            assert m["readOnly"] is True

    # Probes: readiness on /readyz, liveness on /healthz, both on the status port.
    proxy = containers["proxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"beanstalk-tls": 11400, "status": 9400}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "status"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "status"}

    # The grace period covers the proxy's drain.
    proxy_text, _ = _k8s_config_texts()
    shutdown = parse_duration(yaml.safe_load(proxy_text)["limits"]["shutdown_timeout"])
    assert pod["terminationGracePeriodSeconds"] > shutdown


def test_kubernetes_service_and_network_policy_expose_only_the_tls_port() -> None:
    objs = _k8s()
    labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service"]["spec"]
    assert service["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(11400, "beanstalk-tls")]
    policy = objs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    rules = policy["ingress"]
    open_ports = [p["port"] for r in rules if "from" not in r for p in r["ports"]]
    assert open_ports == [11400]
    status_rules = [r for r in rules if any(p["port"] == 9400 for p in r["ports"])]
    assert status_rules and all("from" in r for r in status_rules)
    assert all(p["port"] in (11400, 9400) for r in rules for p in r["ports"])


# --------------------------------------------------------------------------------------------
# compose: the same, with beanstalkd off the network


def test_compose_layout() -> None:
    services = _compose()["services"]
    bs, proxy = services["beanstalkd"], services["proxy"]

    assert bs["network_mode"] == "none"
    assert "ports" not in bs and "expose" not in bs and "networks" not in bs
    cmd = bs["command"]
    assert cmd[cmd.index("-l") + 1] == f"unix:{SOCKET}"
    assert bs["user"] == proxy["user"] == "10001:10001"

    def mounts(service: dict[str, Any]) -> dict[str, str]:
        out = {}
        for spec in service["volumes"]:
            src, dst, *_ = spec.split(":")
            out[dst] = src
        return out

    sock_dir = str(Path(SOCKET).parent)
    assert mounts(bs)[sock_dir] == mounts(proxy)[sock_dir]
    assert mounts(bs)[sock_dir] in _compose()["volumes"]
    # The config directory the proxy mounts is the one checked above.
    assert (COMPOSE.parent / mounts(proxy)["/config"]).resolve() == COMPOSE_CONFIG
    assert proxy["volumes"].count("./config:/config:ro") == 1
    assert "./certs:/certs:ro" in proxy["volumes"]

    # Only 11400 on every interface; the status port on the host's loopback only.
    assert sorted(proxy["ports"]) == sorted(["11400:11400", "127.0.0.1:9400:9400"])
    assert proxy["depends_on"]["beanstalkd"]["condition"] == "service_healthy"
    assert proxy["build"] == "../.."

    config = yaml.safe_load((COMPOSE_CONFIG / "proxy.yaml").read_text())
    grace = parse_duration(proxy["stop_grace_period"])
    assert grace > parse_duration(config["limits"]["shutdown_timeout"])
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])


def test_compose_ignores_generated_keys() -> None:
    ignored = (COMPOSE.parent / ".gitignore").read_text().split()
    assert "pki/" in ignored and "certs/" in ignored


# --------------------------------------------------------------------------------------------
# the beanstalkd pre-stop hook, run for real


def _prestop_script(sock: Path, max_wait: int) -> str:
    hook = _containers()["beanstalkd"]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["sh", "-c"]
    script: str = hook[2]
    assert SOCKET in script and "-lt 30" in script
    return script.replace(SOCKET, str(sock)).replace("-lt 30", f"-lt {max_wait}")


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until beanstalkd accepts on its unix socket (the file exists before it listens)."""
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, "beanstalkd exited"
        assert time.monotonic() < deadline, "beanstalkd socket did not start listening"
        if path.is_socket():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(path)) == 0:
                    return
        time.sleep(0.01)  # no event for a socket file appearing or starting to listen


@pytest.mark.skipif(not Path("/proc/net/unix").exists(), reason="needs Linux /proc/net/unix")
def test_prestop_hook_waits_until_the_proxy_has_closed_its_upstream_connections(
    tmp_path: Path,
) -> None:
    if shutil.which("sh") is None:  # pragma: no cover
        pytest.fail("sh is required")
    sock = tmp_path / "beanstalkd.sock"
    bs = subprocess.Popen(
        [BEANSTALKD, "-l", f"unix:{sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_socket(sock, bs)
        script = _prestop_script(sock, max_wait=20)

        # No upstream connection: returns at once.
        started = time.monotonic()
        subprocess.run(["sh", "-c", script], check=True, timeout=10)
        assert time.monotonic() - started < 2

        # A live connection (the proxy's upstream): the hook keeps waiting ...
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))
        client.sendall(b"list-tubes\r\n")
        assert client.recv(100).startswith(b"OK ")
        hook = subprocess.Popen(["sh", "-c", script])
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                hook.wait(timeout=1.5)
            # ... and returns within a poll period once it is closed.
            client.close()
            assert hook.wait(timeout=5) == 0
        finally:
            if hook.poll() is None:
                hook.kill()
                hook.wait()
    finally:
        bs.terminate()
        bs.wait(10)


def test_prestop_hook_gives_up_after_its_limit(tmp_path: Path) -> None:
    sock = tmp_path / "beanstalkd.sock"
    bs = subprocess.Popen(
        [BEANSTALKD, "-l", f"unix:{sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_socket(sock, bs)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))
        try:
            started = time.monotonic()
            subprocess.run(["sh", "-c", _prestop_script(sock, max_wait=1)], check=True, timeout=10)
            assert 0.9 < time.monotonic() - started < 5
        finally:
            client.close()
    finally:
        bs.terminate()
        bs.wait(10)


def test_readme_mentions_every_file() -> None:
    text = (DEPLOY / "README.md").read_text()
    for name in (
        "beanstalk-proxy.yaml",
        "docker-compose.yml",
        "beanstalkd/Dockerfile",
        "LISTEN_FDS",
        "beanstalkd.socket",
        "/readyz",
        "/healthz",
    ):
        assert name in text, name
    assert re.search(r"unix:/run/beanstalkd/beanstalkd\.sock", text)


# --------------------------------------------------------------------------------------------
# systemd


SYSTEMD_UNIT = DEPLOY / "systemd" / "beanstalk-proxy.service"
SYSUSERS = DEPLOY / "systemd" / "beanstalk-proxy.sysusers"
UNIT_BINARY = "/opt/beanstalk-proxy/bin/beanstalk-proxy"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as section -> key -> values (keys may repeat), strictly: every
    non-comment line is a [section] header or Key=value inside one."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep and re.fullmatch(r"[A-Za-z]+", key), (number, raw)
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_hardened_and_reloads_with_sighup() -> None:
    unit = _unit(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure"
    assert svc["User"] == svc["Group"] == "beanstalk-proxy"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert svc.get(key) == value, key
    assert svc["ReadOnlyPaths"] == "/etc/beanstalk-proxy"
    assert "ReadWritePaths" not in svc  # the proxy writes no file
    # SIGTERM drains for limits.shutdown_timeout (default 10s): systemd must wait longer.
    default_drain = next(f.default for f in fields(Limits) if f.name == "shutdown_timeout")
    assert isinstance(default_drain, float)
    assert parse_duration(svc["TimeoutStopSec"]) > default_drain
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # the user the unit runs as is the one the sysusers entry creates
    entries = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln and ln[0] != "#"]
    assert [e[:2] for e in entries] == [["u", "beanstalk-proxy"]]


def test_systemd_unit_command_lines_are_valid_cli_invocations() -> None:
    unit = _unit(SYSTEMD_UNIT.read_text(encoding="utf-8"))["Service"]
    commands = [*unit["ExecStartPre"], *unit["ExecStart"]]
    assert [c.split()[1] for c in commands] == ["check-config", "serve"]
    for command in commands:
        argv = command.split()
        assert argv[0] == UNIT_BINARY
        params = cli.main.commands[argv[1]].make_context(argv[1], argv[2:]).params
        assert params["config_path"] == "/etc/beanstalk-proxy/proxy.yaml"
    with pytest.raises(click.UsageError):  # and a wrong option would be caught
        cli.main.commands["serve"].make_context("serve", ["--confg", "x"])


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("systemd-analyze is required under CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze not installed (the unit's keys are checked by parsing it)")
    # verify checks that the binary exists: point it at this environment's command.
    here = shutil.which("beanstalk-proxy", path=str(Path(sys.executable).parent))
    assert here is not None
    text = SYSTEMD_UNIT.read_text(encoding="utf-8").replace(UNIT_BINARY, here)
    unit = tmp_path / "beanstalk-proxy.service"
    unit.write_text(text)
    result = subprocess.run(
        [exe, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warned about
    # the check can fail: a misspelled key is reported
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict"))
    bad = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in bad.stderr and "ProtectSytem" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------------------------
# docs an operator needs


def test_kubernetes_docs_name_the_service_dns_name() -> None:
    """Clients inside the cluster connect to the Service name: the server certificate must
    carry it, or every handshake fails with a hostname mismatch."""
    service = _k8s()["Service"]["metadata"]["name"]
    for path in (DEPLOY / "README.md", K8S):
        text = path.read_text(encoding="utf-8")
        assert "certs init" in text and f"--name {service}.<namespace>.svc" in text, path
        assert "check-config" in text and f"--name {service}.<namespace>.svc" in text, path


def test_deploy_readme_describes_the_systemd_unit() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in ("systemd/beanstalk-proxy.service", "systemctl reload", "sysusers"):
        assert needle in text, needle


def test_pyproject_license_is_an_spdx_string() -> None:
    """``license = {text = ...}`` makes setuptools >= 77 print "project.license as a TOML
    table is deprecated" on every pip install; an SPDX string needs setuptools >= 77."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["license"] == "MIT"
    (requirement,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    bound = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
    assert bound and int(bound.group(1)) >= 77, requirement
    assert not any("License ::" in c for c in data["project"].get("classifiers", []))


def _readme_commands(text: str) -> list[list[str]]:
    """Every ``beanstalk-proxy ...`` command line in the sh code blocks of a README (with
    backslash continuations joined and trailing comments dropped)."""
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            for i, word in enumerate(argv):
                named = word == "beanstalk-proxy" or word.endswith("bin/beanstalk-proxy")
                if named and (i == 0 or not argv[i - 1].startswith("-")):
                    commands.append(argv[i + 1 : next(
                        (j for j in range(i + 1, len(argv)) if argv[j] in ("&&", "|", ";")),
                        len(argv),
                    )])
                    break
    return commands


@pytest.mark.parametrize("readme", ["README.md", "deploy/README.md"])
def test_readme_commands_are_valid_invocations(readme: str) -> None:
    """A newcomer copies these lines: each must name real subcommands and options."""
    commands = _readme_commands((ROOT / readme).read_text(encoding="utf-8"))
    assert len(commands) >= (8 if readme == "README.md" else 2), commands
    for argv in commands:
        command: click.Command = cli.main
        args = list(argv)
        while isinstance(command, click.Group) and args and args[0] in command.commands:
            command = command.commands[args.pop(0)]
        if argv == ["--version"]:
            continue
        assert command is not cli.main and not isinstance(command, click.Group), argv
        try:
            command.make_context(command.name or "", args)
        except click.exceptions.Exit:  # --version / --help
            pass
        except click.UsageError as exc:
            pytest.fail(f"{readme}: {' '.join(argv)}: {exc}")


def test_readme_install_section_gets_the_command_onto_a_new_shell() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "python3 -m venv .venv",
        ".venv/bin/pip install '.[fast]'",
        "pip install -e '.[dev,fast]'",
        ".venv/bin/beanstalk-proxy",
        ". .venv/bin/activate",
    ):
        assert needle in install, needle
    assert text.index("## Install") < text.index("## Quickstart")
    # the other newcomer traps of the issue stay fixed
    for s_client in re.findall(r"openssl s_client[^\n]*", text):
        assert " -crlf " in s_client, s_client
    reloading = " ".join(text.split("## Reloading", 1)[1].split("\n## ", 1)[0].split())
    assert "established connections continue, except those whose client certificate" in (
        reloading
    )
    assert "CRLs revoke: they are closed" in reloading

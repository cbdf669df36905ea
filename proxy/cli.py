"""The ``beanstalk-proxy`` command line: the click commands, the composition root.

Each command loads what it needs through ``proxy.loading`` and hands it to the module that does
the work, printing what that returns: ``serve`` and ``client`` run ``proxy.app`` (SIGHUP and
watched-file reloads are ``proxy.reloading``); ``check-config`` validates everything ``serve``
would load (and that the server certificate may serve, for the ``--name`` given); ``explain``
prints ``proxy.explain``'s answer for one command line; ``acl test`` runs a decision table and
``acl diff`` compares the rights of two ACLs; ``status`` prints ``proxy.statusview``'s table;
``certs`` makes a development PKI. Every ``ConfigError`` exits with status 2 and ``error:
<file>: <key path>: <reason> (line L, column C)`` on stderr; PKI errors exit 1.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import __version__, app
from proxy.acl import lint_acl
from proxy.acldiff import diff_policies
from proxy.acldiff import render as render_diff
from proxy.acltest import Case, parse_cases, run_cases
from proxy.certs import (
    CRL,
    PKIError,
    ensure_dev_pki,
    init_ca_and_server,
    issue_client,
    load_cert,
    revoke,
)
from proxy.config import LOG_LEVELS, Config, Endpoint, parse_endpoint
from proxy.errors import ConfigError
from proxy.explain import Explanation, Query, explain_command, explain_shadow
from proxy.identity import Identity, identity_from_der
from proxy.loading import (
    case_identity,
    certificate_identity,
    describe_config_error,
    load_acl,
    load_config,
    load_server_context,
    load_shadow,
    load_yaml,
)
from proxy.logs import LOGGER, event, setup_logging
from proxy.reloading import (
    watched_files,
)
from proxy.servercert import server_cert_problem
from proxy.statusview import StatusError, fetch_sessions, render_table
from proxy.tlsctx import client_context, load_client_cas
from proxy.watch import snapshot as _file_state

__all__ = ["describe_config_error", "load_acl", "load_config", "load_yaml", "main"]

log = logging.getLogger(LOGGER)

EXIT_CONFIG = 2
EXIT_PKI = 1


# --------------------------------------------------------------------------------------------
# the click group


class _Group(click.Group):
    """Maps the project's errors to exit codes and one-line messages on stderr."""

    def invoke(self, ctx: click.Context) -> Any:

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"error: {describe_config_error(exc)}", err=True)
            ctx.exit(EXIT_CONFIG)
        except PKIError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_PKI)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="beanstalk-proxy")
def main() -> None:
    """Mutual-TLS, per-tube access-controlled proxy in front of beanstalkd."""


_config_option = click.option(
    "--config",
    "config_path",
    required=True,
    metavar="PATH",
    help="Proxy configuration file (YAML), e.g. config/proxy.yaml.",
)


# --------------------------------------------------------------------------------------------
# serve


@main.command()
@_config_option
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes sharing the listen port (SO_REUSEPORT); signals reach every worker.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    help="Log level; overrides the config's log.level.",
)
@click.option(
    "--loop",
    type=click.Choice(app.LOOPS),
    default="auto",
    show_default=True,
    help="Event loop: uvloop when installed (auto), uvloop (fail without it), or asyncio.",
)
def serve(config_path: str, workers: int, log_level: str | None, loop: str) -> None:
    """Run the proxy until SIGTERM/SIGINT; SIGHUP reloads the ACL and TLS files."""

    try:  # an unusable --loop fails before anything starts
        app.loop_factory(loop)
    except app.LoopUnavailable as exc:
        raise click.UsageError(str(exc)) from None
    config = load_config(config_path)
    setup_logging(config.log.format, log_level or config.log.level)
    baseline = _file_state(watched_files(config))  # before reading them: see watch()
    policy = load_acl(config.acl, config.source)
    for warning in lint_acl(policy):
        log.warning("ACL lint warning", extra=event("acl_lint", file=config.acl, warning=warning))
    ctx = load_server_context(config)
    fd_problem = app.fd_limit_problem(config, raise_soft=True)
    if fd_problem is not None:
        log.warning("open-file limit too low", extra=event("fd_limit", detail=fd_problem))
    if workers == 1:
        sys.exit(app.run(app.serve(config, ctx, policy, baseline=baseline), loop))
    if config.listen.is_unix or config.listen.port == 0:
        raise ConfigError(
            config.source, "listen", "--workers needs a TCP listen address with a fixed port"
        )
    sys.exit(app.serve_workers(config, ctx, policy, workers, baseline, loop))


# --------------------------------------------------------------------------------------------
# check-config


@main.command("check-config")
@_config_option
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="HOST",
    help="A name clients connect to (DNS name or IP): the server certificate's SANs must "
    "cover it (the listen address is usually a wildcard). Repeatable.",
)
def check_config(config_path: str, names: tuple[str, ...]) -> None:
    """Validate the config, the ACL and every certificate, key, CA and CRL file.

    The server certificate must allow serverAuth and, with --name, carry that name.
    Prints ACL lint warnings, then "ok". Exits 2 with file, key path and reason on a problem."""

    config = load_config(config_path)
    policy = load_acl(config.acl, config.source)
    load_server_context(config)
    _check_server_cert(config, names)
    for warning in lint_acl(policy):
        click.echo(f"warning: {config.acl}: {warning}", err=True)
    _check_shadow(config)
    fd_problem = app.fd_limit_problem(config, raise_soft=False)
    if fd_problem is not None:
        click.echo(f"warning: {config.source}: {fd_problem}", err=True)
    cas = load_client_cas(config.tls, config.source)
    unbound = policy.unbound_principals()
    if len(cas) > 1 and unbound:
        click.echo(
            f"warning: {config.acl}: tls.client_ca ({config.tls.client_ca}) holds {len(cas)} CA "
            f"certificates and principal(s) {', '.join(unbound)} are not bound to one: any of "
            f"these CAs can issue a certificate that becomes them; add an 'issuer' match key",
            err=True,
        )
    click.echo("ok")


def _check_shadow(config: Config) -> None:
    """check-config: the shadow ACL must load too (the proxy itself only logs an error)."""

    shadow = load_shadow(config)
    if shadow is not None:
        for warning in lint_acl(shadow):
            click.echo(f"warning: {config.acl_shadow}: {warning}", err=True)


def _check_server_cert(config: Config, names: Sequence[str]) -> None:
    """serverAuth EKU and, for each of ``names``, a SAN covering it (``ConfigError`` on
    ``tls.cert`` otherwise). The file was already read and checked by the server context."""

    path = config.tls.cert
    cert = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
    checks: Sequence[str | None] = names or [None]
    for name in checks:
        problem = server_cert_problem(cert, name)
        if problem is not None:
            raise ConfigError(config.source, "tls.cert", f"the certificate in {path} {problem}")


# --------------------------------------------------------------------------------------------
# explain


@main.command()
@_config_option
@click.option("--cert", "cert_path", metavar="PEM", help="Client certificate to map.")
@click.option("--principal", "principal_name", metavar="NAME", help="Principal name to use.")
@click.option(
    "--tube",
    metavar="TUBE",
    help="The used tube (put, peek-*, kick), the watched tube (reserve) or the job's tube "
    '(job-id commands). Default for used/watched: "default".',
)
@click.option(
    "--shadow",
    is_flag=True,
    help="Also show the decision of the shadow ACL (acl_shadow) and whether they differ.",
)
@click.argument("commandline")
def explain(
    config_path: str,
    cert_path: str | None,
    principal_name: str | None,
    tube: str | None,
    shadow: bool,
    commandline: str,
) -> None:
    """Show the principal for a certificate and the ACL decision for COMMANDLINE.

    Example: explain --config config/proxy.yaml --cert certs/dev/dev-client.pem 'put 0 0 60 5'.
    Exits 0 when allowed, 1 when denied or refused, 2 on configuration errors (with --shadow:
    the enforced ACL's answer)."""
    config = load_config(config_path)
    shadow_policy = load_shadow(config) if shadow else None
    if shadow and shadow_policy is None:
        raise click.UsageError(f"{config.source} has no acl_shadow key")
    policy = load_acl(config.acl, config.source)
    if (cert_path is None) == (principal_name is None):
        raise click.UsageError("give exactly one of --cert PEM or --principal NAME")
    identity = certificate_identity(cert_path, config)[0] if cert_path is not None else None
    query = Query(
        commandline,
        identity=identity,
        principal=principal_name,
        tube=tube,
        max_job_size=config.limits.max_job_size,
        denial_reply=config.denial_reply,
    )
    if shadow_policy is None:
        _print_explanation(explain_command(policy, query))
        return
    both = explain_shadow(policy, shadow_policy, query)
    _print_explanation(both.enforced, f"== enforced: {config.acl}")
    _print_explanation(both.shadow, f"== shadow: {config.acl_shadow}")
    words = ["ALLOW" if e.allowed else "DENY or refused" for e in (both.enforced, both.shadow)]
    if both.mismatch:
        click.echo(f"== MISMATCH: enforced {words[0]}, shadow {words[1]}")
    else:
        click.echo(f"== same decision: {words[0]}")
    sys.exit(0 if both.enforced.allowed else 1)


def _print_explanation(explanation: Explanation, heading: str | None = None) -> None:
    """Print one policy's explanation; exit 1 after it when denied or refused, unless
    ``heading`` is given (``--shadow`` prints both and exits at the end)."""
    if heading is not None:
        click.echo(heading)
    for line in explanation.lines:
        click.echo(line)
    if explanation.usage_error is not None:
        raise click.UsageError(explanation.usage_error)
    if not explanation.allowed and heading is None:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# acl: decision tables and diffs


@main.group()
def acl() -> None:
    """Tools for changing the ACL safely: decision tables (test) and rights diffs (diff)."""


@acl.command("test")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="Proxy configuration: its ACL, limits.max_job_size and tls.client_ca (for cert cases).",
)
@click.option(
    "--acl",
    "acl_path",
    metavar="PATH",
    help="ACL file to test instead of the config's `acl` (e.g. a proposed change).",
)
@click.argument("cases_path", metavar="CASES")
def acl_test(config_path: str | None, acl_path: str | None, cases_path: str) -> None:
    """Run the decision table CASES (YAML) against the ACL, deciding each case as the proxy.

    Prints one line per failing case and a summary "N passed, M failed". Exits 0 when every
    case passes, 1 when one fails, 2 on a config, ACL or case-file error (with its key path).
    The case format is in config/ACL.md; config/acl.example.test.yaml is an example."""

    if config_path is None and acl_path is None:
        raise click.UsageError("give --config PATH, --acl PATH or both")
    config = load_config(config_path) if config_path is not None else None
    policy_path = acl_path if acl_path is not None else config.acl if config else ""
    policy = load_acl(policy_path)
    cases = parse_cases(load_yaml(cases_path), cases_path)
    base = Path(cases_path).parent

    def identities(case: Case) -> Identity:
        assert case.cert is not None
        path = base / case.cert
        try:
            return case_identity(str(path), config)
        except (PKIError, ValueError) as exc:
            raise ConfigError(cases_path, f"cases[{case.index}].cert", str(exc)) from None

    report = run_cases(
        policy,
        cases,
        identities=identities,
        max_job_size=config.limits.max_job_size if config else 65535,
        source=cases_path,
    )
    for result in report.failures:
        case = result.case
        want = case.expect if case.rule is None else f"{case.expect} by {case.rule}"
        who = f" as {result.principal}" if result.principal else ""
        command = "" if case.name == case.command else f": {case.command!r}"
        click.echo(
            f"FAIL {case.label}{command}{who}: expected {want}, "
            f"got {result.outcome} by {result.rule}"
        )
    failed = len(report.failures)
    click.echo(f"{report.passed} passed, {failed} failed ({policy_path} against {cases_path})")
    if failed:
        sys.exit(1)


@acl.command("diff")
@click.option(
    "--exit-code", is_flag=True, help="Exit 1 when the effective rights differ (like git diff)."
)
@click.argument("old_path", metavar="OLD")
@click.argument("new_path", metavar="NEW")
def acl_diff(old_path: str, new_path: str, exit_code: bool) -> None:
    """Show, per principal, the effective rights NEW grants and revokes compared with OLD.

    Both are ACL files. Reports rights gained and lost (verb classes or commands x tube
    patterns), principals added, removed or matched differently, rate limit and put limit
    changes. Exits 0 (with --exit-code: 1 when there are differences), 2 on an invalid file."""

    diff = diff_policies(load_acl(old_path), load_acl(new_path))
    for line in render_diff(diff):
        click.echo(line)
    if exit_code and diff.principals:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# certs


@main.group()
def certs() -> None:
    """Development PKI: a CA, a server certificate, client certificates and a CRL."""


def _echo_written(paths: Sequence[Path]) -> None:
    for path in paths:
        click.echo(f"wrote {path}")


def _echo_pins(cert_path: Path) -> None:

    identity = identity_from_der(load_cert(cert_path).public_bytes(Encoding.DER))
    click.echo(f"subject: {identity.subject}")
    click.echo(f"fingerprint: {identity.fingerprint}")
    click.echo(f"spki: {identity.spki}")


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="Extra server name (DNS name or IP) for the server certificate; repeatable.",
)
@click.option("--days", default=825, show_default=True, help="Server certificate validity.")
@click.option("--rsa", is_flag=True, help="RSA 2048 keys instead of ECDSA P-256.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs_init(directory: str, names: tuple[str, ...], days: int, rsa: bool, force: bool) -> None:
    """Create a CA, a server certificate (localhost, 127.0.0.1, ::1 + --name) and an empty
    CRL in DIRECTORY."""

    written = init_ca_and_server(
        directory, list(names), days=days, force=force, key_type="rsa" if rsa else "ec"
    )
    _echo_written(written)


@certs.command("issue")
@click.option("--ca", "ca_dir", required=True, metavar="DIR", help="Directory with ca.pem/ca.key.")
@click.argument("name")
@click.option("--ou", "ous", multiple=True, metavar="OU", help="Subject OU; repeatable.")
@click.option(
    "--uri", "uris", multiple=True, metavar="URI", help="URI SAN (e.g. a SPIFFE ID); repeatable."
)
@click.option("--dns", "dns", multiple=True, metavar="DNS", help="DNS SAN; repeatable.")
@click.option("--ip", "ips", multiple=True, metavar="IP", help="IP address SAN; repeatable.")
@click.option(
    "--cn",
    metavar="TEXT",
    help="Subject CN (default: NAME); --cn '' leaves the CN out (SAN-only certificate).",
)
@click.option("--days", default=365, show_default=True, help="Validity in days.")
@click.option("--out", "out_dir", metavar="DIR", help="Output directory (default: the CA's).")
@click.option("--rsa", is_flag=True, help="RSA 2048 key instead of ECDSA P-256.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs_issue(
    ca_dir: str,
    name: str,
    ous: tuple[str, ...],
    uris: tuple[str, ...],
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    cn: str | None,
    days: int,
    out_dir: str | None,
    rsa: bool,
    force: bool,
) -> None:
    """Issue a client certificate CN=NAME (or --cn) as NAME.pem / NAME.key."""

    written = issue_client(
        ca_dir,
        name,
        out_dir=out_dir,
        ous=ous,
        uris=uris,
        dns=dns,
        days=days,
        force=force,
        key_type="rsa" if rsa else "ec",
        ips=ips,
        cn=cn,
    )
    _echo_written(written)
    _echo_pins(written[0])


@certs.command("revoke")
@click.option("--ca", "ca_dir", required=True, metavar="DIR", help="Directory with ca.pem/ca.key.")
@click.argument("cert", metavar="CERT")
def certs_revoke(ca_dir: str, cert: str) -> None:
    """Add CERT's serial to DIR/crl.pem (send the proxy SIGHUP afterwards)."""

    serial = load_cert(cert).serial_number
    added = revoke(ca_dir, cert)
    state = "revoked" if added else "was already revoked"
    click.echo(f"{cert} (serial {serial:x}) {state}; wrote {Path(ca_dir) / CRL}")
    click.echo("reload a running proxy with SIGHUP; tls.crl must name this CRL")


@certs.command("dev")
@click.argument("directory", type=click.Path(file_okay=False), default="certs/dev")
def certs_dev(directory: str) -> None:
    """Create whatever is missing of a development PKI in DIRECTORY (default certs/dev): CA,
    server certificate, CRL and the client certificate dev-client (OU dev)."""

    written = ensure_dev_pki(directory)
    _echo_written(written)
    if not written:
        click.echo(f"{directory}: complete, nothing to do")


# --------------------------------------------------------------------------------------------
# status (live sessions)


@main.command()
@click.option(
    "--metrics-url",
    "urls",
    multiple=True,
    required=True,
    metavar="URL",
    help="The proxy's status listener (its metrics.listen), e.g. http://127.0.0.1:9400. "
    "Repeatable (one table for several proxies). With serve --workers N the one address "
    "lists every worker's sessions, and a PID column says which worker holds each.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document(s) as served.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
def status(urls: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Who is connected now, one line per session (like HAProxy's "show sess").

    Reads /connections from the status listener, which serves it only with
    metrics.connections: true. STATE is connecting, relaying (commands in flight), idle,
    waiting (in a blocking reserve), blocked (the proxy is asking beanstalkd which tube a job
    is in), or draining; IN/OUT are bytes from/to the client, CMDS commands parsed (DENIED of
    them refused), RSV jobs reserved."""
    try:
        docs = [(url, fetch_sessions(url, timeout)) for url in urls]
    except StatusError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        for _, doc in docs:
            click.echo(json.dumps(doc, indent=2))
        return
    for line in render_table(docs):
        click.echo(line)


# --------------------------------------------------------------------------------------------
# client (producer-side tunnel)


def _cli_endpoint(value: str, option: str, allow_port_zero: bool) -> Endpoint:

    try:
        return parse_endpoint(value, allow_port_zero=allow_port_zero)
    except ValueError as exc:
        raise ConfigError("command line", option, str(exc)) from None


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:11300",
    show_default=True,
    help="Plain local listener for unmodified clients: HOST:PORT or unix:/path.",
)
@click.option("--connect", required=True, metavar="HOST:PORT", help="The proxy's TLS address.")
@click.option("--cert", required=True, metavar="PEM", help="This producer's client certificate.")
@click.option("--key", required=True, metavar="PEM", help="Its private key.")
@click.option("--ca", required=True, metavar="PEM", help="CA that signed the proxy's certificate.")
@click.option(
    "--server-name",
    metavar="NAME",
    help="Name the proxy's certificate must carry (default: the --connect host).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr as text or as one JSON object per line.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Log level.",
)
@click.option("--allow-remote-listen", is_flag=True, help="Allow a non-loopback --listen.")
def client(
    listen: str,
    connect: str,
    cert: str,
    key: str,
    ca: str,
    server_name: str | None,
    log_format: str,
    log_level: str,
    allow_remote_listen: bool,
) -> None:
    """Producer-side tunnel: a plain local port carried over mutual TLS to the proxy.

    The local side has no authentication of its own, so it listens on loopback unless
    --allow-remote-listen is given. SIGHUP reloads the certificate, key and CA."""

    setup_logging(log_format, log_level)
    local = _cli_endpoint(listen, "--listen", allow_port_zero=True)
    if not local.is_loopback and not allow_remote_listen:
        raise ConfigError(
            "command line",
            "--listen",
            f"{local} is not loopback or a unix socket: anyone who reaches it would use your "
            "certificate; pass --allow-remote-listen if that is intended",
        )
    remote = _cli_endpoint(connect, "--connect", allow_port_zero=False)
    if remote.is_unix:
        raise ConfigError("command line", "--connect", "must be HOST:PORT")
    name = server_name or remote.host or "localhost"

    def make_ctx() -> ssl.SSLContext:  # re-run on SIGHUP
        return client_context(ca, cert, key)

    make_ctx()  # fail fast with a precise message
    sys.exit(app.run(app.run_client(local, remote, make_ctx, name, [cert, key, ca])))

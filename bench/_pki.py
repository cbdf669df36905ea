"""The benchmarks' throwaway PKI, made with ``proxy.certs`` in a directory: a CA, the proxy's
server certificate (``server.pem``/``server.key``) and a certificate per client CN
(``CN.pem``/``CN.key``); the proxy's TLS settings for them, and a client context that trusts
the CA and presents a client's certificate. Imported by the scripts in ``bench/`` once they
have put the repository on ``sys.path``."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

from proxy.certs import init_ca_and_server, issue_client
from proxy.config import TLSConfig

#: The client the benchmarks connect as.
CLIENT = "bench"


def make_pki(directory: Path, clients: Iterable[str] = (CLIENT,)) -> TLSConfig:
    """Makes the CA, the server's and each of ``clients``' certificates in ``directory``; the
    proxy's ``tls`` settings for them (no CRL, TLS 1.2 and up)."""
    init_ca_and_server(directory)
    for cn in clients:
        issue_client(directory, cn)
    return TLSConfig(
        cert=str(directory / "server.pem"),
        key=str(directory / "server.key"),
        client_ca=str(directory / "ca.pem"),
        crl=(),
        min_version="1.2",
    )


def client_context(directory: Path, cn: str = CLIENT) -> ssl.SSLContext:
    """A client context for the PKI in ``directory`` presenting ``cn``'s certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(directory / "ca.pem"))
    ctx.load_cert_chain(str(directory / f"{cn}.pem"), str(directory / f"{cn}.key"))
    return ctx

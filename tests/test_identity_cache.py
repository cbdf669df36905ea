"""peer_identity remembers the identity of a presented chain per server context: a client that
reconnects costs no second issuer lookup, another certificate gets its own identity, and a TLS
reload (a new context) starts afresh."""

from __future__ import annotations

import pytest
from conftest import PKI, Beanstalkd, serving

from proxy.tlsctx import IDENTITY_CACHE_SIZE, server_context

pytestmark = pytest.mark.integration


async def test_reconnecting_client_reuses_its_identity(pki: PKI, beanstalkd: Beanstalkd) -> None:
    async with serving(pki, beanstalkd.port) as proxy:
        a1 = await proxy.connect("admin")
        a2 = await proxy.connect("admin")
        w = await proxy.connect("worker")
        for c in (a1, a2, w):
            assert await c.line(b"list-tube-used") == b"USING default"
        ids: dict[str, list[object]] = {"admin": [], "worker": []}
        for c in proxy.server.connections:
            ids[c.principal].append(c.identity)
        first, second = ids["admin"]
        assert first is second  # computed once for the same chain
        assert ids["worker"][0] is not first and ids["worker"][0] != first
        cache = proxy.server.ssl_context.identities
        assert cache is not None and len(cache) == 2
        assert 0 < len(cache) <= IDENTITY_CACHE_SIZE
        # a TLS reload brings a new context, and with it an empty cache
        proxy.server.reload_tls(server_context(proxy.server.config.tls))
        again = await proxy.connect("admin")
        assert await again.line(b"list-tube-used") == b"USING default"
        admins = [c.identity for c in proxy.server.connections if c.principal == "admin"]
        new = [i for i in admins if i is not first]
        assert len(admins) == 3 and len(new) == 1  # computed anew under the new context
        assert new[0] == first  # and equal: the same certificate
        for c in (a1, a2, w, again):
            await c.close()

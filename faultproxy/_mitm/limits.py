"""Stream limits: more than 5 concurrent upstream connections per client connection and address.

mitmproxy's ConnectionHandler holds an `asyncio.Semaphore(5)` per upstream address for the whole life of
each upstream connection, and there is no option for it: the 6th same-origin EventSource of a browser
page on one HTTP/2 connection gets nothing at all. `raise_stream_limits` patches the class so every
handler gets larger semaphores, and raises the live handlers' in place.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy import server as mserver

from .checks import Checker

# mitmproxy.proxy.server.ConnectionHandler: `max_conns = defaultdict(lambda: asyncio.Semaphore(5))`.
MITM_DEFAULT_UPSTREAM_CONNS = 5

# --------------------------------------------------------------------------------------------------
# Stream limits
#
# What stops the 6th same-origin EventSource on one HTTP/2 client connection: not an option.
# mitmproxy.proxy.server.ConnectionHandler.__init__ (11.0.2 and 12.x alike) creates
#     self.max_conns = collections.defaultdict(lambda: asyncio.Semaphore(5))
# and open_connection() holds `async with self.max_conns[address]` for the *whole life* of each
# upstream connection. When an HTTP/2 client talks to an HTTP/1 upstream, every stream gets its own
# upstream connection (HttpLayer.get_connection never reuses one for h2 -> h1, and Http1Client closes
# it after one exchange), so per client connection at most 5 upstream exchanges to one address can be
# in flight; the 6th OpenConnection waits on the semaphore until one of the first five ends, which
# for SSE is never. The other limits are far away: the proxy advertises
# SETTINGS_MAX_CONCURRENT_STREAMS = 100 to the client (h2's default local setting), and an HTTP/2
# upstream gets up to 10 streams before its SETTINGS arrive (Http2Client.provisional_max_concurrency),
# then whatever it advertises, with excess streams queued rather than refused.

_upstream_limit: int = MITM_DEFAULT_UPSTREAM_CONNS


def _apply_limit(handler: Any) -> None:
    max_conns = getattr(handler, "max_conns", None)
    if not isinstance(max_conns, collections.defaultdict):
        return
    limit = _upstream_limit
    max_conns.default_factory = functools.partial(_limited_semaphore, limit)
    for sem in list(max_conns.values()):
        have = getattr(sem, "_faultproxy_capacity", MITM_DEFAULT_UPSTREAM_CONNS)
        for _ in range(limit - have):
            sem.release()  # an asyncio.Semaphore is unbounded: each release adds one slot
        if limit > have:
            sem._faultproxy_capacity = limit


def _limited_semaphore(n: int) -> asyncio.Semaphore:
    sem = asyncio.Semaphore(n)
    sem._faultproxy_capacity = n  # type: ignore[attr-defined]
    return sem


def raise_stream_limits(master_or_options: Any = None, *, limit: int = 256) -> None:
    """Allow `limit` concurrent upstream connections per client connection and upstream address.

    There is no mitmproxy option for this (see the comment above); the ConnectionHandler class is
    patched so every handler created afterwards gets the larger semaphores, and the live handlers of
    the running master (`master_or_options` if it is a master, else ctx.master) are raised in place.
    Idempotent; a smaller limit than already set is ignored. 256 > the 100 streams the proxy lets
    one HTTP/2 client open, so the semaphore never binds for a single client connection.
    """
    global _upstream_limit
    _upstream_limit = max(_upstream_limit, int(limit))
    cls = mserver.ConnectionHandler
    if not getattr(cls.__init__, "_faultproxy_patched", False):
        orig_init = cls.__init__

        @functools.wraps(orig_init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_init(self, *args, **kwargs)
            _apply_limit(self)

        __init__._faultproxy_patched = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]
    master = master_or_options if hasattr(master_or_options, "addons") else None
    try:
        master = master or ctx.master
        ps = master.addons.get("proxyserver")
        for handler in list(ps.connections.values()):
            _apply_limit(handler)
    except Exception:
        pass  # no running master yet: the class patch covers every handler to come



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    CH = mserver.ConnectionHandler
    init_src = c.src(CH.__init__)
    c.need(
        "max_conns" in init_src and "Semaphore(5)" in init_src,
        "ConnectionHandler.max_conns is no longer defaultdict(lambda: asyncio.Semaphore(5)): "
        "re-check raise_stream_limits",
    )
    c.need(
        "async with self.max_conns[" in c.src(CH.open_connection),
        "ConnectionHandler.open_connection no longer holds max_conns per upstream connection",
    )

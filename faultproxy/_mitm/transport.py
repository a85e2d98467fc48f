"""Pausing an upstream socket for backpressure, against asyncio's own resume.

asyncio's StreamReader resumes a transport itself when its buffer drains, which would undo a
`pause_reading()`; the transport instance's `resume_reading` is wrapped so that it stays paused while
any stream holds the pause.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .checks import Checker

# --------------------------------------------------------------------------------------------------
# Server transport pausing


def conn_transport(handler: Any, conn: Any) -> asyncio.Transport | None:
    io = handler.transports.get(conn)
    writer = getattr(io, "writer", None)
    transport = getattr(writer, "transport", None)
    if isinstance(transport, asyncio.Transport) and not transport.is_closing():
        return transport
    return None


def transport_holds(transport: asyncio.Transport) -> set[int]:
    """Make resume_reading a no-op while anyone holds the pause.

    asyncio's StreamReader resumes the transport itself when its buffer drains
    (_maybe_resume_transport / _wait_for_data), which would undo our pause_reading(). Wrapping the
    transport instance's resume_reading keeps the pause until the last holder lets go.
    """
    holds: set[int] | None = transport.__dict__.get("_faultproxy_holds")
    if holds is None:
        holds = set()
        orig = transport.resume_reading

        def resume_reading() -> None:
            if not holds:
                orig()

        transport._faultproxy_resume = orig  # type: ignore[attr-defined]
        transport._faultproxy_holds = holds  # type: ignore[attr-defined]
        transport.resume_reading = resume_reading  # type: ignore[method-assign]
    return holds


def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    from mitmproxy.proxy import server

    init_src = c.src(server.ConnectionHandler.__init__)
    c.need("self.transports" in init_src, "ConnectionHandler.transports is no longer set in __init__")
    c.need(
        "writer:" in c.src(server.ConnectionIO),
        "ConnectionIO.writer (the connection's StreamWriter) is gone",
    )

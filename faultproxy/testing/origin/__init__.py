"""A real SSE origin for tests, demos and users.

Its HTTP/1.1 server (server.py) is written by hand on asyncio streams instead of using a framework,
because a fault proxy is tested by what reaches the wire: every byte, every chunk boundary, every flush
and every close is explicit, so a test can ask for "headers late", "no terminating chunk" or "body
delimited by close" and know it got exactly that. Its routes (routes.py) are the SSE streams, byte
bodies, uploads, statuses and delays listed in ENDPOINTS_HELP (also served on ``GET /``).

Three ways to use it:

* in-process: ``with OriginServer() as origin: ...`` (own event loop in a background thread) or
  ``async with OriginServer() as origin: ...`` / ``await origin.start()`` on the caller's loop;
* ``python -m faultproxy.testing.origin --host 127.0.0.1 --port 8000``;
* ``main(argv)`` for a CLI that embeds it.
"""

from .routes import ENDPOINTS_HELP, EventOptions, OriginServer, expected_bytes, expected_sha256, main, sse_event_bytes
from .server import RequestLog, RequestRecord

__all__ = [
    "ENDPOINTS_HELP",
    "EventOptions",
    "OriginServer",
    "RequestLog",
    "RequestRecord",
    "expected_bytes",
    "expected_sha256",
    "main",
    "sse_event_bytes",
]

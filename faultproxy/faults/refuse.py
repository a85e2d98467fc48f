"""`refuse`: turn a request away before the upstream sees it, the way an overloaded HTTP/2 server does.

HTTP/2 clients get RST_STREAM(REFUSED_STREAM) on that stream, with no response headers: RFC 9113
section 8.7 says the request was not processed and may be retried safely (Chromium retries it, then
reports net::ERR_HTTP2_SERVER_REFUSED_STREAM). Other streams on the connection go on. HTTP/1.x clients
have no such frame: the connection closes before any response byte (Chromium: ERR_EMPTY_RESPONSE),
or with `http1: reset` a TCP RST. The request is never written upstream.

`code` picks another RST_STREAM code (e.g. HTTP_1_1_REQUIRED, ENHANCE_YOUR_CALM); the default is what
the issue's incident needs, REFUSED_STREAM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..actions import ErrorCode, H2ErrorCode, code_name
from .base import Fault, FaultConfig, Hit
from .registry import register


class RefuseConfig(FaultConfig):
    type: Literal["refuse"]
    code: ErrorCode = Field(int(H2ErrorCode.REFUSED_STREAM), description="RST_STREAM code for HTTP/2 clients")
    http1: Literal["close", "reset"] = Field(
        "close", description="HTTP/1.x clients: close the connection (FIN) or reset it (TCP RST), before any byte"
    )


@register
class Refuse(Fault[RefuseConfig]):
    Config = RefuseConfig
    acts_on_request = True

    async def on_request(self, hit: Hit) -> None:
        code = self.config.code
        if hit.dry_run:
            hit.record(f"would refuse with RST_STREAM {code_name(code)} (HTTP/1.x: {self.config.http1})", phase="request")
            return
        handle = hit.session.handle
        if handle is None:
            hit.record("not refused: the flow is not a live stream", phase="request")
            return
        h2 = handle.client_is_http2
        done = await handle.refuse(code, reset=self.config.http1 == "reset")
        if done is None:
            hit.record("not refused: the client had already gone", phase="request")
        elif done == "rst_stream":
            hit.record(
                f"RST_STREAM {code_name(code)} on stream {handle.stream_id} before any response; upstream not contacted",
                phase="request",
                action="rst_stream",
                **(handle.last_frame or {}),
            )
        else:
            version = hit.flow.request.http_version
            how = "connection reset (TCP RST)" if done == "reset" else "connection closed"
            hit.record(
                f"{how} before any response byte ({version}); upstream not contacted",
                phase="request",
                action=done,
                **({} if h2 else {"fallback": f"RST_STREAM needs HTTP/2, client speaks {version}"}),
            )
        hit.session.take_over()  # nothing of this flow is ours to send any more; no watch may fire

"""`compress`: gzip a response the way nginx does with `gzip on` covering text/event-stream.

Measured on nginx 1.22.1 (shared infra facts): with `gzip on; gzip_types text/event-stream`,
proxy buffering on and a client sending `Accept-Encoding: gzip` (browsers always do), the whole SSE
stream was held until the upstream ended — the compressor emits nothing for small events until it
is finished. With `X-Accel-Buffering: no` from the upstream, each upstream chunk was sync-flushed and
arrived at once. This kind does exactly that: compressed bytes are collected like nginx's gzip
output buffers (`gzip_buffers`, one 4 KiB page each on x86-64) and go out only when a buffer is
full or the stream ends; for `X-Accel-Buffering: no`, each upstream chunk is Z_SYNC_FLUSHed and
sent at once. (zlib writes the 10-byte gzip header on the first input: sending that alone would
show the client a first body byte that nginx never sends before a buffer fills.)
Headers are rewritten as nginx does: Content-Encoding: gzip, no Content-Length, Vary: Accept-Encoding.
Decompressed, the body is byte-identical to the upstream's.
(nginx.org/en/docs/http/ngx_http_gzip_module.html)
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
import zlib
from typing import Literal

from mitmproxy import http
from pydantic import Field

from ..engine import Channel, Data, Stage, StreamSession, ends_cleanly
from ..units import Size
from .base import Fault, FaultConfig, Hit, accel_buffering_off
from .registry import register


class CompressConfig(FaultConfig):
    type: Literal["compress"]
    types: list[str] = Field(
        default_factory=lambda: ["text/event-stream"],
        description="content types (globs) to compress, like nginx gzip_types",
    )
    level: int = Field(1, ge=1, le=9, description="gzip level (nginx gzip_comp_level, default 1)")
    honor_x_accel_buffering: bool = Field(
        True, description="X-Accel-Buffering: no from the upstream: sync-flush each chunk instead of holding"
    )
    buffer_size: Size = Field(
        4096, gt=0, description="compressed bytes are held until this many are ready (nginx gzip_buffers size)"
    )


class CompressStage(Stage):
    at_client = True  # gzip is the last thing before the client, as nginx's gzip filter is

    def __init__(self, hit: Hit, config: CompressConfig, sync_flush: bool):
        super().__init__(hit)
        self.config = config
        self.sync_flush = sync_flush
        # wbits 16+15: a gzip wrapper, as nginx writes.
        self.compressor = zlib.compressobj(config.level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.raw = 0
        self.sent = 0

    async def _emit(self, dst: Channel, data: bytes) -> None:
        if data:
            self.sent += len(data)
            await dst.send(Data(data))

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        started = time.monotonic()
        try:
            await self._pipe(src, dst)
        except asyncio.CancelledError:
            # The client went away while the stream was held: say so, or the journal would show
            # nothing for exactly the streams this fault starved.
            if self.raw:
                self.hit.record(
                    f"gzip held {self.raw} bytes for {time.monotonic() - started:.3f}s until the client left; "
                    f"{self.sent} compressed bytes sent",
                    raw_bytes=self.raw,
                    gzip_bytes=self.sent,
                )
            raise

    async def _pipe(self, src: Channel, dst: Channel) -> None:
        held = bytearray()  # compressor output not sent yet (nginx's gzip output buffers)
        if self.sync_flush:
            # Unbuffered, nginx passes the (empty) flush that follows the response headers through
            # its gzip filter: the client gets the gzip header and an empty sync block (15 bytes)
            # at once, before any event. Measured against nginx 1.22.1 (tests/test_nginx_parity.py):
            # the compressed bodies are byte-identical, chunk for chunk.
            await self._emit(dst, self.compressor.flush(zlib.Z_SYNC_FLUSH))
        while True:
            item = await src.get()
            if isinstance(item, Data):
                self.raw += len(item.data)
                held += self.compressor.compress(item.data)
                if self.sync_flush:
                    held += self.compressor.flush(zlib.Z_SYNC_FLUSH)
                if self.sync_flush or len(held) >= self.config.buffer_size:
                    await self._emit(dst, bytes(held))
                    held.clear()
                continue
            if ends_cleanly(item):
                # The end (the upstream's, or a cut with a clean end): what the compressor still has
                # goes out with the gzip trailer, as nginx sends its last buffer.
                await self._emit(dst, bytes(held + self.compressor.flush(zlib.Z_FINISH)))
            # A failure or any other cut drops what is held: nginx, when its upstream times out or
            # closes early behind `gzip on`, finalizes the request without flushing its gzip buffers
            # (a held SSE stream shows the client nothing at all).
            mode = "sync-flushed per chunk (X-Accel-Buffering: no)" if self.sync_flush else "held by the compressor"
            self.hit.record(f"gzip {self.raw} -> {self.sent} bytes, {mode}", raw_bytes=self.raw, gzip_bytes=self.sent)
            await dst.send(item)
            return


@register
class Compress(Fault[CompressConfig]):
    Config = CompressConfig
    streams_response = True

    def applies_to_response(self, flow: http.HTTPFlow) -> bool:
        resp = flow.response
        if resp is None or "content-encoding" in resp.headers:
            return False
        accepts = [part.split(";")[0].strip().lower() for part in flow.request.headers.get("accept-encoding", "").split(",")]
        if "gzip" not in accepts:
            return False
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        return any(fnmatch.fnmatch(ctype, t.lower()) for t in self.config.types)

    async def on_response_headers(self, hit: Hit) -> None:
        resp = hit.flow.response
        assert resp is not None
        resp.headers["content-encoding"] = "gzip"
        resp.headers.pop("content-length", None)
        vary = resp.headers.get("vary")
        if not vary:
            resp.headers["vary"] = "Accept-Encoding"
        elif "accept-encoding" not in vary.lower():
            resp.headers["vary"] = f"{vary}, Accept-Encoding"
        if hit.flow.request.http_version.startswith("HTTP/1") and "transfer-encoding" not in resp.headers:
            resp.headers["transfer-encoding"] = "chunked"

    def body_stage(self, hit: Hit) -> Stage:
        sync = self.config.honor_x_accel_buffering and accel_buffering_off(hit.flow.response)
        return CompressStage(hit, self.config, sync)

"""`buffer`: hold body bytes back the way buffering proxies do.

- `size: 4k`  coalesce until that many bytes have accumulated (or the upstream ends)
- `size: all` hold the whole body until the upstream ends (antivirus and secure-web-gateway proxies
              do this to text/event-stream: the client sees nothing until the stream is over)
- `events: N` release each SSE event only once N more complete events have arrived (scanning proxies
              that lag: Kaspersky holds each event until the next one arrives, N = 1)
- `flush_interval` also release whatever is held at this period

`honor_x_accel_buffering` (default true) turns the fault off for a response whose upstream sent
`X-Accel-Buffering: no`, as nginx does — the standard fix for buffered SSE.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from mitmproxy import http
from pydantic import Field, model_validator

from ..engine import TERMINAL, Channel, Cut, Data, Fail, Stage, StreamSession, ends_cleanly
from ..sse import EventScanner
from ..units import Duration, Size
from .base import Fault, FaultConfig, Hit, accel_buffering_off
from .registry import register


class BufferConfig(FaultConfig):
    type: Literal["buffer"]
    size: Size | Literal["all"] | None = Field(None, description="bytes to coalesce, or 'all' to hold the whole body")
    events: int | None = Field(None, ge=1, description="hold each event until this many more have arrived")
    flush_interval: Duration | None = Field(None, gt=0, description="release what is held at this period")
    honor_x_accel_buffering: bool = Field(True, description="skip responses whose upstream sent X-Accel-Buffering: no")

    @model_validator(mode="after")
    def _one_mode(self):  # type: ignore[no-untyped-def]
        if (self.size is None) == (self.events is None):
            raise ValueError("give exactly one of size (bytes or 'all') and events")
        if self.size == 0:
            raise ValueError("size must be above 0 bytes (or 'all')")
        return self


class BufferStage(Stage):
    def __init__(self, hit: Hit, config: BufferConfig):
        super().__init__(hit)
        self.config = config
        self.held = bytearray()
        self.boundaries: list[int] = []  # offsets in `held` where complete events end (events mode)
        self.scanner = EventScanner() if config.events is not None else None
        self.longest_hold = 0.0
        self.held_since: float | None = None

    def _take(self, n: int) -> bytes:
        out = bytes(self.held[:n])
        del self.held[:n]
        if self.boundaries:
            self.boundaries = [b - n for b in self.boundaries if b > n]
        if self.held_since is not None:
            self.longest_hold = max(self.longest_hold, time.monotonic() - self.held_since)
            self.held_since = time.monotonic() if self.held else None
        return out

    def _hold(self, data: bytes) -> None:
        if self.scanner is not None:
            base = len(self.held)
            self.boundaries.extend(base + end for end in self.scanner.feed(data))
        if self.held_since is None:
            self.held_since = time.monotonic()
        self.held += data

    def _ready(self) -> int:
        """How many held bytes may go now."""
        cfg = self.config
        if cfg.events is not None:
            surplus = len(self.boundaries) - cfg.events
            return self.boundaries[surplus - 1] if surplus > 0 else 0
        if cfg.size == "all":
            return 0
        assert isinstance(cfg.size, int)
        return len(self.held) if len(self.held) >= cfg.size else 0

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        try:
            await self._pipe(src, dst)
        except asyncio.CancelledError:
            # The client went away while bytes were held: journal it (these are the starved streams).
            if self.held_since is not None:
                self.hit.record(
                    f"held {len(self.held)} bytes for {time.monotonic() - self.held_since:.3f}s until the client left",
                    held_bytes=len(self.held),
                )
            raise

    async def _pipe(self, src: Channel, dst: Channel) -> None:
        interval = self.config.flush_interval
        next_flush = time.monotonic() + interval if interval else None
        while True:
            timeout = None if next_flush is None else next_flush - time.monotonic()
            item = await src.get(timeout)
            if item is None or (next_flush is not None and time.monotonic() >= next_flush):
                if self.held:
                    await dst.send(Data(self._take(len(self.held))))
                next_flush = time.monotonic() + interval if interval else None
                if item is None:
                    continue
            if isinstance(item, Data):
                self._hold(item.data)
                if n := self._ready():
                    await dst.send(Data(self._take(n)))
                continue
            assert isinstance(item, TERMINAL)
            if self.held and not (isinstance(item, Cut) and not ends_cleanly(item)):
                # The upstream finished (or broke, or a cut before this stage ended the body cleanly):
                # what was held goes out, nothing is lost. A cut that breaks the stream drops it: a
                # buffering hop whose upstream broke has nothing complete to pass on.
                await dst.send(Data(self._take(len(self.held))))
            self._report(item)
            await dst.send(item)
            return

    def _report(self, item: object) -> None:
        how = f"events held {self.config.events} behind" if self.config.events else f"buffered size={self.config.size}"
        ending = "cut" if isinstance(item, Cut) else "upstream failed" if isinstance(item, Fail) else "upstream ended"
        self.hit.record(f"{how}; longest hold {self.longest_hold:.3f}s; {ending}", longest_hold=round(self.longest_hold, 6))


@register
class Buffer(Fault[BufferConfig]):
    Config = BufferConfig
    streams_response = True

    def applies_to_response(self, flow: http.HTTPFlow) -> bool:
        if self.config.honor_x_accel_buffering and accel_buffering_off(flow.response):
            return False
        return True

    def body_stage(self, hit: Hit) -> Stage:
        return BufferStage(hit, self.config)

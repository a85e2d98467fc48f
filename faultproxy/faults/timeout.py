"""`timeout`: what proxies, CDNs and load balancers do when the upstream is too slow.

- `scope: idle`       no byte from the upstream for `after`, counted from the request being sent and
                      reset by every byte (nginx `proxy_read_timeout`, ALB/NLB idle timeouts): only
                      traffic — heartbeat comments included — keeps it alive.
- `scope: first_byte` no response headers within `after` of the request (Heroku's 30 s, CDN TTFB limits).
- `scope: total`      the whole exchange within `after` (a GCP load balancer's backend timeout, Go's
                      `WriteTimeout`): heartbeats do not help.

Before the response headers the `before_headers` action applies (default `status`: answer `status`,
default 504); after them, `action` (default `close`).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from ..actions import ActionFields, ActionName, perform
from ..engine import TERMINAL, Channel, Cut, Stage, StreamSession
from ..units import Duration
from .base import Fault, FaultConfig, Hit
from .registry import register


class TimeoutConfig(FaultConfig, ActionFields):
    type: Literal["timeout"]
    scope: Literal["idle", "first_byte", "total"] = "idle"
    after: Duration = Field(description="the limit")
    before_headers: ActionName | None = "status"

    def describe_limit(self) -> str:
        what = {"idle": "no upstream byte", "first_byte": "no response headers", "total": "exchange not done"}
        return f"{what[self.scope]} for {self.after:.3f}s"


class TimeoutStage(Stage):
    """After the headers: watch the upstream's own arrivals (idle) or the clock (total)."""

    at_upstream = True

    def __init__(self, hit: Hit, config: TimeoutConfig):
        super().__init__(hit)
        self.config = config

    def _deadline(self, session: StreamSession) -> float:
        if self.config.scope == "total":
            start = session.request_sent_at or session.headers_sent_at or time.monotonic()
        else:
            start = session.last_upstream_at or time.monotonic()
        return start + self.config.after

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        while True:
            item = await src.get(self._deadline(session) - time.monotonic())
            if item is None:
                await dst.send(Cut(self.config, self.hit, self.config.describe_limit()))
                return
            await dst.send(item)
            if isinstance(item, TERMINAL):
                return


@register
class Timeout(Fault[TimeoutConfig]):
    Config = TimeoutConfig
    streams_response = True

    def body_stage(self, hit: Hit) -> Stage | None:
        if self.config.scope == "first_byte":
            return None  # the headers came in time: nothing more to watch
        return TimeoutStage(hit, self.config)

    def before_headers_watch(self, hit: Hit):  # type: ignore[no-untyped-def]
        async def fire() -> None:
            await perform(hit.session, self.config, hit, self.config.describe_limit())

        # Counted from the request being sent; before any response byte, idle and first_byte agree.
        return self.config.after, fire

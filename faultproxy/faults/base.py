"""What every fault kind is: a config model, and the moments of an exchange it acts on.

A fault kind is one module in this package with one `Fault` subclass registered by name. Its
`Config` is a small pydantic model (the profile entry, `type: <kind>`). The addon asks each
matched fault for what it does at three moments, so kinds stay independent and chain in the
order the profile writes them:

- `on_request`         before the request goes upstream (delay it, answer it, refuse it)
- `on_response_headers` when the upstream's headers arrive (delay, replace, rewrite)
- `body_stage`         a stage of the streaming engine that reads body chunks from an input
                       channel and writes them to an output channel (Toxiproxy's `Pipe`)

plus `before_headers_watch` for kinds that act when something does *not* arrive in time.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from mitmproxy import http

    from ..engine import Stage, StreamSession
    from ..journal import Journal


class FaultConfig(BaseModel):
    """Base of every kind's config. Unknown keys are errors; configs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str

    def describe(self) -> dict[str, Any]:
        """Parameters for the journal: what the profile said, minus defaults nobody set."""
        return self.model_dump(mode="json", exclude={"type"}, exclude_defaults=True, by_alias=True)


C = TypeVar("C", bound=FaultConfig)


class Hit:
    """One fault applied to one flow: the place kinds record what they did and reach the engine."""

    def __init__(
        self,
        *,
        flow: http.HTTPFlow,
        rule: str,
        profile: str,
        fault: Fault,
        rng: random.Random,
        journal: Journal,
        session_factory: Any,
        dry_run: bool,
        counters: Any = None,
    ):
        self.flow = flow
        self.rule = rule
        self.profile = profile
        self.fault = fault
        self.rng = rng
        self.journal = journal
        self._session_factory = session_factory
        self.dry_run = dry_run
        self.counters = counters  # the rule's matching.RuleCounters: `injected` counts once per hit
        self._counted = False

    @property
    def session(self) -> StreamSession:
        """The flow's streaming-engine session (created on first use, shared by every fault on the flow)."""
        return self._session_factory()

    def record(self, outcome: str, **extra: Any) -> None:
        """Journal what the client saw because of this fault."""
        if self.counters is not None and not self.dry_run and not self._counted:
            self._counted = True
            self.counters.injected += 1
        self.journal.record(self, outcome, **extra)


class Fault(Generic[C]):
    """A configured fault kind. Instances are made once per profile load and shared by flows."""

    kind: ClassVar[str]
    Config: ClassVar[type[FaultConfig]]

    # Whether this kind acts before the upstream answers. Such faults cannot depend on match
    # conditions that are only known from the response (status, response headers).
    acts_on_request: ClassVar[bool] = False
    # Whether this kind needs the response body streamed through the engine.
    streams_response: ClassVar[bool] = False
    # Whether this kind needs the request body streamed (slow uploads).
    streams_request: ClassVar[bool] = False

    def __init__(self, config: C):
        self.config = config

    def applies_to_response(self, flow: http.HTTPFlow) -> bool:
        """Late opt-out once response headers are known (e.g. `X-Accel-Buffering: no`)."""
        return True

    async def on_request(self, hit: Hit) -> None:
        """Act before the request goes upstream."""

    async def on_response_headers(self, hit: Hit) -> None:
        """Act when the upstream's response headers arrive, before the client gets them."""

    def body_stage(self, hit: Hit) -> Stage | None:
        """A stage for the response body pipeline, or None."""
        return None

    def request_stage(self, hit: Hit) -> Stage | None:
        """A stage for the request body pipeline (towards the upstream), or None."""
        return None

    def before_headers_watch(self, hit: Hit) -> Any:
        """A watch for the time before response headers (see engine.Watch), or None."""
        return None

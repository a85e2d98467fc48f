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

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from ..engine import Hit, Stage

if TYPE_CHECKING:
    from mitmproxy import http


class FaultConfig(BaseModel):
    """Base of every kind's config. Unknown keys are errors; configs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str

    def describe(self) -> dict[str, Any]:
        """Parameters for the journal: what the profile said, minus defaults nobody set."""
        return self.model_dump(mode="json", exclude={"type"}, exclude_defaults=True, by_alias=True)


C = TypeVar("C", bound=FaultConfig)


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


# Shared by the kinds that model nginx's buffering (buffer, compress).
def accel_buffering_off(response: http.Response | None) -> bool:
    """nginx reads the first characters of X-Accel-Buffering, case-insensitively: 'no' turns buffering off."""
    if response is None:
        return False
    return response.headers.get("x-accel-buffering", "").strip().lower().startswith("no")

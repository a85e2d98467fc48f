"""`abort`: answer with a chosen status, headers and body instead of the upstream's response.

`phase: request` answers without contacting the upstream at all (a proxy that rejects the request);
`phase: response` lets the request reach the upstream and then replaces whatever it answered (a
gateway that turns the backend's response into an error), closing the upstream connection.
"""

from __future__ import annotations

from typing import Literal

from mitmproxy import http
from pydantic import Field

from .base import Fault, FaultConfig, Hit
from .registry import register


class AbortConfig(FaultConfig):
    type: Literal["abort"]
    phase: Literal["request", "response"] = "request"
    status: int = Field(503, ge=100, le=599, description="HTTP status code to answer with")
    headers: dict[str, str] = Field(default_factory=dict, description="response headers")
    body: str = Field("", description="response body")


def make_response(status: int, body: str, headers: dict[str, str]) -> http.Response:
    hdrs = {"content-type": "text/plain; charset=utf-8", **{k.lower(): v for k, v in headers.items()}}
    return http.Response.make(status, body.encode(), hdrs)


@register
class Abort(Fault[AbortConfig]):
    Config = AbortConfig

    @property
    def acts_on_request(self) -> bool:  # type: ignore[override]
        return self.config.phase == "request"

    async def on_request(self, hit: Hit) -> None:
        if self.config.phase != "request":
            return
        if hit.dry_run:
            hit.record(f"would answer status {self.config.status}", phase="request")
            return
        hit.flow.response = make_response(self.config.status, self.config.body, self.config.headers)
        hit.record(f"status {self.config.status}", phase="request")

    async def on_response_headers(self, hit: Hit) -> None:
        if self.config.phase != "response":
            return
        upstream = hit.flow.response.status_code if hit.flow.response else None
        if hit.dry_run:
            hit.record(f"would replace status {upstream} with {self.config.status}", phase="response")
            return
        await hit.session.replace_response(make_response(self.config.status, self.config.body, self.config.headers))
        hit.record(f"status {self.config.status} (upstream said {upstream})", phase="response")

"""What a diverted stream's sink receives: faultproxy's own event types, so no mitmproxy event class leaks out of _mitm."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

from mitmproxy import http

log = logging.getLogger("faultproxy._mitm")

# --------------------------------------------------------------------------------------------------
# What a sink receives (faultproxy's own types, so no mitmproxy event class leaks out of this module)


@dataclass
class UpstreamHeaders:
    response: http.Response
    end_stream: bool = False  # the upstream said there is no body; an UpstreamEnd still follows


@dataclass
class UpstreamData:
    data: bytes


@dataclass
class UpstreamTrailers:
    trailers: http.Headers


@dataclass
class UpstreamEnd:
    pass


@dataclass
class UpstreamError:
    message: str


UpstreamEvent = Union[UpstreamHeaders, UpstreamData, UpstreamTrailers, UpstreamEnd, UpstreamError]


@dataclass
class ClientData:
    data: bytes


@dataclass
class ClientTrailers:
    trailers: http.Headers


@dataclass
class ClientEnd:
    pass


ClientEvent = Union[ClientData, ClientTrailers, ClientEnd]


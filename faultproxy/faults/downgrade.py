"""`downgrade`: offer only HTTP/1.1 in ALPN to matching clients — "turn off HTTP/2" per host, no server change.

A rule whose faults include `downgrade` acts at the TLS handshake, not on requests: when a client's
ClientHello arrives, the proxy negotiates `http/1.1` with it if the rule's `match.host` globs match
the name the client asked for (its SNI; a client that sends none, e.g. for an IP-literal URL, is
matched by the address it connected to). The client then speaks HTTP/1.1 on that connection; a
client that offered only `h2` gets no ALPN at all (and usually gives up or falls back to HTTP/1.1).
Every downgraded connection is journaled (`event: downgrade`, with the SNI and the client's offers).

At TLS time nothing but the host is known, so such a rule may have no other match condition (the
profile loader rejects `path`, `headers`, `status`, `probability`, ...; see profile._raw_checks).
Rule schedules (`active`), enable/disable and the kill switch apply per connection. Other faults in
the same rule act on the flows of matching hosts as usual; a rule of `downgrade` alone never touches a flow.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .. import _mitm
from . import register
from .base import Fault, FaultConfig

if TYPE_CHECKING:
    from ..addon import FaultProxy

log = logging.getLogger("faultproxy")

ALPN_HTTP1 = b"http/1.1"
# Match conditions a downgrade rule may carry: the only thing a TLS ClientHello tells.
TLS_TIME_MATCH_KEYS = ("host",)


class DowngradeConfig(FaultConfig):
    type: Literal["downgrade"]


@register
class Downgrade(Fault[DowngradeConfig]):
    Config = DowngradeConfig
    # Acts on connections (the TLS handshake), not on flows: rules made of such faults are never
    # matched against requests (matching.CompiledRule.connection_only).
    connection_level: ClassVar[bool] = True


def _names(data: Any) -> tuple[str | None, str | None]:
    """(SNI, the address the client connected to) of a tls_clienthello hook's data."""
    client = data.context.client
    hello = getattr(data, "client_hello", None)
    sni = getattr(hello, "sni", None) or getattr(client, "sni", None)
    sockname = getattr(client, "sockname", None)
    return sni, (sockname[0] if sockname else None)


def on_tls_clienthello(addon: FaultProxy, data: Any) -> None:
    """The addon's tls_clienthello hook: negotiate only http/1.1 with a client a downgrade rule matches."""
    if getattr(data, "ignore_connection", False) or addon.control.killed:
        return
    rules = [r for r in addon.rules if any(isinstance(f, Downgrade) for f in r.faults)]
    if not rules:
        return
    sni, local = _names(data)
    host = sni or local
    for rule in rules:
        if not rule.is_active() or not rule.matches_host(host):
            continue
        _apply(addon, rule, data, sni, local)
        return


def _apply(addon: FaultProxy, rule: Any, data: Any, sni: str | None, local: str | None) -> None:
    from mitmproxy import ctx

    client = data.context.client
    offers = [a.decode("ascii", "replace") for a in (getattr(getattr(data, "client_hello", None), "alpn_protocols", None) or [])]
    dry = bool(getattr(ctx.options, "fault_dry_run", False))
    if dry:
        outcome = "would offer only http/1.1 in ALPN"
    elif _mitm.set_client_alpn(data, ALPN_HTTP1):
        if "http/1.1" in offers:
            outcome = "offered only http/1.1 in ALPN"
        elif offers:
            outcome = "offered only http/1.1 in ALPN; the client did not offer it, so no ALPN was negotiated"
        else:
            outcome = "offered only http/1.1 in ALPN; the client offered no ALPN (HTTP/1.1 anyway)"
    else:
        outcome = "not downgraded: the TLS handshake was already under way"
    peer = getattr(client, "peername", None)
    who = f"{peer[0]}:{peer[1]}" if peer else None
    fault = next(f for f in rule.faults if isinstance(f, Downgrade))
    if not dry:
        rule.counters.matched += 1
        rule.counters.injected += 1
    addon.journal.fired[(rule.profile, rule.name, "downgrade")] += 1
    addon.journal.event(
        "downgrade",
        f"[{rule.profile}/{rule.name}] downgrade {who} sni={sni or '-'}: {outcome} (client offered {', '.join(offers) or 'nothing'})",
        client=who,
        sni=sni,
        host=sni or local,
        profile=rule.profile,
        rule=rule.name,
        fault="downgrade",
        params=fault.config.describe(),
        outcome=outcome,
        alpn_offers=offers,
        alpn="http/1.1",
        **({"dry_run": True} if dry else {}),
    )

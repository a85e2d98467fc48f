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
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from .. import _mitm
from ..journal import Journal
from .base import Fault, FaultConfig
from .registry import register

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


def on_tls_clienthello(data: Any, rules: Sequence[Any], *, journal: Journal, dry_run: bool) -> None:
    """A tls_clienthello hook's work: negotiate only http/1.1 with a client that one of `rules`
    (matching.CompiledRule; the caller passes none while the kill switch is on) matches, and journal it."""
    if getattr(data, "ignore_connection", False):
        return
    rules = [r for r in rules if any(isinstance(f, Downgrade) for f in r.faults)]
    if not rules:
        return
    sni, local = _names(data)
    host = sni or local
    for rule in rules:
        if not rule.is_active() or not rule.matches_host(host):
            continue
        _apply(rule, data, sni, local, journal=journal, dry_run=dry_run)
        return


def _apply(rule: Any, data: Any, sni: str | None, local: str | None, *, journal: Journal, dry_run: bool) -> None:
    client = data.context.client
    offers = [a.decode("ascii", "replace") for a in (getattr(getattr(data, "client_hello", None), "alpn_protocols", None) or [])]
    if dry_run:
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
    if not dry_run:
        rule.counters.matched += 1
        rule.counters.injected += 1
    journal.fired[(rule.profile, rule.name, "downgrade")] += 1
    journal.event(
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
        **({"dry_run": True} if dry_run else {}),
    )

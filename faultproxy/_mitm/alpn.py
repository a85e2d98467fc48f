"""Negotiating only one ALPN protocol with one client connection (the `downgrade` fault).

mitmproxy's tlsconfig addon builds every client-side TLS connection on a shared, cached SSL context whose
ALPN select callback reads the per-connection choice from the connection's app data. There is no
per-connection option, so `set_client_alpn` writes that choice where the callback will read it.
"""

from __future__ import annotations

from typing import Any

from .checks import Checker

# --------------------------------------------------------------------------------------------------
# Client ALPN


def set_client_alpn(data: Any, alpn: bytes = b"http/1.1") -> bool:
    """Negotiate only `alpn` with this client connection. Call from tls_clienthello or tls_start_client.

    mitmproxy's tlsconfig addon builds the client-side SSL.Connection on a cached SSL.Context that is
    shared between connections; its ALPN select callback takes the per-connection choice from the
    connection's app data (`AppData`: client_alpn, server_alpn, http2). With client_alpn set, the
    callback selects it if the client offers it, else negotiates no ALPN at all, and clients then
    speak HTTP/1.1. Two orders are possible:

    * our hook runs before TlsConfig.tls_start_client (script addons: ScriptLoader sits before
      TlsConfig in mitmproxy's default addon list): data.ssl_conn does not exist yet, so we set
      client.alpn, which TlsConfig copies into AppData.client_alpn (ClientTLSLayer overwrites
      client.alpn with the negotiated value once the handshake is done);
    * it runs after (an addon added after the defaults): we edit the AppData of data.ssl_conn.

    Not done: editing client.alpn_offers in tls_clienthello (OpenSSL sees the offers of the
    ClientHello itself), or replacing the context's select callback (it is shared by every connection).
    Returns False when neither is possible.
    """
    conn = getattr(data, "ssl_conn", None)
    if conn is not None:
        try:
            app = conn.get_app_data()
        except Exception:
            app = None
        if isinstance(app, dict) and "client_alpn" in app:
            app["client_alpn"] = alpn
            app["http2"] = alpn == b"h2"
            return True
        return False
    context = getattr(data, "context", None)
    client = getattr(context, "client", None)
    if client is None or getattr(client, "tls_established", False):
        return False
    client.alpn = alpn
    return True



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    from mitmproxy.addons import tlsconfig

    c.need(
        'app_data["client_alpn"]' in c.src(tlsconfig.alpn_select_callback),
        "addons.tlsconfig.alpn_select_callback no longer reads client_alpn from the connection's app data",
    )
    c.need(
        "set_app_data" in c.src(tlsconfig.TlsConfig.tls_start_client)
        and "client_alpn = client.alpn" in c.src(tlsconfig.TlsConfig.tls_start_client),
        "TlsConfig.tls_start_client no longer copies client.alpn into the connection's AppData",
    )
    from mitmproxy.proxy.layers import tls as tls_layer

    c.need(
        "self.conn.alpn = self.tls.get_alpn_proto_negotiated()" in c.src(tls_layer),
        "the TLS layer no longer sets conn.alpn from the negotiated protocol (set_client_alpn relies on it)",
    )

"""`faultproxy demo`: why "the progress bar sometimes dies in production", and what fixes it, in a browser.

It starts the demo backend (:class:`~faultproxy.demo.server.DemoServer`: the built-in SSE origin plus a
simulated upload, the page and its API) and faultproxy in front of it (the lean engine, TLS on the same
port so browsers speak HTTP/2, the control API on a loopback port), and prints one URL. The page shows two
clients of the same upload side by side — the incident's naive EventSource and a resilient client — with
what the proxy did to each, live; see docs/demo.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType

from .server import DemoServer

__all__ = ["Demo", "DemoServer", "main"]


class Demo:
    """The backend and the proxy, started together: ``with Demo(port=0) as demo: open demo.url``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        confdir: str | Path | None = None,
        engine: str = "lean",
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.confdir = Path(confdir).expanduser() if confdir is not None else Path.home() / ".mitmproxy"
        self.engine = engine
        self.startup_timeout = startup_timeout
        self.server: DemoServer | None = None
        self.proxy = None  # ProxyProcess

    @property
    def url(self) -> str:
        """The page, over TLS (HTTP/2 for browsers)."""
        if self.proxy is None:
            raise RuntimeError("the demo is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.proxy.port}/"

    def start(self) -> Demo:
        from ..testing.proxy import ProxyProcess

        self.server = DemoServer("127.0.0.1", 0)
        self.server.start_in_thread()
        try:
            self.proxy = ProxyProcess(
                None,
                upstream=self.server.url,
                engine=self.engine,
                control_api=True,
                confdir=self.confdir,
                startup_timeout=self.startup_timeout,
                # Later --listen-* win over the harness's 127.0.0.1:0. The demo may run for hours: keep the
                # proxy's output (collected in memory) to warnings, and mitmdump from printing every flow.
                extra_args=[
                    "--listen-host", self.host, "--listen-port", str(self.port),
                    "--set", "termlog_verbosity=warn",
                    *(["--set", "flow_detail=0"] if self.engine == "mitmdump" else []),
                ],  # fmt: skip
            )
            self.proxy.start()
            self.server.control_url = self.proxy.api_url
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.proxy is not None and self.proxy.is_running()

    def stop(self) -> None:
        proxy, self.proxy = self.proxy, None
        server, self.server = self.server, None
        try:
            if proxy is not None:
                try:
                    proxy.stop()
                except Exception as e:  # a crash report is worth printing, not a traceback on Ctrl-C
                    print(f"faultproxy demo: the proxy reported a problem on exit: {e}", file=sys.stderr)
        finally:
            if server is not None:
                server.stop_in_thread()

    def __enter__(self) -> Demo:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="faultproxy demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address of the proxy (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port of the page and the proxy (default 8080)")
    parser.add_argument(
        "--confdir", default=None, help="mitmproxy's confdir with its CA (default ~/.mitmproxy, as mitmproxy)"
    )
    parser.add_argument("--full", action="store_true", help="run mitmdump instead of the lean engine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from ..testing.proxy import ProxyStartError

    demo = Demo(args.host, args.port, confdir=args.confdir, engine="mitmdump" if args.full else "lean")

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            demo.start()
        except ProxyStartError as e:
            first = str(e).splitlines()[0]
            print(f"faultproxy demo: the proxy did not start ({first}); is port {args.port} taken? Try --port.", file=sys.stderr)
            return 1
        print(f"faultproxy demo: open {demo.url}", flush=True)
        print(
            f"  TLS with mitmproxy's CA ({demo.confdir}): accept the browser's warning once, or trust "
            "mitmproxy-ca-cert.pem. Ctrl-C stops the demo.",
            flush=True,
        )
        while demo.running():
            time.sleep(0.5)
        print("faultproxy demo: the proxy exited unexpectedly", file=sys.stderr)
        if demo.proxy is not None:
            print(demo.proxy.output()[-4000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())

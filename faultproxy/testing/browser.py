"""Headless Chromium for tests and demos: what a real browser reports when faultproxy breaks a stream.

Debian's ``/usr/bin/chromium`` driven through Playwright's Python API with ``executable_path`` (Playwright's
own browser downloads are never used). Each :meth:`Browser.page` gets its own browser context (cookies,
cache, HTTP/2 sessions and the server properties Chromium learns, such as "this server requires
HTTP/1.1", are all per context), so tests do not leak into each other while one Chromium process serves
a whole test module. Playwright's ``launch()`` gives that process a fresh temporary user-data dir.

What a :class:`PageWatch` collects, all of it Chromium's own words:

* ``failed``: every ``requestfailed`` event, with Chromium's error text (``net::ERR_HTTP2_PROTOCOL_ERROR``,
  ``net::ERR_HTTP2_SERVER_REFUSED_STREAM``, ...) and the resource type (``fetch``, ``eventsource``);
* ``console``: console messages (Chromium logs ``Failed to load resource: net::ERR_...`` there too);
* ``finished``: requests that completed.

In the page, :data:`PROBE_JS` installs ``window.fp``: ``fp.eventSource(name, url)`` and
``fp.fetchStream(name, url, headers, init)`` record every message, error, readyState and the time they happened
(``performance.now()``), ``fp.state()`` returns it all; :meth:`PageWatch.wait_for` polls it. Playwright's
sync API delivers its events only while it is called, so every wait here pumps it with
``page.wait_for_timeout``.

With ``net_log=path`` Chromium also writes its net log (``--log-net-log``); :func:`read_net_log` parses it
after :meth:`Browser.close` (also an unterminated file), and :func:`h2_frames_received` lists the RST_STREAM
and GOAWAY frames Chromium says it received, with their codes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM_FLAGS",
    "Browser",
    "ConsoleMessage",
    "FailedRequest",
    "PageWatch",
    "PROBE_JS",
    "find_chromium",
    "h2_frames_received",
    "read_net_log",
]

# Headless, no sandbox (containers run as root), no GPU, trust the proxy's throwaway certificates, and no
# background traffic of Chromium's own that could share or disturb the connections a test looks at.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--ignore-certificate-errors",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
)

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def find_chromium() -> str | None:
    """Debian's chromium (``FAULTPROXY_CHROMIUM`` overrides the path), or None when it is not installed."""
    for candidate in (os.environ.get("FAULTPROXY_CHROMIUM"), DEFAULT_CHROMIUM, shutil.which("chromium")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# Installed on every page of a PageWatch. Plain ES2017, no dependencies.
PROBE_JS = r"""
(() => {
  if (window.fp) return;
  const t0 = performance.now();
  const now = () => Math.round((performance.now() - t0) * 10) / 10;
  const streams = {};
  const open = {};
  window.fp = {
    // An EventSource; every message/error/open with its time, lastEventId and readyState.
    eventSource(name, url) {
      const s = streams[name] = {kind: "eventsource", url, log: [], messages: 0, errors: 0, opens: 0};
      const es = open[name] = new EventSource(url);
      es.onopen = () => { s.opens++; s.log.push({t: now(), type: "open", readyState: es.readyState}); };
      es.onmessage = (e) => {
        s.messages++;
        s.log.push({t: now(), type: "message", id: e.lastEventId, data: e.data, readyState: es.readyState});
      };
      es.onerror = () => { s.errors++; s.log.push({t: now(), type: "error", readyState: es.readyState}); };
      return name;
    },
    close(name) { if (open[name]) { open[name].close(); delete open[name]; } },
    closeAll() { for (const n of Object.keys(open)) fp.close(n); },
    // fetch() whose body is read chunk by chunk; ends with done (clean end) or error (TypeError: network error).
    fetchStream(name, url, headers, init) {
      const s = streams[name] = {kind: "fetch", url, log: [], status: null, text: "", done: false, error: null};
      (async () => {
        try {
          const resp = await fetch(url, Object.assign({headers: headers || {}, cache: "no-store"}, init || {}));
          s.status = resp.status;
          s.log.push({t: now(), type: "headers", status: resp.status});
          const reader = resp.body.getReader();
          const dec = new TextDecoder();
          for (;;) {
            const {done, value} = await reader.read();
            if (done) break;
            s.text += dec.decode(value, {stream: true});
            s.log.push({t: now(), type: "data", bytes: value.length});
          }
          s.done = true;
          s.log.push({t: now(), type: "end"});
        } catch (e) {
          s.error = String(e);
          s.log.push({t: now(), type: "error", error: String(e)});
        }
      })();
      return name;
    },
    state() { return streams; },
  };
})();
"""


@dataclass
class FailedRequest:
    url: str
    error_text: str  # Chromium's net error, e.g. "net::ERR_HTTP2_PROTOCOL_ERROR"
    resource_type: str  # "fetch", "eventsource", "document", ...
    method: str
    at: float  # time.monotonic() when Playwright delivered it


@dataclass
class ConsoleMessage:
    type: str
    text: str
    at: float


@dataclass
class PageWatch:
    """One page in its own browser context, with everything Chromium reported about it."""

    page: Any
    context: Any
    failed: list[FailedRequest] = field(default_factory=list)
    console: list[ConsoleMessage] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (url, resource type)
    page_errors: list[str] = field(default_factory=list)

    def _attach(self) -> None:
        page = self.page

        def on_failed(request: Any) -> None:
            self.failed.append(
                FailedRequest(request.url, request.failure or "", request.resource_type, request.method, time.monotonic())
            )

        page.on("requestfailed", on_failed)
        page.on("requestfinished", lambda r: self.finished.append((r.url, r.resource_type)))
        page.on("console", lambda m: self.console.append(ConsoleMessage(m.type, m.text, time.monotonic())))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def goto(self, url: str, timeout: float = 10.0) -> None:
        self.page.goto(url, timeout=timeout * 1000)
        self.page.evaluate(PROBE_JS)

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def event_source(self, name: str, url: str) -> None:
        self.js("([n, u]) => fp.eventSource(n, u)", [name, url])

    def fetch_stream(
        self, name: str, url: str, headers: dict[str, str] | None = None, init: dict[str, Any] | None = None
    ) -> None:
        """fetch(url) with these headers (and RequestInit fields, e.g. {"credentials": "omit"}), body read as a stream."""
        self.js("([n, u, h, i]) => fp.fetchStream(n, u, h, i)", [name, url, headers or {}, init or {}])

    def set_cookie(self, name: str, value: str) -> None:
        """A cookie for the page's origin: EventSource cannot send headers, but it sends cookies."""
        self.js("([n, v]) => { document.cookie = `${n}=${v}; path=/`; }", [name, value])

    def state(self, name: str | None = None) -> Any:
        streams = self.js("() => fp.state()")
        return streams if name is None else streams.get(name)

    def pump(self, seconds: float) -> None:
        """Let Playwright deliver events for this long."""
        self.page.wait_for_timeout(max(1, int(seconds * 1000)))

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
        """Poll `predicate` (which may call :meth:`state`) until it is truthy; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; page state: {self._debug()}"
                )
            self.pump(interval)

    def _debug(self) -> str:
        try:
            state = json.dumps(self.state())[:3000]
        except Exception as e:  # the page may be gone
            state = f"<unavailable: {e}>"
        failed = [(f.resource_type, f.error_text, f.url) for f in self.failed]
        return f"{state}; requestfailed: {failed}; console: {[c.text for c in self.console][-10:]}"

    def errors(self, url_part: str = "", resource_type: str | None = None) -> list[str]:
        """Chromium's error texts for failed requests whose URL contains `url_part`."""
        return [
            f.error_text
            for f in self.failed
            if url_part in f.url and (resource_type is None or f.resource_type == resource_type)
        ]

    def close(self) -> None:
        try:
            self.page.evaluate("() => window.fp && fp.closeAll()")
        except Exception:
            pass
        try:
            self.context.close()
        except Exception:
            pass


class Browser:
    """One headless Chromium (Debian's, via Playwright). ``with Browser() as b: w = b.page(url)``."""

    def __init__(
        self,
        *,
        executable: str | None = None,
        net_log: str | os.PathLike[str] | None = None,
        extra_args: Iterable[str] = (),
        launch_timeout: float = 30.0,
        share_with: Browser | None = None,
    ) -> None:
        """`share_with`: another running Browser whose Playwright driver to use. Playwright's sync API
        allows one driver per thread, so a second Chromium (e.g. one with a net log) in the same test
        must share it."""
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError(f"no chromium at {DEFAULT_CHROMIUM} (set FAULTPROXY_CHROMIUM)")
        self.executable = exe
        self.net_log = Path(net_log) if net_log is not None else None
        self.args = list(CHROMIUM_FLAGS) + list(extra_args)
        if self.net_log is not None:
            self.args += [f"--log-net-log={self.net_log}", "--net-log-capture-mode=Default"]
        self.launch_timeout = launch_timeout
        self._share_with = share_with
        self._pw: Any = None
        self._manager: Any = None
        self.browser: Any = None
        self.pages: list[PageWatch] = []

    def start(self) -> Browser:
        from playwright.sync_api import sync_playwright

        if self._share_with is not None:
            if self._share_with._pw is None:
                raise RuntimeError("share_with: that Browser is not running")
            self._pw = self._share_with._pw
        else:
            self._manager = sync_playwright()
            self._pw = self._manager.start()
        try:
            self.browser = self._pw.chromium.launch(
                executable_path=self.executable,
                headless=True,
                args=self.args,
                timeout=self.launch_timeout * 1000,
            )
        except BaseException:
            if self._manager is not None:
                self._manager.__exit__(None, None, None)
            self._pw = self._manager = None
            raise
        return self

    @property
    def version(self) -> str:
        return str(self.browser.version)

    def page(self, url: str | None = None) -> PageWatch:
        """A new page in a new browser context (own cookies and connections), optionally opened at `url`."""
        context = self.browser.new_context(ignore_https_errors=True)
        watch = PageWatch(context.new_page(), context)
        watch._attach()
        self.pages.append(watch)
        if url is not None:
            watch.goto(url)
        return watch

    def close(self) -> None:
        for watch in self.pages:
            watch.close()
        self.pages.clear()
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            if self._manager is not None:
                self._manager.__exit__(None, None, None)
            self.browser = self._pw = self._manager = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Chromium's net log


def read_net_log(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(constants, events) of a Chromium net-log file; also a file Chromium did not finish (one event per line)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
        return data.get("constants", {}), data.get("events", [])
    except json.JSONDecodeError:
        pass
    constants: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if line.startswith('{"constants":'):
            try:
                constants = json.loads(line + "}")["constants"]
            except (json.JSONDecodeError, KeyError):
                pass
            continue
        if line.startswith("{") and line.endswith("}"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return constants, events


def h2_frames_received(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The RST_STREAM and GOAWAY frames Chromium logged as received:
    [{"frame": "RST_STREAM", "stream_id": 1, "error_code": "2 (INTERNAL_ERROR)"}, {"frame": "GOAWAY", ...}]."""
    constants, events = read_net_log(path)
    names = {v: k for k, v in constants.get("logEventTypes", {}).items()}
    wanted = {"HTTP2_SESSION_RECV_RST_STREAM": "RST_STREAM", "HTTP2_SESSION_RECV_GOAWAY": "GOAWAY"}
    out = []
    for ev in events:
        name = names.get(ev.get("type"))
        if name in wanted:
            out.append({"frame": wanted[name], **(ev.get("params") or {})})
    return out

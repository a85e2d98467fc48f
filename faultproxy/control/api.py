"""The control API: JSON over HTTP/1.1 on mitmproxy's own event loop (standard library only).

A small hand-written server on asyncio streams, not a framework: the API has a dozen routes, runs
inside the proxy's loop (so handlers touch the plane's state directly, without locks or threads), and
must never take the proxy down: every request is bounded (head 64 KiB, body 8 MiB, idle 30 s), every
refusal is a 4xx with a JSON `error`, and an unexpected failure is logged and answered 500 instead of
escaping. See docs/control.md for the routes.

Guards, in order: a request carrying an `Origin` header (a browser page) is refused (403); with a
token configured, a missing or wrong `Authorization: Bearer` is 401 before anything else is looked
at; without a token, the Host header must be an IP literal or localhost (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import http
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from .plane import RECENT_RECORDS, ControlRequestError, SetEntry, split_yaml_documents

if TYPE_CHECKING:
    from .plane import ControlPlane

log = logging.getLogger("faultproxy")

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
IDLE_TIMEOUT = 30.0
SSE_HEARTBEAT = 15.0
SSE_QUEUE = 10_000  # records a slow SSE client may fall behind before records are dropped for it
YAML_TYPES = {
    "",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",  # curl --data-binary's default
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **details: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.details = details


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    body: bytes = b""
    parts: list[str] = field(default_factory=list)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    @property
    def keep_alive(self) -> bool:
        conn = self.header("connection").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"

    def json(self) -> Any:
        if not self.body.strip():
            raise HttpError(400, "the request body is empty; expected JSON")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the request body is not valid JSON: {e}") from None

    def text(self) -> str:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HttpError(400, f"the request body is not UTF-8: {e}") from None


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value: Any, **headers: str) -> Response:
    return Response(status, (json.dumps(value, indent=2, default=str) + "\n").encode(), headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **details: Any) -> Response:
    return json_response(status, {"error": message, "status": status, **details}, **(headers or {}))


Handler = Callable[[Request], Awaitable[Response] | Response]


class ControlServer:
    def __init__(self, plane: ControlPlane, host: str, port: int, *, token: str | None):
        self.plane = plane
        self.host = "127.0.0.1" if host.lower() == "localhost" else host
        self.port = port
        self.token = token
        self._sock: socket.socket | None = None
        self._server: asyncio.base_events.Server | None = None
        self._starting: asyncio.Task[Any] | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.requests = collections.Counter[int]()  # responses by status, for tests and curiosity

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind now (synchronously: the address is known when this returns), serve from the loop."""
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(self.host or "0.0.0.0").version == 6 else socket.AF_INET
        except ValueError:
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._starting = loop.create_task(
            asyncio.start_server(self._client, sock=sock, limit=MAX_HEAD), name="faultproxy control API"
        )
        self._starting.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._server = task.result()
        elif not task.cancelled():
            log.error("faultproxy: the control API failed to start: %s", task.exception())

    def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._conns):
            task.cancel()

    # --- connections ---------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await self._read_request(reader)
                except HttpError as e:
                    await self._write(writer, error_response(e.status, e.message), keep_alive=False)
                    return
                if request is None:
                    return
                if request.method == "GET" and request.path == "/events":
                    refused = self._guard(request)
                    if refused is not None:
                        await self._write(writer, refused, keep_alive=False)
                        return
                    await self._events(request, reader, writer)
                    return
                response = await self._respond(request)
                await self._write(writer, response, keep_alive=request.keep_alive)
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # Shutdown. Not re-raised: asyncio's start_server callback (3.12.1) logs a traceback for a
            # connection task that ends cancelled, and this task is ours alone.
            pass
        except Exception:
            log.exception("faultproxy: control API connection failed")
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None
            raise HttpError(400, "incomplete request head") from None
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request head larger than {MAX_HEAD} bytes") from None
        except TimeoutError:
            return None
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise HttpError(400, "malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise HttpError(505, f"unsupported protocol {version!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, f"malformed header line {line[:80]!r}")
            key = name.lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        path, _, query = target.partition("?")
        request = Request(method.upper(), path, dict(parse_qsl(query)), version, headers)
        request.body = await self._read_body(reader, headers)
        return request

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HttpError(400, "malformed chunk size") from None
                if size == 0:
                    while (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)) != b"\r\n":
                        pass  # trailers
                    return bytes(body)
                if len(body) + size > MAX_BODY:
                    raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
                body += await asyncio.wait_for(reader.readexactly(size + 2), IDLE_TIMEOUT)
                del body[-2:]
        length_text = headers.get("content-length")
        if not length_text:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length_text!r}") from None
        if length < 0:
            raise HttpError(400, f"bad Content-Length {length_text!r}")
        if length > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        return await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT)

    async def _write(self, writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool) -> None:
        self.requests[response.status] += 1
        try:
            phrase = http.HTTPStatus(response.status).phrase
        except ValueError:
            phrase = "Unknown"
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "Connection": "keep-alive" if keep_alive else "close",
            **response.headers,
        }
        head = f"HTTP/1.1 {response.status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("latin-1") + response.body)
        await writer.drain()

    # --- guards and routing --------------------------------------------------------------------

    def _guard(self, request: Request) -> Response | None:
        if "origin" in request.headers:
            return error_response(403, "requests from web pages (with an Origin header) are not accepted")
        if self.token is not None:
            auth = request.header("authorization")
            scheme, _, given = auth.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())
            if not ok:
                why = "missing bearer token" if not auth else "wrong bearer token"
                return error_response(401, why, {"WWW-Authenticate": 'Bearer realm="faultproxy"'})
        elif not _host_is_safe(request.header("host")):
            return error_response(403, f"Host {request.header('host')!r} refused: use an IP address or localhost")
        return None

    async def _respond(self, request: Request) -> Response:
        refused = self._guard(request)
        if refused is not None:
            return refused
        try:
            handler = self._route(request)
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
            return result  # type: ignore[return-value]
        except HttpError as e:
            return error_response(e.status, e.message, e.headers, **e.details)
        except ControlRequestError as e:
            return error_response(e.status, e.message, **e.details)
        except Exception:
            log.exception("faultproxy: control API failed on %s %s", request.method, request.path)
            return error_response(500, "internal error (logged by the proxy)")

    def _route(self, request: Request) -> Handler:
        path = unquote(request.path)
        if len(path) > 1:
            path = path.rstrip("/")
        method = request.method
        if path.startswith("/rules/"):
            ident = path.removeprefix("/rules/")
            for action, enabled in (("/enable", True), ("/disable", False)):
                if ident.endswith(action):
                    self._allow(method, "POST")
                    rule = ident.removesuffix(action)
                    return lambda r: self._set_rule(rule, enabled)
            if method == "PATCH":
                return lambda r: self._patch_rule(ident, r)
            self._allow(method, "GET", "PATCH")
            return lambda r: json_response(200, {"rules": [self.plane.rule_info(x) for x in self.plane.find(ident)]})
        routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._index},
            "/health": {"GET": lambda r: json_response(200, {"ok": True, "killed": self.plane.killed, "generation": self.plane.generation})},
            "/status": {"GET": lambda r: json_response(200, self.plane.status())},
            "/rules": {"GET": lambda r: json_response(200, {"rules": self.plane.rules_info()})},
            "/profiles": {"GET": self._get_profiles, "PUT": self._put_profiles, "POST": self._put_profiles},
            "/profiles/reload": {"POST": self._reload},
            "/off": {"POST": lambda r: self._kill(True)},
            "/kill": {"POST": lambda r: self._kill(True)},
            "/on": {"POST": lambda r: self._kill(False)},
            "/resume": {"POST": lambda r: self._kill(False)},
            "/metrics": {"GET": self._metrics},
            "/events": {"GET": self._index},  # GET is served as a stream before routing; others get 405
        }
        methods = routes.get(path)
        if methods is None:
            raise HttpError(404, f"no such endpoint {request.path!r}; GET / lists them")
        self._allow(method, *methods)
        return methods[method]

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HttpError(405, f"method {method} not allowed here (allowed: {', '.join(allowed)})", {"Allow": ", ".join(allowed)})

    # --- handlers ------------------------------------------------------------------------------

    def _index(self, request: Request) -> Response:
        return json_response(
            200,
            {
                "service": "faultproxy control API",
                "endpoints": [
                    "GET  /health",
                    "GET  /status",
                    "GET  /rules",
                    "GET  /rules/{profile}/{rule}  (or /rules/{rule} when the name is unique)",
                    "PATCH /rules/{id}  {\"enabled\": true|false}",
                    "POST /rules/{id}/enable, /rules/{id}/disable",
                    "GET  /profiles",
                    "PUT  /profiles  (YAML body, or JSON {\"profiles\": [...]})",
                    "POST /profiles/reload",
                    "POST /off (kill switch), POST /on (resume)",
                    "GET  /events  (Server-Sent Events: journal records)",
                    "GET  /metrics  (Prometheus text)",
                ],
            },
        )

    def _set_rule(self, ident: str, enabled: bool) -> Response:
        found = self.plane.set_enabled(ident, enabled)
        return json_response(200, {"rules": [self.plane.rule_info(r) for r in found]})

    def _patch_rule(self, ident: str, request: Request) -> Response:
        data = request.json()
        if not isinstance(data, dict) or not isinstance(data.get("enabled"), bool) or set(data) - {"enabled"}:
            raise HttpError(400, 'expected a JSON object {"enabled": true} or {"enabled": false}')
        return self._set_rule(ident, data["enabled"])

    def _kill(self, killed: bool) -> Response:
        self.plane.set_killed(killed)
        return json_response(200, {"killed": self.plane.killed})

    def _get_profiles(self, request: Request) -> Response:
        return json_response(200, {"profiles": self.plane.profiles_info(), "set": [e.to_json() for e in self.plane.entries]})

    def _put_profiles(self, request: Request) -> Response:
        media = request.header("content-type").split(";")[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            entries = _entries_from_json(request.json())
        elif media in YAML_TYPES:
            text = request.text()
            docs = split_yaml_documents(text)
            if not docs:
                raise HttpError(400, 'the request body is empty: send profile YAML, or JSON {"profiles": [...]}')
            entries = [
                SetEntry(text=doc, source="request-body", default_name="uploaded" if i == 0 else f"uploaded-{i + 1}")
                for i, (_, doc) in enumerate(docs)
            ]
        else:
            raise HttpError(415, f"unsupported Content-Type {media!r}: send application/yaml or application/json")
        self.plane.replace(entries)
        return json_response(200, {"profiles": self.plane.profiles_info(), "set": [e.to_json() for e in self.plane.entries], "generation": self.plane.generation})

    def _reload(self, request: Request) -> Response:
        result = self.plane.reload()
        if not result["ok"]:
            return error_response(422, "reload rejected; the profiles in force stay", errors=result["errors"])
        return json_response(200, result)

    def _metrics(self, request: Request) -> Response:
        return Response(200, self.plane.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")

    # --- the journal as Server-Sent Events -----------------------------------------------------

    async def _events(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backlog = max(0, min(RECENT_RECORDS, int(request.query.get("backlog", "0"))))
            last_id = int(request.header("last-event-id") or -1)
        except ValueError:
            await self._write(writer, error_response(400, "backlog and Last-Event-ID must be integers"), keep_alive=False)
            return
        queue: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        wake = asyncio.Event()
        dropped = 0

        def listener(seq: int, record: dict[str, Any]) -> None:
            nonlocal dropped
            if len(queue) >= SSE_QUEUE:
                dropped += 1
            else:
                queue.append((seq, record))
            wake.set()

        recent = list(self.plane.recent)
        if last_id >= 0:
            queue.extend((s, r) for s, r in recent if s > last_id)
        elif backlog:
            queue.extend(recent[-backlog:])
        self.plane.listeners.append(listener)
        self.requests[200] += 1
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
            "X-Accel-Buffering: no\r\nConnection: close\r\n\r\n: faultproxy journal\n\n"
        )
        writer.write(head.encode())
        gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more; EOF means it left
        try:
            await writer.drain()
            while not gone.done():
                if not queue and not dropped:
                    waiter = asyncio.ensure_future(wake.wait())
                    done, _ = await asyncio.wait({waiter, gone}, timeout=SSE_HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if gone in done:
                        break
                    if not done:
                        writer.write(b": keep-alive\n\n")
                wake.clear()
                out = []
                while queue:
                    seq, record = queue.popleft()
                    kind = record.get("event", "fault")
                    data = json.dumps(record, separators=(",", ":"), default=str)
                    out.append(f"id: {seq}\nevent: {kind}\ndata: {data}\n\n")
                if dropped:
                    out.append(f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n")
                    dropped = 0
                if out:
                    writer.write("".join(out).encode())
                await writer.drain()
        finally:
            gone.cancel()
            if listener in self.plane.listeners:
                self.plane.listeners.remove(listener)


def _host_is_safe(host_header: str) -> bool:
    host = host_header.strip()
    if not host:
        return True  # HTTP/1.0 without Host: not a browser
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _entries_from_json(data: Any) -> list[SetEntry]:
    items = data.get("profiles") if isinstance(data, dict) else data
    if not isinstance(items, list) or (isinstance(data, dict) and set(data) - {"profiles"}):
        raise HttpError(400, 'expected JSON {"profiles": [...]}: each a shipped name or path, {"ref": ...} or {"yaml": ...}')
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            entries.append(SetEntry(ref=item))
        elif isinstance(item, dict) and set(item) == {"ref"} and isinstance(item["ref"], str):
            entries.append(SetEntry(ref=item["ref"]))
        elif (
            isinstance(item, dict)
            and isinstance(item.get("yaml"), str)
            and set(item) <= {"yaml", "source"}
            and isinstance(item.get("source", ""), str)
        ):
            source = item.get("source") or f"profiles[{i}]"
            entries.append(SetEntry(text=item["yaml"], source=source, default_name="uploaded" if i == 0 else f"uploaded-{i + 1}"))
        else:
            raise HttpError(400, f'profiles[{i}]: expected a name or path, {{"ref": "..."}} or {{"yaml": "..."}}, got {json.dumps(item)[:100]}')
    return entries

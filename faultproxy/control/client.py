"""`faultproxy.Control`: a small Python client for the control API (standard library only).

    from faultproxy import Control

    ctl = Control("http://127.0.0.1:8089", token=None)
    ctl.status()["killed"]
    ctl.disable("h2-rst-stream/reset-after-events")
    with ctl.faults("aws-alb"):          # this profile set inside the block, the previous one after
        ...
    ctl.off(); ctl.on()                  # kill switch
    for record in ctl.events(): ...      # the journal, live

Every method raises `ControlError` (with `.status`, `.message`, `.errors`) when the API refuses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["Control", "ControlError"]


class ControlError(Exception):
    """The control API answered with an error status."""

    def __init__(self, status: int, message: str, payload: Any = None):
        self.status = status
        self.message = message
        self.payload = payload
        self.errors: list[str] = list(payload.get("errors", [])) if isinstance(payload, dict) else []
        detail = "".join(f"\n  {e}" for e in self.errors)
        super().__init__(f"{status}: {message}{detail}")


def _profile_entry(profile: Any) -> Any:
    """A profile for the API: a name or path (str / PathLike), YAML text (str with a newline), or a dict."""
    if isinstance(profile, Mapping):
        try:
            import yaml

            text = yaml.safe_dump(dict(profile), sort_keys=False)
        except ImportError:  # pragma: no cover - PyYAML comes with faultproxy; JSON is YAML anyway
            text = json.dumps(dict(profile), indent=2)
        return {"yaml": text, "source": f"{profile.get('name') or 'inline'}.yaml"}
    if isinstance(profile, os.PathLike):
        return os.fspath(profile)
    if isinstance(profile, str):
        return {"yaml": profile} if "\n" in profile else profile
    raise TypeError(f"a profile is a name, a path, YAML text or a dict, not {type(profile).__name__}")


class Control:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Control({self.url!r})"

    # --- plumbing ------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              timeout: float | None = None, headers: Mapping[str, str] | None = None) -> Any:
        import urllib.error  # here, not at the top: `import faultproxy` (the pytest plugin) stays cheap
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
                message = payload.get("error", raw.decode(errors="replace"))
            except ValueError:
                payload, message = None, raw.decode(errors="replace")
            raise ControlError(e.code, message, payload) from None

    def request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        """Any API call: JSON-encodes dict/list bodies; returns parsed JSON, or text for non-JSON answers."""
        data: bytes | None = None
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode(), content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
        elif isinstance(body, bytes):
            data = body
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        with self._open(method, path, data, content_type) as resp:
            raw = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(raw)
            return raw.decode()

    # --- reading -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/status")

    def rules(self) -> list[dict[str, Any]]:
        return self.request("GET", "/rules")["rules"]

    def rule(self, ident: str) -> dict[str, Any]:
        """One rule by `profile/rule` (or a unique rule name)."""
        return self.request("GET", f"/rules/{ident}")["rules"][0]

    def counters(self, ident: str) -> dict[str, int]:
        return self.rule(ident)["counters"]

    def metrics(self) -> str:
        return self.request("GET", "/metrics")

    def profile_set(self) -> list[Any]:
        """The loaded set as the API takes it back (for `replace`)."""
        return self.request("GET", "/profiles")["set"]

    # --- steering ------------------------------------------------------------------------------

    def enable(self, ident: str) -> list[dict[str, Any]]:
        return self.request("POST", f"/rules/{ident}/enable")["rules"]

    def disable(self, ident: str) -> list[dict[str, Any]]:
        return self.request("POST", f"/rules/{ident}/disable")["rules"]

    def off(self) -> None:
        """Kill switch: no new fault until `on()`."""
        self.request("POST", "/off")

    def on(self) -> None:
        self.request("POST", "/on")

    def replace(self, *profiles: Any) -> dict[str, Any]:
        """Replace the loaded profiles: shipped names / paths, YAML text, dicts, or entries from `profile_set()`.
        With no argument: no profile at all. Raises ControlError (422 with `.errors`) if any is invalid."""
        entries = [p if isinstance(p, dict) and set(p) <= {"ref", "yaml", "source"} and p else _profile_entry(p)
                   for p in profiles]
        return self.request("PUT", "/profiles", {"profiles": entries})

    def upload(self, yaml_text: str) -> dict[str, Any]:
        """Replace the loaded profiles with YAML (one or more documents separated by `---`)."""
        return self.request("PUT", "/profiles", yaml_text, "application/yaml")

    def reload(self) -> dict[str, Any]:
        return self.request("POST", "/profiles/reload")

    @contextmanager
    def faults(self, *profiles: Any) -> Iterator[Control]:
        """These profiles inside the block; the set that was loaded before, after it (also on errors)."""
        previous = self.profile_set()
        self.replace(*profiles)
        try:
            yield self
        finally:
            self.replace(*previous)

    @contextmanager
    def killed(self) -> Iterator[Control]:
        """The kill switch on inside the block."""
        self.off()
        try:
            yield self
        finally:
            self.on()

    # --- the journal, live ---------------------------------------------------------------------

    def events(self, backlog: int = 0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Journal records as they happen (Server-Sent Events), from the moment this returns: the stream
        is open before the first record is asked for. `backlog`: also up to that many recent records
        first. `timeout`: seconds one read may wait (TimeoutError after that); None waits forever.
        Close the iterator (or let it go) to disconnect."""
        resp = self._open("GET", f"/events?backlog={backlog}", timeout=timeout, headers={"Accept": "text/event-stream"})
        return self._read_events(resp)

    @staticmethod
    def _read_events(resp: Any) -> Iterator[dict[str, Any]]:
        try:
            event, data = "message", []  # type: str, list[str]
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        record = json.loads("\n".join(data))
                        if event == "dropped":
                            record = {"event": "dropped", **record}
                        yield record
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
        finally:
            resp.close()

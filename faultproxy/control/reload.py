"""Hot reload: watch the files behind the loaded profiles and reload them when they change.

Polling on the proxy's own event loop (no thread, no extra dependency): every `interval` seconds each
file is stat'ed and read, and a digest of (path, size, content) is compared with the one taken when
the profiles were loaded. Content, not only mtimes: two edits in the same coarse mtime tick must not
be missed. Files are small, so reading them four times a second costs nothing that matters.

A change is acted on once it has held for one short re-check (`settle`), so an editor's
truncate-then-write is read whole rather than half. `extends` chains are followed, so editing a base
profile reloads the profiles built on it. A reload that fails validation leaves the last good
profiles in force (the plane decides that); the watcher then waits for the next change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from ..profile import resolve_ref

log = logging.getLogger("faultproxy")

Signature = tuple[tuple[str, str | None], ...]


def profile_files(refs: Iterable[str]) -> list[Path]:
    """Every file a set of profile references reads, `extends` included (a missing ref: its path)."""
    seen: dict[Path, None] = {}

    def visit(ref: str, relative_to: Path | None) -> None:
        try:
            path = resolve_ref(ref, relative_to).resolve()
        except FileNotFoundError:
            candidate = Path(ref).expanduser()
            if relative_to is not None and not candidate.is_absolute():
                candidate = relative_to / candidate
            seen.setdefault(candidate.resolve(), None)  # watch for it to appear
            return
        if path in seen:
            return
        seen[path] = None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:
            return  # the loader reports it; we only need the file list
        extends = data.get("extends") if isinstance(data, dict) else None
        for base in [extends] if isinstance(extends, str) else extends if isinstance(extends, list) else []:
            if isinstance(base, str):
                visit(base, path.parent)

    for ref in refs:
        visit(ref, None)
    return list(seen)


def signature(files: Iterable[Path]) -> Signature:
    out: list[tuple[str, str | None]] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            out.append((str(path), None))
        else:
            out.append((str(path), f"{len(data)}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"))
    return tuple(out)


class ProfileWatcher:
    def __init__(self, on_change: Callable[[], object], interval: float = 0.25, settle: float = 0.05):
        self.on_change = on_change
        self.interval = interval
        self.settle = settle
        self.enabled = True
        self.files: list[Path] = []
        self._loaded: Signature = ()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0

    def track(self, refs: list[str]) -> None:
        """The profiles of these references were just loaded: watch their files from this state on."""
        self.files = profile_files(refs)
        self._loaded = signature(self.files)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="faultproxy profile watcher")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.enabled or not self.files:
                continue
            try:
                if self.poll_once_changed():
                    await self._settled_then_reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("faultproxy: profile watcher failed; it keeps watching")

    def poll_once_changed(self) -> bool:
        self.polls += 1
        return signature(self.files) != self._loaded

    async def _settled_then_reload(self) -> None:
        first = signature(self.files)
        while True:
            await asyncio.sleep(self.settle)
            now = signature(self.files)
            if now == first:
                break
            first = now  # still being written
        if now == self._loaded:
            return  # changed and changed back
        self._loaded = now  # a rejected edit is not retried until the files change again
        self.on_change()

"""mitmproxy's hook dispatch, made cheap for the lean engine (`faultproxy run`).

mitmproxy's AddonManager walks every addon (and its children) with getattr, a generator and a context
manager for every hook of every flow, and again for the `update` hook after each of them; its
ProxyConnectionHandler.handle_hook builds a generator context manager (the timeout watchdog's
`disarm()`) and calls dataclasses.fields() for each of the four hooks of a request. This module
replaces both for the lean engine's master only (`cache_hook_dispatch` on one AddonManager,
`install_lean_hook_handler` on the class, called from the lean engine's process), with the same
semantics; `check()` and tests/test_lean.py fail when mitmproxy changes what is copied here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy.proxy import mode_servers, server

from .checks import Checker


def stop_legacy_log_events(master: Any) -> None:
    """Stop re-emitting every log record as the deprecated `add_log` hook across all addons (a formatted
    record plus a chain walk per log line; no addon of the lean engine implements it)."""
    legacy = getattr(master, "_legacy_log_events", None)
    if legacy is not None:
        legacy.uninstall()


@functools.cache
def hook_fields(cls: type) -> tuple[str, ...]:
    """Hook.args() without dataclasses.fields() on every call (it builds a tuple per call)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def cache_hook_dispatch(manager: addonmanager.AddonManager) -> None:
    """Make `manager.trigger_event` find each hook's methods once, not on every event.

    mitmproxy's AddonManager walks every addon (and its children) with getattr, a generator and a
    context manager for every hook of every flow, and again for the `update` hook after each of them.
    This keeps, per hook name, the list of methods to call, grouped by top-level addon exactly as
    `trigger_event` groups them (one `safecall` per addon, `AddonHalt` stops the event), and forgets
    it whenever an addon is added or removed; `handle_lifecycle` skips the `update` hook when no addon
    has one. With a script loader in the chain it steps aside: scripts change their child addons on
    reload without telling the manager.

    Relies on AddonManager.chain/lookup/_iter_hooks/add/remove/register/clear/handle_lifecycle and
    addonmanager.safecall (same in mitmproxy 11 and 12); tests/test_lean.py checks it against
    mitmproxy's own dispatch.
    """
    cache: dict[str, list[list[Callable[..., Any]]]] = {}
    original = manager.trigger_event
    original_lifecycle = manager.handle_lifecycle

    def forgetting(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cache.clear()
            try:
                return fn(*args, **kwargs)
            finally:
                cache.clear()

        return wrapper

    for name in ("add", "remove", "register", "clear"):
        setattr(manager, name, forgetting(getattr(manager, name)))

    def groups_for(event: Any) -> list[list[Callable[..., Any]]]:
        groups = cache.get(event.name)
        if groups is None:
            groups = []
            for addon in manager.chain:
                funcs = [func for _, func in manager._iter_hooks(addon, event)]
                if funcs:
                    groups.append(funcs)
            cache[event.name] = groups
        return groups

    async def trigger_event(event: Any) -> None:
        if "scriptloader" in manager.lookup:
            return await original(event)
        groups = groups_for(event)
        if not groups:
            return
        args = [getattr(event, name) for name in hook_fields(type(event))]
        for funcs in groups:
            # safecall() semantics without a generator context manager per addon and event: the
            # rare error is handed to safecall itself, which logs it exactly as mitmproxy does.
            try:
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                with addonmanager.safecall():
                    raise

    _no_update = hooks.UpdateHook([])

    async def handle_lifecycle(event: Any) -> None:
        if "scriptloader" in manager.lookup:
            return await original_lifecycle(event)
        await trigger_event(event)
        if groups_for(_no_update):  # an addon has an `update` hook: give it the flow, as mitmproxy does
            message = getattr(event, hook_fields(type(event))[0])
            if isinstance(message, flow.Flow):
                await trigger_event(hooks.UpdateHook([message]))

    manager.trigger_event = trigger_event  # type: ignore[method-assign]
    manager.handle_lifecycle = handle_lifecycle  # type: ignore[method-assign]


MITM_HANDLE_HOOK = mode_servers.ProxyConnectionHandler.handle_hook  # what install_lean_hook_handler replaces


def install_lean_hook_handler() -> None:
    """ProxyConnectionHandler.handle_hook without a generator context manager and dataclasses.fields()
    per hook (four hooks per request): the watchdog is disarmed the way TimeoutWatchdog.disarm() does
    it, the flow is the hook's first field. The class is patched: call only in the lean engine's process.
    tests/test_lean.py fails when mitmproxy's handle_hook or disarm() change."""
    cls = mode_servers.ProxyConnectionHandler
    if getattr(cls.handle_hook, "_faultproxy_patched", False):
        return

    async def handle_hook(self: Any, hook: Any) -> None:
        watchdog = self.timeout_watchdog
        watchdog.can_timeout.clear()
        watchdog.blocker += 1
        try:
            data = getattr(hook, hook_fields(type(hook))[0])
            await self.master.addons.handle_lifecycle(hook)
            if isinstance(data, flow.Flow):
                await data.wait_for_resume()
        finally:
            watchdog.blocker -= 1
            if watchdog.blocker == 0:
                watchdog.register_activity()
                watchdog.can_timeout.set()

    handle_hook._faultproxy_patched = True  # type: ignore[attr-defined]
    cls.handle_hook = handle_hook  # type: ignore[method-assign]


def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    from mitmproxy import master

    c.need(
        "self._legacy_log_events = log.LegacyLogEvents(self)" in c.src(master.Master.__init__),
        "Master._legacy_log_events is gone: re-check stop_legacy_log_events",
    )
    hook_src = c.src(MITM_HANDLE_HOOK)
    for needle in ("with self.timeout_watchdog.disarm():", "(data,) = hook.args()",
                   "await self.master.addons.handle_lifecycle(hook)", "await data.wait_for_resume()"):  # fmt: skip
        c.need(needle in hook_src, f"ProxyConnectionHandler.handle_hook changed ({needle!r}): re-check install_lean_hook_handler")
    disarm_src = c.src(server.TimeoutWatchdog.disarm)
    for needle in ("self.can_timeout.clear()", "self.blocker += 1", "self.blocker -= 1", "if self.blocker == 0:",
                   "self.register_activity()", "self.can_timeout.set()"):  # fmt: skip
        c.need(needle in disarm_src, f"TimeoutWatchdog.disarm changed ({needle!r}): re-check install_lean_hook_handler")
    trigger_src = c.src(addonmanager.AddonManager.trigger_event)
    c.need(
        "safecall()" in trigger_src
        and "AddonHalt" in trigger_src
        and "_iter_hooks" in c.src(addonmanager.AddonManager.invoke_addon),
        "AddonManager.trigger_event changed: re-check cache_hook_dispatch",
    )
    for name in ("chain", "lookup", "_iter_hooks", "add", "remove", "register", "clear", "handle_lifecycle"):
        c.need(
            hasattr(addonmanager.AddonManager, name) or name in c.src(addonmanager.AddonManager.__init__),
            f"AddonManager.{name} is gone: re-check cache_hook_dispatch",
        )

"""The architecture as a test: the layers of docs/architecture.md, and one home for mitmproxy internals.

1. `lint-imports` (import-linter, contracts in pyproject.toml) must keep every contract: no upward import
   between layers, no import cycle between sibling modules at any depth, fault kinds independent.
   Type-checking imports count.
2. Only faultproxy._mitm imports mitmproxy's internals (the proxy core's layers, server and events, the
   addon manager) and, outside the test clients, the protocol libraries under them (h2, hyperframe,
   wsproto): everything that breaks
   when a mitmproxy release moves them is in one package, checked by _mitm.check_internals().
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "faultproxy"

# mitmproxy's public addon API (and the mode spec parser) are fine anywhere; these are not.
INTERNAL_PREFIXES = (
    "mitmproxy.proxy.layers",
    "mitmproxy.proxy.layer",
    "mitmproxy.proxy.server",
    "mitmproxy.proxy.events",
    "mitmproxy.proxy.commands",
    "mitmproxy.proxy.context",
    "mitmproxy.proxy.mode_servers",
    "mitmproxy.addonmanager",
    "mitmproxy.utils.typecheck",
)
# The protocol libraries under mitmproxy's layers: internals when the proxy uses them, plain client
# libraries in faultproxy.testing's frame-level test clients.
PROTOCOL_LIBRARIES = ("h2", "hyperframe", "wsproto")


def _lint_imports() -> list[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    return [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]


def test_import_contracts_hold() -> None:
    proc = subprocess.run(
        [*_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, "import-linter contracts broken:\n" + proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "kept" in proc.stdout


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_only_the_mitm_package_touches_mitmproxy_internals() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("faultproxy", "_mitm"):
            continue
        forbidden = INTERNAL_PREFIXES if rel.parts[:2] == ("faultproxy", "testing") else INTERNAL_PREFIXES + PROTOCOL_LIBRARIES
        for line, module in _imported_modules(path):
            if any(module == p or module.startswith(p + ".") for p in forbidden):
                offenders.append(f"{rel}:{line}: imports {module}")
    assert not offenders, "mitmproxy internals outside faultproxy/_mitm:\n  " + "\n  ".join(offenders)


def test_the_internals_check_covers_every_mitm_module() -> None:
    """A module of _mitm that patches or reads mitmproxy must contribute its own check() to check_internals."""
    from faultproxy._mitm import internals

    checked = {m.__name__.rsplit(".", 1)[-1] for m in internals._MODULES}
    exempt = {"__init__", "checks", "internals", "messages", "transport"}  # no mitmproxy internal read there
    modules = {p.stem for p in (PACKAGE / "_mitm").glob("*.py")} - exempt
    assert modules <= checked, f"_mitm modules without a check(): {sorted(modules - checked)}"

"""CLI test helpers: emulator request counts, and CliRunner at 80 columns."""

from __future__ import annotations

from typing import Any

import httpx
from typer.testing import CliRunner

from sandbox.stack import SandboxStack


def calls(stack: SandboxStack) -> dict[str, int]:
    """Requests each emulator has served, read through its /_sandbox/stats route."""
    out = {}
    for system, e in stack.emulators.items():
        stats = httpx.get(e.server.base_url + "/_sandbox/stats", verify=False).json()
        out[system] = stats["total"]
    return out


def writes(stack: SandboxStack) -> int:
    return sum(
        httpx.get(e.server.base_url + "/_sandbox/stats", verify=False).json()["writes"]
        for e in stack.emulators.values()
    )


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    from cli import app

    runner = CliRunner()
    return runner.invoke(app, list(args), env={"COLUMNS": "80", **(env or {})})

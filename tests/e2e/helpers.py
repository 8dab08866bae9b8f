"""End-to-end helpers: run the real `handoff` command, and read truth back through the
emulators' own HTTP APIs (never from their in-memory state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from sandbox.stack import SandboxStack

REPO = Path(__file__).resolve().parents[2]


def handoff(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """Run `handoff ARGS` in a subprocess, exactly as an operator or scheduler would."""
    cmd = [sys.executable, "-c", "import cli; cli.main()", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def create_progress_properties(stack: SandboxStack) -> None:
    """What an operator does once per portal: `handoff check --create-missing`."""
    import tempfile

    config = stack.write_config(Path(tempfile.mkdtemp()) / "check.yaml")
    proc = handoff("check", "--create-missing", "-c", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sync_json(config: Path, *extra: str) -> dict[str, Any]:
    proc = handoff("sync", "-c", str(config), "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return json.loads(proc.stdout)


def won_hubspot_deals(stack: SandboxStack) -> set[str]:
    """Won = the deal's stage is closed with probability 1 in its pipeline, read over HTTP."""
    e = stack["hubspot"]
    headers = {"Authorization": f"Bearer {e.token}"}
    with httpx.Client(base_url=e.base_url, headers=headers) as c:
        won_stages = {
            (p["id"], s["id"])
            for p in c.get("/crm/v3/pipelines/deals").json()["results"]
            for s in p["stages"]
            if s["metadata"].get("isClosed") == "true"
            and float(s["metadata"].get("probability", 0)) == 1.0
        }
        won, after = set(), None
        while True:
            params: dict[str, Any] = {"limit": 100, "properties": "dealstage,pipeline"}
            if after:
                params["after"] = after
            body = c.get("/crm/v3/objects/deals", params=params).json()
            for d in body["results"]:
                props = d["properties"]
                if (props.get("pipeline"), props.get("dealstage")) in won_stages:
                    won.add(d["id"])
            after = (body.get("paging") or {}).get("next", {}).get("after")
            if not after:
                return won


def stamps(stack: SandboxStack, tool: str, crm: str) -> Counter:
    """How many projects in `tool` carry each deal of `crm` (read through the tool's API)."""
    prefix = f"handoff:{crm}:"
    return Counter(
        p["stamp"].removeprefix(prefix)
        for p in stack.projects(tool)
        if p["stamp"] and p["stamp"].startswith(prefix)
    )


def writes(stack: SandboxStack, system: str) -> int:
    e = stack[system]
    return httpx.get(e.server.base_url + "/_sandbox/stats", verify=False).json()["writes"]


def won_salesforce_deals(stack: SandboxStack) -> set[str]:
    with stack.salesforce_http() as c:
        body = c.get("/query", params={"q": "SELECT Id FROM Opportunity WHERE IsWon = true"}).json()
        won = {r["Id"] for r in body["records"]}
        while not body["done"]:
            body = c.get(body["nextRecordsUrl"].split("/v59.0", 1)[1]).json()
            won |= {r["Id"] for r in body["records"]}
    return won


def won_deals(stack: SandboxStack, crm: str) -> set[str]:
    return won_hubspot_deals(stack) if crm == "hubspot" else won_salesforce_deals(stack)


def complete_milestones(stack: SandboxStack, tool: str, project_id: str, n: int) -> list[str]:
    return stack.complete_milestones(tool, project_id, n)


def deal_progress(stack: SandboxStack, crm: str, deal_id: str) -> tuple[Any, Any, Any]:
    return stack.deal_progress(crm, deal_id)

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


def salesforce_http(stack: SandboxStack) -> httpx.Client:
    e = stack["salesforce"]
    sid = e.state.issue_session()
    return httpx.Client(
        base_url=e.base_url + "/services/data/v59.0",
        headers={"Authorization": f"Bearer {sid}"},
        verify=stack.tls.ca_pem,
    )


def won_salesforce_deals(stack: SandboxStack) -> set[str]:
    with salesforce_http(stack) as c:
        body = c.get("/query", params={"q": "SELECT Id FROM Opportunity WHERE IsWon = true"}).json()
        won = {r["Id"] for r in body["records"]}
        while not body["done"]:
            body = c.get(body["nextRecordsUrl"].split("/v59.0", 1)[1]).json()
            won |= {r["Id"] for r in body["records"]}
    return won


def won_deals(stack: SandboxStack, crm: str) -> set[str]:
    return won_hubspot_deals(stack) if crm == "hubspot" else won_salesforce_deals(stack)


def complete_milestones(stack: SandboxStack, tool: str, project_id: str, n: int) -> list[str]:
    """Complete the first `n` milestones of a project through the tool's own API."""
    e = stack[tool]
    if tool == "asana":
        with httpx.Client(base_url=e.base_url, headers={"Authorization": f"Bearer {e.token}"}) as c:
            tasks = c.get(
                f"/projects/{project_id}/tasks",
                params={"opt_fields": "name,resource_subtype,due_on", "limit": 100},
            ).json()["data"]
            milestones = [t for t in tasks if t["resource_subtype"] == "milestone"]
            milestones.sort(key=lambda t: (t.get("due_on") or "", t["gid"]))
            for t in milestones[:n]:
                c.put(f"/tasks/{t['gid']}", json={"data": {"completed": True}}).raise_for_status()
            return [t["name"] for t in milestones[:n]]
    with httpx.Client(base_url=e.base_url, headers={"Authorization": e.token}) as c:
        tasks = c.get(
            f"/list/{project_id}/task",
            params=[("custom_items[]", "1"), ("include_closed", "true"), ("subtasks", "true")],
        ).json()["tasks"]
        tasks.sort(key=lambda t: (int(t.get("due_date") or 0), t["id"]))
        closed = next(
            s["status"]
            for s in c.get(f"/list/{project_id}").json()["statuses"]
            if s["type"] == "closed"
        )
        for t in tasks[:n]:
            c.put(f"/task/{t['id']}", json={"status": closed}).raise_for_status()
        return [t["name"] for t in tasks[:n]]


PROGRESS_FIELDS = {
    "hubspot": ("delivery_progress", "delivery_status", "last_milestone"),
    "salesforce": ("Delivery_Progress__c", "Delivery_Status__c", "Last_Milestone__c"),
}


def deal_progress(stack: SandboxStack, crm: str, deal_id: str) -> tuple[Any, Any, Any]:
    """(percent, status, last milestone) as the CRM's API returns them."""
    names = PROGRESS_FIELDS[crm]
    if crm == "hubspot":
        e = stack["hubspot"]
        body = httpx.get(
            f"{e.base_url}/crm/v3/objects/deals/{deal_id}",
            params={"properties": ",".join(names)},
            headers={"Authorization": f"Bearer {e.token}"},
        ).json()["properties"]
        return float(body[names[0]]), body[names[1]], body[names[2]]
    with salesforce_http(stack) as c:
        body = c.get(f"/sobjects/Opportunity/{deal_id}").json()
    return float(body[names[0]]), body[names[1]], body[names[2]]

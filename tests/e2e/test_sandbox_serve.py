"""Issue #2's recipe verbatim: `handoff sandbox serve --seed 200 --write-config sb.yaml`, then
`handoff sync -c sb.yaml --json` creates one Asana project per won HubSpot deal, counted
through the emulators' own HTTP APIs; a second sync creates none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.helpers import REPO, handoff


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_sandbox_serve_then_sync(tmp_path: Path):
    config = tmp_path / "sb.yaml"
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import cli; cli.main()",
            "sandbox",
            "serve",
            "--seed",
            "200",
            "--write-config",
            str(config),
        ],
        cwd=REPO,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while "Serving" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.2)
        urls = dict(
            line.split(None, 1)
            for line in (tmp_path / "serve.log").read_text().splitlines()
            if line.startswith(("hubspot ", "asana ", "salesforce ", "clickup "))
        )
        env = _read_env(tmp_path / "sb.secrets.env")
        handoff("check", "--create-missing", "-c", str(config))

        first = json.loads(handoff("sync", "hubspot-asana", "-c", str(config), "--json").stdout)
        hs = httpx.Client(
            base_url=urls["hubspot"].strip(),
            headers={"Authorization": f"Bearer {env['SANDBOX_HUBSPOT_TOKEN']}"},
        )
        won_stages = {
            (p["id"], s["id"])
            for p in hs.get("/crm/v3/pipelines/deals").json()["results"]
            for s in p["stages"]
            if s["metadata"]["isClosed"] == "true" and float(s["metadata"]["probability"]) == 1
        }
        won, after = set(), None
        while True:
            body = hs.get(
                "/crm/v3/objects/deals",
                params={
                    "limit": 100,
                    "properties": "pipeline,dealstage",
                    **({"after": after} if after else {}),
                },
            ).json()
            won |= {
                d["id"]
                for d in body["results"]
                if (d["properties"]["pipeline"], d["properties"]["dealstage"]) in won_stages
            }
            after = (body.get("paging") or {}).get("next", {}).get("after")
            if not after:
                break
        asana = httpx.Client(
            base_url=urls["asana"].strip(),
            headers={"Authorization": f"Bearer {env['SANDBOX_ASANA_TOKEN']}"},
        )
        ws = asana.get("/workspaces").json()["data"][0]["gid"]
        stamps, params = (
            [],
            {
                "workspace": ws,
                "limit": 100,
                "opt_fields": "custom_fields.name,custom_fields.text_value",
            },
        )
        while True:
            body = asana.get("/projects", params=params).json()
            stamps += [
                cf["text_value"]
                for p in body["data"]
                for cf in p["custom_fields"]
                if cf["name"] == "Handoff deal" and cf.get("text_value")
            ]
            if not body.get("next_page"):
                break
            params["offset"] = body["next_page"]["offset"]
        assert sorted(stamps) == sorted(f"handoff:hubspot:{d}" for d in won)
        assert first["pipelines"][0]["created"] == len(won) > 50

        second = json.loads(handoff("sync", "hubspot-asana", "-c", str(config), "--json").stdout)
        assert second["pipelines"][0]["created"] == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=20)
        log.close()

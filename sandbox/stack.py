"""The whole sandbox: every vendor emulator on its own loopback port, seeded, plus a config
that points Handoff at them (`handoff sandbox serve`, `handoff demo`, end-to-end tests).
"""

from __future__ import annotations

import importlib
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sandbox.common import EmulatorControls
from sandbox.serve import LoopbackServer, TLSFiles

CRMS = ("hubspot", "salesforce")
TOOLS = ("asana", "clickup")
# Deal fields the presets write progress into. A Salesforce admin creates them in Setup
# (`handoff check` names any that are missing); the sandbox org comes with them.
SALESFORCE_PROGRESS_FIELDS = (
    ("Delivery_Progress__c", "percent"),
    ("Delivery_Status__c", "text"),
    ("Last_Milestone__c", "text"),
    ("Next_Milestone_Due__c", "date"),
)
PROGRESS_FIELDS = {
    "hubspot": ("delivery_progress", "delivery_status", "last_milestone"),
    "salesforce": ("Delivery_Progress__c", "Delivery_Status__c", "Last_Milestone__c"),
}
SALESFORCE_SECRET_VAR = "SANDBOX_SALESFORCE_CLIENT_SECRET"
TOKEN_VARS = {
    "hubspot": "SANDBOX_HUBSPOT_TOKEN",
    "salesforce": "SANDBOX_SALESFORCE_REFRESH_TOKEN",
    "asana": "SANDBOX_ASANA_TOKEN",
    "clickup": "SANDBOX_CLICKUP_TOKEN",
}


@dataclass
class Emulator:
    system: str
    state: Any
    controls: EmulatorControls
    server: LoopbackServer
    token: str
    base_url: str  # what a client is configured with (vendor path prefix included)


def _available(system: str) -> bool:
    try:
        importlib.import_module(f"sandbox.{system}")
    except ImportError:
        return False
    return True


class SandboxStack:
    """Start, seed and describe the emulators; write a Handoff config for them."""

    def __init__(
        self,
        seed_deals: int = 200,
        rng_seed: int = 7,
        rate_limits: bool = False,
        systems: tuple[str, ...] | None = None,
        workdir: str | Path | None = None,
        seed_won_share: float = 0.4,
    ) -> None:
        self.seed_deals = seed_deals
        self.seed_won_share = seed_won_share
        self.rng = random.Random(rng_seed)
        self.rate_limits = rate_limits
        self.systems = tuple(
            s for s in (systems or CRMS + TOOLS) if s in _STARTERS and _available(s)
        )
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="handoff-sandbox-"))
        self.emulators: dict[str, Emulator] = {}
        self.tls: TLSFiles | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> SandboxStack:
        for system in self.systems:
            self.emulators[system] = _STARTERS[system](self)
            if self.rate_limits:
                self.emulators[system].controls.set_rate_limits(True)
        return self

    def stop(self) -> None:
        for emu in self.emulators.values():
            emu.server.stop()

    def __enter__(self) -> SandboxStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def urls(self) -> dict[str, str]:
        return {s: e.base_url for s, e in self.emulators.items()}

    def __getitem__(self, system: str) -> Emulator:
        return self.emulators[system]

    def pairings(self) -> list[tuple[str, str]]:
        return [(c, t) for c in CRMS for t in TOOLS if c in self.emulators and t in self.emulators]

    # -- config -----------------------------------------------------------------------------
    def secrets_path(self, config_path: str | Path) -> Path:
        p = Path(config_path)
        return p.with_name(p.stem + ".secrets.env")

    def env(self) -> dict[str, str]:
        env = {TOKEN_VARS[s]: e.token for s, e in self.emulators.items()}
        if "salesforce" in self.emulators:
            from sandbox.salesforce import DEFAULT_CLIENT_SECRET

            env[SALESFORCE_SECRET_VAR] = DEFAULT_CLIENT_SECRET
        return env

    def write_config(
        self,
        path: str | Path,
        *,
        pairings: list[tuple[str, str]] | None = None,
        state_url: str | None = None,
        retry: dict[str, float] | None = None,
        extra_options: dict[str, Any] | None = None,
    ) -> Path:
        """A config for these emulators; tokens go to a secrets file beside it."""
        import io

        from ruamel.yaml import YAML

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        secrets = self.secrets_path(path)
        secrets.write_text("".join(f"{k}={v}\n" for k, v in self.env().items()))
        secrets.chmod(0o600)
        connections = {s: _CONNECTION[s](self, e) for s, e in self.emulators.items()}
        if not self.rate_limits:
            # The emulators enforce no limits: let the client pace itself no slower either.
            for system, conn in connections.items():
                conn.update(_UNPACED.get(system, {}))
        if retry:
            for c in connections.values():
                c["retry"] = dict(retry)
        pipelines = []
        for crm, tool in pairings or self.pairings():
            options: dict[str, Any] = {"overlap": "2m", **(extra_options or {})}
            pipelines.append(
                {
                    "name": f"{crm}-{tool}",
                    "source": crm,
                    "target": tool,
                    "mapping": f"preset:{crm}-{tool}",
                    "schedule": {"every": "5m"},
                    "options": options,
                }
            )
        config = {
            "version": 1,
            "state": {"url": state_url or "sqlite:///handoff-sandbox.db"},
            "secrets_file": secrets.name,
            "connections": connections,
            "pipelines": pipelines,
        }
        header = (
            "# Handoff config for the local sandbox (written by `handoff sandbox serve`).\n"
            f"# Tokens are in {secrets.name}; the emulators live only while the sandbox runs.\n"
        )
        buf = io.StringIO()
        YAML(typ="safe", pure=True).dump(config, buf)
        path.write_text(header + buf.getvalue())
        return path

    def advance_clocks(self, by: timedelta) -> None:
        """Move every emulator's clock forward: "`by` later", without waiting for it."""
        for system, emu in self.emulators.items():
            if system == "clickup":
                emu.state.advance(by.total_seconds())
            else:
                with emu.state.lock:
                    emu.state.clock_offset += by

    # -- inspection (through the emulators' own HTTP APIs) ------------------------------------
    def projects_table(self) -> Any:
        from rich.table import Table

        table = Table(title="Projects in the sandbox project tools")
        for col in ("tool", "project", "deal stamp", "url"):
            table.add_column(col, overflow="fold")
        for tool in TOOLS:
            if tool in self.emulators:
                for row in _PROJECTS[tool](self.emulators[tool])[:12]:
                    table.add_row(tool, row["name"], row["stamp"] or "—", row.get("url") or "")
        return table

    def salesforce_http(self) -> Any:
        """An httpx client on the Salesforce emulator's REST API with a fresh session."""
        import httpx

        e = self.emulators["salesforce"]
        assert self.tls is not None
        return httpx.Client(
            base_url=e.base_url + "/services/data/v59.0",
            headers={"Authorization": f"Bearer {e.state.issue_session()}"},
            verify=self.tls.ca_pem,
        )

    def complete_milestones(self, tool: str, project_id: str, n: int) -> list[str]:
        """Complete the first `n` milestones (by due date) through the tool's own API, as the
        delivery team would; returns their names."""
        import httpx

        e = self.emulators[tool]
        if tool == "asana":
            auth = {"Authorization": f"Bearer {e.token}"}
            with httpx.Client(base_url=e.base_url, headers=auth) as c:
                tasks = c.get(
                    f"/projects/{project_id}/tasks",
                    params={"opt_fields": "name,resource_subtype,due_on", "limit": 100},
                ).json()["data"]
                todo = [t for t in tasks if t["resource_subtype"] == "milestone"]
                todo.sort(key=lambda t: (t.get("due_on") or "", t["gid"]))
                for t in todo[:n]:
                    c.put(f"/tasks/{t['gid']}", json={"data": {"completed": True}})
                return [t["name"] for t in todo[:n]]
        with httpx.Client(base_url=e.base_url, headers={"Authorization": e.token}) as c:
            params = [("custom_items[]", "1"), ("include_closed", "true"), ("subtasks", "true")]
            tasks = c.get(f"/list/{project_id}/task", params=params).json()["tasks"]
            tasks.sort(key=lambda t: (int(t.get("due_date") or 0), t["id"]))
            statuses = c.get(f"/list/{project_id}").json()["statuses"]
            closed = next(st["status"] for st in statuses if st["type"] == "closed")
            for t in tasks[:n]:
                c.put(f"/task/{t['id']}", json={"status": closed})
            return [t["name"] for t in tasks[:n]]

    def deal_progress(self, crm: str, deal_id: str) -> tuple[Any, Any, Any]:
        """(percent, status, last milestone) on the deal, as the CRM's API returns them."""
        import httpx

        names = PROGRESS_FIELDS[crm]
        if crm == "hubspot":
            e = self.emulators["hubspot"]
            body = httpx.get(
                f"{e.base_url}/crm/v3/objects/deals/{deal_id}",
                params={"properties": ",".join(names)},
                headers={"Authorization": f"Bearer {e.token}"},
            ).json()["properties"]
        else:
            with self.salesforce_http() as c:
                body = c.get(f"/sobjects/Opportunity/{deal_id}").json()
        pct = body.get(names[0])
        return (
            (float(pct) if pct not in (None, "") else None),
            body.get(names[1]),
            body.get(names[2]),
        )

    def projects(self, tool: str) -> list[dict[str, Any]]:
        """Every project in `tool`, read through its HTTP API: name, stamp, id."""
        return _PROJECTS[tool](self.emulators[tool])


# -- per-vendor wiring ------------------------------------------------------------------------


def _serve(
    stack: SandboxStack, system: str, state: Any, token: str, tls: bool = False, prefix: str = ""
) -> Emulator:
    module = importlib.import_module(f"sandbox.{system}")
    controls = EmulatorControls()
    app = module.create_app(state, controls)
    tls_files = None
    if tls:
        if stack.tls is None:
            stack.tls = TLSFiles.create(str(stack.workdir))
        tls_files = stack.tls
    server = LoopbackServer(app, tls=tls_files).start()
    return Emulator(system, state, controls, server, token, server.base_url + prefix)


def _start_hubspot(stack: SandboxStack) -> Emulator:
    from sandbox.hubspot import HubSpotState

    token = "pat-na1-sandbox-" + f"{stack.rng.getrandbits(32):08x}"
    state = HubSpotState(tokens={token})
    state.seed(stack.seed_deals, stack.rng, stack.seed_won_share)
    return _serve(stack, "hubspot", state, token)


def _start_asana(stack: SandboxStack) -> Emulator:
    from sandbox.asana import AsanaState

    token = "2/sandbox/" + f"{stack.rng.getrandbits(48):012x}"
    # A paid workspace: milestone changes are read with workspace-wide search.
    state = AsanaState(tokens={token}, premium=True)
    state.seed(stack.rng)
    return _serve(stack, "asana", state, token, prefix="/api/1.0")


def _start_salesforce(stack: SandboxStack) -> Emulator:
    from sandbox.salesforce import DEFAULT_CLIENT_ID, DEFAULT_USERNAME, SalesforceState

    state = SalesforceState(rng_seed=stack.rng.randrange(10**6))
    for name, kind in SALESFORCE_PROGRESS_FIELDS:
        state.add_custom_field("Opportunity", name, kind)
    state.seed(stack.seed_deals, stack.rng, stack.seed_won_share)
    token = state.issue_refresh_token(DEFAULT_CLIENT_ID, DEFAULT_USERNAME)
    return _serve(stack, "salesforce", state, token, tls=True)


def _start_clickup(stack: SandboxStack) -> Emulator:
    from sandbox.clickup import ClickUpState

    token = (
        "pk_"
        + str(stack.rng.randrange(10**7, 10**8))
        + "_SANDBOX"
        + f"{stack.rng.getrandbits(32):08X}"
    )
    state = ClickUpState(tokens={token})
    state.seed(stack.rng)
    return _serve(stack, "clickup", state, token, prefix="/api/v2")


_STARTERS: dict[str, Callable[[SandboxStack], Emulator]] = {
    "hubspot": _start_hubspot,
    "salesforce": _start_salesforce,
    "asana": _start_asana,
    "clickup": _start_clickup,
}


def _hubspot_connection(stack: SandboxStack, e: Emulator) -> dict[str, Any]:
    return {
        "kind": "hubspot",
        "base_url": e.base_url,
        "portal_url": e.base_url,
        "auth": {"token": "${" + TOKEN_VARS["hubspot"] + "}"},
    }


def _asana_connection(stack: SandboxStack, e: Emulator) -> dict[str, Any]:
    return {
        "kind": "asana",
        "base_url": e.base_url,
        "auth": {"token": "${" + TOKEN_VARS["asana"] + "}"},
        "workspace": "Acme Delivery",
        "team": "Delivery",
        "job_poll_seconds": 0.05,
    }


def _salesforce_connection(stack: SandboxStack, e: Emulator) -> dict[str, Any]:
    from sandbox.salesforce import DEFAULT_CLIENT_ID

    assert stack.tls is not None
    return {
        "kind": "salesforce",
        "login_url": e.base_url,
        "ca_bundle": stack.tls.ca_pem,
        "auth": {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": "${" + SALESFORCE_SECRET_VAR + "}",
            "refresh_token": "${" + TOKEN_VARS["salesforce"] + "}",
        },
    }


def _clickup_connection(stack: SandboxStack, e: Emulator) -> dict[str, Any]:
    return {
        "kind": "clickup",
        "base_url": e.base_url,
        "auth": {"token": "${" + TOKEN_VARS["clickup"] + "}"},
        "team": "Acme Delivery",
        "space": "Client Delivery",
        "folder": "Onboarding projects",
    }


_UNPACED: dict[str, dict[str, Any]] = {
    "hubspot": {"requests_per_10s": 100_000, "search_per_second": 10_000},
    "asana": {"requests_per_minute": 1_000_000},
    "clickup": {"requests_per_minute": 1_000_000},
    "salesforce": {"requests_per_second": 100_000},
}

_CONNECTION: dict[str, Callable[[SandboxStack, Emulator], dict[str, Any]]] = {
    "hubspot": _hubspot_connection,
    "salesforce": _salesforce_connection,
    "asana": _asana_connection,
    "clickup": _clickup_connection,
}


def _asana_projects(e: Emulator) -> list[dict[str, Any]]:
    import httpx

    out = []
    with httpx.Client(base_url=e.base_url, headers={"Authorization": f"Bearer {e.token}"}) as c:
        ws = c.get("/workspaces").json()["data"][0]["gid"]
        params: dict[str, Any] = {
            "workspace": ws,
            "limit": 100,
            "opt_fields": "name,permalink_url,custom_fields.name,custom_fields.text_value",
        }
        while True:
            body = c.get("/projects", params=params).json()
            for p in body["data"]:
                stamp = next(
                    (
                        cf.get("text_value")
                        for cf in p.get("custom_fields") or []
                        if cf.get("name") == "Handoff deal"
                    ),
                    None,
                )
                out.append(
                    {
                        "id": p["gid"],
                        "name": p["name"],
                        "stamp": stamp,
                        "url": p.get("permalink_url"),
                    }
                )
            nxt = body.get("next_page")
            if not nxt:
                return out
            params["offset"] = nxt["offset"]


def _clickup_projects(e: Emulator) -> list[dict[str, Any]]:
    """Lists in the space, each with the stamp its deal-record task carries."""
    import httpx

    out = []
    with httpx.Client(base_url=e.base_url, headers={"Authorization": e.token}) as c:
        team = c.get("/team").json()["teams"][0]["id"]
        fields = c.get(f"/team/{team}/field").json()["fields"]
        stamp_id = next(f["id"] for f in fields if f["name"] == "Handoff deal")
        stamps: dict[str, str] = {}
        page = 0
        while True:
            params = [("page", page), ("include_closed", "true"), ("subtasks", "true")]
            tasks = c.get(f"/team/{team}/task", params=params).json()["tasks"]
            for t in tasks:
                for cf in t.get("custom_fields") or []:
                    if cf["id"] == stamp_id and cf.get("value"):
                        stamps.setdefault(t["list"]["id"], cf["value"])
            if len(tasks) < 100:
                break
            page += 1
        for space in c.get(f"/team/{team}/space").json()["spaces"]:
            lists = list(c.get(f"/space/{space['id']}/list").json()["lists"])
            for folder in c.get(f"/space/{space['id']}/folder").json()["folders"]:
                lists += c.get(f"/folder/{folder['id']}/list").json()["lists"]
            for lst in lists:
                out.append(
                    {
                        "id": lst["id"],
                        "name": lst["name"],
                        "stamp": stamps.get(lst["id"]),
                        "url": None,
                    }
                )
    return out


_PROJECTS: dict[str, Callable[[Emulator], list[dict[str, Any]]]] = {
    "asana": _asana_projects,
    "clickup": _clickup_projects,
}

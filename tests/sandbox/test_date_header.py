"""Every emulator answers with one `Date` header from its own clock, as the vendors' servers
do (RFC 9110 §6.6.1): the engine takes where a change read began from it, so it must move
when a test moves the emulator's clock, and be the only one (not uvicorn's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx

from sandbox.stack import SandboxStack


def _dates(stack: SandboxStack) -> dict[str, datetime]:
    out = {}
    for system, emu in stack.emulators.items():
        # Any answer carries it, an error included (here: no such route, or no session).
        with httpx.Client(base_url=emu.base_url, verify=False) as c:
            response = c.get("/no/such/route")
        values = response.headers.get_list("date")
        assert len(values) == 1, (system, values)
        out[system] = parsedate_to_datetime(values[0])
    return out


def test_each_emulator_sends_its_own_clock_in_one_date_header():
    systems = ("hubspot", "salesforce", "asana", "clickup")
    with SandboxStack(seed_deals=0, systems=systems) as stack:
        now = datetime.now(UTC)
        before = _dates(stack)
        assert set(before) == set(systems)
        for system, when in before.items():
            assert abs(when - now) < timedelta(seconds=5), system
        stack.advance_clocks(timedelta(hours=2))
        after = _dates(stack)
        for system in systems:
            moved = after[system] - before[system]
            assert timedelta(hours=2) <= moved < timedelta(hours=2, seconds=5), system

"""Failpoints: let a test kill this process at an exact step (e.g. between "project created"
and "link saved"), which random SIGKILL timing alone reaches too rarely to prove anything.

Off unless HANDOFF_FAILPOINT is set, e.g. `after-create:3` = die on the third create.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("HANDOFF_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

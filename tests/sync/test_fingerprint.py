"""Fingerprints never change: stored ones are compared with new ones, so the shortcut for
plain values must hash exactly the text the JSON encoder writes, for every value."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
import struct
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sync.forward import fingerprint

_ENCODER = json.JSONEncoder(sort_keys=True, default=str)


def reference_fingerprint(value: Any) -> str:
    """The fingerprint as it has always been computed."""
    return hashlib.blake2b(_ENCODER.encode(value).encode(), digest_size=8).hexdigest()


class Tier(enum.StrEnum):
    GOLD = "Gold"


class Level(enum.IntEnum):
    ONE = 1


class Text(str):
    pass


def _values() -> list[Any]:
    values: list[Any] = [
        "", "Silver", 'say "hi"', "back\\slash", "tab\tnew\nline", "\x00\x1f\x7f", "ünïcødé €",
        "😀", "\u2028", "x" * 100, Text("sub"), Tier.GOLD,
        0, 1, -1, 40595, 10**30, -(10**30), 2**63, Level.ONE,
        0.0, -0.0, 1.5, 0.1 + 0.2, 1e16, 1e-7, 1e308, 5e-324, 123456789.125,
        math.nan, -math.nan, math.inf, -math.inf,
        True, False, None,
        date(2024, 1, 1), date(1, 1, 1), datetime(2024, 1, 1, 12, 30),
        datetime(2024, 1, 1, 12, 30, 5, 123, tzinfo=UTC),
        datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
        Decimal("1.50"), {"b": 1, "a": [1, "x", None]}, [1, "x", None, 2.5], (1, 2), {},
        {"nested": {"z": date(2024, 1, 1), "a": math.inf}},
    ]  # fmt: skip
    rnd = random.Random(11)
    for _ in range(3000):
        values.append(rnd.randint(-(10**20), 10**20))
        values.append(rnd.uniform(-1e20, 1e20))
        values.append(struct.unpack("d", rnd.getrandbits(64).to_bytes(8, "little"))[0])
        values.append("".join(chr(rnd.randint(0, 0x2FFF)) for _ in range(rnd.randint(0, 12))))
        values.append(date.fromordinal(rnd.randint(1, 3_000_000)))
    return values


def test_a_fingerprint_is_the_one_stored_before() -> None:
    for value in _values():
        expected = reference_fingerprint(value)
        assert fingerprint(value) == expected, repr(value)
        assert fingerprint(value) == expected, repr(value)  # again: from the recent ones

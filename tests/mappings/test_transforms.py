"""The shortcuts in the coercions and filters give what the plain code gives: the same value,
or the same error, for every input (the plain code is kept here as the reference)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest

from mappings.transforms import CoercionError, _date_filter, _to_datetime, to_date, to_number


def reference_to_number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise CoercionError(f"{value!r} is a yes/no, not a number")
    if isinstance(value, int | float):
        return value
    try:
        d = Decimal(str(value).strip().replace(",", ""))
    except InvalidOperation:
        raise CoercionError(f"{value!r} is not a number") from None
    return int(d) if d == d.to_integral_value() else float(d)


def reference_to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise CoercionError(f"{value!r} is not a date or date-time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise CoercionError(f"{value!r} is not a date or date-time")


def reference_date_filter(value: Any, fmt: str = "%Y-%m-%d") -> str:
    if value in (None, ""):
        return ""
    return to_date(value).strftime(fmt)


class Text(str):
    pass


def _inputs() -> list[Any]:
    values: list[Any] = [
        "", " ", "0", "00", "007", "5", "40595", "-3", "+3", " 12 ", "1,200", "12.50", "1e3",
        "abc", "NaN", "inf", "٣", "²", "1_000", "9" * 30, "9" * 31, "9" * 5000, Text("42"),
        0, 7, -7, 2**70, 0.5, -0.0, 1e16, float("nan"), True, False, None, [], {},
        "2024-03-01", "2024-03-01T10:00:00", "2024-03-01T10:00:00Z", " 2024-03-01T10:00Z ",
        "2024-03-01T23:30:00-05:00", "2024-13-01", "0999-01-01", "1709251200000",
        " 1709251200000 ", Text("2024-03-01"), date(2024, 3, 1), date(999, 1, 1),
        datetime(2024, 3, 1, 12), datetime(2024, 3, 1, 23, tzinfo=timezone(timedelta(hours=-5))),
    ]  # fmt: skip
    rnd = random.Random(3)
    for _ in range(300):
        values.append(str(rnd.randint(0, 10**12)))
        day = date(rnd.randint(1, 9999), rnd.randint(1, 12), rnd.randint(1, 28))
        values.append(day.isoformat())
    return values


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        result = fn(*args)
    except Exception as exc:
        return ("error", type(exc), str(exc))
    # A float by its repr: nan is not equal to itself.
    return ("value", type(result), repr(result) if isinstance(result, float) else result)


@pytest.mark.parametrize(
    ("fast", "reference"),
    [
        (to_number, reference_to_number),
        (_to_datetime, reference_to_datetime),
        (_date_filter, reference_date_filter),
    ],
)
def test_a_shortcut_gives_what_the_plain_code_gives(fast, reference) -> None:
    for value in _inputs():
        assert _outcome(fast, value) == _outcome(reference, value), repr(value)


def test_the_date_filter_keeps_any_other_format() -> None:
    for value in ("2024-03-01", date(1, 2, 3), "0999-12-31T00:00:00Z"):
        for fmt in ("%d/%m/%Y", "%Y-%m-%d", "%Y"):
            assert _date_filter(value, fmt) == reference_date_filter(value, fmt)

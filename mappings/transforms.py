"""Named transforms, type coercions and the sandboxed Jinja2 environment used by field maps.

Mapping files name transforms from the registry (`transforms: [trim, upper]`); they never
carry code. Jinja2 is for text templates only, sandboxed, and an undefined name is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment


class CoercionError(ValueError):
    pass


def _to_datetime(value: Any) -> datetime:
    # A text first (no str is also a date or a number): it is the common case.
    if isinstance(value, str) and not value.strip().isdigit():
        text = value.strip().replace("Z", "+00:00")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise CoercionError(f"{value!r} is not a date or date-time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float | str):
        # HubSpot and ClickUp send epoch milliseconds (a text of digits here).
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    raise CoercionError(f"{value!r} is not a date or date-time")


def to_string(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def to_number(value: Any) -> int | float:
    if type(value) is str and len(value) <= 30 and value.isdigit() and value.isascii():
        # A plain whole number (how CRMs send amounts): what the Decimal route gives, at a
        # third of its cost. A longer text takes that route (int() limits its digits).
        return int(value)
    if isinstance(value, bool):
        raise CoercionError(f"{value!r} is a yes/no, not a number")
    if isinstance(value, int | float):
        return value
    try:
        d = Decimal(str(value).strip().replace(",", ""))
    except InvalidOperation:
        raise CoercionError(f"{value!r} is not a number") from None
    return int(d) if d == d.to_integral_value() else float(d)


def to_integer(value: Any) -> int:
    n = to_number(value)
    if isinstance(n, float) and not n.is_integer():
        raise CoercionError(f"{value!r} is not a whole number")
    return int(n)


def to_date(value: Any) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    return _to_datetime(value).date()


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "y", "1", "on"):
        return True
    if text in ("false", "no", "n", "0", "off", ""):
        return False
    raise CoercionError(f"{value!r} is not true/false")


COERCIONS: dict[str, Callable[[Any], Any]] = {
    "string": to_string,
    "number": to_number,
    "integer": to_integer,
    "date": to_date,
    "datetime": _to_datetime,
    "bool": to_bool,
}


def _add_days(value: Any, days: str) -> date:
    return to_date(value) + timedelta(days=int(days))


# name -> (function, takes an argument). Written in files as `name` or `name:arg`.
TRANSFORMS: dict[str, tuple[Callable[..., Any], bool]] = {
    "trim": (lambda v: str(v).strip(), False),
    "lower": (lambda v: str(v).lower(), False),
    "upper": (lambda v: str(v).upper(), False),
    "title": (lambda v: str(v).title(), False),
    "round": (lambda v, nd="0": round(to_number(v), int(nd)), True),
    "truncate": (lambda v, n: str(v)[: int(n)], True),
    "add_days": (_add_days, True),
    "percent": (lambda v: round(to_number(v) * 100, 1), False),
}


def parse_transform(spec: str) -> tuple[str, str | None]:
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg.strip() if sep else None)


def apply_transform(spec: str, value: Any) -> Any:
    name, arg = parse_transform(spec)
    fn, takes_arg = TRANSFORMS[name]
    return fn(value, arg) if (takes_arg and arg is not None) else fn(value)


def _money(value: Any, currency: str = "") -> str:
    if value in (None, ""):
        return ""
    amount = to_number(value)
    text = f"{amount:,.2f}"
    return f"{text} {currency}".strip()


def _date_filter(value: Any, fmt: str = "%Y-%m-%d") -> str:
    if value in (None, ""):
        return ""
    day = to_date(value)
    if fmt == "%Y-%m-%d" and type(day) is date and day.year >= 1000:
        # The same text, without strftime's round trip through the C library (4x the cost);
        # below year 1000 glibc's %Y does not pad to four digits, so strftime decides there.
        return day.isoformat()
    return day.strftime(fmt)


class RecordView(dict):
    """A record's fields as templates see them (`deal.amount`): plain data, no methods of
    its own, so reading a field needs none of the sandbox's attribute checks."""


DICT_NAMES = frozenset(dir(dict))


class MappingEnvironment(SandboxedEnvironment):
    def getattr(self, obj: Any, attribute: str) -> Any:
        # `deal.amount` on a record: the item, unless a dict method has that name (Jinja
        # looks attributes up first). Half of a typical template's cost otherwise goes to
        # the sandbox trying getattr on a dict and catching the AttributeError.
        if type(obj) is RecordView and attribute in obj and attribute not in DICT_NAMES:
            return obj[attribute]
        return super().getattr(obj, attribute)


def none_as_empty(value: Any) -> Any:
    """The environment's `finalize`: `{{ x }}` of None writes nothing."""
    return "" if value is None else value


def make_environment() -> SandboxedEnvironment:
    env = MappingEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        finalize=none_as_empty,
    )
    env.filters["money"] = _money
    env.filters["date"] = _date_filter
    env.filters["add_days"] = _add_days
    return env


TEMPLATE_NAMES = frozenset({"deal", "progress", "today", "now"})

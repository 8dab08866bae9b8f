"""Problems found in a config or mapping file, written for the person who must fix them.

Every problem carries FILE:LINE, the key path, what is wrong and how to fix it; pydantic
errors are translated here so the whole product reports them one way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from connectors.secrets import redact


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        path = f" {self.path}:" if self.path else ""
        fix = f" — {self.fix}" if self.fix else ""
        return redact(f"{where}:{path} {self.message}{fix}")


class ProblemsFound(Exception):
    """Raised with every problem at once; the CLI prints them and exits 2."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys the model accepts at `loc` (best effort, for did-you-mean hints)."""
    import typing

    current: Any = model
    for part in loc:
        if current is None:
            return []
        origin = typing.get_origin(current)
        if origin in (list, dict) or (origin is typing.Union):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[-1] if args else None
            if isinstance(part, int) or origin is dict:
                continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                continue  # a discriminator tag or a dict key: stay on this model
            current = field.annotation
            origin = typing.get_origin(current)
            if origin is typing.Union or str(origin) == "types.UnionType":
                args = [a for a in typing.get_args(current) if a is not type(None)]
                current = args[0] if len(args) == 1 else current
    while typing.get_origin(current) in (list, dict):
        current = typing.get_args(current)[-1]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


_FIXES: dict[str, str] = {
    "missing": "add this key",
    "string_type": "write text (quote it if it looks like a number or date)",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "list_type": "write a list (lines starting with '- ')",
    "dict_type": "write a mapping (key: value lines)",
    "model_type": "write a mapping (key: value lines)",
}


class Locator(Protocol):
    path: str

    def line_of(self, loc: tuple[Any, ...]) -> int | None: ...

    def present(self, loc: tuple[Any, ...]) -> tuple[Any, ...]: ...


def problems_from_validation(
    exc: ValidationError, doc: Locator, model: type[BaseModel] | None = None
) -> list[Problem]:
    problems = []
    file, line_of = doc.path, doc.line_of
    for err in exc.errors():
        loc = doc.present(tuple(err["loc"]))
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = _allowed_keys(model, tuple(err["loc"])[:-1]) if model else []
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it or check the spelling"
            if allowed:
                fix += f" (allowed here: {', '.join(allowed)})"
            problems.append(Problem(file, line_of(loc), dotted(loc), f"unknown key '{key}'", fix))
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        got = err.get("input")
        if kind not in ("missing",) and not isinstance(got, dict | list) and got is not None:
            msg = f"{msg} (got {got!r})"
        fix = _FIXES.get(kind, "")
        if kind in ("literal_error", "enum"):
            fix = "use one of the values listed"
        problems.append(Problem(file, line_of(loc), dotted(loc), msg, fix))
    return problems

"""A parser and evaluator for the subset of SOQL the Salesforce emulator answers.

Supported: ``SELECT f1, f2, Parent.f3 | COUNT() FROM sobject [WHERE cond] [ORDER BY f [ASC|DESC]
[NULLS FIRST|LAST], ...] [LIMIT n] [OFFSET n]``; conditions with AND / OR / NOT and parentheses,
``= != <> < <= > >= LIKE IN NOT IN``; string, number, boolean, null, date, dateTime literals and
the relative date literals TODAY, YESTERDAY, TOMORROW, LAST_N_DAYS:n, NEXT_N_DAYS:n.

It is as strict as Salesforce where the docs say so, because a connector that passes here must
pass against a real org:
- AND and OR can't be mixed without parentheses ("Parentheses are required whenever you mix the
  operators"), https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_logicaloperators.htm
- a dateTime field only compares with a dateTime literal and a date field with a date literal;
  text needs quotes and numbers/dates must not have them,
  https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_dateformats.htm
- text comparisons (=, LIKE, IN, ORDER BY) are case-insensitive; ORDER BY ASC puts nulls first,
  DESC puts them last, and rows with equal sort keys come back in no guaranteed order,
  https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_orderby.htm
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol

TEXT_TYPES = frozenset(
    {"id", "reference", "string", "picklist", "textarea", "email", "url", "phone", "combobox"}
)
NUMBER_TYPES = frozenset({"currency", "double", "percent", "int"})
ID_TYPES = frozenset({"id", "reference"})
MAX_OFFSET = 2000  # "The maximum offset is 2,000 rows" (SOQL OFFSET docs)


class SoqlError(Exception):
    """A query Salesforce would reject; `code` is the REST errorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Schema(Protocol):
    def sobject_name(self, name: str) -> str | None:
        """Canonical sObject name for a case-insensitive name, or None."""

    def field(self, sobject: str, name: str) -> tuple[str, str] | None:
        """(canonical field name, field type) or None."""

    def relationship(self, sobject: str, name: str) -> tuple[str, str] | None:
        """(reference field name, target sObject) for a relationship name, or None."""


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:\\.|[^'\\])*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<number>[+-]?(?:\d+\.\d*|\.\d+|\d+))
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<dateliteral>[A-Za-z_]+:\d+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "'": "'", '"': '"', "\\": "\\"}


@dataclass
class Token:
    kind: str
    text: str
    pos: int

    @property
    def upper(self) -> str:
        return self.text.upper()


def _unescape(body: str, keep_like: bool) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in ("%", "_"):
                # \% and \_ stay escaped for LIKE patterns, plain chars elsewhere.
                out.append("\\" + nxt if keep_like else nxt)
            else:
                out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _malformed(text, pos, f"unexpected token: '{text[pos]}'")
        kind = m.lastgroup or ""
        if kind != "ws":
            tokens.append(Token(kind, m.group(), pos))
        pos = m.end()
    tokens.append(Token("eof", "", len(text)))
    return tokens


def _located(text: str, pos: int, message: str) -> str:
    # Salesforce echoes the query with a caret under the offending column:
    # "\nSELECT Id FROM Accoun\n               ^\nERROR at Row:1:Column:16\n<message>"
    line = " ".join(text.split("\n"))
    return f"\n{line}\n{' ' * pos}^\nERROR at Row:1:Column:{pos + 1}\n{message}"


def _malformed(text: str, pos: int, message: str) -> SoqlError:
    return SoqlError("MALFORMED_QUERY", _located(text, pos, message))


# --------------------------------------------------------------------------------------------
# AST
# --------------------------------------------------------------------------------------------


@dataclass
class FieldPath:
    """A resolved field: `hops` are (reference field, target sObject, relationship name)."""

    text: str
    hops: list[tuple[str, str, str]]
    name: str
    type: str

    @property
    def key(self) -> str:
        return ".".join([h[2] for h in self.hops] + [self.name]).lower()


@dataclass
class Literal:
    kind: str  # string, number, boolean, null, date, datetime, range
    value: Any
    pos: int


@dataclass
class Comparison:
    field: FieldPath
    op: str
    value: Literal | list[Literal]


@dataclass
class Logical:
    op: str  # AND, OR
    items: list[Any]


@dataclass
class Negation:
    item: Any


@dataclass
class OrderItem:
    field: FieldPath
    descending: bool
    nulls_last: bool


@dataclass
class Query:
    text: str
    sobject: str
    fields: list[FieldPath] = field(default_factory=list)
    count_only: bool = False
    where: Any = None
    order_by: list[OrderItem] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

_KEYWORDS = frozenset(
    {"SELECT", "FROM", "WHERE", "ORDER", "BY", "LIMIT", "OFFSET", "AND", "OR", "NOT", "IN"}
    | {"LIKE", "ASC", "DESC", "NULLS", "FIRST", "LAST", "GROUP", "HAVING", "FOR", "WITH"}
)


class _Parser:
    def __init__(self, text: str, schema: Schema, today: date) -> None:
        self.text = text
        self.schema = schema
        self.today = today
        self.tokens = tokenize(text)
        self.i = 0
        self.sobject = ""

    # -- token helpers ------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def at_kw(self, *words: str) -> bool:
        return self.tok.kind == "ident" and self.tok.upper in words

    def expect_kw(self, word: str) -> Token:
        if not self.at_kw(word):
            raise self.unexpected()
        return self.advance()

    def expect_punct(self, ch: str) -> Token:
        if self.tok.text != ch:
            raise self.unexpected()
        return self.advance()

    def unexpected(self, tok: Token | None = None) -> SoqlError:
        t = tok or self.tok
        shown = t.text if t.kind != "eof" else "<EOF>"
        return _malformed(self.text, t.pos, f"unexpected token: '{shown}'")

    # -- grammar ------------------------------------------------------------------------
    def parse(self) -> Query:
        self.expect_kw("SELECT")
        select_start = self.i
        # Skip to FROM first: field names resolve against the sObject named after it.
        depth = 0
        while not (depth == 0 and self.at_kw("FROM")):
            if self.tok.kind == "eof":
                raise self.unexpected()
            if self.tok.text == "(":
                depth += 1
            elif self.tok.text == ")":
                depth -= 1
            self.advance()
        from_tok = self.advance()
        obj_tok = self.advance()
        if obj_tok.kind != "ident" or "." in obj_tok.text or obj_tok.upper in _KEYWORDS:
            raise self.unexpected(obj_tok if obj_tok.kind != "eof" else from_tok)
        sobject = self.schema.sobject_name(obj_tok.text)
        if sobject is None:
            raise SoqlError(
                "INVALID_TYPE",
                _located(
                    self.text,
                    obj_tok.pos,
                    f"sObject type '{obj_tok.text}' is not supported. If you are attempting to "
                    "use a custom object, be sure to append the '__c' after the entity name. "
                    "Please reference your WSDL or the describe call for the appropriate names.",
                ),
            )
        self.sobject = sobject
        query = Query(text=self.text, sobject=sobject)
        after_from = self.i
        self.i = select_start
        self._select_list(query)
        if self.i != after_from - 2:
            raise self.unexpected()
        self.i = after_from
        if self.at_kw("WHERE"):
            self.advance()
            query.where = self._condition()
        if self.at_kw("ORDER"):
            self.advance()
            self.expect_kw("BY")
            query.order_by = self._order_list()
        if self.at_kw("LIMIT"):
            self.advance()
            query.limit = self._non_negative_int()
        if self.at_kw("OFFSET"):
            self.advance()
            off_tok = self.tok
            query.offset = self._non_negative_int()
            if query.offset > MAX_OFFSET:
                raise SoqlError(
                    "NUMBER_OUTSIDE_VALID_RANGE",
                    _located(
                        self.text,
                        off_tok.pos,
                        f"Maximum SOQL offset allowed is {MAX_OFFSET}",
                    ),
                )
        if self.tok.kind != "eof":
            raise self.unexpected()
        if query.count_only and query.order_by:
            raise _malformed(self.text, 0, "ORDER BY is not supported with COUNT()")
        return query

    def _non_negative_int(self) -> int:
        t = self.advance()
        if t.kind != "number" or not t.text.isdigit():
            raise self.unexpected(t)
        return int(t.text)

    def _select_list(self, query: Query) -> None:
        if self.at_kw("COUNT") and self.tokens[self.i + 1].text == "(":
            self.advance()
            self.advance()
            if self.tok.text != ")":
                # COUNT(field) is an aggregate query; this emulator only answers COUNT().
                raise _malformed(self.text, self.tok.pos, "aggregate queries are not supported")
            self.advance()
            query.count_only = True
            return
        seen: set[str] = set()
        while True:
            t = self.advance()
            if t.kind != "ident" or t.upper in _KEYWORDS:
                raise self.unexpected(t)
            path = self.resolve(t)
            if path.key in seen:
                raise _malformed(self.text, t.pos, f"duplicate field selected: {path.text}")
            seen.add(path.key)
            query.fields.append(path)
            if self.tok.text != ",":
                break
            self.advance()

    def resolve(self, t: Token) -> FieldPath:
        parts = t.text.split(".")
        # "Opportunity.Name" in a query FROM Opportunity is the object-qualified field name.
        if len(parts) > 1 and parts[0].lower() == self.sobject.lower():
            parts = parts[1:]
        current = self.sobject
        hops: list[tuple[str, str, str]] = []
        for rel in parts[:-1]:
            found = self.schema.relationship(current, rel)
            if found is None:
                raise SoqlError(
                    "INVALID_FIELD",
                    _located(
                        self.text,
                        t.pos,
                        f"Didn't understand relationship '{rel}' in field path. If you are "
                        "attempting to use a custom relationship, be sure to append the '__r' "
                        "after the custom relationship name. Please reference your WSDL or the "
                        "describe call for the appropriate names.",
                    ),
                )
            ref_field, target = found
            canonical_rel = ref_field[:-2] if ref_field.endswith("Id") else rel
            hops.append((ref_field, target, canonical_rel))
            current = target
        got = self.schema.field(current, parts[-1])
        if got is None:
            raise SoqlError(
                "INVALID_FIELD",
                _located(
                    self.text,
                    t.pos,
                    f"No such column '{parts[-1]}' on entity '{current}'. If you are attempting "
                    "to use a custom field, be sure to append the '__c' after the custom field "
                    "name. Please reference your WSDL or the describe call for the appropriate "
                    "names.",
                ),
            )
        name, ftype = got
        text = ".".join([h[2] for h in hops] + [name])
        return FieldPath(text=text, hops=hops, name=name, type=ftype)

    def _condition(self) -> Any:
        first = self._unary()
        op: str | None = None
        items = [first]
        while self.at_kw("AND", "OR"):
            t = self.advance()
            if op is not None and t.upper != op:
                # Mixing AND and OR at one level without parentheses is a syntax error.
                raise self.unexpected(t)
            op = t.upper
            items.append(self._unary())
        return items[0] if op is None else Logical(op, items)

    def _unary(self) -> Any:
        if self.at_kw("NOT"):
            self.advance()
            return Negation(self._unary())
        if self.tok.text == "(":
            self.advance()
            inner = self._condition()
            self.expect_punct(")")
            return inner
        return self._comparison()

    def _comparison(self) -> Comparison:
        ftok = self.advance()
        if ftok.kind != "ident" or ftok.upper in _KEYWORDS:
            raise self.unexpected(ftok)
        path = self.resolve(ftok)
        if self.at_kw("NOT"):
            self.advance()
            self.expect_kw("IN")
            return Comparison(path, "NOT IN", self._value_list(path))
        if self.at_kw("IN"):
            self.advance()
            return Comparison(path, "IN", self._value_list(path))
        if self.at_kw("LIKE"):
            self.advance()
            vtok = self.tok
            value = self._value(path, like=True)
            if path.type not in TEXT_TYPES - ID_TYPES or value.kind != "string":
                raise SoqlError(
                    "INVALID_FIELD",
                    _located(
                        self.text,
                        vtok.pos,
                        f"invalid operator on {path.type} field: LIKE on field '{path.text}'",
                    ),
                )
            return Comparison(path, "LIKE", value)
        if self.tok.kind != "op":
            raise self.unexpected()
        op = self.advance().text
        op = "!=" if op == "<>" else op
        value = self._value(path)
        if value.kind == "null" and op not in ("=", "!="):
            raise _malformed(self.text, value.pos, f"invalid operator {op} for null value")
        if path.type == "boolean" and op not in ("=", "!="):
            raise SoqlError(
                "INVALID_FIELD",
                _located(
                    self.text, value.pos, f"invalid operator on boolean field: {op} {path.text}"
                ),
            )
        return Comparison(path, op, value)

    def _value_list(self, path: FieldPath) -> list[Literal]:
        self.expect_punct("(")
        values = [self._value(path)]
        while self.tok.text == ",":
            self.advance()
            values.append(self._value(path))
        self.expect_punct(")")
        return values

    def _type_error(self, path: FieldPath, pos: int) -> SoqlError:
        want = {"datetime": "dateTime", "date": "date", "boolean": "boolean"}.get(
            path.type, "double" if path.type in NUMBER_TYPES else "string"
        )
        quotes = (
            "should be enclosed in quotes"
            if want == "string"
            else "should not be enclosed in quotes"
        )
        return SoqlError(
            "INVALID_FIELD",
            _located(
                self.text,
                pos,
                f"value of filter criterion for field '{path.text}' must be of type {want} "
                f"and {quotes}",
            ),
        )

    def _value(self, path: FieldPath, like: bool = False) -> Literal:
        t = self.advance()
        ftype = path.type
        if t.kind == "ident" and t.upper == "NULL":
            return Literal("null", None, t.pos)
        if t.kind == "string":
            if ftype not in TEXT_TYPES:
                raise self._type_error(path, t.pos)
            text = _unescape(t.text[1:-1], keep_like=like)
            if ftype in ID_TYPES and not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", text):
                raise SoqlError(
                    "INVALID_QUERY_FILTER_OPERATOR",
                    _located(self.text, t.pos, f"invalid ID field: {text}"),
                )
            return Literal("string", text, t.pos)
        if t.kind == "number":
            if ftype not in NUMBER_TYPES:
                raise self._type_error(path, t.pos)
            return Literal("number", float(t.text), t.pos)
        if t.kind == "ident" and t.upper in ("TRUE", "FALSE"):
            if ftype != "boolean":
                raise self._type_error(path, t.pos)
            return Literal("boolean", t.upper == "TRUE", t.pos)
        if t.kind == "date":
            if ftype != "date":
                raise self._type_error(path, t.pos)
            try:
                return Literal("date", date.fromisoformat(t.text), t.pos)
            except ValueError:
                raise _malformed(
                    self.text, t.pos, f"line 1:{t.pos} no viable alternative"
                ) from None
        if t.kind == "datetime":
            if ftype != "datetime":
                raise self._type_error(path, t.pos)
            return Literal("datetime", parse_datetime(t.text), t.pos)
        if t.kind in ("ident", "dateliteral"):
            rng = self._date_range(t)
            if rng is not None:
                if ftype not in ("date", "datetime"):
                    raise self._type_error(path, t.pos)
                return Literal("range", rng, t.pos)
        raise self.unexpected(t)

    def _date_range(self, t: Token) -> tuple[date, date] | None:
        """A relative date literal as a [start, end) range of days (UTC)."""
        word, _, n_text = t.upper.partition(":")
        d = self.today
        if not n_text:
            offsets = {"TODAY": 0, "YESTERDAY": -1, "TOMORROW": 1}
            if word not in offsets:
                return None
            start = d + timedelta(days=offsets[word])
            return start, start + timedelta(days=1)
        n = int(n_text)
        if word == "LAST_N_DAYS":
            # "For the number n provided, starts 00:00:00 of the current day and continues for
            # the past n days" - today included.
            return d - timedelta(days=n - 1), d + timedelta(days=1)
        if word == "NEXT_N_DAYS":
            return d + timedelta(days=1), d + timedelta(days=n + 1)
        return None

    def _order_list(self) -> list[OrderItem]:
        items: list[OrderItem] = []
        while True:
            t = self.advance()
            if t.kind != "ident" or t.upper in _KEYWORDS:
                raise self.unexpected(t)
            path = self.resolve(t)
            if path.type == "textarea":
                raise SoqlError(
                    "INVALID_FIELD",
                    _located(
                        self.text,
                        t.pos,
                        f"field '{path.text}' can not be sorted in a query call",
                    ),
                )
            descending = False
            if self.at_kw("ASC", "DESC"):
                descending = self.advance().upper == "DESC"
            nulls_last = descending
            if self.at_kw("NULLS"):
                self.advance()
                if not self.at_kw("FIRST", "LAST"):
                    raise self.unexpected()
                nulls_last = self.advance().upper == "LAST"
            items.append(OrderItem(path, descending, nulls_last))
            if self.tok.text != ",":
                return items
            self.advance()


def parse(text: str, schema: Schema, today: date) -> Query:
    """Parse and type-check `text`; raises :class:`SoqlError` as Salesforce would answer."""
    if not text or not text.strip():
        raise SoqlError("MALFORMED_QUERY", "A query string has to be specified")
    return _Parser(text, schema, today).parse()


def parse_datetime(text: str) -> datetime:
    """SOQL/REST dateTime text (Z, +hh:mm or +hhmm offsets, optional millis) to aware UTC."""
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    m = re.search(r"([+-])(\d{2})(\d{2})$", t)
    if m and not re.search(r"[+-]\d{2}:\d{2}$", t):
        t = t[: m.start()] + f"{m.group(1)}{m.group(2)}:{m.group(3)}"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

Lookup = Callable[[str, str], dict[str, Any] | None]


def field_value(path: FieldPath, record: dict[str, Any], lookup: Lookup) -> Any:
    current: dict[str, Any] | None = record
    for ref_field, target, _ in path.hops:
        ref = current.get(ref_field) if current else None
        current = lookup(target, ref) if ref else None
        if current is None:
            return None
    return current.get(path.name) if current else None


def _norm(value: Any, ftype: str) -> Any:
    if value is None:
        return None
    if ftype in ID_TYPES:
        return str(value)[:15]
    if ftype in TEXT_TYPES:
        return str(value).lower()
    if ftype in NUMBER_TYPES:
        return float(value)
    return value


def _like(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def _compare_range(value: Any, op: str, rng: tuple[date, date], ftype: str) -> bool:
    start, end = rng
    if ftype == "datetime":
        lo: Any = datetime.combine(start, time(), UTC)
        hi: Any = datetime.combine(end, time(), UTC)
    else:
        lo, hi = start, end
    inside = lo <= value < hi
    return {
        "=": inside,
        "!=": not inside,
        "<": value < lo,
        "<=": value < hi,
        ">": value >= hi,
        ">=": value >= lo,
    }[op]


def _compare(c: Comparison, record: dict[str, Any], lookup: Lookup) -> bool:
    raw = field_value(c.field, record, lookup)
    ftype = c.field.type
    if c.op in ("IN", "NOT IN"):
        assert isinstance(c.value, list)
        vals = {_norm(v.value, ftype) for v in c.value}
        hit = _norm(raw, ftype) in vals
        return hit if c.op == "IN" else not hit
    assert isinstance(c.value, Literal)
    lit = c.value
    if c.op == "LIKE":
        return raw is not None and _like(lit.value).fullmatch(str(raw)) is not None
    if lit.kind == "null":
        return (raw is None) == (c.op == "=")
    if raw is None:
        return c.op == "!="
    if lit.kind == "range":
        return _compare_range(raw, c.op, lit.value, ftype)
    left, right = _norm(raw, ftype), _norm(lit.value, ftype)
    return {
        "=": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[c.op]


def matches(node: Any, record: dict[str, Any], lookup: Lookup) -> bool:
    if node is None:
        return True
    if isinstance(node, Comparison):
        return _compare(node, record, lookup)
    if isinstance(node, Negation):
        return not matches(node.item, record, lookup)
    if node.op == "AND":
        return all(matches(i, record, lookup) for i in node.items)
    return any(matches(i, record, lookup) for i in node.items)


class _Key:
    """Sort key honouring direction and NULLS FIRST/LAST per ORDER BY item."""

    __slots__ = ("values", "items")

    def __init__(self, values: list[Any], items: list[OrderItem]) -> None:
        self.values = values
        self.items = items

    def __lt__(self, other: _Key) -> bool:
        for a, b, item in zip(self.values, other.values, self.items, strict=True):
            if a == b:
                continue
            if a is None or b is None:
                # A null sorts before everything with NULLS FIRST, after with NULLS LAST.
                return (a is None) != item.nulls_last
            return (a > b) if item.descending else (a < b)
        return False


def run(query: Query, records: list[dict[str, Any]], lookup: Lookup) -> list[dict[str, Any]]:
    """Filter, order, offset and limit `records` (already in the store's arbitrary order)."""
    rows = [r for r in records if matches(query.where, r, lookup)]
    if query.order_by:
        items = query.order_by
        rows.sort(
            key=lambda r: _Key(
                [_norm(field_value(i.field, r, lookup), i.field.type) for i in items], items
            )
        )
    rows = rows[query.offset :]
    if query.limit is not None:
        rows = rows[: query.limit]
    return rows

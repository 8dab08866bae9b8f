"""The SQL state store (SQLite by default, PostgreSQL by URL): one class, batched writes.

The engine commits a page at a time: links, seen marks, dead letters and the cursor move
together in one transaction, so the cursor never passes a record that was not recorded.
Claims (pending links) are committed on their own, before the project is created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as _json_str
from operator import attrgetter, itemgetter
from typing import Any

from sqlalchemy import (
    Engine,
    Select,
    and_,
    bindparam,
    delete,
    event,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, create_engine

from connectors.base import Cursor
from state.errors import StateSchemaError
from state.models import CursorRow, DeadLetterRow, LeaseRow, LinkRow, RunRow, SeenRow


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything we store is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class Link:
    pipeline: str
    deal_id: str
    state: str
    project_id: str | None
    project_name: str | None = None
    project_url: str | None = None
    deal_status: str = "won"
    forward_prints: dict[str, str] = field(default_factory=dict)
    back_prints: dict[str, str] = field(default_factory=dict)
    milestones: dict[str, list] = field(default_factory=dict)
    next_due_on: str | None = None


@dataclass
class DeadLetter:
    id: int
    pipeline: str
    stream: str
    record_id: str
    step: str
    error_kind: str
    message: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_retry_at: datetime | None


@dataclass
class Parked:
    """A failure to record in the page's transaction."""

    stream: str
    record_id: str
    step: str
    error_kind: str
    message: str


# Which flow owns which link columns (see PageCommit.link_columns).
FORWARD_LINK_COLUMNS = (
    "state",
    "project_id",
    "project_name",
    "project_url",
    "deal_status",
    "forward_prints",
)
BACK_LINK_COLUMNS = ("back_prints", "milestones", "next_due_on")


@dataclass
class PageCommit:
    """Everything one processed page changes in the state store, applied atomically."""

    pipeline: str
    stream: str
    cursor: Cursor | None = None
    link_updates: list[Link] = field(default_factory=list)
    seen: list[tuple[str, datetime]] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)  # record ids whose dead letter is cleared
    dlq_stream: str | None = None  # stream of parked/resolved records (default: `stream`)
    dropped_claims: list[str] = field(default_factory=list)  # pending claims to release
    # The link columns this page's flow owns: the forward and back flows never overwrite each
    # other's columns, and a page writes (and serialises) only its own.
    link_columns: tuple[str, ...] = ()  # () = every column


def _link(row: Any) -> Link:
    """From an ORM row or a Core row of the links table."""
    return _link_from_values([getattr(row, name) for name in _LINK_FIELDS])


# The links table's columns a Link carries, in the order of Link's fields.
_LINK_FIELDS = ("pipeline", "deal_id", *FORWARD_LINK_COLUMNS, *BACK_LINK_COLUMNS)
assert tuple(f.name for f in fields(Link)) == _LINK_FIELDS


def _link_from_values(v: Any) -> Link:
    """From the values of the `_LINK_FIELDS` columns, as `_link` makes it from a row."""
    return Link(*v[:7], dict(v[7] or {}), dict(v[8] or {}), dict(v[9] or {}), v[10])


def _dead_letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        id=row.id or 0,
        pipeline=row.pipeline,
        stream=row.stream,
        record_id=row.record_id,
        step=row.step,
        error_kind=row.error_kind,
        message=row.message,
        attempts=row.attempts,
        first_failed_at=as_utc(row.first_failed_at),  # type: ignore[arg-type]
        last_failed_at=as_utc(row.last_failed_at),  # type: ignore[arg-type]
        next_retry_at=as_utc(row.next_retry_at),
    )


# Transient failures parked as dead letters are retried automatically after this backoff.
DLQ_BACKOFF = [
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
]


def json_text(value: Any) -> str:
    """`json.dumps(value)`, the same text; a dict of texts (a link's fingerprints: a page
    writes one a row) at half the cost, without building a JSON encoder for each."""
    if type(value) is dict:
        try:
            items = [f"{_json_str(k)}: {_json_str(v)}" for k, v in value.items()]
        except TypeError:
            pass  # a key or value that is not text: json.dumps converts or refuses it
        else:
            return "{" + ", ".join(items) + "}"
    return json.dumps(value)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=json_text,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets `handoff status` read while a run writes; NORMAL sync is safe in WAL.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class DriverStatement:
    """A Core statement compiled once for one database and run straight on the driver.
    SQLAlchemy's per-row parameter handling costs more than SQLite's own work for a page of
    link updates (measured 29 vs 13 µs a row); here each row costs one tuple and only the
    conversions its column types need (dates on SQLite, JSON), both ways."""

    sql: str
    names: tuple[str, ...]  # bind names, in the driver's order
    positional: bool
    convert: tuple[tuple[str, Any], ...]  # (bind name, the type's bind processor)
    # (column index, the type's result processor), for a SELECT read with `query`
    results: tuple[tuple[int, Any], ...] = ()

    @classmethod
    def compile(cls, stmt: Any, dialect: Any) -> DriverStatement:
        compiled = stmt.compile(dialect=dialect)
        names = tuple(compiled.positiontup or compiled.binds)
        convert = []
        for name in dict.fromkeys(names):  # a shared bind appears once per use
            proc = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                convert.append((name, proc))
        results = []
        if isinstance(stmt, Select):
            for i, col in enumerate(stmt.selected_columns):
                proc = col.type.dialect_impl(dialect).result_processor(dialect, None)
                if proc is not None:
                    results.append((i, proc))
        return cls(
            compiled.string, names, bool(compiled.positional), tuple(convert), tuple(results)
        )

    def query(self, conn: Any, params: dict[str, Any]) -> list[Any]:
        """The rows of one execution of a SELECT, values converted as SQLAlchemy converts
        them (SQLite's date texts, JSON texts)."""
        rows = self.execute(conn, params).fetchall()
        if not self.results:
            return rows
        out = []
        for row in rows:
            values = list(row)
            for i, proc in self.results:
                values[i] = proc(values[i])
            out.append(values)
        return out

    def execute_many(
        self,
        conn: Any,
        names: tuple[str, ...],
        rows: list[tuple[Any, ...]],
        shared: dict[str, Any] | None = None,
    ) -> None:
        """executemany of `rows`, each the values of the binds `names` in that order. The
        binds in `shared` have one value for every row (a page's `now`): converted once, not
        once a row, as a row's values are put in the driver's order by one C-level pick."""
        procs = dict(self.convert)
        fixed = {n: procs[n](v) if n in procs else v for n, v in (shared or {}).items()}
        row_procs = [(i, procs[n]) for i, n in enumerate(names) if n in procs]
        if row_procs:
            converted: list[Any] = []
            for row in rows:
                values = list(row)
                for i, proc in row_procs:
                    values[i] = proc(values[i])
                converted.append(values)
            rows = converted
        if not self.positional:
            named = [dict(zip(names, row, strict=True), **fixed) for row in rows]
            conn.exec_driver_sql(self.sql, named)
            return
        tail = tuple(fixed.values())
        where = {n: i for i, n in enumerate(names)}
        where.update((n, len(names) + i) for i, n in enumerate(fixed))
        pick = itemgetter(*(where[n] for n in self.names))
        params = [pick((*row, *tail)) for row in rows]
        if len(self.names) == 1:  # itemgetter of one index gives the value, not a tuple
            params = [(p,) for p in params]
        conn.exec_driver_sql(self.sql, params)

    def execute(self, conn: Any, params: dict[str, Any]) -> Any:
        """One execution; returns the driver's result (rows, for RETURNING)."""
        params = dict(params)
        for name, proc in self.convert:
            params[name] = proc(params[name])
        if not self.positional:
            return conn.exec_driver_sql(self.sql, params)
        if len(self.names) < 2:  # itemgetter takes one index or more, and gives no 1-tuple
            return conn.exec_driver_sql(self.sql, tuple(params[n] for n in self.names))
        # One C-level pick: a page's claims and look-ups have a bind per record.
        return conn.exec_driver_sql(self.sql, itemgetter(*self.names)(params))


class StateStore:
    """Cursors, links, seen marks, runs, dead letters and leases, in one SQL database."""

    def __init__(self, url: str, *, create: bool = True, auto_migrate: bool | None = None) -> None:
        """`create` checks the schema at start-up (see `state.migrate`): SQLite is migrated
        on first use; a server database that is behind raises `StateSchemaError`, naming
        `handoff state migrate`. `auto_migrate` overrides that choice either way."""
        self.url = url
        self.engine = make_engine(url)
        self._dialect = self.engine.dialect.name
        self._statements: dict[Any, Any] = {}  # hot-path statements, built once
        if create:
            from state.migrate import ensure_schema

            auto = self._dialect == "sqlite" if auto_migrate is None else auto_migrate
            try:
                ensure_schema(self.engine, auto=auto)
            except StateSchemaError:
                self.engine.dispose()
                raise

    def migrate(self) -> tuple[str | None, str]:
        """Bring the schema up to date (`handoff state migrate`): (revision before, after)."""
        from state.migrate import upgrade

        return upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    # -- cursors ---------------------------------------------------------------------------
    def get_cursor(self, pipeline: str, stream: str) -> Cursor | None:
        return self.read_position(pipeline, stream)[0]

    def read_position(self, pipeline: str, stream: str) -> tuple[Cursor | None, datetime | None]:
        """The stream's cursor, and where its last complete read began on the system's clock
        (see `Connector.read_clock`), from one read of the row."""
        with Session(self.engine) as s:
            row = s.get(CursorRow, (pipeline, stream))
            if row is None:
                return None, None
            cursor = Cursor(as_utc(row.modified_at), row.record_id)  # type: ignore[arg-type]
            return cursor, as_utc(row.read_from)

    def set_cursor(self, pipeline: str, stream: str, cursor: Cursor | None) -> None:
        with Session(self.engine) as s, s.begin():
            if cursor is None:
                s.exec(
                    delete(CursorRow).where(  # type: ignore[call-overload]
                        CursorRow.pipeline == pipeline, CursorRow.stream == stream
                    )
                )
                s.exec(delete(SeenRow).where(SeenRow.pipeline == pipeline))  # type: ignore[call-overload]
            else:
                self._write_cursor(s, pipeline, stream, cursor)
                # Set by hand (a rewind): the next read starts at this cursor, not at the
                # last complete read.
                s.exec(
                    update(CursorRow)  # type: ignore[call-overload]
                    .where(CursorRow.pipeline == pipeline, CursorRow.stream == stream)
                    .values(read_from=None)
                )

    def _write_cursor(self, s: Session, pipeline: str, stream: str, cursor: Cursor) -> None:
        stmt = self._statements.get("cursor")
        if stmt is None:
            c = CursorRow.__table__.c
            ins = self._insert(CursorRow.__table__).values(
                pipeline=bindparam("pipeline", type_=c.pipeline.type),
                stream=bindparam("stream", type_=c.stream.type),
                modified_at=bindparam("modified_at", type_=c.modified_at.type),
                record_id=bindparam("record_id", type_=c.record_id.type),
                updated_at=bindparam("updated_at", type_=c.updated_at.type),
            )
            stmt = self._statements["cursor"] = DriverStatement.compile(
                ins.on_conflict_do_update(
                    index_elements=["pipeline", "stream"],
                    set_={
                        "modified_at": ins.excluded.modified_at,
                        "record_id": ins.excluded.record_id,
                        "updated_at": ins.excluded.updated_at,
                    },
                ),
                self.engine.dialect,
            )
        stmt.execute(
            s.connection(),
            {
                "pipeline": pipeline,
                "stream": stream,
                "modified_at": cursor.modified_at,
                "record_id": cursor.record_id,
                "updated_at": utcnow(),
            },
        )

    def advance_read_from(self, pipeline: str, stream: str, when: datetime) -> None:
        """Record that a read beginning at `when` went to its end. Only moves forward, and
        only on a stream that has a cursor (a read that found nothing yet leaves none)."""
        c = CursorRow.__table__.c
        with self.engine.begin() as conn:
            conn.execute(
                update(CursorRow.__table__)
                .where(
                    c.pipeline == pipeline,
                    c.stream == stream,
                    (c.read_from.is_(None)) | (c.read_from < when),
                )
                .values(read_from=when)
            )

    def cursors(self, pipeline: str) -> dict[str, Cursor]:
        with Session(self.engine) as s:
            rows = s.exec(select(CursorRow).where(CursorRow.pipeline == pipeline)).scalars()
            return {r.stream: Cursor(as_utc(r.modified_at), r.record_id) for r in rows}  # type: ignore[arg-type]

    # -- seen marks (overlap-window de-duplication) ------------------------------------------
    def seen_marks(
        self, pipeline: str, stream: str, record_ids: Sequence[str]
    ) -> dict[str, datetime]:
        c = SeenRow.__table__.c
        rows = self._select_in(
            "seen_marks",
            lambda ids: select(c.record_id, c.modified_at).where(
                c.pipeline == bindparam("pipeline"),
                c.stream == bindparam("stream"),
                c.record_id.in_(ids),
            ),
            {"pipeline": pipeline, "stream": stream},
            list(record_ids),
        )
        return {rid: as_utc(ts) for rid, ts in rows}  # type: ignore[misc]

    def prune_seen(self, pipeline: str, stream: str, older_than: datetime) -> None:
        with Session(self.engine) as s, s.begin():
            s.exec(
                delete(SeenRow).where(  # type: ignore[call-overload]
                    SeenRow.pipeline == pipeline,
                    SeenRow.stream == stream,
                    SeenRow.modified_at < older_than,
                )
            )

    # -- links -------------------------------------------------------------------------------
    def links_for(self, pipeline: str, deal_ids: Iterable[str]) -> dict[str, Link]:
        c = LinkRow.__table__.c
        rows = self._select_in(
            "links_for",
            lambda ids: select(*(c[name] for name in _LINK_FIELDS)).where(
                c.pipeline == bindparam("pipeline"), c.deal_id.in_(ids)
            ),
            {"pipeline": pipeline},
            list(deal_ids),
        )
        return {r[1]: _link_from_values(r) for r in rows}

    def _select_in(self, key: str, build: Any, params: dict[str, Any], ids: list[str]) -> list[Any]:
        """The rows of `build(binds)`, a SELECT matching a column IN the binds, for `ids`
        500 at a time: compiled once and run on the driver (SQLAlchemy's expanding IN, built
        again for each page, cost twice the query). Each chunk is padded with its last id,
        which matches nothing more, to a power of two up to 32, then to a multiple of 50 (a
        CRM page is 100 records): 16 statements serve every page size."""
        out: list[Any] = []
        if not ids:
            return out
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                n = len(chunk)
                size = 1 << (n - 1).bit_length() if n <= 32 else -(-n // 50) * 50
                made = self._statements.get((key, size))
                if made is None:
                    names = tuple(f"id{i}" for i in range(size))
                    stmt = build([bindparam(name) for name in names])
                    made = (DriverStatement.compile(stmt, self.engine.dialect), names)
                    self._statements[(key, size)] = made
                stmt, names = made
                chunk += [chunk[-1]] * (size - len(chunk))
                values = dict(params)
                values.update(zip(names, chunk, strict=True))
                out += stmt.query(conn, values)
        return out

    def link(self, pipeline: str, deal_id: str) -> Link | None:
        return self.links_for(pipeline, [deal_id]).get(deal_id)

    def links_by_project(self, pipeline: str, project_ids: Iterable[str]) -> dict[str, Link]:
        ids = list(project_ids)
        out: dict[str, Link] = {}
        with Session(self.engine) as s:
            for start in range(0, len(ids), 500):
                rows = s.exec(
                    select(LinkRow).where(
                        LinkRow.pipeline == pipeline,
                        LinkRow.project_id.in_(ids[start : start + 500]),  # type: ignore[union-attr]
                    )
                ).scalars()
                out.update({r.project_id: _link(r) for r in rows if r.project_id})
        return out

    def links_due_before(self, pipeline: str, day: str) -> list[Link]:
        """Linked projects with an open milestone due before `day` (they may be at risk)."""
        with Session(self.engine) as s:
            rows = s.exec(
                select(LinkRow).where(
                    LinkRow.pipeline == pipeline,
                    LinkRow.state == "created",
                    LinkRow.next_due_on.is_not(None),  # type: ignore[union-attr]
                    LinkRow.next_due_on < day,  # type: ignore[operator]
                )
            ).scalars()
            return [_link(r) for r in rows]

    def iter_links(self, pipeline: str, state: str | None = "created") -> Iterable[Link]:
        with Session(self.engine) as s:
            q = select(LinkRow).where(LinkRow.pipeline == pipeline)
            if state:
                q = q.where(LinkRow.state == state)
            for row in s.exec(q.order_by(LinkRow.id).execution_options(yield_per=1000)).scalars():
                yield _link(row)

    def link_counts(self, pipeline: str) -> dict[str, int]:
        with Session(self.engine) as s:
            rows = s.exec(
                select(LinkRow.state, func.count())
                .where(LinkRow.pipeline == pipeline)
                .group_by(LinkRow.state)
            ).all()
            return {state: n for state, n in rows}

    def claim(self, pipeline: str, deal_id: str) -> tuple[bool, Link]:
        """Take the deal before creating its project. False (and the row) if already taken."""
        now = utcnow()
        with Session(self.engine) as s:
            try:
                with s.begin():
                    s.add(
                        LinkRow(
                            pipeline=pipeline,
                            deal_id=deal_id,
                            state="pending",
                            created_at=now,
                            updated_at=now,
                        )
                    )
            except IntegrityError:
                existing = self.link(pipeline, deal_id)
                assert existing is not None
                return False, existing
        return True, Link(pipeline, deal_id, "pending", None)

    def claim_many(self, pipeline: str, deal_ids: Sequence[str]) -> set[str]:
        """Take many deals in one statement; returns the ids this call claimed (the others
        were already linked or claimed by someone else)."""
        if not deal_ids:
            return set()
        # Sorted: two runs claiming overlapping pages take the row locks in the same order,
        # so PostgreSQL never has to break a deadlock between them.
        ids = sorted(set(deal_ids))
        now, claimed = utcnow(), set()
        with self.engine.begin() as conn:
            # 200 rows = 800 binds: under every SQLite build's limit (999 before 3.32).
            for start in range(0, len(ids), 200):
                chunk = ids[start : start + 200]
                stmt = self._statements.get(("claim", len(chunk)))
                if stmt is None:
                    stmt = self._claim_statement(len(chunk))
                    self._statements[("claim", len(chunk))] = stmt
                params: dict[str, Any] = {"pipeline": pipeline, "now": now}
                params.update((f"d{i}", d) for i, d in enumerate(chunk))
                claimed.update(r[0] for r in stmt.execute(conn, params))
        return claimed

    def _claim_statement(self, n: int) -> DriverStatement:
        """INSERT of `n` pending links in one multi-row VALUES ... ON CONFLICT DO NOTHING
        RETURNING: only the deal id varies per row (one bind each); the rest are shared
        binds and SQL literals, so a page's claim costs one small parameter tuple."""
        table = LinkRow.__table__
        empty = literal_column("'{}'")  # the JSON columns' empty value: no per-row dump
        shared = {
            "pipeline": bindparam("pipeline", type_=table.c.pipeline.type),
            "state": literal_column("'pending'"),
            "deal_status": literal_column("'won'"),
            "forward_prints": empty,
            "back_prints": empty,
            "milestones": empty,
            "created_at": bindparam("now", type_=table.c.created_at.type),
            "updated_at": bindparam("now", type_=table.c.updated_at.type),
        }
        rows = [
            {**shared, "deal_id": bindparam(f"d{i}", type_=table.c.deal_id.type)} for i in range(n)
        ]
        stmt = (
            self._insert(table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["pipeline", "deal_id"])
            .returning(table.c.deal_id)
        )
        return DriverStatement.compile(stmt, self.engine.dialect)

    def save_link(self, link: Link) -> None:
        """Record a created/adopted project at once, outside the page transaction."""
        with Session(self.engine) as s, s.begin():
            self._update_links(s, [link])

    _LINK_COLUMNS = FORWARD_LINK_COLUMNS + BACK_LINK_COLUMNS

    def _update_links(
        self, s: Session, links: Sequence[Link], columns: tuple[str, ...] = ()
    ) -> None:
        """One executemany for a page's links (Core, not the ORM: this is the hot path)."""
        if not links:
            return
        columns = columns or self._LINK_COLUMNS
        stmt = self._statements.get(("links", columns))
        if stmt is None:
            c = LinkRow.__table__.c
            stmt = self._statements[("links", columns)] = DriverStatement.compile(
                update(LinkRow.__table__)
                .where(c.pipeline == bindparam("k_pipeline"), c.deal_id == bindparam("k_deal"))
                .values(
                    updated_at=bindparam("v_updated_at"),
                    **{col: bindparam(f"v_{col}") for col in columns},
                ),
                self.engine.dialect,
            )
        values = attrgetter("pipeline", "deal_id", *columns)
        stmt.execute_many(
            s.connection(),
            ("k_pipeline", "k_deal", *(f"v_{col}" for col in columns)),
            [values(link) for link in links],
            {"v_updated_at": utcnow()},
        )

    def drop_claim(self, pipeline: str, deal_id: str) -> None:
        """Release a pending claim whose create was refused outright (nothing was created)."""
        with Session(self.engine) as s, s.begin():
            s.exec(
                delete(LinkRow).where(  # type: ignore[call-overload]
                    LinkRow.pipeline == pipeline,
                    LinkRow.deal_id == deal_id,
                    LinkRow.state == "pending",
                )
            )

    # -- the page transaction ----------------------------------------------------------------
    def commit_page(self, page: PageCommit) -> None:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            if page.dropped_claims:
                s.exec(
                    delete(LinkRow).where(  # type: ignore[call-overload]
                        LinkRow.pipeline == page.pipeline,
                        LinkRow.deal_id.in_(page.dropped_claims),  # type: ignore[attr-defined]
                        LinkRow.state == "pending",
                    )
                )
            if page.link_updates:
                self._update_links(s, page.link_updates, page.link_columns)
            if page.seen:
                stmt = self._statements.get("seen")
                if stmt is None:
                    ins = self._insert(SeenRow.__table__)
                    stmt = self._statements["seen"] = ins.on_conflict_do_update(
                        index_elements=["pipeline", "stream", "record_id"],
                        set_={"modified_at": ins.excluded.modified_at},
                    )
                rows = [
                    {
                        "pipeline": page.pipeline,
                        "stream": page.stream,
                        "record_id": rid,
                        "modified_at": ts,
                    }
                    for rid, ts in page.seen
                ]
                s.connection().execute(stmt, rows)
            # A record parked again in this same page keeps its dead letter (and its count).
            resolved = set(page.resolved) - {p.record_id for p in page.parked}
            if resolved:
                self._resolve(
                    s.connection(), page.pipeline, page.dlq_stream or page.stream, resolved
                )
            for p in page.parked:
                self._park(s, page.pipeline, p, now)
            if page.cursor is not None:
                self._write_cursor(s, page.pipeline, page.stream, page.cursor)

    def _resolve(self, conn: Any, pipeline: str, stream: str, record_ids: set[str]) -> None:
        """Clear the dead letters of records applied in this page. Almost always there are
        none: one indexed probe first spares the statement with a parameter per record."""
        probe = self._statements.get("dlq_probe")
        if probe is None:
            c = DeadLetterRow.__table__.c
            where = (c.pipeline == bindparam("pipeline"), c.stream == bindparam("stream"))
            probe = self._statements["dlq_probe"] = select(c.id).where(*where).limit(1)
            self._statements["dlq_delete"] = delete(DeadLetterRow.__table__).where(
                *where, c.record_id.in_(bindparam("ids", expanding=True))
            )
        params = {"pipeline": pipeline, "stream": stream}
        if conn.execute(probe, params).first() is not None:
            conn.execute(self._statements["dlq_delete"], {**params, "ids": sorted(record_ids)})

    def _park(self, s: Session, pipeline: str, p: Parked, now: datetime) -> None:
        existing = s.exec(
            select(DeadLetterRow).where(
                DeadLetterRow.pipeline == pipeline,
                DeadLetterRow.stream == p.stream,
                DeadLetterRow.record_id == p.record_id,
            )
        ).scalar_one_or_none()
        attempts = (existing.attempts + 1) if existing else 1
        next_retry = (
            now + DLQ_BACKOFF[min(attempts - 1, len(DLQ_BACKOFF) - 1)]
            if p.error_kind == "transient"
            else None
        )
        if existing:
            existing.step, existing.error_kind, existing.message = p.step, p.error_kind, p.message
            existing.attempts, existing.last_failed_at = attempts, now
            existing.next_retry_at = next_retry
            s.add(existing)
        else:
            s.add(
                DeadLetterRow(
                    pipeline=pipeline,
                    stream=p.stream,
                    record_id=p.record_id,
                    step=p.step,
                    error_kind=p.error_kind,
                    message=p.message,
                    attempts=1,
                    first_failed_at=now,
                    last_failed_at=now,
                    next_retry_at=next_retry,
                )
            )

    # -- dead letters -----------------------------------------------------------------------
    def dead_letters(
        self, pipeline: str | None = None, *, due_only: bool = False
    ) -> list[DeadLetter]:
        with Session(self.engine) as s:
            q = select(DeadLetterRow)
            if pipeline:
                q = q.where(DeadLetterRow.pipeline == pipeline)
            if due_only:
                q = q.where(
                    and_(
                        DeadLetterRow.next_retry_at.is_not(None),  # type: ignore[union-attr]
                        DeadLetterRow.next_retry_at <= utcnow(),  # type: ignore[operator]
                    )
                )
            return [_dead_letter(r) for r in s.exec(q.order_by(DeadLetterRow.id)).scalars()]

    def dead_letter(self, dl_id: int) -> DeadLetter | None:
        with Session(self.engine) as s:
            row = s.get(DeadLetterRow, dl_id)
            return _dead_letter(row) if row else None

    def drop_dead_letter(self, dl_id: int) -> bool:
        with Session(self.engine) as s, s.begin():
            res = s.exec(delete(DeadLetterRow).where(DeadLetterRow.id == dl_id))  # type: ignore[call-overload]
            return bool(res.rowcount)

    def dead_letter_count(self, pipeline: str) -> int:
        with Session(self.engine) as s:
            return s.exec(
                select(func.count())
                .select_from(DeadLetterRow)
                .where(DeadLetterRow.pipeline == pipeline)
            ).scalar_one()

    # -- runs ---------------------------------------------------------------------------------
    def start_run(self, pipeline: str, kind: str, owner: str) -> int:
        with Session(self.engine) as s, s.begin():
            row = RunRow(pipeline=pipeline, kind=kind, owner=owner, started_at=utcnow())
            s.add(row)
            s.flush()
            return row.id  # type: ignore[return-value]

    def finish_run(self, run_id: int, status: str, counts: dict[str, Any]) -> None:
        with Session(self.engine) as s, s.begin():
            s.exec(
                update(RunRow)  # type: ignore[call-overload]
                .where(RunRow.id == run_id)
                .values(status=status, finished_at=utcnow(), **counts)
            )

    def last_run(self, pipeline: str) -> RunRow | None:
        with Session(self.engine) as s:
            return s.exec(
                select(RunRow)
                .where(RunRow.pipeline == pipeline, RunRow.status != "running")
                .order_by(RunRow.id.desc())  # type: ignore[union-attr]
                .limit(1)
            ).scalar_one_or_none()

    def running(self, pipeline: str) -> RunRow | None:
        with Session(self.engine) as s:
            return (
                s.exec(
                    select(RunRow).where(RunRow.pipeline == pipeline, RunRow.status == "running")
                )
                .scalars()
                .first()
            )

    def mark_abandoned_runs(self, pipeline: str) -> None:
        """Runs left `running` by a killed process, found once we hold the lease."""
        with Session(self.engine) as s, s.begin():
            s.exec(
                update(RunRow)  # type: ignore[call-overload]
                .where(RunRow.pipeline == pipeline, RunRow.status == "running")
                .values(status="interrupted", finished_at=utcnow())
            )

    # -- leases -------------------------------------------------------------------------------
    # On PostgreSQL every lease decision uses the database's clock, so replicas on machines
    # whose clocks disagree still agree on when a lease has expired.
    def _now(self, s: Session) -> datetime:
        if self._dialect == "postgresql":
            return as_utc(s.exec(select(func.now())).scalar_one())  # type: ignore[call-overload,return-value]
        return utcnow()

    def acquire_lease(self, pipeline: str, owner: str, ttl: timedelta) -> bool:
        """Take the pipeline's lease if it is free, expired, or already ours (then renew it).

        One statement: INSERT ... ON CONFLICT DO UPDATE ... WHERE (expired or ours) RETURNING.
        PostgreSQL locks the conflicting row, re-checks the WHERE on its latest version and
        returns a row only when this statement inserted or updated it, so of any number of
        concurrent acquirers exactly one wins; SQLite serialises writers outright.
        """
        table = LeaseRow.__table__
        with Session(self.engine) as s, s.begin():
            now = self._now(s)
            stmt = self._insert(table).values(pipeline=pipeline, owner=owner, expires_at=now + ttl)
            stmt = stmt.on_conflict_do_update(
                index_elements=["pipeline"],
                set_={"owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at},
                where=or_(table.c.expires_at < now, table.c.owner == owner),  # type: ignore[attr-defined]
            ).returning(table.c.owner)  # type: ignore[attr-defined]
            won = s.exec(stmt).scalar_one_or_none()  # type: ignore[call-overload]
            return won == owner

    def renew_lease(self, pipeline: str, owner: str, ttl: timedelta) -> bool:
        """Extend a lease we hold. False when it is gone or another owner has it (lost)."""
        with Session(self.engine) as s, s.begin():
            now = self._now(s)
            res = s.exec(
                update(LeaseRow)  # type: ignore[call-overload]
                .where(LeaseRow.pipeline == pipeline, LeaseRow.owner == owner)
                .values(expires_at=now + ttl)
            )
            return bool(res.rowcount)

    def take_over_lease(self, pipeline: str, dead_owner: str, owner: str, ttl: timedelta) -> bool:
        """Replace a holder known to be dead (compare-and-set on the owner)."""
        with Session(self.engine) as s, s.begin():
            res = s.exec(
                update(LeaseRow)  # type: ignore[call-overload]
                .where(LeaseRow.pipeline == pipeline, LeaseRow.owner == dead_owner)
                .values(owner=owner, expires_at=self._now(s) + ttl)
            )
            return bool(res.rowcount)

    def release_lease(self, pipeline: str, owner: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.exec(
                delete(LeaseRow).where(LeaseRow.pipeline == pipeline, LeaseRow.owner == owner)  # type: ignore[call-overload]
            )

    def lease(self, pipeline: str) -> LeaseRow | None:
        with Session(self.engine) as s:
            row = s.get(LeaseRow, pipeline)
            if row and as_utc(row.expires_at) > self._now(s):  # type: ignore[operator]
                return row
            return None

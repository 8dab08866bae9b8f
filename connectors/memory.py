"""In-memory CRM and project tool: the engine's test doubles and the benchmark's baseline.

They implement the same interfaces as the vendor connectors, with an optional fault hook
called before (and, for "apply then fail", after) each operation.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from connectors.base import (
    CRM,
    Deal,
    DealStamp,
    DealStatus,
    DealUpdate,
    Milestone,
    ProjectRef,
    ProjectSpec,
    ProjectTool,
    WriteOutcome,
)
from connectors.errors import ConnectorError, ErrorKind

# fault(op) is called before an operation; it may raise a ConnectorError, or return
# "after" to have the operation applied and then fail (the response is lost).
FaultHook = Callable[[str], str | None]


def transient(system: str, what: str = "injected") -> ConnectorError:
    return ConnectorError(system, ErrorKind.TRANSIENT, what, status=503)


class MemoryCRM(CRM):
    kind = "memory-crm"

    def __init__(
        self,
        name: str = "crm",
        page_size: int = 100,
        fault: FaultHook | None = None,
        clock: Callable[[], datetime] | None = None,
    ):
        super().__init__()
        self.clock = clock  # the system's clock, reported as `read_clock` when set
        self.name = name
        self.page_size = page_size
        self.deals: dict[str, Deal] = {}
        self.fault = fault
        self.writes: list[DealUpdate] = []
        self.timeline: list[tuple[str, str]] = []
        self.refuse: set[str] = set()  # deal ids whose writes fail validation

    def put(self, deal: Deal) -> None:
        self.deals[deal.id] = deal

    def _op(self, op: str) -> str | None:
        self.calls[op] += 1
        return self.fault(op) if self.fault else None

    def read_changed_deals(
        self, since: datetime | None, fields: Sequence[str], until: datetime | None = None
    ) -> Iterator[list[Deal]]:
        self.read_clock = self.clock() if self.clock else None
        ordered = sorted(self.deals.values(), key=lambda d: (d.modified_at, d.id))
        chosen = [
            d
            for d in ordered
            if (since is None or d.modified_at >= since)
            and (until is None or d.modified_at <= until)
        ]
        for i in range(0, max(len(chosen), 1), self.page_size):
            self._op("read")
            page = chosen[i : i + self.page_size]
            if page:
                yield [Deal(d.id, d.modified_at, d.status, dict(d.properties), d.url) for d in page]

    def get_deals(self, deal_ids: Sequence[str], fields: Sequence[str]) -> list[Deal]:
        self._op("get")
        return [self.deals[i] for i in deal_ids if i in self.deals]

    def write_deal_fields(self, updates: Sequence[DealUpdate]) -> list[WriteOutcome]:
        out = []
        for start in range(0, len(updates), self.write_batch_size):
            out += self._write_batch(updates[start : start + self.write_batch_size])
        return out

    def _write_batch(self, updates: Sequence[DealUpdate]) -> list[WriteOutcome]:
        after = self._op("write")
        out = []
        for u in updates:
            if u.deal_id in self.refuse:
                out.append(WriteOutcome(u.deal_id, False, "refused by validation rule"))
                continue
            if u.deal_id not in self.deals:
                out.append(WriteOutcome(u.deal_id, False, "no such deal"))
                continue
            deal = self.deals[u.deal_id]
            deal.properties.update(u.fields)
            deal.modified_at = datetime.now(UTC)  # as the vendors do: writes are changes too
            self.writes.append(u)
            out.append(WriteOutcome(u.deal_id, True))
        if after == "after":
            raise transient(self.name, "write applied, response lost")
        return out

    def add_timeline_entry(self, deal_id: str, text: str) -> None:
        self._op("timeline")
        self.timeline.append((deal_id, text))

    def field_names(self) -> set[str]:
        return set(itertools.chain.from_iterable(d.properties for d in self.deals.values()))

    def check(self) -> str:
        return "memory CRM"


@dataclass
class MemoryProject:
    ref: ProjectRef
    stamp: str
    spec: ProjectSpec
    archived: bool = False
    comments: list[str] = field(default_factory=list)


class MemoryProjects(ProjectTool):
    kind = "memory-tool"

    def __init__(self, name: str = "tool", fault: FaultHook | None = None) -> None:
        super().__init__()
        self.name = name
        self.page_size = 100
        self.projects: dict[str, MemoryProject] = {}
        self.milestones: dict[str, Milestone] = {}
        self.fault = fault
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the engine creates from several threads at once

    def _op(self, op: str) -> str | None:
        with self._lock:
            self.calls[op] += 1
        return self.fault(op) if self.fault else None

    def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
        after = self._op("create")
        with self._lock:
            pid = f"p{next(self._ids)}"
            ref = ProjectRef(pid, spec.name, f"memory://{pid}")
            self.projects[pid] = MemoryProject(ref, stamp.marker, spec)
        now = datetime.now(UTC)
        for i, m in enumerate(spec.milestones):
            mid = f"{pid}-m{i}"
            self.milestones[mid] = Milestone(mid, pid, m.name, False, None, m.due_on, now)
        if after == "after":
            raise transient(self.name, "create applied, response lost")
        return ref

    def find_project(self, stamp: DealStamp, name: str | None = None) -> ProjectRef | None:
        self._op("find")
        for p in self.projects.values():
            if p.stamp == stamp.marker:
                return p.ref
        return None

    def ensure_stamp(self, project_id: str, stamp: DealStamp) -> None:
        self._op("stamp")
        self.projects[project_id].stamp = stamp.marker

    def update_project(self, project_id: str, spec: ProjectSpec) -> None:
        after = self._op("update")
        p = self.projects.get(project_id)
        if p is None:
            raise ConnectorError(self.name, ErrorKind.RECORD, "no such project", status=404)
        p.spec.fields.update(spec.fields)
        p.spec.custom_fields.update(spec.custom_fields)
        if after == "after":
            raise transient(self.name, "update applied, response lost")

    def complete_milestone(self, milestone_id: str, when: datetime, done: bool = True) -> None:
        m = self.milestones[milestone_id]
        m.completed, m.completed_at, m.modified_at = done, (when if done else None), when

    def read_milestone_changes(
        self,
        since: datetime | None,
        project_ids: Sequence[str],
        settled_before: datetime | None = None,
    ) -> Iterator[list[Milestone]]:
        chosen = sorted(
            (
                m
                for m in list(self.milestones.values())  # a snapshot: creates run meanwhile
                if (since is None or m.modified_at >= since)
                and (settled_before is None or m.modified_at < settled_before)
            ),
            key=lambda m: (m.modified_at, m.id),
        )
        for i in range(0, max(len(chosen), 1), self.page_size):
            self._op("milestones")
            if chosen[i : i + self.page_size]:
                yield [copy.copy(m) for m in chosen[i : i + self.page_size]]

    def server_now(self) -> datetime | None:
        return datetime.now(UTC)  # the clock milestones are stamped with

    def comment_on_project(self, project_id: str, text: str) -> None:
        self._op("comment")
        self.projects[project_id].comments.append(text)

    def archive_project(self, project_id: str) -> None:
        self._op("archive")
        self.projects[project_id].archived = True

    def projects_for(self, deal_id: str, crm_kind: str = MemoryCRM.kind) -> list[MemoryProject]:
        marker = DealStamp(crm_kind, deal_id).marker
        return [p for p in self.projects.values() if p.stamp == marker]

    def check(self) -> str:
        return "memory project tool"


def won(deal_id: str, when: datetime, **props: object) -> Deal:
    return Deal(deal_id, when, DealStatus.WON, {"dealname": f"Deal {deal_id}", **props})

"""The two interfaces the engine speaks to (a CRM, a project tool) and the records they exchange.

Everything the engine knows of a vendor passes through these types; a fifth system is a new
module implementing one of the two classes, registered in `connectors.registry`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, ClassVar


class DealStatus(enum.StrEnum):
    OPEN = "open"
    WON = "won"
    LOST = "lost"
    DELETED = "deleted"


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in a change stream: the pair (modified time, record id), compared as a pair."""

    modified_at: datetime
    record_id: str

    def to_text(self) -> str:
        return f"{self.modified_at.isoformat()}|{self.record_id}"

    @classmethod
    def from_text(cls, text: str) -> Cursor:
        when, _, rid = text.partition("|")
        return cls(datetime.fromisoformat(when), rid)


@dataclass
class Deal:
    """A CRM deal as the engine sees it: id, change time, won/lost/open, and its raw fields."""

    id: str
    modified_at: datetime
    status: DealStatus
    properties: dict[str, Any]
    url: str | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.modified_at, self.id)


@dataclass(frozen=True)
class DealStamp:
    """What identifies a deal's project in the project tool, so it can be found again."""

    crm: str
    deal_id: str

    @property
    def marker(self) -> str:
        return f"handoff:{self.crm}:{self.deal_id}"


@dataclass
class MilestoneSpec:
    name: str
    due_on: date | None = None
    section: str | None = None


@dataclass
class ProjectSpec:
    """What the mapping produced for one deal: the project to create (or keep in sync)."""

    name: str
    template: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    custom_fields: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    milestones: list[MilestoneSpec] = field(default_factory=list)


@dataclass
class ProjectRef:
    id: str
    name: str
    url: str | None = None


@dataclass
class Milestone:
    """One milestone of a linked project as the project tool reports it."""

    id: str
    project_id: str
    name: str
    completed: bool
    completed_at: datetime | None
    due_on: date | None
    modified_at: datetime


@dataclass
class DealUpdate:
    deal_id: str
    fields: dict[str, Any]


@dataclass
class WriteOutcome:
    """Per-record result of a batch write: success, or the vendor's reason for refusing it."""

    record_id: str
    ok: bool
    error: str | None = None


class Connector(ABC):
    """What every connection has: a kind, an API-call counter, a reachability check."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        # The system's own clock when the latest change read (`read_changed_deals`,
        # `read_milestone_changes`) made its first request, from the response's `Date` header
        # less a second (the header has whole seconds), or None when the system sent none. A
        # read that went to its end has seen every change made before then that the system's
        # search could see, so the engine's next read may begin an overlap before this time
        # rather than before the newest record it saw: a quiet pipeline stops re-reading its
        # own last writes. A change read sets it to None first, then calls `_note_read_clock`
        # after each of its requests.
        self.read_clock: datetime | None = None

    def _note_read_clock(self, clock: datetime | None) -> None:
        """Keep the clock of the change read's first response (later ones are ignored)."""
        if self.read_clock is None:
            self.read_clock = clock

    @property
    def api_calls(self) -> int:
        return sum(self.calls.values())

    @abstractmethod
    def check(self) -> str:
        """Reach the system and authenticate; return who we are (no secrets)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release HTTP connections."""


class CRM(Connector):
    """A source of deals."""

    write_batch_size: ClassVar[int] = 100  # deals per vendor batch write

    @abstractmethod
    def read_changed_deals(
        self, since: datetime | None, fields: Sequence[str], until: datetime | None = None
    ) -> Iterator[list[Deal]]:
        """Pages of deals modified at or after `since` (inclusive), oldest first.

        Order within equal timestamps is whatever the vendor gives; each deal appears once
        per call even across the vendor's result ceilings.
        """

    @abstractmethod
    def get_deals(self, deal_ids: Sequence[str], fields: Sequence[str]) -> list[Deal]:
        """The current state of these deals (batch reads where the vendor has them)."""

    @abstractmethod
    def write_deal_fields(self, updates: Sequence[DealUpdate]) -> list[WriteOutcome]:
        """Write fields onto deals in as few calls as the vendor allows."""

    @abstractmethod
    def field_names(self) -> set[str]:
        """Every field/property name deals have in this CRM."""

    def add_timeline_entry(self, deal_id: str, text: str) -> None:
        raise NotImplementedError(f"{self.kind} has no timeline entries yet")


class ProjectTool(Connector):
    """A destination for projects."""

    @abstractmethod
    def create_project(self, spec: ProjectSpec, stamp: DealStamp) -> ProjectRef:
        """Create the project, stamped so `find_project(stamp)` finds it again."""

    @abstractmethod
    def find_project(self, stamp: DealStamp, name: str | None = None) -> ProjectRef | None:
        """The project carrying this stamp, if one exists (archived ones included).

        With `name`, a project of exactly that name and no stamp at all is adopted (and
        stamped): a create that died before its stamp was written.
        """

    @abstractmethod
    def ensure_stamp(self, project_id: str, stamp: DealStamp) -> None:
        """Make sure the project carries the stamp (a create cut short before stamping)."""

    @abstractmethod
    def update_project(self, project_id: str, spec: ProjectSpec) -> None:
        """Apply the kept-in-sync parts of `spec` (fields/custom fields present) to the project."""

    @abstractmethod
    def read_milestone_changes(
        self,
        since: datetime | None,
        project_ids: Sequence[str],
        settled_before: datetime | None = None,
    ) -> Iterator[list[Milestone]]:
        """Pages of milestones modified at or after `since`, oldest first.

        `project_ids` are the linked projects; a tool that can read changes workspace-wide
        does so (reads in proportion to what changed) and the engine ignores the rest.

        With `settled_before` (on the tool's clock, see `server_now`), a *settled read*: only
        changes made before then, a time the engine chose old enough that nothing changed
        before it can still appear later. A tool without a workspace-wide change feed yields
        nothing for a settled read (a read per linked project would cost more than waiting
        for the run's last read).
        """

    def server_now(self) -> datetime | None:
        """The tool's own clock now, estimated from its latest answer (never ahead of it);
        None before the first answer that carried one."""
        return None

    def comment_on_project(self, project_id: str, text: str) -> None:
        raise NotImplementedError(f"{self.kind} cannot comment on projects yet")

    def archive_project(self, project_id: str) -> None:
        raise NotImplementedError(f"{self.kind} cannot archive projects yet")

    def create_cost(self, spec: ProjectSpec) -> int:
        """API calls `create_project(spec)` is expected to make (for dry-run plans)."""
        return 1

    def update_cost(self, spec: ProjectSpec) -> int:
        return 1

"""The field-map file schema (pydantic): how a deal becomes a project, and progress a deal.

A target field is filled by exactly one of `source` (copy a deal field), `template` (a Jinja2
text template) or `value` (a constant), then optionally passed through named `transforms`, a
value `map`, and a `type` coercion. A bare string is shorthand: `"{{ ... }}"` is a template,
anything else is the name of a source field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mappings.transforms import COERCIONS, TRANSFORMS, parse_transform

FieldType = Literal["string", "number", "integer", "date", "datetime", "bool"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldRule(Strict):
    source: str | None = Field(None, description="deal field to copy")
    template: str | None = Field(None, description="Jinja2 text template")
    value: Any = Field(None, description="a constant")
    transforms: list[str] = Field(default_factory=list)
    map: dict[str, Any] | None = Field(None, description="value map: source value -> target")
    default: Any = Field(None, description="used when the value is empty or not in the map")
    type: FieldType | None = None
    required: bool = False
    sync: bool = Field(False, description="keep this field in sync after the project exists")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"template": data} if "{{" in data or "{%" in data else {"source": data}
        return data

    @model_validator(mode="after")
    def _one_origin(self) -> FieldRule:
        given = [k for k in ("source", "template", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of source, template or value"
                + (f" (found {', '.join(given)})" if given else "")
            )
        return self

    @field_validator("transforms")
    @classmethod
    def _known_transforms(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            name, arg = parse_transform(spec)
            if name not in TRANSFORMS:
                known = ", ".join(sorted(TRANSFORMS))
                raise ValueError(f"unknown transform '{name}' (known: {known})")
            if TRANSFORMS[name][1] and arg is None and name in ("truncate", "add_days"):
                raise ValueError(f"transform '{name}' needs an argument, e.g. '{name}:30'")
        return specs

    @field_validator("map")
    @classmethod
    def _map_keys_text(cls, m: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if m is None else {str(k): v for k, v in m.items()}


assert set(FieldType.__args__) == set(COERCIONS)  # type: ignore[attr-defined]


class MilestoneRule(Strict):
    name: str = Field(description="milestone name (may be a template)")
    due_in_days: int | None = Field(None, description="days after `milestones_start`")
    section: str | None = None


class ProjectMap(Strict):
    name: FieldRule
    template: str | None = Field(
        None, description="template name or id in the project tool; omit to create plainly"
    )
    fields: dict[str, FieldRule] = Field(default_factory=dict)
    custom_fields: dict[str, FieldRule] = Field(default_factory=dict)
    sections: list[str] = Field(default_factory=list)
    milestones: list[MilestoneRule] = Field(default_factory=list)
    milestones_start: FieldRule | None = Field(
        None, description="date milestone due dates count from (default: today)"
    )


class UnwonRule(Strict):
    action: Literal["none", "comment", "archive"] = "comment"
    text: str = "Handoff: deal {{ deal.id }} is no longer won (now {{ deal.status }})."


class TimelineRule(Strict):
    on: Literal["milestone_completed"] = "milestone_completed"
    text: str = "Milestone completed: {{ progress.last_milestone }}"


class FieldMap(Strict):
    version: Literal[1] = 1
    description: str | None = None
    source: Literal["hubspot", "salesforce"] | None = Field(
        None, description="the CRM this map reads (checked against the pipeline)"
    )
    target: Literal["asana", "clickup"] | None = None
    read_fields: list[str] = Field(
        default_factory=list, description="extra deal fields to fetch besides those referenced"
    )
    project: ProjectMap
    on_unwon: UnwonRule = Field(default_factory=UnwonRule)
    progress: dict[str, FieldRule] = Field(
        default_factory=dict, description="deal field -> rule over progress values"
    )
    timeline: TimelineRule | None = None

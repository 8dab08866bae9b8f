"""Load a field-map file, compile its templates once, and apply it to records (pure functions).

`load_field_map` reports every problem in the file with its line; `map_deal` turns one deal
into a project spec plus the kept-in-sync values, collecting every error for that record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.utils import concat
from pydantic import ValidationError

from connectors.base import Deal, MilestoneSpec, ProjectSpec
from mappings.problems import Problem, ProblemsFound, problems_from_validation
from mappings.schema import FieldMap, FieldRule
from mappings.transforms import (
    COERCIONS,
    TEMPLATE_NAMES,
    CoercionError,
    RecordView,
    apply_transform,
    make_environment,
)
from mappings.yaml_source import LocatedYaml, load_yaml

_ENV = make_environment()
PRESET_PREFIX = "preset:"


@dataclass
class MappingError:
    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f" — {self.fix}" if self.fix else "")


@dataclass
class CompiledFieldMap:
    path: str
    spec: FieldMap
    templates: dict[str, Template]  # template text -> compiled
    deal_fields: list[str]  # every deal field the map reads
    # Texts whose only name is `today` (a due date 90 days out): rendered once per day, not
    # once per deal.
    daily: set[str] = field(default_factory=set)
    _daily_cache: dict[tuple[Any, Any], Any] = field(default_factory=dict, repr=False)

    def template(self, text: str) -> Template:
        return self.templates[text]

    def render(self, text: str, context: dict[str, Any]) -> str:
        if text in self.daily:
            return self.once_a_day(text, context, lambda: self._render(text, context))
        return self._render(text, context)

    def once_a_day(self, key: Any, context: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """`compute()` for `key`, cached for the context's `today`."""
        full = (key, context.get("today"))
        cached = self._daily_cache.get(full)
        if cached is None:
            if len(self._daily_cache) > 256:  # a daemon running for months
                self._daily_cache.clear()
            cached = self._daily_cache[full] = compute()
        return cached

    def _render(self, text: str, context: dict[str, Any]) -> str:
        """`Template.render`, minus the per-call merge of Jinja's globals into the context
        (the load-time check admits only TEMPLATE_NAMES, so no template can reach them):
        a third of a render's cost on the backfill hot path."""
        t = self.templates[text]
        return concat(t.root_render_func(Context(_ENV, context, t.name, t.blocks))).strip()


@dataclass
class ForwardResult:
    spec: ProjectSpec | None
    synced: dict[str, Any] = field(default_factory=dict)  # "fields.x" / "custom_fields.y"
    errors: list[MappingError] = field(default_factory=list)


def preset_path(name: str) -> Path:
    return Path(str(resources.files("mappings") / "presets" / f"{name}.yaml"))


def resolve_mapping_path(ref: str, base_dir: Path) -> Path:
    if ref.startswith(PRESET_PREFIX):
        return preset_path(ref.removeprefix(PRESET_PREFIX))
    p = Path(ref)
    return p if p.is_absolute() else base_dir / p


def _referenced_deal_fields(ast: nodes.Template) -> set[str]:
    out = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if isinstance(target, nodes.Name) and target.name == "deal":
            if isinstance(node, nodes.Getattr):
                out.add(node.attr)
            elif isinstance(node.arg, nodes.Const):
                out.add(str(node.arg.value))
    return out


def _template_texts(fm: FieldMap) -> list[tuple[tuple[Any, ...], str]]:
    """Every Jinja2 text in the map with the YAML location it came from."""
    found: list[tuple[tuple[Any, ...], str]] = []

    def rule(loc: tuple[Any, ...], r: FieldRule | None) -> None:
        if r is not None and r.template is not None:
            found.append((loc, r.template))

    p = fm.project
    rule(("project", "name"), p.name)
    rule(("project", "milestones_start"), p.milestones_start)
    for k, r in p.fields.items():
        rule(("project", "fields", k), r)
    for k, r in p.custom_fields.items():
        rule(("project", "custom_fields", k), r)
    for i, m in enumerate(p.milestones):
        found.append((("project", "milestones", i, "name"), m.name))
    for k, r in fm.progress.items():
        rule(("progress", k), r)
    found.append((("on_unwon", "text"), fm.on_unwon.text))
    if fm.timeline:
        found.append((("timeline", "text"), fm.timeline.text))
    return found


def _source_fields(fm: FieldMap) -> set[str]:
    rules = [fm.project.name, *fm.project.fields.values(), *fm.project.custom_fields.values()]
    if fm.project.milestones_start:
        rules.append(fm.project.milestones_start)
    return {r.source for r in rules if r.source}


def compile_field_map(doc: LocatedYaml) -> tuple[CompiledFieldMap | None, list[Problem]]:
    """Validate and compile a parsed mapping file; every problem at once."""
    try:
        spec = FieldMap.model_validate(doc.data)
    except ValidationError as exc:
        return None, problems_from_validation(exc, doc, FieldMap)
    problems: list[Problem] = []
    templates: dict[str, Template] = {}
    daily: set[str] = set()
    referenced = set(_source_fields(spec)) | set(spec.read_fields)
    for loc, text in _template_texts(spec):
        rule_loc = loc + ("template",) if loc[-1] != "name" or loc[1] != "milestones" else loc
        try:
            ast = _ENV.parse(text)
        except TemplateSyntaxError as exc:
            base = doc.value_line(rule_loc) or doc.line_of(loc) or 1
            problems.append(
                Problem(
                    doc.path,
                    base + max(0, (exc.lineno or 1) - 1),
                    ".".join(str(p) for p in loc),
                    f"template syntax error: {exc.message}",
                    "close every {{ }} and {% %}; filters are written {{ value | filter }}",
                )
            )
            continue
        names = meta.find_undeclared_variables(ast)
        unknown = names - TEMPLATE_NAMES
        if unknown:
            problems.append(
                Problem(
                    doc.path,
                    doc.value_line(rule_loc) or doc.line_of(loc),
                    ".".join(str(p) for p in loc),
                    f"template uses unknown name(s): {', '.join(sorted(unknown))}",
                    "templates can use deal.<field>, progress.<value>, today and now",
                )
            )
            continue
        referenced |= _referenced_deal_fields(ast)
        templates[text] = _ENV.from_string(text)
        if names <= {"today"}:
            daily.add(text)
    # Fields every deal carries without asking the CRM for them.
    referenced -= {"id", "status", "url", "modified_at"}
    # The map is returned even with template problems, so callers can check the rest too.
    return CompiledFieldMap(doc.path, spec, templates, sorted(referenced), daily), problems


def load_field_map(path: str | Path) -> CompiledFieldMap:
    doc = load_yaml(path)
    compiled, problems = compile_field_map(doc)
    if problems or compiled is None:
        raise ProblemsFound(problems)
    return compiled


# -- applying a map ------------------------------------------------------------------------


def deal_context(deal: Deal) -> dict[str, Any]:
    view = RecordView(deal.properties)  # its fields, plus id/status/url/modified_at
    view.update(
        id=deal.id,
        status=str(deal.status),
        url=deal.url or "",
        modified_at=deal.modified_at.isoformat(),
    )
    return {"deal": view}


def _empty(value: Any) -> bool:
    return value is None or value == ""


def evaluate(
    cm: CompiledFieldMap, name: str, rule: FieldRule, context: dict[str, Any], source: dict
) -> tuple[Any, MappingError | None]:
    """One target field's value, or the reason it cannot be computed."""
    if rule.template is not None and rule.source is None and rule.template in cm.daily:
        # The same all day for every record (a due date 90 days out): computed once.
        return cm.once_a_day(id(rule), context, lambda: _evaluate(cm, name, rule, context, source))
    return _evaluate(cm, name, rule, context, source)


def _evaluate(
    cm: CompiledFieldMap, name: str, rule: FieldRule, context: dict[str, Any], source: dict
) -> tuple[Any, MappingError | None]:
    try:
        if rule.source is not None:
            value = source.get(rule.source)
        elif rule.template is not None:
            value = cm.render(rule.template, context)
        else:
            value = rule.value
        if not _empty(value):
            for t in rule.transforms:
                value = apply_transform(t, value)
        if rule.map is not None and not _empty(value):
            key = str(value)
            if key in rule.map:
                value = rule.map[key]
            elif rule.default is not None:
                value = rule.default
            else:
                return None, MappingError(
                    name,
                    f"value {key!r} is not in the value map",
                    f"add {key!r} to the map or give the field a default",
                )
        if _empty(value) and rule.default is not None:
            value = rule.default
        if _empty(value):
            if rule.required:
                what = f"deal field '{rule.source}'" if rule.source else "the result"
                return None, MappingError(
                    name,
                    f"required, but {what} is empty",
                    "fill it in the CRM, or give the field a default",
                )
            return None, None
        if rule.type:
            value = COERCIONS[rule.type](value)
        return value, None
    except UndefinedError as exc:
        return None, MappingError(
            name,
            f"template refers to something the record lacks: {exc.message}",
            "fix the field name, or guard it with | default('')",
        )
    except CoercionError as exc:
        return None, MappingError(name, f"cannot convert to {rule.type}: {exc}", "")
    except SecurityError as exc:
        return None, MappingError(name, f"template not allowed: {exc}", "")
    except (TypeError, ValueError, ArithmeticError) as exc:
        return None, MappingError(name, f"{type(exc).__name__}: {exc}", "")


def map_deal(cm: CompiledFieldMap, deal: Deal, today: date | None = None) -> ForwardResult:
    """Deal -> project spec (pure: no I/O). Every error for the record is collected."""
    today = today or datetime.now(UTC).date()
    p = cm.spec.project
    context = {**deal_context(deal), "today": today, "now": datetime.now(UTC)}
    source = context["deal"]
    errors: list[MappingError] = []
    synced: dict[str, Any] = {}

    name, err = evaluate(cm, "project.name", p.name, context, source)
    if err:
        errors.append(err)
    elif _empty(name):
        errors.append(MappingError("project.name", "is empty", "make it required or templated"))

    def group(label: str, rules: dict[str, FieldRule]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, rule in rules.items():
            value, e = evaluate(cm, f"project.{label}.{key}", rule, context, source)
            if e:
                errors.append(e)
                continue
            if value is not None:
                out[key] = value
            if rule.sync:
                synced[f"{label}.{key}"] = value
        return out

    fields = group("fields", p.fields)
    custom = group("custom_fields", p.custom_fields)

    start: date = today
    if p.milestones_start is not None:
        value, e = evaluate(cm, "project.milestones_start", p.milestones_start, context, source)
        if e:
            errors.append(e)
        elif value is not None:
            start = COERCIONS["date"](value)
    milestones = []
    for i, m in enumerate(p.milestones):
        try:
            mname = cm.render(m.name, context)
        except UndefinedError as exc:
            errors.append(MappingError(f"project.milestones[{i}].name", exc.message or ""))
            continue
        due = start + timedelta(days=m.due_in_days) if m.due_in_days is not None else None
        milestones.append(MilestoneSpec(mname, due, m.section))

    if errors:
        return ForwardResult(None, synced, errors)
    spec = ProjectSpec(
        name=str(name),
        template=p.template,
        fields=fields,
        custom_fields=custom,
        sections=list(p.sections),
        milestones=milestones,
    )
    return ForwardResult(spec, synced, [])


def render_text(cm: CompiledFieldMap, text: str, context: dict[str, Any]) -> str:
    return cm.render(text, context)

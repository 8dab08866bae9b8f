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
from mappings.fast_render import compile_fast
from mappings.problems import Problem, ProblemsFound, problems_from_validation
from mappings.schema import FieldMap, FieldRule
from mappings.transforms import (
    COERCIONS,
    DICT_NAMES,
    TEMPLATE_NAMES,
    CoercionError,
    RecordView,
    apply_transform,
    make_environment,
)
from mappings.yaml_source import LocatedYaml, load_yaml

_ENV = make_environment()
PRESET_PREFIX = "preset:"


@dataclass(frozen=True, slots=True)
class _Rule:
    """A FieldRule's settings as slots, for `_evaluate` on the hot path: it reads half a
    dozen for each field of every deal, and a pydantic model's attribute costs several times
    a slot's. Read the same way, so `evaluate` takes either."""

    source: str | None
    template: str | None
    value: Any
    transforms: list[str]
    map: dict[str, Any] | None
    default: Any
    type: str | None
    required: bool

    @classmethod
    def of(cls, r: FieldRule) -> _Rule:
        return cls(
            r.source, r.template, r.value, r.transforms, r.map, r.default, r.type, r.required
        )


# A project field for `map_deal`: (key, rule, name in errors, kept-in-sync key or None, daily).
_Target = tuple[str, _Rule, str, str | None, bool]


@dataclass(frozen=True)
class _Plan:
    """The project part of a map as `map_deal` applies it, with the names its errors and
    kept-in-sync values use: made once per map, not once per deal."""

    name: _Rule
    fields: list[_Target]
    custom_fields: list[_Target]
    milestones_start: _Rule | None
    milestones: list[Any]  # MilestoneRule
    template: str | None
    sections: list[str]


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
    # template text -> its fast render (mappings.fast_render), for the texts it covers
    fast: dict[str, Callable[[dict[str, Any]], str]] = field(default_factory=dict, repr=False)
    # Whether a template or a rule may read the deal's `modified_at` / a template reads `now`:
    # `map_deal` leaves out of the context what none of them can read (see _uses_deal_whole).
    reads_modified_at: bool = True
    uses_now: bool = True
    _daily_cache: dict[tuple[Any, Any], Any] = field(default_factory=dict, repr=False)
    _plan: _Plan | None = field(default=None, repr=False)

    def plan(self) -> _Plan:
        if self._plan is None:
            p = self.spec.project
            self._plan = _Plan(
                _Rule.of(p.name),
                [self._target("fields", k, r) for k, r in p.fields.items()],
                [self._target("custom_fields", k, r) for k, r in p.custom_fields.items()],
                _Rule.of(p.milestones_start) if p.milestones_start is not None else None,
                list(p.milestones),
                p.template,
                list(p.sections),
            )
        return self._plan

    def _target(self, label: str, key: str, rule: FieldRule) -> _Target:
        daily = self.is_daily(rule)
        synced = f"{label}.{key}" if rule.sync else None
        return key, _Rule.of(rule), f"project.{label}.{key}", synced, daily

    def template(self, text: str) -> Template:
        return self.templates[text]

    def render(self, text: str, context: dict[str, Any]) -> str:
        if text in self.daily:
            return self.once_a_day(text, context, self._render, text, context)
        return self._render(text, context)

    def is_daily(self, rule: FieldRule | _Rule) -> bool:
        """A rule whose value is a template of `today` alone (a due date 90 days out): the
        same all day for every record, so worked out once a day."""
        return rule.template is not None and rule.source is None and rule.template in self.daily

    def once_a_day(
        self, key: Any, context: dict[str, Any], compute: Callable[..., Any], *args: Any
    ) -> Any:
        """`compute(*args)` for `key`, cached for the context's `today` (the arguments, not a
        closure: this is asked once for every record)."""
        full = (key, context.get("today"))
        cached = self._daily_cache.get(full)
        if cached is None:
            if len(self._daily_cache) > 256:  # a daemon running for months
                self._daily_cache.clear()
            cached = self._daily_cache[full] = compute(*args)
        return cached

    def _render(self, text: str, context: dict[str, Any]) -> str:
        """`Template.render`, minus the per-call merge of Jinja's globals into the context
        (the load-time check admits only TEMPLATE_NAMES, so no template can reach them):
        a third of a render's cost on the backfill hot path. A template the fast render
        covers is rendered by it, unless it meets anything unusual: Jinja then renders it as
        before, and gives the same text or raises the same error."""
        fast = self.fast.get(text)
        if fast is not None:
            try:
                return fast(context)
            except Exception:
                pass  # Jinja's render below decides, as it always did
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


def _uses_deal_whole(ast: nodes.Template) -> bool:
    """Whether the template uses `deal` other than to read a field by its name (`deal.x`,
    `deal['x']`): `deal.items()`, `deal | tojson` or `{% set d = deal %}` may read any."""
    by_name = {
        id(node.node)
        for node in ast.find_all((nodes.Getattr, nodes.Getitem))
        if isinstance(node.node, nodes.Name)
        and (
            node.attr not in DICT_NAMES
            if isinstance(node, nodes.Getattr)
            else isinstance(node.arg, nodes.Const)
        )
    }
    return any(id(n) not in by_name for n in ast.find_all(nodes.Name) if n.name == "deal")


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
    fast: dict[str, Callable[[dict[str, Any]], str]] = {}
    daily: set[str] = set()
    referenced = set(_source_fields(spec)) | set(spec.read_fields)
    uses_now = deal_whole = False
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
        deal_whole = deal_whole or _uses_deal_whole(ast)
        uses_now = uses_now or "now" in names
        templates[text] = _ENV.from_string(text)
        fast_render = compile_fast(ast, _ENV, TEMPLATE_NAMES)
        if fast_render is not None:
            fast[text] = fast_render
        if names <= {"today"}:
            daily.add(text)
    reads_modified_at = deal_whole or "modified_at" in referenced
    # Fields every deal carries without asking the CRM for them.
    referenced -= {"id", "status", "url", "modified_at"}
    # The map is returned even with template problems, so callers can check the rest too.
    compiled = CompiledFieldMap(
        doc.path, spec, templates, sorted(referenced), daily, fast, reads_modified_at, uses_now
    )
    return compiled, problems


def load_field_map(path: str | Path) -> CompiledFieldMap:
    doc = load_yaml(path)
    compiled, problems = compile_field_map(doc)
    if problems or compiled is None:
        raise ProblemsFound(problems)
    return compiled


# -- applying a map ------------------------------------------------------------------------


def deal_context(deal: Deal) -> dict[str, Any]:
    return {"deal": _deal_view(deal, modified_at=True)}


def _deal_view(deal: Deal, modified_at: bool) -> RecordView:
    view = RecordView(deal.properties)  # its fields, plus id/status/url/modified_at
    view["id"] = deal.id
    view["status"] = str(deal.status)
    view["url"] = deal.url or ""
    if modified_at:  # a tenth of a mapping's cost: written only for a map that reads it
        view["modified_at"] = deal.modified_at.isoformat()
    return view


def _empty(value: Any) -> bool:
    return value is None or value == ""


def evaluate(
    cm: CompiledFieldMap, name: str, rule: FieldRule | _Rule, context: dict[str, Any], source: dict
) -> tuple[Any, MappingError | None]:
    """One target field's value, or the reason it cannot be computed."""
    if cm.is_daily(rule):
        return cm.once_a_day(id(rule), context, _evaluate, cm, name, rule, context, source)
    return _evaluate(cm, name, rule, context, source)


def _evaluate(
    cm: CompiledFieldMap, name: str, rule: FieldRule | _Rule, context: dict[str, Any], source: dict
) -> tuple[Any, MappingError | None]:
    # `value is None or value == ""` is `_empty(value)`, inline: this runs for every field of
    # every deal.
    try:
        if rule.source is not None:
            value = source.get(rule.source)
        elif rule.template is not None:
            value = cm.render(rule.template, context)
        else:
            value = rule.value
        if rule.transforms and not (value is None or value == ""):
            for t in rule.transforms:
                value = apply_transform(t, value)
        if rule.map is not None and not (value is None or value == ""):
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
        if value is None or value == "":
            if rule.default is not None:
                value = rule.default
            if value is None or value == "":
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
    plan = cm.plan()
    source = _deal_view(deal, cm.reads_modified_at)
    context = {"deal": source, "today": today}
    if cm.uses_now:
        context["now"] = datetime.now(UTC)
    errors: list[MappingError] = []
    synced: dict[str, Any] = {}

    name, err = evaluate(cm, "project.name", plan.name, context, source)
    if err:
        errors.append(err)
    elif _empty(name):
        errors.append(MappingError("project.name", "is empty", "make it required or templated"))

    fields: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for out, targets in ((fields, plan.fields), (custom, plan.custom_fields)):
        for key, rule, field_name, synced_key, daily in targets:
            if daily:
                value, e = evaluate(cm, field_name, rule, context, source)
            else:
                value, e = _evaluate(cm, field_name, rule, context, source)
            if e:
                errors.append(e)
                continue
            if value is not None:
                out[key] = value
            if synced_key is not None:
                synced[synced_key] = value

    start: date = today
    if plan.milestones_start is not None:
        value, e = evaluate(cm, "project.milestones_start", plan.milestones_start, context, source)
        if e:
            errors.append(e)
        elif value is not None:
            start = COERCIONS["date"](value)
    milestones = []
    for i, m in enumerate(plan.milestones):
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
        template=plan.template,
        fields=fields,
        custom_fields=custom,
        sections=list(plan.sections),
        milestones=milestones,
    )
    return ForwardResult(spec, synced, [])


def render_text(cm: CompiledFieldMap, text: str, context: dict[str, Any]) -> str:
    return cm.render(text, context)

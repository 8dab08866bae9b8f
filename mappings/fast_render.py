"""A faster render for the plain templates of a field map: text, record fields, named filters,
`set`, `if`/`else` expressions, comparisons and and/or/not.

From Jinja's own parse, these constructs are compiled to the same Python expressions Jinja's
code generator writes for them; what a Jinja render spends beyond those (a Context, a
generator, the sandbox's getattr, the finalize call) is most of a template's cost on the
backfill hot path. Anything else is left to Jinja: a template using anything not covered gets
no fast render, and a render that meets anything unusual (a missing name or field, a value
that is not a record, an error of any kind) raises, and the caller renders it with Jinja, which
gives the text or the error exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import Environment, nodes
from jinja2.utils import _PassArg

from mappings.transforms import DICT_NAMES, RecordView, none_as_empty

# Jinja's spelling of each comparison (jinja2.compiler.operators).
_COMPARE = {
    "eq": "==",
    "ne": "!=",
    "gt": ">",
    "gteq": ">=",
    "lt": "<",
    "lteq": "<=",
    "in": "in",
    "notin": "not in",
}


class NotFast(Exception):
    """The template, or this render of it, is Jinja's to do."""


def compile_fast(
    ast: nodes.Template, env: Environment, context_names: frozenset[str]
) -> Callable[[dict[str, Any]], str] | None:
    """A render function for a parsed template, or None when it uses anything not covered.

    Given the context, the function returns what `concat(root_render_func(...)).strip()`
    returns, or raises (NotFast or the error met), and has no other effect."""
    try:
        return _Compiler(env, context_names).template(ast)
    except NotFast:
        return None


def _not_fast() -> Any:
    raise NotFast


class _Compiler:
    """Writes one Python function: `def render(c)`, `c` being the render's context."""

    def __init__(self, env: Environment, context_names: frozenset[str]) -> None:
        self.env = env
        self.context_names = context_names
        self.values: dict[str, Any] = {}  # the function's globals: constants and filters
        self.records: set[str] = set()  # context names read as records (`deal.x`)
        self.loaded: set[str] = set()  # context names read at all
        self.assigned: set[str] = set()  # names `{% set %}` so far, in template order

    def template(self, ast: nodes.Template) -> Callable[[dict[str, Any]], str]:
        finalize = self.env.finalize
        if self.env.autoescape or finalize is None or _PassArg.from_obj(finalize) is not None:
            raise NotFast  # what this writer does not do (the field maps' environment does not)
        # Jinja gives a name set anywhere in the template its own slot, unset until the `set`:
        # a template setting a context name, or reading a set name first, is left to Jinja.
        stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "store"}
        if stored & self.context_names:
            raise NotFast
        body: list[str] = []
        parts: list[str] = []
        for stmt in ast.body:
            if isinstance(stmt, nodes.Output):
                for child in stmt.nodes:
                    if isinstance(child, nodes.TemplateData):
                        parts.append(self.value(child.data))
                    else:
                        parts.append(self.output(self.expr(child), finalize))
            elif isinstance(stmt, nodes.Assign) and isinstance(stmt.target, nodes.Name):
                # Output before a `set` is evaluated before it, as in Jinja.
                if parts:
                    body.append(f"out.extend(({', '.join(parts)},))")
                    parts = []
                body.append(f"s_{stmt.target.name} = {self.expr(stmt.node)}")
                self.assigned.add(stmt.target.name)
            else:
                raise NotFast
        head = [f"c_{n} = c[{n!r}]" for n in sorted(self.loaded)]  # KeyError: Jinja's Undefined
        head += [f"if type(c_{n}) is not _Record: _not_fast()" for n in sorted(self.records)]
        if body:
            body.append(f"out.extend(({', '.join(parts)},))" if parts else "pass")
            lines = [*head, "out = []", *body, "return ''.join(out).strip()"]
        else:
            lines = [
                *head,
                f"return ''.join(({', '.join(parts)},)).strip()" if parts else "return ''",
            ]
        source = "def render(c):\n" + "".join(f"    {line}\n" for line in lines)
        scope = {"_finalize": finalize, "_Record": RecordView, "_not_fast": _not_fast}
        scope.update(self.values)
        exec(compile(source, "<fast template>", "exec"), scope)
        return scope["render"]

    def output(self, expr: str, finalize: Any) -> str:
        if finalize is none_as_empty:  # written out: one call less for every `{{ }}`
            return f'str("" if (_v := {expr}) is None else _v)'
        return f"str(_finalize({expr}))"

    def value(self, value: Any) -> str:
        """A constant, by reference: no repr() round trip to trust."""
        name = f"k{len(self.values)}"
        self.values[name] = value
        return name

    def expr(self, node: nodes.Node) -> str:
        if isinstance(node, nodes.Const):
            return self.value(node.value)
        if isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name in self.assigned:
                return f"s_{node.name}"
            if node.name in self.context_names and node.name.isidentifier():
                self.loaded.add(node.name)
                return f"c_{node.name}"
            raise NotFast
        if isinstance(node, nodes.Getattr) and node.ctx == "load":
            return self.getattr(node)
        if isinstance(node, nodes.Filter):
            return self.filter(node)
        if isinstance(node, nodes.CondExpr) and node.expr2 is not None:
            return (
                f"({self.expr(node.expr1)} if {self.expr(node.test)} else {self.expr(node.expr2)})"
            )
        if isinstance(node, nodes.Compare) and all(op.op in _COMPARE for op in node.ops):
            ops = "".join(f" {_COMPARE[op.op]} {self.expr(op.expr)}" for op in node.ops)
            return f"({self.expr(node.expr)}{ops})"
        if isinstance(node, nodes.Or):
            return f"({self.expr(node.left)} or {self.expr(node.right)})"
        if isinstance(node, nodes.And):
            return f"({self.expr(node.left)} and {self.expr(node.right)})"
        if isinstance(node, nodes.Not):
            return f"(not {self.expr(node.node)})"
        raise NotFast

    def getattr(self, node: nodes.Getattr) -> str:
        # MappingEnvironment.getattr reads a record's field as an item, unless a dict method
        # has its name; a missing field raises KeyError, where Jinja has its Undefined.
        if node.attr in DICT_NAMES:
            raise NotFast
        inner = node.node
        if not isinstance(inner, nodes.Name):
            raise NotFast
        target, attr = self.expr(inner), self.value(node.attr)
        if target.startswith("c_"):
            self.records.add(inner.name)  # a context name: checked once, at the top
            return f"{target}[{attr}]"
        return f"({target}[{attr}] if type({target}) is _Record else _not_fast())"

    def filter(self, node: nodes.Filter) -> str:
        func = self.env.filters.get(node.name)
        if (
            func is None
            or _PassArg.from_obj(func) is not None
            or node.node is None
            or node.kwargs
            or node.dyn_args is not None
            or node.dyn_kwargs is not None
        ):
            raise NotFast
        args = [self.expr(node.node), *(self.expr(a) for a in node.args)]
        return f"{self.value(func)}({', '.join(args)})"

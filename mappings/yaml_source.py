"""Load YAML keeping each key's line, so problems can point at FILE:LINE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from mappings.problems import Problem, ProblemsFound


@dataclass
class LocatedYaml:
    path: str
    tree: Any  # ruamel round-trip nodes (dict/list subclasses carrying .lc)

    @property
    def data(self) -> Any:
        return _plain(self.tree)

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """1-based line of the deepest node on `loc` that exists in the file."""
        node, line = self.tree, 1
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                line = node.lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
                line = node.lc.item(part)[0] + 1
                node = node[part]
            else:
                continue  # a discriminator tag or a key pydantic adds: skip it
        return line

    def present(self, loc: tuple[Any, ...]) -> tuple[Any, ...]:
        """`loc` without the parts pydantic adds (union tags): only keys the file has,
        plus the last part (a missing or unknown key is named as written)."""
        node, kept = self.tree, []
        for i, part in enumerate(loc):
            if (
                isinstance(node, dict)
                and part in node
                or isinstance(node, list)
                and isinstance(part, int)
                and part < len(node)
            ):
                node = node[part]
                kept.append(part)
            elif i == len(loc) - 1:
                kept.append(part)
        return tuple(kept)

    def value_line(self, loc: tuple[Any, ...]) -> int | None:
        """Line where the value at `loc` starts (block scalars start on the next line)."""
        *parent_loc, last = loc
        node = self.tree
        for part in parent_loc:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return self.line_of(loc)
        if isinstance(node, CommentedMap) and last in node:
            return node.lc.value(last)[0] + 1
        return self.line_of(loc)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if hasattr(node, "__str__") and type(node).__name__ in ("ScalarFloat",):
        return float(node)
    if type(node).__module__.startswith("ruamel"):
        if isinstance(node, str):
            return str(node)
        if isinstance(node, bool):
            return bool(node)
        if isinstance(node, int):
            return int(node)
    return node


def load_yaml(path: str | Path) -> LocatedYaml:
    """Parse a YAML file; a syntax error becomes a Problem with its line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProblemsFound(
            [Problem(str(path), None, "", "file not found", "check the path")]
        ) from None
    except OSError as exc:
        raise ProblemsFound([Problem(str(path), None, "", f"cannot read: {exc}")]) from None
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ProblemsFound(
            [
                Problem(
                    str(path),
                    line,
                    "",
                    f"YAML syntax error: {exc.problem or exc.context}",
                    "check indentation and quoting on this line",
                )
            ]
        ) from None
    if tree is None:
        tree = CommentedMap()
    return LocatedYaml(str(path), tree)

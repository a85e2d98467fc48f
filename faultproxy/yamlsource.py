"""Safe YAML loading that remembers where every value came from.

PyYAML's SafeLoader composes a node tree in which every node carries its start mark (line,
column). We compose (never construct arbitrary objects), convert the tree to plain Python values
ourselves, and keep a map from each value's path (('rules', 0, 'faults', 1, 'after')) to its mark,
so validation errors can name `file:line:column`. Only the YAML core schema is accepted: a
`!!python/object` or any other non-standard tag is an error, not an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ProfileError, ProfileIssue

Path = tuple[str | int, ...]

_CORE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}


@dataclass
class SourceDoc:
    """A parsed document: plain data plus the position of every value and mapping key in it."""

    source: str
    data: Any
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)  # value positions
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)  # mapping key positions

    def position(self, path: Path) -> tuple[int, int]:
        """Best position for a path: the value, else its key, else the nearest parent that exists."""
        for end in range(len(path), -1, -1):
            p = path[:end]
            if end == len(path) and p in self.key_marks and p not in self.marks:
                return self.key_marks[p]
            if p in self.marks:
                return self.marks[p]
        return (0, 0)

    def key_position(self, path: Path) -> tuple[int, int]:
        """Position of the key itself (for 'unknown key' errors), else of the value."""
        return self.key_marks.get(path) or self.position(path)


class _Composer:
    def __init__(self, source: str):
        self.source = source
        self.issues: list[ProfileIssue] = []
        self.marks: dict[Path, tuple[int, int]] = {}
        self.key_marks: dict[Path, tuple[int, int]] = {}
        self.count = 0

    @staticmethod
    def _pos(node: yaml.Node) -> tuple[int, int]:
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def _issue(self, node: yaml.Node, path: Path, message: str) -> None:
        line, col = self._pos(node)
        self.issues.append(ProfileIssue(self.source, line, col, format_path(path), message))

    def convert(self, node: yaml.Node, path: Path) -> Any:
        # Aliases can expand exponentially ('billion laughs'); a profile never needs this many values.
        self.count += 1
        if self.count > _MAX_VALUES:
            raise _TooLarge
        self.marks[path] = self._pos(node)
        if node.tag not in _CORE_TAGS:
            self._issue(node, path, f"the YAML tag {node.tag!r} is not allowed in a profile")
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _CORE_TAGS:
                    self._issue(key_node, path, "mapping keys must be plain scalars")
                    continue
                key = _resolve_scalar(key_node)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    key = str(key)
                child = (*path, key)
                if key in out:
                    self._issue(key_node, child, f"duplicate key {key!r}")
                    continue
                self.key_marks[child] = self._pos(key_node)
                out[key] = self.convert(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return _resolve_scalar(node)


_SCALAR_LOADER = yaml.SafeLoader("")
_MAX_VALUES = 100_000


class _TooLarge(Exception):
    pass


def _resolve_scalar(node: yaml.Node) -> Any:
    try:
        return _SCALAR_LOADER.construct_object(node, deep=True)
    except yaml.YAMLError:
        return node.value


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml(text: str, source: str) -> SourceDoc:
    """Parse one YAML document safely; raise ProfileError naming file:line:column on any problem."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ProfileError([ProfileIssue(source, line, col, "", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as e:
        raise ProfileError([ProfileIssue(source, 0, 0, "", f"invalid YAML: {e}")]) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProfileError([ProfileIssue(source, 0, 0, "", f"unreadable YAML: {e}")]) from None
    if not nodes or nodes[0] is None:
        raise ProfileError([ProfileIssue(source, 1, 1, "", "the profile is empty")])
    if len(nodes) > 1:
        second = nodes[1]
        line = second.start_mark.line + 1 if second is not None else 0
        raise ProfileError(
            [ProfileIssue(source, line, 1, "", "one profile per file: found a second YAML document")]
        )
    composer = _Composer(source)
    try:
        data = composer.convert(nodes[0], ())
    except RecursionError:
        raise ProfileError([ProfileIssue(source, 0, 0, "", "the document nests too deeply")]) from None
    except _TooLarge:
        raise ProfileError(
            [ProfileIssue(source, 0, 0, "", f"the document expands to more than {_MAX_VALUES} values")]
        ) from None
    if composer.issues:
        raise ProfileError(composer.issues)
    return SourceDoc(source, data, composer.marks, composer.key_marks)

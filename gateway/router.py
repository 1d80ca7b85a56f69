"""Method + path-template routing, compiled once at policy load.

Templates are split into segments and stored in a trie: literal segments
first, then ``{param}`` (one non-empty segment), then a final
``{param:path}`` (the rest). Matching walks the canonical path's segments;
it never sees an encoded or ambiguous path, because the canonical-target step
refuses those before routing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Routable(Protocol):
    @property
    def methods(self) -> frozenset[str]: ...
    @property
    def path(self) -> str: ...


R = TypeVar("R", bound=Routable)


class RouteConflict(ValueError):
    """Two routes claim the same method and template."""


@dataclass(slots=True)
class _Node(Generic[R]):
    literal: dict[str, _Node[R]] = field(default_factory=dict)
    param: _Node[R] | None = None
    here: dict[str, R] = field(default_factory=dict)
    tail: dict[str, R] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match(Generic[R]):
    route: R
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    allow: tuple[str, ...]


def template_params(template: str) -> list[tuple[str, bool]]:
    """The ``(name, is_tail)`` parameters of a template, in order."""
    out = []
    for segment in template.strip("/").split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name, _, kind = segment[1:-1].partition(":")
            out.append((name, kind == "path"))
    return out


class Router(Generic[R]):
    def __init__(self, routes: Iterable[R]) -> None:
        self._root: _Node[R] = _Node()
        self._names: dict[int, list[str]] = {}
        for route in routes:
            self._add(route)

    def _add(self, route: R) -> None:
        node = self._root
        segments = route.path.strip("/").split("/") if route.path != "/" else []
        names: list[str] = []
        for i, segment in enumerate(segments):
            if segment.startswith("{") and segment.endswith("}"):
                name, _, kind = segment[1:-1].partition(":")
                if not name.isidentifier():
                    raise ValueError(f"a parameter name such as {{lead_id}}, not {segment!r}")
                if name in names:
                    raise ValueError(f"each parameter once in a template ({name!r} repeats)")
                names.append(name)
                if kind == "path":
                    if i != len(segments) - 1:
                        raise ValueError("a {name:path} parameter only as the last segment")
                    self._bind(node.tail, route)
                    self._names[id(route)] = names
                    return
                if kind:
                    raise ValueError(f"a parameter kind of 'path' or none, not {kind!r}")
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                if not segment or "{" in segment or "}" in segment:
                    raise ValueError(
                        f"literal segments or whole {{param}} segments, not {segment!r}"
                    )
                node = node.literal.setdefault(segment, _Node())
        self._bind(node.here, route)
        self._names[id(route)] = names

    @staticmethod
    def _bind(table: dict[str, R], route: R) -> None:
        for method in route.methods:
            if method in table:
                raise RouteConflict(f"{method} {route.path} is already routed")
            table[method] = route

    def match(self, method: str, path: str) -> Match[R] | MethodNotAllowed | None:
        segments = path[1:].split("/") if path != "/" else []
        values: list[str] = []
        allow: set[str] = set()
        route = self._walk(self._root, segments, 0, method, values, allow)
        if route is not None:
            return Match(route, dict(zip(self._names[id(route)], values, strict=True)))
        if allow:
            return MethodNotAllowed(tuple(sorted(allow)))
        return None

    def _walk(
        self,
        node: _Node[R],
        segments: list[str],
        i: int,
        method: str,
        values: list[str],
        allow: set[str],
    ) -> R | None:
        if i == len(segments):
            if node.here:
                found = node.here.get(method)
                if found is not None:
                    return found
                allow.update(node.here)
            return None
        segment = segments[i]
        child = node.literal.get(segment)
        if child is not None:
            found = self._walk(child, segments, i + 1, method, values, allow)
            if found is not None:
                return found
        if node.param is not None and segment:
            values.append(segment)
            found = self._walk(node.param, segments, i + 1, method, values, allow)
            if found is not None:
                return found
            values.pop()
        if node.tail and all(segments[i:]):
            found = node.tail.get(method)
            if found is not None:
                values.append("/".join(segments[i:]))
                return found
            allow.update(node.tail)
        return None

"""Read a policy file: YAML with a line for every key path, then validation.

YAML is composed into nodes (not loaded straight to objects) so that every
value keeps its line; pydantic's error locations are then mapped back to the
line a user must edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy.errors import PolicyError, format_path
from gateway.policy.schema import PolicySpec

Lines = dict[tuple[str | int, ...], int]

_constructor = yaml.SafeLoader(stream="")


def _to_python(node: yaml.Node, path: tuple[str | int, ...], lines: Lines, file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _constructor.construct_object(key_node)  # type: ignore[no-untyped-call]
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise PolicyError(
                    file,
                    format_path((*path, key)),
                    key_node.start_mark.line + 1,
                    "each key once (this one is repeated)",
                )
            out[key] = _to_python(value_node, (*path, key), lines, file)
            # Errors about a key point at the key, not at its (possibly nested) value.
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return _constructor.construct_object(node)  # type: ignore[no-untyped-call]


def line_of(lines: Lines, parts: tuple[str | int, ...]) -> int | None:
    """The line of the deepest key path we know, walking up for missing keys."""
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return lines.get((), None)


def parse_policy_text(text: str, file: str) -> tuple[PolicySpec, Lines]:
    lines: Lines = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(
            file, "", mark.line + 1 if mark else None, f"valid YAML ({problem})"
        ) from exc
    if node is None:
        raise PolicyError(file, "", 1, "a policy mapping with version, upstreams and routes")
    data = _to_python(node, (), lines, file)
    if not isinstance(data, dict):
        raise PolicyError(file, "", 1, "a policy mapping with version, upstreams and routes")
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as exc:
        # A misspelt key also makes the real one "missing": name the typo.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        error = errors[0]
        loc = _clean_loc(error["loc"])
        raise PolicyError(file, format_path(loc), line_of(lines, loc), _expected(error)) from None
    return spec, lines


def read_policy_file(path: str | Path) -> tuple[PolicySpec, Lines, str]:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(file, "", None, f"a readable policy file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PolicyError(file, "", None, "a UTF-8 text file") from None
    spec, lines = parse_policy_text(text, file)
    return spec, lines, text


def _clean_loc(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    # pydantic adds union branch names (``list[str]``, ``RoleSpec``) and
    # validator tags to locations; users only know the keys of their file.
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int) or (
            isinstance(part, str)
            and not ("[" in part or part[:1].isupper() or part.startswith("function-"))
        ):
            out.append(part)
    return tuple(out)


def _expected(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "no such key here (is it misspelt?)"
    if kind == "missing":
        return "this key, which is required"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if kind == "literal_error":
        return message.replace("Input should be", "one of")
    return message[0].lower() + message[1:] if message else kind

"""The one error a policy can raise: where it is wrong, and what was expected."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy file that cannot be served.

    ``path`` is the key path in the file's own terms (``routes[3].upstream``),
    ``line`` the 1-based line of that key, ``expected`` what would be valid.
    """

    def __init__(self, file: str, path: str, line: int | None, expected: str) -> None:
        self.file = file
        self.path = path
        self.line = line
        self.expected = expected
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.expected}"


def format_path(parts: tuple[str | int, ...]) -> str:
    """``("routes", 3, "upstream")`` -> ``routes[3].upstream``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out

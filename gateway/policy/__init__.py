"""Policy files: load, validate, compile."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.compile import compile_policy
from gateway.policy.errors import PolicyError
from gateway.policy.loader import parse_policy_text, read_policy_file
from gateway.policy.model import Policy, Route, Upstream

__all__ = ["Policy", "PolicyError", "Route", "Upstream", "load_policy", "load_policy_text"]


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile a policy file; raises ``PolicyError``."""
    spec, lines, text = read_policy_file(path)
    return compile_policy(spec, lines, str(path), text)


def load_policy_text(text: str, file: str = "<policy>") -> Policy:
    spec, lines = parse_policy_text(text, file)
    return compile_policy(spec, lines, file, text)

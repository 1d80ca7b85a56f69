"""The route matcher: literals before parameters, 405 with Allow."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.router import Match, MethodNotAllowed, RouteConflict, Router


@dataclass(frozen=True)
class R:
    name: str
    path: str
    methods: frozenset[str] = frozenset({"GET"})


ROUTES = [
    R("list", "/crm/v1/{tenant}/leads", frozenset({"GET", "POST"})),
    R("get", "/crm/v1/{tenant}/leads/{lead_id}"),
    R("export", "/crm/v1/{tenant}/leads/export"),
    R("signup", "/crm/v1/signup", frozenset({"POST"})),
    R("echo", "/crm/v1/{tenant}/echo/{rest:path}"),
    R("root", "/"),
]
router = Router(ROUTES)


@pytest.mark.parametrize(
    ("method", "path", "name", "params"),
    [
        ("GET", "/crm/v1/acme/leads", "list", {"tenant": "acme"}),
        ("POST", "/crm/v1/acme/leads", "list", {"tenant": "acme"}),
        ("GET", "/crm/v1/acme/leads/42", "get", {"tenant": "acme", "lead_id": "42"}),
        ("GET", "/crm/v1/acme/leads/export", "export", {"tenant": "acme"}),
        ("POST", "/crm/v1/signup", "signup", {}),
        ("GET", "/crm/v1/acme/echo/a/b/c", "echo", {"tenant": "acme", "rest": "a/b/c"}),
        ("GET", "/", "root", {}),
    ],
)
def test_match(method: str, path: str, name: str, params: dict[str, str]) -> None:
    match = router.match(method, path)
    assert isinstance(match, Match)
    assert match.route.name == name and match.params == params


@pytest.mark.parametrize(
    "path",
    [
        "/crm/v1/acme/leads/",
        "/crm/v1/acme",
        "/crm/v1/acme/echo",
        "/crm/v1/acme/Leads",
        "/crm/v1//leads",
    ],
)
def test_no_match(path: str) -> None:
    assert router.match("GET", path) is None


def test_wrong_method_lists_allowed() -> None:
    assert router.match("DELETE", "/crm/v1/acme/leads") == MethodNotAllowed(("GET", "POST"))
    assert router.match("GET", "/crm/v1/signup") == MethodNotAllowed(("POST",))


def test_conflicts_and_bad_templates_refused() -> None:
    with pytest.raises(RouteConflict):
        Router([R("a", "/x/{id}"), R("b", "/x/{other}")])
    with pytest.raises(ValueError, match="last segment"):
        Router([R("a", "/x/{rest:path}/y")])
    with pytest.raises(ValueError, match="once"):
        Router([R("a", "/x/{id}/{id}")])

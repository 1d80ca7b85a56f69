"""The one timestamp format of the trail: ISO 8601 UTC with milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def format_ts(when: float) -> str:
    """Unix time -> ``2026-11-22T10:00:00.123Z`` (the lead builds ``ts`` with this too)."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    """An ISO 8601 time -> an aware UTC datetime; a time without a zone is UTC.

    Raises ``ValueError`` on anything else.
    """
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)

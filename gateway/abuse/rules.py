"""Detector and ladder settings, compiled from the policy at load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    max: int
    per: float


@dataclass(frozen=True, slots=True)
class Detectors:
    scraping_mode: str | None = None
    distinct_objects: Window | None = None
    sequential_run: int | None = None
    sharing_mode: str | None = None
    distinct_networks: Window | None = None
    distinct_devices: Window | None = None
    seats_per: float = 3600.0
    spam_mode: str | None = None
    fan_out_routes: frozenset[str] = frozenset()
    fan_out_field: str = ""
    fan_out: Window | None = None
    duplicates_mode: str | None = None
    duplicate_routes: frozenset[str] = frozenset()
    duplicates: Window | None = None
    probing_mode: str | None = None
    refusals: Window | None = None

    @property
    def body_routes(self) -> frozenset[str]:
        """Routes whose request body a detector reads (bounded, JSON)."""
        return self.fan_out_routes | self.duplicate_routes


@dataclass(frozen=True, slots=True)
class Rung:
    after: int
    action: str  # warn | throttle | suspend | terminate
    seconds: float | None


@dataclass(frozen=True, slots=True)
class Ladder:
    rungs: tuple[Rung, ...]
    window: float
    throttle_rate: float  # requests per second while throttled
    throttle_burst: int

    def rung_for(self, offenses: int) -> Rung | None:
        """The highest rung reached after ``offenses`` signals."""
        reached = None
        for rung in self.rungs:
            if offenses >= rung.after:
                reached = rung
        return reached

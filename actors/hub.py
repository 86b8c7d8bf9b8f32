"""The serving side of the hub: the dashboard's `Hub` (lorafleet.dashboard.hub) plus what the serving
layer itself reads (health, draining, executors, adapters, prefetch counters, latest step timing).

Writers: the scheduler actor (snapshot after every step, step records, request records, health), the
admission actor (records and counters of refused requests), the prefetcher (its counters). Readers:
HTTP handlers and the dashboard. It holds copies, never the Engine. See docs/serving.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.dashboard.hub import Hub, RequestRecord, StepRecord

__all__ = ["PrefetchStats", "RequestRecord", "ServeHub", "StepRecord", "StepTiming"]


@dataclass
class StepTiming:
    """The latest step's timing (and the smoothed step time admission also uses)."""

    step: int = 0
    step_ms: float = 0.0
    step_ms_avg: float = 0.0
    batch_tokens: int = 0
    batch_seqs: int = 0


@dataclass
class PrefetchStats:
    requested: int = 0
    loaded: int = 0
    failed: int = 0
    load_seconds: float = 0.0


@dataclass
class ServeHub(Hub):
    """Hub + serving state. `info` holds static facts (model name/path, start time, engine limits)."""

    info: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    invalid_adapters: dict[str, str] = field(default_factory=dict)  # under --adapter-root, refused on first use
    healthy: bool = True
    health_reason: str = ""
    draining: bool = False
    stalled: str = ""  # the step watchdog's reason while no step result arrives (actors/watchdog.py)
    executors: list[dict] = field(default_factory=list)
    prefetch: PrefetchStats = field(default_factory=PrefetchStats)
    timing: StepTiming = field(default_factory=StepTiming)

    def __post_init__(self) -> None:
        Hub.__init__(self)

    def mark_unhealthy(self, reason: str) -> None:
        self.healthy, self.health_reason = False, reason
        self.count("executor_failures")

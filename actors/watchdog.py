"""Step watchdog: notices an executor that stopped returning step results (frozen, wedged in a kernel,
paused by the OS) although a step is outstanding.

`StepWatchdog` is the plain decision (no event loop, unit-tested): given when the scheduler started waiting
for the oldest outstanding result, it says `ok`, `stalled` (past `stall_s`: `/health` answers 503 "executor
stalled" and a log line says so) or `failed` (past `kill_after_s`, when set: the executor group is killed,
which takes the ordinary executor-failure path: in-flight requests get `executor_failed`, then a restart or
exit 3). When results flow again the state returns to `ok` (`/health` 200, a log line). An idle executor
(no step outstanding) is never stalled. See docs/serving.md, "Failure and shutdown".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.actors.logs import event, server_log

OK, STALLED, FAILED = "ok", "stalled", "failed"


@dataclass
class StepWatchdog:
    """Thresholds in seconds; `kill_after_s` 0 = never kill (report only)."""

    stall_s: float
    kill_after_s: float = 0.0

    def __post_init__(self) -> None:
        if self.stall_s <= 0:
            raise ValueError("--stall-timeout must be > 0 seconds")
        if self.kill_after_s < 0:
            raise ValueError("--stall-kill-after must be >= 0 seconds (0 = never)")

    def state(self, waiting_since: float | None, now: float) -> str:
        if waiting_since is None:
            return OK
        waited = now - waiting_since
        if self.kill_after_s and waited >= self.kill_after_s:
            return FAILED
        return STALLED if waited >= self.stall_s else OK

    @property
    def interval(self) -> float:
        """How often to look: a quarter of the stall bound, between 50 ms and 1 s."""
        return min(1.0, max(0.05, self.stall_s / 4))


async def watch_steps(watchdog: StepWatchdog, waiting_since: Callable[[], float | None], hub,
                      kill: Callable[[str], None]) -> None:
    """The watchdog actor: sets `hub.stalled` (a reason, or "" when fine), logs each change, and calls
    `kill(reason)` once per stall that lasts past `kill_after_s`."""
    killed_for: float | None = None
    while True:
        await asyncio.sleep(watchdog.interval)
        since, now = waiting_since(), time.monotonic()
        state = watchdog.state(since, now)
        if state == OK:
            if hub.stalled:
                event(server_log, "executor resumed: step results are arriving again")
                hub.stalled = ""
            continue
        reason = f"executor stalled: no step result for {now - since:.1f} s"
        if not hub.stalled:
            event(server_log, f"{reason} (health 503 until results resume)", logging.WARNING)
            hub.count("executor_stalls")
        hub.stalled = reason
        if state == FAILED and killed_for != since:
            killed_for = since
            event(server_log, f"{reason}; killing the executor (--stall-kill-after {watchdog.kill_after_s:g} s)",
                  logging.ERROR)
            kill(reason)

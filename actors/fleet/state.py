"""FleetState: the fleet's one shared record (a single-replica Serve deployment).

Replicas push a report every ~0.5 s (their server's health, queue, resident adapters, models, /metrics text);
the ingress reads the fresh ones for /health, /metrics, /v1/models, the dashboard and the admin broadcast's
member list. Runtime adapter loads/unloads made through the fleet are recorded here so that a replica that
starts later (a replacement after a failure) replays them.
"""

from __future__ import annotations

import time
from typing import Any

STALE_S = 3.0  # a replica that has not reported for this long is not a member any more


class FleetStateBase:
    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.runtime: dict[str, str] = {}

    def report(self, replica: str, report: dict[str, Any]) -> None:
        self.reports[replica] = {**report, "received": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """replica id -> its latest report, for replicas heard from in the last STALE_S seconds."""
        now = time.time()
        for replica in [r for r, rep in self.reports.items() if now - rep["received"] > STALE_S]:
            del self.reports[replica]
        return dict(self.reports)

    def record_admin(self, op: str, name: str, path: str | None) -> None:
        if op == "load" and path is not None:
            self.runtime[name] = path
        else:
            self.runtime.pop(name, None)

    def runtime_adapters(self) -> dict[str, str]:
        return dict(self.runtime)

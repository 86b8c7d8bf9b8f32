"""Operator dashboard and Prometheus metrics, fed by the Hub the serving actors publish to.

The serving layer wires it in with `setup_routes(app, hub)`: GET /dashboard, GET /ws/dashboard,
GET /metrics and the static files under /static/ (see docs/dashboard.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.dashboard.hub import Hub, RequestRecord, StepRecord
    from lorafleet.dashboard.web import setup_routes

__all__ = ["Hub", "RequestRecord", "StepRecord", "setup_routes"]


def __getattr__(name: str):
    if name == "setup_routes":
        from lorafleet.dashboard.web import setup_routes

        return setup_routes
    if name in ("Hub", "RequestRecord", "StepRecord"):
        from lorafleet.dashboard import hub

        return getattr(hub, name)
    raise AttributeError(name)

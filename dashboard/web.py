"""aiohttp routes of the dashboard: GET /dashboard, GET /ws/dashboard, GET /metrics, static files.

    setup_routes(app, hub)   # the serving layer calls this once, before the app starts

Everything reads the Hub; nothing here touches the engine. Websockets are closed on app shutdown.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from importlib import resources
from pathlib import Path

import jinja2
from aiohttp import WSMsgType, web

from lorafleet.dashboard.feed import Feed, Subscriber
from lorafleet.dashboard.hub import Hub
from lorafleet.dashboard.prom import CONTENT_TYPE, make_registry, render
from lorafleet.dashboard.stats import FleetStats

STATS = web.AppKey("lorafleet_dashboard_stats", FleetStats)
FEED = web.AppKey("lorafleet_dashboard_feed", Feed)
SOCKETS = web.AppKey("lorafleet_dashboard_sockets", weakref.WeakSet)
REGISTRY = web.AppKey("lorafleet_dashboard_registry", object)
TEMPLATES = web.AppKey("lorafleet_dashboard_templates", jinja2.Environment)
SETTINGS = web.AppKey("lorafleet_dashboard_settings", dict)
MAX_CLIENT_FRAME = 256  # characters: the only client frame with a meaning is {"type": "resync"}


def static_dir() -> Path:
    return Path(str(resources.files("lorafleet.static")))


def setup_routes(app: web.Application, hub: Hub, *, max_lora: int | None = None, window_s: float = 60.0,
                 default_slo_ttft_ms: float | None = None, update_interval_s: float = 0.25,
                 title: str = "lorafleet", static_prefix: str = "/static/",
                 metric_prefix: str = "lorafleet:", model_name: str | None = None) -> FleetStats:
    """Register /dashboard, /ws/dashboard, /metrics and the static files on `app`, reading `hub`.

    `max_lora` is the engine's cap on distinct adapters per batch (the `max_lora` label of
    lora_requests_info); `default_slo_ttft_ms` applies to requests that carry no SLO; `metric_prefix`
    starts every /metrics name ("vllm:" for drop-in use with vLLM dashboards); `model_name` (the served
    base model's name) labels the families as vLLM's do. Returns the
    FleetStats aggregator (already listening to the hub)."""
    stats = FleetStats(hub, window_s=window_s, default_slo_ttft_ms=default_slo_ttft_ms)
    app[STATS] = stats
    app[FEED] = Feed(stats, min_interval=min(0.2, update_interval_s * 0.8))
    app[SOCKETS] = weakref.WeakSet()
    app[REGISTRY] = make_registry(stats, max_lora, metric_prefix, model_name)
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.PackageLoader("lorafleet.dashboard", "templates"), autoescape=True)
    app[SETTINGS] = {"interval": update_interval_s, "title": title, "static": static_prefix.rstrip("/")}
    app.router.add_get("/dashboard", dashboard_page)
    app.router.add_get("/ws/dashboard", dashboard_socket)
    app.router.add_get("/metrics", metrics)
    if not any(getattr(r, "canonical", None) == static_prefix.rstrip("/") for r in app.router.resources()):
        app.router.add_static(static_prefix, static_dir(), name="lorafleet-static")
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_stop_stats)
    return stats


async def dashboard_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    html = request.app[TEMPLATES].get_template("dashboard.html").render(
        title=settings["title"], static=settings["static"], interval_ms=int(settings["interval"] * 1000))
    return web.Response(text=html, content_type="text/html")


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def dashboard_socket(request: web.Request) -> web.WebSocketResponse:
    """Send a full state, then a delta every update interval, until the client goes away."""
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    subscriber = Subscriber(request.app[FEED])
    interval = request.app[SETTINGS]["interval"]
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not ws.closed:
        if loop.time() >= due:
            due = loop.time() + interval
            try:
                await ws.send_str(_dumps(subscriber.message()))
            except ConnectionError:
                break
        try:
            msg = await ws.receive(timeout=max(0.01, due - loop.time()))
        except asyncio.TimeoutError:
            continue
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
        if msg.type == WSMsgType.TEXT and _wants_full(msg.data):
            subscriber = Subscriber(request.app[FEED])  # its next frame (at the next tick) is a full snapshot
    return ws


def _dumps(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False, default=_plain)


def _wants_full(data: str) -> bool:
    """True for a `{"type": "resync"}` frame; anything else a client sends (not JSON, nested too deeply to
    parse, not an object, long) is ignored."""
    if len(data) > MAX_CLIENT_FRAME:
        return False
    try:
        return json.loads(data).get("type") == "resync"
    except (ValueError, AttributeError, RecursionError):
        return False


def _plain(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=1001, message=b"server shutdown")


async def _stop_stats(app: web.Application) -> None:
    app[STATS].close()

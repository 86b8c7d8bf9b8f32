"""The aiohttp application: routes, API-key middleware, admin adapter load/unload, health, debug state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
from pathlib import Path

from aiohttp import web

from lorafleet.actors import openai_api
from lorafleet.actors.fields import Text, check_document, is_text
from lorafleet.actors.frontend import Frontend, internal_error, watch_send_buffers, ws_stream
from lorafleet.actors.protocol import ApiError, bad
from lorafleet.actors.security import files_inside, origin_allowed

log = logging.getLogger("lorafleet.app")
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_LORA_NAME = 1024

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/debug/state")
KEY_ONLY_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # closed to everyone without --admin-key
DASHBOARD_PATHS = ("/dashboard", "/ws/dashboard")
KEYED_ROOT_PATHS = ("/tokenize", "/detokenize")  # vLLM's routes outside /v1: --api-key guards them too
DASHBOARD_COOKIE = "lorafleet_dashboard"


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key") or request.query.get("api_key")


def _matches(given: str | None, expected: str) -> bool:
    """Constant-time key check; a client value that is not UTF-8 (aiohttp keeps its bytes as surrogates) is
    compared as the bytes it was, so it is simply wrong, never an encoding error."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _dashboard_token(key: str) -> str:
    """The dashboard cookie's value: an HMAC of the key (the cookie never holds the key itself)."""
    return hmac.new(key.encode(), b"lorafleet-dashboard", hashlib.sha256).hexdigest()


def _origin_refusal(request: web.Request, frontend: Frontend) -> ApiError | None:
    """Browser WebSocket upgrades and POSTs from an origin not allowed (actors/security.py) get 403."""
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if not upgrade and request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    origin = request.headers.get("Origin")
    if origin_allowed(origin, request.host, frontend.allowed_origins, bool(frontend.api_key)):
        return None
    return ApiError(403, "forbidden_origin", f"Origin: {origin!r} is not allowed (same origin, localhost, or "
                    "--allowed-origin)", "Origin")


async def _dashboard_guarded(request: web.Request, handler, frontend: Frontend) -> web.StreamResponse:
    """/dashboard and /ws/dashboard need --dashboard-key (default: the API key; the admin key also opens them)
    when one is set: as a bearer/X-API-Key header, `?api_key=`, or the cookie /dashboard sets once opened
    with the key, which the page's own WebSocket then carries."""
    keys = [k for k in (frontend.dashboard_key or frontend.api_key, frontend.admin_key) if k]
    if not keys:
        return await handler(request)
    given = _bearer(request)
    cookie = request.cookies.get(DASHBOARD_COOKIE)
    key = next((k for k in keys if _matches(given, k) or _matches(cookie, _dashboard_token(k))), None)
    if key is None:
        return openai_api.error_response(ApiError(401, "invalid_api_key", "the dashboard needs its key: open "
                                                  "/dashboard?api_key=<key> (--dashboard-key, else --api-key)"))
    response = await handler(request)
    if request.path == "/dashboard" and _matches(given, key) and not response.prepared:
        response.set_cookie(DASHBOARD_COOKIE, _dashboard_token(key), httponly=True, samesite="Strict", path="/")
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Origin allow-list for browser upgrades/POSTs; --dashboard-key (or --api-key) guards the dashboard;
    --api-key guards /v1/*; --admin-key guards the admin paths and also opens /v1/*. Without an admin key
    the routes that change what is served (load/unload) answer 403 to everyone; /v1/debug/state
    (read-only) then follows the /v1 rule."""
    frontend: Frontend = request.app["frontend"]
    refusal = _origin_refusal(request, frontend)
    if refusal is not None:
        return openai_api.error_response(refusal)
    if request.path in DASHBOARD_PATHS:
        return await _dashboard_guarded(request, handler, frontend)
    if not request.path.startswith("/v1/") and request.path not in KEYED_ROOT_PATHS:
        return await handler(request)
    refusal = _check_keys(request, frontend)
    if refusal is not None:
        return openai_api.error_response(refusal)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return openai_api.error_response(ApiError(exc.status, code, f"{request.method} {request.path}: {exc.reason}"))
    except Exception as exc:  # a bug: logged with its traceback, the client gets a reference, not the trace
        if isinstance(exc, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
            # the client left before its response could start (e.g. while its request waited for admission):
            # nothing to answer and no server failure; the handler cancelled its generations
            log.info("%s %s: the client disconnected before the response started", request.method, request.path)
            return web.Response(status=499)  # never sent; the access log's "client closed request"
        ref = frontend.new_id("err")
        log.exception("%s %s failed (%s)", request.method, request.path, ref)
        return openai_api.error_response(internal_error(ref, exc))


def _check_keys(request: web.Request, frontend: Frontend) -> ApiError | None:
    given = _bearer(request)
    is_admin = frontend.admin_key is not None and _matches(given, frontend.admin_key)
    if request.path in KEY_ONLY_PATHS and frontend.admin_key is None:
        return ApiError(403, "admin_disabled", f"{request.path} is disabled: start the server with --admin-key "
                        "(or LORAFLEET_ADMIN_KEY) to load and unload adapters at runtime")
    if request.path in ADMIN_PATHS and frontend.admin_key is not None and not is_admin:
        return ApiError(403, "forbidden", "this endpoint needs the admin key")
    if frontend.api_key is not None and not is_admin and not _matches(given, frontend.api_key):
        return ApiError(401, "invalid_api_key", "missing or wrong API key (Authorization: Bearer <key>)")
    return None


def _adapter_path(frontend: Frontend, raw: object) -> str:
    """The realpath of `raw`, which must lie under --adapter-root (relative paths are taken from there)."""
    if not isinstance(raw, str) or not raw:
        raise bad("lora_path", "must be a non-empty string")
    if not is_text(raw) or "\0" in raw or len(raw.encode("utf-8")) > MAX_PATH_BYTES:
        raise bad("lora_path", f"must be text of at most {MAX_PATH_BYTES} bytes without NUL characters")
    if frontend.adapter_root is None:
        raise ApiError(403, "forbidden_path", "lora_path: runtime loading needs the server started with "
                       "--adapter-root", "lora_path")
    root = os.path.realpath(frontend.adapter_root)
    path = os.path.realpath(os.path.join(root, raw))
    if os.path.commonpath([root, path]) != root:
        raise ApiError(403, "forbidden_path", "lora_path: resolves outside the adapter root", "lora_path")
    if not Path(path).is_dir():
        raise ApiError(404, "adapter_not_found", f"lora_path: {raw!r} is not a directory under the adapter root",
                       "lora_path")
    outside = files_inside(root, path)
    if outside is not None:
        raise ApiError(403, "forbidden_path", f"lora_path: {outside!r} links outside the adapter root", "lora_path")
    return path


_ADMIN_STATUS = {"adapter_exists": 400, "adapter_in_use": 409, "model_not_found": 404, "adapter_invalid": 400}


async def _admin(request: web.Request, op: str) -> web.Response:
    frontend: Frontend = request.app["frontend"]
    try:
        body = await openai_api.read_json(request, frontend)
        if not isinstance(body, dict):
            raise bad("body", "must be a JSON object")
        check_document(body)
        name = Text(MAX_LORA_NAME).check("lora_name", body.get("lora_name"), None)
        if name == frontend.ctx.base_name:
            raise bad("lora_name", "must be a non-empty string other than the base model's name")
        path = _adapter_path(frontend, body.get("lora_path")) if op == "load" else None
    except ApiError as exc:
        return openai_api.error_response(exc)
    result = await frontend.admin(op, name, path)
    if not result.ok:
        code = result.code or "adapter_invalid"
        param = "lora_name" if code != "adapter_invalid" else "lora_path"
        return openai_api.error_response(ApiError(_ADMIN_STATUS.get(code, 400), code, result.message, param))
    frontend.ctx.adapters = set(frontend.hub.adapters)
    return web.json_response({"status": "ok", "message": result.message})


async def load_lora_adapter(request: web.Request) -> web.Response:
    return await _admin(request, "load")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    return await _admin(request, "unload")


async def health(request: web.Request) -> web.Response:
    hub = request.app["frontend"].hub
    body = {"status": "ok", "executors": hub.executors, "step": hub.timing.step}
    if not hub.healthy or hub.stalled:
        body.update(status="unhealthy", reason=hub.health_reason or hub.stalled)
        return web.json_response(body, status=503)
    if hub.draining:
        body.update(status="draining")
        return web.json_response(body, status=503)
    return web.json_response(body)


async def debug_state(request: web.Request) -> web.Response:
    """The latest engine snapshot (pool usage, page owners, queues) as JSON."""
    hub = request.app["frontend"].hub
    snapshot = hub.snapshot
    return web.json_response({
        "snapshot": dataclasses.asdict(snapshot) if snapshot is not None else None,
        "step": dataclasses.asdict(hub.timing),
        "prefetch": dataclasses.asdict(hub.prefetch),
        "healthy": hub.healthy,
        "invalid_adapters": hub.invalid_adapters,
    })


async def _send_buffer_watch(app: web.Application):
    """For the app's life: the bound on all connections' unsent bytes (frontend.watch_send_buffers)."""
    task = asyncio.create_task(watch_send_buffers(app["frontend"]), name="send-buffer-watch")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_sockets(app: web.Application) -> None:
    """Close every WebSocket at once (each first sends what it has queued, a deflate one for at most 2 s)."""
    await asyncio.gather(*(conn.close_socket(1001, b"server shutting down") for conn in list(app["frontend"].sockets)))


async def _to_dashboard(request: web.Request) -> web.Response:
    """GET / → /dashboard, keeping the query (`?api_key=` opens a dashboard that needs its key)."""
    raise web.HTTPFound("/dashboard" + (f"?{request.query_string}" if request.query_string else ""))


def build_app(frontend: Frontend) -> web.Application:
    """The aiohttp app; calls lorafleet.dashboard.setup_routes(app, hub) when the dashboard provides it."""
    app = web.Application(middlewares=[auth_middleware], client_max_size=frontend.max_body_bytes)
    app["frontend"] = frontend
    app.router.add_get("/v1/stream", ws_stream)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_get("/v1/models/{model:.+}", openai_api.model)  # names under --adapter-root hold "/"
    app.router.add_get("/version", openai_api.version)
    app.router.add_post("/tokenize", openai_api.tokenize)
    app.router.add_post("/detokenize", openai_api.detokenize)
    app.on_response_prepare.append(openai_api.request_id_header)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/v1/debug/state", debug_state)
    app.router.add_get("/health", health)
    app.on_shutdown.append(_close_sockets)
    app.cleanup_ctx.append(_send_buffer_watch)
    try:
        from lorafleet.dashboard import setup_routes
    except ImportError:
        setup_routes = None
    if setup_routes is not None:
        app.router.add_get("/", _to_dashboard)
        info = frontend.hub.info
        setup_routes(app, frontend.hub, max_lora=info.get("config", {}).get("max_adapters_per_batch"),
                     default_slo_ttft_ms=info.get("slo_ttft_ms"), title=f"lorafleet · {frontend.ctx.base_name}",
                     metric_prefix=info.get("metric_prefix") or "lorafleet:", model_name=frontend.ctx.base_name)
    return app

"""The fleet's ingress deployment: the one HTTP/WebSocket endpoint in front of the replicas.

- OpenAI `/v1/completions`, `/v1/chat/completions`: routed by the body's `model` (an adapter as Ray's
  multiplexed model id, the base model unmultiplexed), streamed through; `x-lorafleet-replica` names the
  replica. A replica failure before the first byte is retried on another replica (up to `retries` times).
- `/v1/stream`: the ingress terminates the client's WebSocket and routes EVERY `generate` frame on its own
  (one socket may mix adapters); a `cancel` cancels that frame's Ray call, which cancels it in the server
  that runs it; the `accepted` frame carries `replica`.
- `/v1/models`: the union over replicas; `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`: broadcast to
  every running replica (Serve's `broadcast`, past the replicas' queues) and replayed by replicas started later.
- `/health` (ok / degraded / unavailable), `/metrics` (every replica's families with a `replica` label),
  `/dashboard` (replicas, adapters, load), `/fleet/state` (the same as JSON).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations (Request,
# WebSocket) at run time, after Serve has rebuilt the methods elsewhere, so they must be real objects.
import asyncio
import hmac
import html
import json
import time
import uuid
from typing import Any

import msgpack
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.websockets import WebSocketDisconnect

from lorafleet.actors.fleet.child import REPLICA_FAILED, ReplicaDown, server_keys
from lorafleet.actors.fleet.metrics import FleetMetrics, render

MSGPACK_PROTOCOL = "lorafleet.msgpack"
REPLICA_HEADER = "x-lorafleet-replica"
VIEW_TTL_S = 0.25
SHOWN = 20  # adapter names per replica on the dashboard

app = FastAPI()


class NoReplica(Exception):
    """Every attempt failed before the first byte."""


class QueueFull(Exception):
    """The replicas' router already holds --max-queued-requests waiting requests (Ray's BackPressureError)."""


QUEUE_FULL = "queue_full"


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": code, "code": code, "param": param}}


def _key(headers, query) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or query.get("api_key")


def _matches(given: str | None, expected: str | None) -> bool:
    return expected is not None and given is not None and hmac.compare_digest(given.encode(), expected.encode())


def own_request_id() -> None:
    """Give the next handle call its own Serve request id. Calls made inside one incoming request inherit its
    internal id, and a router that fulfils each pending request by that id (ours: every call carries its own
    routing hints) would serve only one of several concurrent calls; the frames of one WebSocket and the admin
    broadcast are exactly such concurrent calls."""
    serve_context._set_request_context(_internal_request_id=uuid.uuid4().hex)


def _retryable(exc: BaseException) -> tuple[bool, str | None]:
    """(may retry elsewhere, the failed replica's id when known)."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, ReplicaDown):
            return True, candidate.replica
    return isinstance(exc, (RayActorError, ReplicaUnavailableError)), None


async def _rest(gen, event_stream: bool):
    """The response's remaining bytes. If the replica call itself fails after the first byte (its actor died),
    an event stream still ends with an SSE error event; a whole-body response cannot say more than stop."""
    try:
        async for chunk in gen:
            yield chunk
    except Exception as exc:  # after the first byte there is no retry; tell an SSE client in its own format
        if event_stream:
            error = error_body(REPLICA_FAILED, f"the replica failed mid-stream: {str(exc).splitlines()[-1][:300]}")
            yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        gen.cancel()


def _code(body: object) -> str | None:
    return (body.get("error") or {}).get("code") if isinstance(body, dict) else None


class FleetSocket:
    """One client socket: each `generate` frame is its own routed Ray call; replies keep the client's id."""

    def __init__(self, ingress: "FleetIngress", ws: WebSocket, binary: bool) -> None:
        self.ingress, self.ws, self.binary = ingress, ws, binary
        self.lock = asyncio.Lock()
        self.active: dict[str, Generation] = {}
        self.tasks: set[asyncio.Task] = set()

    async def send(self, frame: dict) -> None:
        async with self.lock:
            try:
                if self.binary:
                    await self.ws.send_bytes(msgpack.packb(frame, use_bin_type=True))
                else:
                    await self.ws.send_text(json.dumps(frame, separators=(",", ":")))
            except (RuntimeError, WebSocketDisconnect):
                pass  # the client went away; its generations are cancelled by close()

    async def error(self, cid: str | None, code: str, message: str, param: str | None = None) -> None:
        await self.send({"type": "error", "id": cid, "error": {"code": code, "message": message, "param": param}})

    async def handle(self, data: str | bytes | None) -> None:
        try:
            frame = json.loads(data) if isinstance(data, str) else msgpack.unpackb(data or b"", raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            await self.error(None, "invalid_json", f"the frame is not valid JSON/msgpack: {exc}")
            return
        if not isinstance(frame, dict):
            await self.error(None, "invalid_json", "a frame must be an object")
            return
        cid = frame.get("id")
        if not isinstance(cid, str) or not cid:
            await self.error(None, "invalid_request", "id: must be a non-empty string", "id")
        elif frame.get("type") == "generate":
            await self.generate(cid, frame)
        elif frame.get("type") == "cancel":
            if cid in self.active:
                self.active[cid].cancel()
        else:
            await self.error(cid, "unknown_type", f"type: unknown frame type {frame.get('type')!r} "
                             "(generate, cancel)", "type")

    async def generate(self, cid: str, frame: dict) -> None:
        if cid in self.active:
            await self.error(cid, "duplicate_id", f"id: {cid!r} is already generating on this socket", "id")
            return
        generation = Generation(cid)
        self.active[cid] = generation
        task = asyncio.create_task(self.pump(generation, {**frame, "id": uuid.uuid4().hex}))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def pump(self, generation: "Generation", frame: dict) -> None:
        cid = generation.cid
        try:
            adapter = await self.ingress.multiplexed_id(frame.get("model"))
            try:
                generation.gen, first = await self.ingress.first("stream", adapter, frame)
            except NoReplica as exc:
                self._release(generation)
                await self.error(cid, REPLICA_FAILED, f"no replica could serve the request: {exc}")
                return
            except QueueFull as exc:
                self._release(generation)
                await self.error(cid, QUEUE_FULL, str(exc))
                return
            self.ingress.count("ws_generations")
            if generation.cancelled:
                generation.gen.cancel()
            await self._relay(generation, first)
        finally:
            self._release(generation)

    async def _relay(self, generation: "Generation", first: dict) -> None:
        reply = first
        try:
            while True:
                if reply.get("type") == "delta":
                    generation.tokens += len(reply.get("token_ids") or ())
                final = reply.get("type") == "error" or (reply.get("type") == "done"
                                                          and not reply.get("remaining"))  # n: one done per choice
                if final:
                    self._release(generation)
                await self.send({**reply, "id": generation.cid})
                if final:
                    return
                reply = await generation.gen.__anext__()
        except (RequestCancelledError, asyncio.CancelledError, StopAsyncIteration) as exc:
            if not generation.cancelled:
                raise exc if not isinstance(exc, StopAsyncIteration) else RuntimeError("stream ended early") from exc
            self._release(generation)
            await self.send({"type": "done", "id": generation.cid, "finish_reason": "cancelled",
                             "usage": {"prompt_tokens": None, "completion_tokens": generation.tokens}})
        except Exception as exc:  # the replica call failed after the first frame: a terminal error frame
            self._release(generation)
            self.ingress.count("replica_failures")
            await self.error(generation.cid, REPLICA_FAILED, f"the replica failed mid-stream: "
                             f"{str(exc).splitlines()[-1][:300]}")

    def _release(self, generation: "Generation") -> None:
        if self.active.get(generation.cid) is generation:
            del self.active[generation.cid]

    async def close(self) -> None:
        for generation in list(self.active.values()):
            generation.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Generation:
    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.gen = None
        self.cancelled = False
        self.tokens = 0

    def cancel(self) -> None:
        self.cancelled = True
        if self.gen is not None:
            self.gen.cancel()


def dashboard_html(view: dict[str, dict], expected: int, counters: dict[str, int]) -> str:
    """A plain HTML page (refreshes every 2 s): one row per replica with its health, load and adapters."""
    rows = []
    for replica, rep in sorted(view.items()):
        adapters = [m["id"] for m in rep.get("models", []) if m.get("parent") is not None]
        cells = [replica, "healthy" if rep.get("healthy") else f"down: {rep.get('reason')}",
                 str(rep.get("running", 0)), str(rep.get("waiting", 0)), str(rep.get("served", 0)),
                 ", ".join(rep.get("resident", [])) or "–",
                 ", ".join(sorted(adapters)[:SHOWN]) + (f" +{len(adapters) - SHOWN}" if len(adapters) > SHOWN else ""),
                 f"<a href=\"{html.escape(rep.get('url', ''))}/dashboard\">{html.escape(rep.get('url', ''))}</a>"]
        escaped = [c if c.startswith("<a ") else html.escape(c) for c in cells]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in escaped) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("replica", "health", "running", "waiting", "served",
                                              "resident adapters", "adapters", "server"))
    events = ", ".join(f"{html.escape(k)}={v}" for k, v in sorted(counters.items())) or "none"
    return (f"<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>"
            f"<title>lorafleet fleet</title><style>body{{font-family:sans-serif}}td,th{{padding:4px 8px;"
            f"border-bottom:1px solid #ddd;text-align:left}}</style></head><body><h1>lorafleet fleet</h1>"
            f"<p>{len(view)} of {expected} replica(s) reporting · events: {events}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>")


# Defined last: Serve pickles the FastAPI app when the class is decorated, with the module globals that exist
# at that moment, so every helper the routes use must be defined above.
@serve.ingress(app)
class FleetIngress:
    def __init__(self, replicas: DeploymentHandle, state: DeploymentHandle, options: dict[str, Any]) -> None:
        self.replicas, self.state = replicas, state
        self.expected = int(options["replicas"])
        self.retries = int(options.get("retries", 3))
        self.max_queued = options.get("max_queued_requests")
        self.api_key, self.admin_key = server_keys(options.get("server_args", []))
        self.metrics = FleetMetrics()
        self.metrics.expected = self.expected
        self.counters: dict[str, int] = {}
        self.metrics.counters = self.counters
        self._view: dict[str, dict] = {}
        self._view_at = 0.0

    def count(self, event: str) -> None:
        self.counters[event] = self.counters.get(event, 0) + 1

    async def view(self) -> dict[str, dict]:
        if time.monotonic() - self._view_at > VIEW_TTL_S:
            self._view = await self.state.snapshot.remote()
            self._view_at = time.monotonic()
        return self._view

    async def base_name(self) -> str | None:
        for _ in range(100):
            for report in (await self.view()).values():
                for model in report.get("models", []):
                    if model.get("parent") is None:
                        return model["id"]
            await asyncio.sleep(0.1)
            self._view_at = 0.0
        return None

    async def multiplexed_id(self, model: object) -> str:
        """The adapter's name as the multiplexed model id; "" for the base model (and for a missing model, which
        the server then refuses by itself)."""
        if not isinstance(model, str) or not model:
            return ""
        return "" if model == await self.base_name() else model

    async def first(self, method: str, adapter: str, *args: Any) -> tuple[Any, Any]:
        """Start `method` on a replica and wait for its first item; on a replica failure before that, retry on
        another (the failed one avoided). Returns (the Ray response generator, the first item)."""
        avoid: list[str] = []
        last = "no replica answered"
        for attempt in range(self.retries + 1):
            handle = self.replicas.options(stream=True, multiplexed_model_id=adapter)
            own_request_id()
            gen = getattr(handle, method).remote(*args, route={"avoid": list(avoid)})
            try:
                return gen, await gen.__anext__()
            except BackPressureError as exc:
                self.count("rejected_queue_full")
                raise QueueFull(f"the fleet's queue is full ({self.max_queued} waiting); retry later") from exc
            except StopAsyncIteration:
                last = "the replica returned nothing"
            except Exception as exc:
                retry, replica = _retryable(exc)
                if not retry:
                    raise
                self.count("replica_failures")
                last = str(exc).splitlines()[-1][:300]
                if replica is not None and replica not in avoid:
                    avoid.append(replica)
            if attempt < self.retries:
                self.count("retries")
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise NoReplica(last)

    # OpenAI HTTP --------------------------------------------------------------------------------------
    async def _generate(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        adapter = await self.multiplexed_id(parsed.get("model") if isinstance(parsed, dict) else None)
        try:
            gen, meta = await self.first("http", adapter, "POST", path, body, dict(request.headers))
        except NoReplica as exc:
            return JSONResponse(error_body(REPLICA_FAILED, f"no replica could serve the request: {exc}"), 503)
        except QueueFull as exc:
            return JSONResponse(error_body(QUEUE_FULL, str(exc)), 429, headers={"Retry-After": "1"})
        self.count("http_requests")
        headers = {**meta["headers"], REPLICA_HEADER: meta["replica"]}
        headers.pop("content-type", None)
        headers.pop("Content-Type", None)
        media = meta["headers"].get("Content-Type") or meta["headers"].get("content-type")
        event_stream = (media or "").startswith("text/event-stream")
        return StreamingResponse(_rest(gen, event_stream), status_code=meta["status"], headers=headers,
                                 media_type=media)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if self.api_key is not None and not (_matches(_key(request.headers, request.query_params), self.api_key)
                                             or _matches(_key(request.headers, request.query_params), self.admin_key)):
            return JSONResponse(error_body("invalid_api_key", "missing or wrong API key"), 401)
        data: dict[str, dict] = {}
        for replica, report in sorted((await self.view()).items()):
            for model in report.get("models", []):
                entry = data.setdefault(model["id"], {**model, "replicas": []})
                entry["replicas"].append(replica)
        base = [m for m in data.values() if m.get("parent") is None]
        adapters = sorted((m for m in data.values() if m.get("parent") is not None), key=lambda m: m["id"])
        return JSONResponse({"object": "list", "data": base + adapters})

    # admin broadcast ---------------------------------------------------------------------------------
    async def _admin(self, request: Request, op: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return JSONResponse(error_body("invalid_json", f"body: is not valid JSON: {exc}", "body"), 400)
        if not isinstance(body, dict):
            return JSONResponse(error_body("invalid_request", "body: must be a JSON object", "body"), 400)
        own_request_id()
        answers = await self.replicas.broadcast("admin", op, body, dict(request.headers)).results_async(
            timeout_s=120.0, return_exceptions=True)
        results = [a if isinstance(a, dict) else {"replica": "?", "status": 503, "body": error_body(
            REPLICA_FAILED, f"the replica failed: {str(a).splitlines()[-1][:300]}")} for a in answers]
        if not results:
            return JSONResponse(error_body(REPLICA_FAILED, "no replica is running"), 503)
        return await self._admin_outcome(op, body, results)

    async def _admin_outcome(self, op: str, body: dict, results: list[dict]) -> Response:
        """200 when every replica ends in the wanted state (done now, or already so); else the first failure's
        status, with every replica's answer under `replicas`."""
        already = {"load": "adapter_exists", "unload": "model_not_found"}[op]
        per = {r["replica"]: {**r["body"], "status_code": r["status"]} for r in results}
        done = [r for r in results if r["status"] == 200]
        fine = [r for r in results if r["status"] == 200 or _code(r["body"]) == already]
        if done and len(fine) == len(results):
            await self.state.record_admin.remote(op, body.get("lora_name"), body.get("lora_path"))
            self._view_at = 0.0
            return JSONResponse({"status": "ok", "message": f"{op}ed on {len(done)} of {len(results)} replica(s)",
                                 "replicas": per})
        failed = next(r for r in results if r not in fine) if len(fine) < len(results) else results[0]
        return JSONResponse({**failed["body"], "replicas": per}, failed["status"])

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        return await self._admin(request, "load")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        return await self._admin(request, "unload")

    # observability -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        view = await self.view()
        healthy = sorted(r for r, rep in view.items() if rep.get("healthy"))
        status = "ok" if len(healthy) >= self.expected else ("degraded" if healthy else "unavailable")
        body = {"status": status, "replicas_expected": self.expected, "replicas_healthy": len(healthy),
                "replicas": {r: {"healthy": rep.get("healthy"), "reason": rep.get("reason")}
                             for r, rep in sorted(view.items())}}
        return JSONResponse(body, 200 if healthy else 503)

    @app.get("/metrics")
    async def fleet_metrics(self) -> Response:
        self.metrics.reports = await self.view()
        return Response(render(self.metrics), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/fleet/state")
    async def fleet_state(self, request: Request) -> Response:
        if self.admin_key is not None and not _matches(_key(request.headers, request.query_params), self.admin_key):
            return JSONResponse(error_body("forbidden", "this endpoint needs the admin key"), 403)
        view = await self.view()
        replicas = {r: {k: v for k, v in rep.items() if k != "metrics"} for r, rep in sorted(view.items())}
        return JSONResponse({"expected": self.expected, "replicas": replicas, "events": self.counters})

    @app.get("/dashboard")
    async def dashboard(self) -> Response:
        return HTMLResponse(dashboard_html(await self.view(), self.expected, self.counters))

    # WebSocket ---------------------------------------------------------------------------------------
    @app.websocket("/v1/stream")
    async def ws_stream(self, ws: WebSocket) -> None:
        if self.api_key is not None:
            given = _key(ws.headers, ws.query_params)
            if not (_matches(given, self.api_key) or _matches(given, self.admin_key)):
                await ws.close(code=1008, reason="missing or wrong API key")
                return
        binary = MSGPACK_PROTOCOL in ws.scope.get("subprotocols", [])
        await ws.accept(subprotocol=MSGPACK_PROTOCOL if binary else None)
        conn = FleetSocket(self, ws, binary)
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await conn.handle(msg.get("text") if msg.get("text") is not None else msg.get("bytes"))
        except WebSocketDisconnect:
            pass
        finally:
            await conn.close()

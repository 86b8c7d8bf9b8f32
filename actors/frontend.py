"""The frontend actor: aiohttp routes for WebSocket streaming, OpenAI-compatible HTTP, admin and health.

Requests are validated here (actors/protocol.py), submitted to admission, and their per-step news comes
back through the `Router`, which owns the one inbox every producer (admission, scheduler) answers to and
hands each request's messages to that request's `Generation`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web

from lorafleet.actors.channels import Channel, LocalChannel
from lorafleet.actors.fields import redact, show, unique_keys
from lorafleet.actors.hub import RequestRecord, ServeHub
from lorafleet.actors.logprobs import ws_logprobs
from lorafleet.actors.protocol import ApiError, GenerationSpec, ParseContext, bad, client_id, parse_ws_generate
from lorafleet.actors.schema import AdminOp, AdminResult, Admitted, Cancel, DeltaItem, Rejected, StepDeltas, Submit

MSGPACK_PROTOCOL = "lorafleet.msgpack"
_UNTIED = ("invalid_json", "unknown_type", "duplicate_id")  # error frames that must not end a generation
log = logging.getLogger("lorafleet.frontend")
_ERROR_STATUS = {"internal_error": 500, "executor_failed": 503, "slo_unattainable": 429, "server_shutting_down": 503}


class Router:
    """Routes Admitted / Rejected / StepDeltas / AdminResult messages to the waiting request's queue."""

    def __init__(self, inbox: LocalChannel) -> None:
        self.inbox = inbox
        self.queues: dict[str, asyncio.Queue[object]] = {}

    def open(self, request_id: str) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self.queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def run(self) -> None:
        while True:
            msg = await self.inbox.recv()
            if isinstance(msg, StepDeltas):
                for item in msg.items:
                    self._deliver(item.request_id, item)
            elif isinstance(msg, (Admitted, Rejected, AdminResult)):
                self._deliver(msg.request_id, msg)
            else:
                raise TypeError(f"router got unexpected message {type(msg).__name__}")

    def _deliver(self, request_id: str, msg: object) -> None:
        queue = self.queues.get(request_id)
        if queue is not None:
            queue.put_nowait(msg)


@dataclass
class Generation:
    """One submitted generation as seen by a handler: wait for admission, then read its items."""

    frontend: Frontend
    request_id: str
    spec: GenerationSpec
    queue: asyncio.Queue[object]
    finished: bool = False
    cancel_sent: bool = False

    async def admitted(self) -> None:
        """Returns when admitted; raises ApiError when refused."""
        msg = await self.queue.get()
        if isinstance(msg, Rejected):
            self.finished = True
            exc = ApiError(msg.status, msg.code, msg.message, msg.param, msg.retry_after)
            self.frontend.refused(exc, self.spec, self.request_id)
            raise exc
        if isinstance(msg, DeltaItem) and msg.finished:  # failed before its Admitted went out
            self.finished = True
            raise item_error(msg)
        assert isinstance(msg, Admitted), f"unexpected first message {msg!r}"

    async def next(self) -> DeltaItem:
        item = await self.queue.get()
        assert isinstance(item, DeltaItem), f"unexpected message {item!r}"
        self.finished = self.finished or item.finished
        return item

    def cancel(self) -> None:
        """Ask the scheduler to stop it (idempotent); a final `cancelled` item will still arrive."""
        if not self.finished and not self.cancel_sent:
            self.cancel_sent = True
            self.frontend.admission.send(Cancel(self.request_id))

    def close(self) -> None:
        """Stop listening; cancels the request if it has not finished."""
        self.cancel()
        self.frontend.router.close(self.request_id)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits (docs/serving.md, "Overload and hostile clients").

    `ws_generations`: generations in flight on one WebSocket (more get a `too_many_generations` error
    frame; the socket stays usable). `ws_frame_rate` / `ws_frame_burst`: a token bucket of client frames
    per second; an invalid frame costs `ws_invalid_cost` tokens; a socket that empties the bucket is closed
    with 1008 (policy violation). `body_timeout`: seconds a client may take to send a request body (408)."""

    ws_generations: int = 256
    ws_frame_rate: float = 500.0
    ws_frame_burst: float = 1000.0
    ws_invalid_cost: float = 10.0
    body_timeout: float = 30.0


class FrameBucket:
    """Token bucket over a socket's frames: `take(cost)` is False once the client sends faster than allowed."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self, cost: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - cost
        self.at = now
        return self.tokens >= 0


@dataclass
class Frontend:
    """Shared state of the HTTP/WS handlers (read-only except the id counter and open sockets)."""

    ctx: ParseContext
    admission: Channel
    scheduler: Channel
    router: Router
    hub: ServeHub
    api_key: str | None = None
    admin_key: str | None = None
    adapter_root: Path | None = None
    max_body_bytes: int = 1 << 20
    dashboard_key: str | None = None
    allowed_origins: frozenset[str] = frozenset()  # browser origins beyond same-origin and localhost
    limits: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    _ids: itertools.count = field(default_factory=itertools.count)

    def new_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def start(self, spec: GenerationSpec) -> Generation:
        request_id = self.new_id()
        queue = self.router.open(request_id)
        self.admission.send(Submit(request_id, spec.prompt_ids, spec.params, spec.adapter, spec.slo_ttft_ms,
                                   time.monotonic()))
        return Generation(self, request_id, spec, queue)

    def refused(self, exc: ApiError, spec: GenerationSpec | None = None, request_id: str | None = None) -> None:
        """Record a generation request that ended with an error before it was admitted: a client error
        (bad field, unknown model, too long...) or a refusal (queue full, SLO unattainable, shutting down),
        so request_failure_total, the dashboard's FAILED tile and the access log see it. The adapter is
        only named when the request parsed (a client-chosen unknown name must not become a label)."""
        self.hub.publish_record(RequestRecord(
            request_id or self.new_id(), spec.adapter if spec is not None else None,
            len(spec.prompt_ids) if spec is not None else 0, 0, None, exc.code,
            slo_ttft_ms=spec.slo_ttft_ms if spec is not None else None, status=exc.status))

    def start_choices(self, spec: GenerationSpec) -> list[Generation]:
        """One generation per choice (prompts x n, `GenerationSpec.choices`), in choice-index order."""
        return [self.start(choice) for choice in spec.choices()]

    async def admin(self, op: str, name: str, path: str | None) -> AdminResult:
        request_id = self.new_id("admin")
        queue = self.router.open(request_id)
        try:
            self.scheduler.send(AdminOp(request_id, op, name, path))
            result = await queue.get()
        finally:
            self.router.close(request_id)
        assert isinstance(result, AdminResult)
        return result


async def admit_all(generations: list[Generation]) -> None:
    """Wait until every choice is admitted; the first refusal is raised (the caller closes them all)."""
    results = await asyncio.gather(*(g.admitted() for g in generations), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class Merged:
    """The items of several generations in arrival order, each with its generation, until every one has
    finished or failed. One reader task per generation, owned here: `close` cancels and awaits them."""

    def __init__(self, generations: list[Generation]) -> None:
        self.queue: asyncio.Queue[tuple[Generation, DeltaItem]] = asyncio.Queue()
        self.open = len(generations)
        self.tasks = [asyncio.create_task(self._read(g), name=f"read-{g.request_id}") for g in generations]

    async def _read(self, generation: Generation) -> None:
        while True:
            item = await generation.next()
            self.queue.put_nowait((generation, item))
            if item.finished or item.error_code is not None:
                return

    async def next(self) -> tuple[Generation, DeltaItem] | None:
        """The next (generation, item), or None when all have ended."""
        if self.open == 0:
            return None
        generation, item = await self.queue.get()
        if item.finished or item.error_code is not None:
            self.open -= 1
        return generation, item

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def item_error(item: DeltaItem) -> ApiError:
    return ApiError(_ERROR_STATUS.get(item.error_code or "", 500), item.error_code or "internal_error",
                    item.error_message or "")


# WebSocket /v1/stream -------------------------------------------------------------------------------
class WsConnection:
    """One socket: many generations told apart by the client's id; one lock serialises writes.

    A frame that fails gets an error frame and the socket goes on: tied to the frame's `id` when that id is
    valid, else `id: null`. Nothing a client sends can make a frame unsendable: one that cannot be encoded
    (msgpack cannot carry every Python value) is replaced by an `internal_error` frame with `id: null`."""

    def __init__(self, frontend: Frontend, ws: web.WebSocketResponse) -> None:
        self.frontend, self.ws = frontend, ws
        self.binary = ws.ws_protocol == MSGPACK_PROTOCOL
        self.lock = asyncio.Lock()
        self.active: dict[str, list[Generation]] = {}  # client id -> its choices' generations
        self.tasks: set[asyncio.Task] = set()
        limits = frontend.limits
        self.bucket = FrameBucket(limits.ws_frame_rate, limits.ws_frame_burst)

    def _encode(self, frame: dict[str, Any]) -> str | bytes:
        if self.binary:
            return msgpack.packb(frame, use_bin_type=True)
        return json.dumps(frame, separators=(",", ":"))

    async def send(self, frame: dict[str, Any]) -> None:
        """Send a frame; a client that has gone away loses it silently (its generations are cancelled when
        the socket's loop ends), so no task dies of a closed connection."""
        if self.ws.closed:
            return
        try:
            data = self._encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("ws frame %s for id %r could not be encoded: %r", frame.get("type"), frame.get("id"), exc)
            data = self._encode({"type": "error", "id": None, "error": {
                "code": "internal_error", "message": "a frame for this socket could not be encoded", "param": None}})
        try:
            async with self.lock:
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(data)
        except ConnectionError:
            pass  # the client disconnected meanwhile

    def admit_frame(self, invalid: bool = False) -> bool:
        """Charge the socket's frame bucket: False when the client exceeds its frame rate."""
        limits = self.frontend.limits
        return self.bucket.take(limits.ws_invalid_cost if invalid else 1.0)

    async def error(self, cid: str | None, exc: ApiError) -> None:
        await self.send({"type": "error", "id": cid, "error": {"code": exc.code, "message": redact(exc.message),
                                                               "param": exc.param}})

    def decode(self, msg) -> dict:
        try:
            frame = json.loads(msg.data, object_pairs_hook=unique_keys) if msg.type == WSMsgType.TEXT else \
                msgpack.unpackb(msg.data, raw=False, object_pairs_hook=unique_keys)
        except RecursionError as exc:
            raise ApiError(400, "invalid_json", "body: the frame is nested too deeply to parse", "body") from exc
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ApiError(400, "invalid_json", f"body: the frame is not valid {self._format(msg)}: {exc}",
                           "body") from exc
        if not isinstance(frame, dict):
            raise ApiError(400, "invalid_json", "body: a frame must be an object", "body")
        return frame

    @staticmethod
    def _format(msg) -> str:
        return "JSON" if msg.type == WSMsgType.TEXT else "msgpack"

    async def handle(self, msg) -> bool:
        """One client frame; any error is answered with an error frame (the socket goes on). False when the
        frame was invalid (it costs more of the socket's frame budget); a well-formed frame refused for
        capacity (429: too_many_generations, queue_full, slo_unattainable) is load, not abuse, and costs 1."""
        cid = None
        try:
            frame = self.decode(msg)
            cid = _valid_id(frame)
            await self.dispatch(frame)
            return True
        except ApiError as exc:
            self.frontend.refused(exc)
            await self.error(None if exc.code in _UNTIED else cid, exc)
            return exc.status == 429
        except Exception as exc:  # a bug must not end the socket or show the client a traceback
            ref = self.frontend.new_id("err")
            log.exception("ws frame failed (%s, id %r)", ref, cid)
            self.frontend.refused(internal_error(ref, exc))
            await self.error(cid, internal_error(ref, exc))
        return False

    async def dispatch(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "generate":
            await self.generate(frame)
        elif kind == "cancel":
            cid = client_id(frame)
            for generation in self.active.get(cid, ()):
                generation.cancel()
        else:
            raise ApiError(400, "unknown_type", f"type: unknown frame type {show(kind)} (generate, cancel)", "type")

    async def generate(self, frame: dict) -> None:
        cid = client_id(frame)
        if cid in self.active:
            raise ApiError(400, "duplicate_id", f"id: {cid!r} is already generating on this socket", "id")
        cap = self.frontend.limits.ws_generations
        if len(self.active) >= cap:
            raise ApiError(429, "too_many_generations", f"this socket already has {cap} generations in flight (the "
                           "per-connection limit); wait for one to end", None, 1.0)
        spec = parse_ws_generate(frame, self.frontend.ctx)
        generations = self.frontend.start_choices(spec)
        self.active[cid] = generations
        task = asyncio.create_task(self.pump(cid, generations), name=f"ws-{cid}")
        self.tasks.add(task)
        task.add_done_callback(self._pump_done)

    def _pump_done(self, task: asyncio.Task) -> None:
        """Owner's end of a generation task: its outcome is always retrieved (an unexpected failure is
        logged with its id, never left as "Task exception was never retrieved")."""
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("generation %s failed", task.get_name(), exc_info=task.exception())

    async def pump(self, cid: str, generations: list[Generation]) -> None:
        merged = None
        try:
            try:
                await admit_all(generations)
            except ApiError as exc:
                self._release(cid, generations)
                await self.error(cid, exc)
                return
            await self.send({"type": "accepted", "id": cid})
            merged = Merged(generations)
            await self._stream(cid, generations, merged)
        finally:
            self._release(cid, generations)
            if merged is not None:
                await merged.close()
            for generation in generations:
                generation.close()

    def _release(self, cid: str, generations: list[Generation]) -> None:
        """Free the id before the final frame goes out: the client may reuse it as soon as it reads it."""
        if self.active.get(cid) is generations:
            del self.active[cid]

    async def _stream(self, cid: str, generations: list[Generation], merged: Merged) -> None:
        """delta frames as tokens arrive and one done frame per choice (`index`: prompt index * n + sample
        index); the id is released with the last done. An error ends every choice of the id."""
        tokenizer = self.frontend.ctx.tokenizer
        started: set[int] = set()
        while (got := await merged.next()) is not None:
            generation, item = got
            spec, index = generation.spec, generation.spec.index
            if item.token_ids or item.text:
                text = item.text
                if spec.echo and index not in started and tokenizer is not None:  # echo: the prompt's text first
                    text = tokenizer.decode(spec.prompt_ids, skip_special_tokens=True) + text
                started.add(index)
                frame = {"type": "delta", "id": cid, "index": index, "text": text, "token_ids": item.token_ids}
                if generation.spec.params.get("logprobs") is not None:
                    frame["logprobs"] = ws_logprobs(item.logprobs, tokenizer)
                if item.prompt_logprobs is not None:
                    frame["prompt_logprobs"] = ws_logprobs(item.prompt_logprobs, tokenizer)
                await self.send(frame)
            if item.error_code is not None:
                self._release(cid, generations)
                await self.error(cid, item_error(item))
                return
            if item.finished:
                if merged.open == 0:
                    self._release(cid, generations)
                await self.send({
                    "type": "done", "id": cid, "index": index, "remaining": merged.open,
                    "finish_reason": item.finish_reason,
                    "usage": {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens},
                    "timing": {"queue_ms": item.queue_ms, "ttft_ms": item.ttft_ms, "e2e_ms": item.e2e_ms},
                })

    async def close(self) -> None:
        for generation in [g for choices in self.active.values() for g in choices]:
            generation.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _valid_id(frame: dict) -> str | None:
    """The frame's id if it is a valid client id (the one an error frame may echo), else None."""
    try:
        return client_id(frame)
    except ApiError:
        return None


def internal_error(ref: str, exc: BaseException) -> ApiError:
    """What a client sees of a server bug: a reference to find it in the log, no traceback or path."""
    return ApiError(500, "internal_error", f"the server failed on this request ({type(exc).__name__}); the "
                    f"server log has the details under {ref}")


async def ws_stream(request: web.Request) -> web.WebSocketResponse:
    frontend: Frontend = request.app["frontend"]
    ws = web.WebSocketResponse(protocols=(MSGPACK_PROTOCOL,), max_msg_size=frontend.max_body_bytes)
    await ws.prepare(request)
    conn = WsConnection(frontend, ws)
    frontend.sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not conn.admit_frame(invalid=not await conn.handle(msg)):
                await _close_abusive(conn)
                break
            await asyncio.sleep(0)  # one socket's backlog of frames never holds the loop from the others
    finally:
        frontend.sockets.discard(ws)
        await conn.close()
    return ws


async def _close_abusive(conn: WsConnection) -> None:
    limits = conn.frontend.limits
    conn.frontend.hub.count("ws_closed_frame_rate")
    log.warning("closing a WebSocket (1008): frames over --ws-frame-rate %g/s; its %d generation(s) in flight "
                "are cancelled", limits.ws_frame_rate, len(conn.active))
    await conn.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=f"frame rate over {limits.ws_frame_rate:g}/s "
                        f"(an invalid frame counts {limits.ws_invalid_cost:g})".encode())


def bad_body(exc: Exception) -> ApiError:
    return bad("body", f"is not valid JSON: {exc}", "invalid_json")

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
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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
CLOSE_DRAIN_S = 2.0  # how long closing a permessage-deflate socket waits for its queued frames to be sent
_UNTIED = ("invalid_json", "unknown_type", "duplicate_id")  # error frames that must not end a generation
log = logging.getLogger("lorafleet.frontend")
_ERROR_STATUS = {"internal_error": 500, "executor_failed": 503, "slo_unattainable": 429, "server_shutting_down": 503}
_ITEM_PARAM = {"slo_unattainable": "slo_ttft_ms", "adapter_invalid": "model"}


Receiver = Callable[[object], None]


class Router:
    """Routes Admitted / Rejected / StepDeltas / AdminResult messages to the request they name.

    Each open request has a receiver: a queue's `put_nowait` (`open`, for handlers that await their messages)
    or a callback (`attach`) that handles the message at once. A step's `StepDeltas` is delivered in one pass,
    item by item in the step's order, inside one callback of the loop: a WebSocket's generations encode their
    frames into their socket's outbox there, and each socket writes the step's frames once, after the pass
    (`WsConnection.flush`). A receiver that raises is logged and detached; the router and the other requests
    go on."""

    def __init__(self, inbox: LocalChannel) -> None:
        self.inbox = inbox
        self.receivers: dict[str, Receiver] = {}

    def open(self, request_id: str) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self.receivers[request_id] = queue.put_nowait
        return queue

    def attach(self, request_id: str, receiver: Receiver) -> None:
        """Hand the request's next messages to `receiver` (called on the loop, must not block)."""
        self.receivers[request_id] = receiver

    def close(self, request_id: str) -> None:
        self.receivers.pop(request_id, None)

    async def run(self) -> None:
        while True:
            self.dispatch(await self.inbox.recv())

    def dispatch(self, msg: object) -> None:
        if isinstance(msg, StepDeltas):
            for item in msg.items:
                self._deliver(item.request_id, item)
        elif isinstance(msg, (Admitted, Rejected, AdminResult)):
            self._deliver(msg.request_id, msg)
        else:
            raise TypeError(f"router got unexpected message {type(msg).__name__}")

    def _deliver(self, request_id: str, msg: object) -> None:
        receiver = self.receivers.get(request_id)
        if receiver is None:
            return
        try:
            receiver(msg)
        except Exception:
            log.exception("delivering %s to %s failed; its messages are dropped", type(msg).__name__, request_id)
            self.close(request_id)


@dataclass
class Generation:
    """One submitted generation as seen by a handler: wait for admission, then read its items."""

    frontend: Frontend
    request_id: str
    spec: GenerationSpec
    queue: asyncio.Queue[object]
    finished: bool = False
    cancel_sent: bool = False

    def resolve(self, msg: object) -> ApiError | None:
        """Take the generation's first message: None when it was admitted, else the refusal (recorded)."""
        if isinstance(msg, Rejected):
            self.finished = True
            exc = ApiError(msg.status, msg.code, msg.message, msg.param, msg.retry_after)
            self.frontend.refused(exc, self.spec, self.request_id)
            return exc
        if isinstance(msg, DeltaItem) and msg.finished:  # failed before its Admitted went out
            self.finished = True
            return item_error(msg)
        assert isinstance(msg, Admitted), f"unexpected first message {msg!r}"
        return None

    async def admitted(self) -> None:
        """Returns when admitted; raises ApiError when refused."""
        exc = self.resolve(await self.queue.get())
        if exc is not None:
            raise exc

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
    with 1008 (policy violation). `ws_send_buffer`: bytes of frames one WebSocket may have waiting to be sent
    (its client reads slower than its generations produce); over it the connection is dropped and its
    generations cancelled. `sse_send_buffer`: the same bound for one OpenAI SSE stream (its events encoded
    but not yet sent). `send_buffer_total`: the bound on all connections' unsent bytes together (many slow
    readers, each under its own bound); over it the connections holding the most are dropped the same way
    (`shed_slow_readers`). `body_timeout`: seconds a client may take to send a request body (408)."""

    ws_generations: int = 256
    ws_frame_rate: float = 500.0
    ws_frame_burst: float = 1000.0
    ws_invalid_cost: float = 10.0
    ws_send_buffer: int = 64 << 20
    sse_send_buffer: int = 64 << 20
    send_buffer_total: int = 1 << 30
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
    sockets: set[WsConnection] = field(default_factory=set)
    sse_streams: set[Any] = field(default_factory=set)  # openai_api.SseStream of the streamed responses in flight
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


SHED_EVERY_S = 0.25  # how often the connections' unsent bytes are summed (`watch_send_buffers`)


def shed_slow_readers(frontend: Frontend) -> int:
    """Drop the connections (WebSockets and SSE streams) holding the most unsent bytes until what all of them
    hold together is within `limits.send_buffer_total`; returns how many were dropped. Each connection's own
    bound stops one slow reader; this one stops many (each under its own bound) from filling the memory."""
    held = [(conn.unsent(), conn) for conn in (*frontend.sockets, *frontend.sse_streams) if not conn.dropped]
    total = sum(size for size, _ in held)
    limit, dropped = frontend.limits.send_buffer_total, 0
    for size, conn in sorted(held, key=lambda pair: pair[0], reverse=True):
        if total <= limit:
            break
        conn.drop(f"all connections together over {limit} bytes waiting (--max-send-buffer-total-mb); this one "
                  f"held the most, {size} bytes")
        total -= size
        dropped += 1
    return dropped


async def watch_send_buffers(frontend: Frontend) -> None:
    """`shed_slow_readers` every SHED_EVERY_S seconds, for the server's life."""
    while True:
        await asyncio.sleep(SHED_EVERY_S)
        shed_slow_readers(frontend)


async def admit_all(generations: list[Generation]) -> None:
    """Wait until every choice is admitted; the first refusal is raised (the caller closes them all)."""
    results = await asyncio.gather(*(g.admitted() for g in generations), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class Merged:
    """The items of several admitted generations in arrival order, each with its generation, until every one
    has finished or failed. The Router appends them straight to one deque and wakes the reader (no task per
    generation, no queue per item); items that reached a generation's own queue before (between its admission
    and this) come first."""

    def __init__(self, generations: list[Generation]) -> None:
        self.items: deque[tuple[Generation, DeltaItem]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.open = len(generations)
        self.ended: set[str] = set()
        for generation in generations:
            while not generation.queue.empty():
                self.items.append((generation, generation.queue.get_nowait()))
            generation.frontend.router.attach(generation.request_id, partial(self._put, generation))

    def _put(self, generation: Generation, item: object) -> None:
        assert isinstance(item, DeltaItem), f"unexpected message {item!r}"
        self.items.append((generation, item))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> tuple[Generation, DeltaItem] | None:
        """The next (generation, item), or None when all have ended."""
        while self.open:
            if not self.items:
                self.waiter = asyncio.get_running_loop().create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
                continue
            generation, item = self.items.popleft()
            if generation.request_id in self.ended:
                continue  # nothing follows a generation's last item; ignore it if anything did
            if item.finished or item.error_code is not None:
                generation.finished = generation.finished or item.finished
                self.ended.add(generation.request_id)
                self.open -= 1
            return generation, item
        return None


def item_error(item: DeltaItem) -> ApiError:
    """The error a request that failed after admission ends with; `param` names the request's field where the
    failure is about one (its first-token deadline, its adapter), as the refusals at admission do."""
    code = item.error_code or "internal_error"
    return ApiError(_ERROR_STATUS.get(code, 500), code, item.error_message or "", _ITEM_PARAM.get(code))


# WebSocket /v1/stream -------------------------------------------------------------------------------
_json_frame = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(frame, separators=...), minus its set-up
_json_string = json.encoder.encode_basestring_ascii  # what that encoder writes for a str (ensure_ascii)
_MSGPACK_TOKEN_IDS = msgpack.packb("token_ids", use_bin_type=True)
_FIN_TEXT, _FIN_BINARY = 0x81, 0x82  # RFC 6455 §5.2: FIN + opcode 1 (text) / 2 (binary)


def ws_frame(payload: bytes, binary: bool) -> bytes:
    """One unfragmented, unmasked (server → client) WebSocket data frame: header + payload (RFC 6455 §5.2)."""
    first = _FIN_BINARY if binary else _FIN_TEXT
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", first, size) + payload
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


class WsConnection:
    """One socket: many generations told apart by the client's id, and one outbox of frames in send order.

    Every frame for the socket is encoded once and appended to the outbox (`post`, never awaits); the outbox
    is written once per loop pass (`flush`, scheduled by the first post), so a step's frames for this socket go
    out in one transport write. Without permessage-deflate the frames are built here (RFC 6455 framing) and
    written straight to the transport, which never blocks: a client that reads slowly only grows its own
    socket's buffer, and the loop never waits for it. With permessage-deflate negotiated (a browser's default;
    the compressor's state lives in aiohttp's writer) a writer task owned by the connection sends them one by
    one through aiohttp, in order.

    A frame that fails gets an error frame and the socket goes on: tied to the frame's `id` when that id is
    valid, else `id: null`. Nothing a client sends can make a frame unsendable: one that cannot be encoded
    (msgpack cannot carry every Python value) is replaced by an `internal_error` frame with `id: null`."""

    def __init__(self, frontend: Frontend, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        self.frontend, self.ws, self.transport = frontend, ws, transport
        self.binary = ws.ws_protocol == MSGPACK_PROTOCOL
        self.compressed = bool(ws.compress) or transport is None
        self.active: dict[str, WsStream] = {}  # client id -> its choices' stream
        self.outbox: list[bytes | str] = []
        self.outbox_bytes = 0  # frames waiting for the writer task (permessage-deflate sockets)
        self.flush_due = self.dropped = False
        self.writer: asyncio.Task | None = None
        self.wake, self.idle = asyncio.Event(), asyncio.Event()  # writer task: frames to send / none left
        self.idle.set()
        limits = frontend.limits
        self.bucket = FrameBucket(limits.ws_frame_rate, limits.ws_frame_burst)

    def _encode(self, frame: dict[str, Any]) -> str | bytes:
        if self.binary:
            return msgpack.packb(frame, use_bin_type=True)
        return _json_frame(frame)

    def delta_prefix(self, cid: str, index: int) -> str | bytes:
        """The encoded start of a plain delta frame of (`cid`, `index`), up to its `text` value: what
        `_encode({"type": "delta", "id": cid, "index": index, "text": ...})` writes before the text."""
        if self.binary:
            return b"\x85" + b"".join(msgpack.packb(v, use_bin_type=True)
                                       for v in ("type", "delta", "id", cid, "index", index, "text"))
        return '{"type":"delta","id":' + _json_string(cid) + ',"index":' + str(int(index)) + ',"text":'

    def post_delta(self, prefix: str | bytes, text: str, token_ids: list[int]) -> None:
        """Post the plain delta frame `{"type", "id", "index", "text", "token_ids"}` from its encoded prefix
        (`delta_prefix`): the same bytes `post` would encode, without building and walking the dict."""
        if self.dropped or self.ws.closed:
            return
        if type(text) is not str or type(token_ids) is not list or not all(type(t) is int for t in token_ids):
            raise TypeError("a plain delta frame carries a str text and a list of int token ids")
        if self.binary:
            data = prefix + msgpack.packb(text, use_bin_type=True) + _MSGPACK_TOKEN_IDS + \
                msgpack.packb(token_ids, use_bin_type=True)
        else:
            data = prefix + _json_string(text) + ',"token_ids":[' + ",".join(map(str, token_ids)) + "]}"
        self._queue(data)

    def post(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the socket (sent in order with the next flush); a client that has gone away
        loses it silently (its generations are cancelled when the socket's loop ends)."""
        if self.dropped or self.ws.closed:
            return
        try:
            data = self._encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("ws frame %s for id %r could not be encoded: %r", frame.get("type"), frame.get("id"), exc)
            data = self._encode({"type": "error", "id": None, "error": {
                "code": "internal_error", "message": "a frame for this socket could not be encoded", "param": None}})
        self._queue(data)

    def unsent(self) -> int:
        """Bytes of frames posted to this socket and not yet sent (outbox + the transport's buffer)."""
        return self.outbox_bytes + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def _queue(self, data: str | bytes) -> None:
        if self.compressed:
            self.outbox.append(data)
            self.outbox_bytes += len(data)
            if self.outbox_bytes > self.frontend.limits.ws_send_buffer:
                self._drop()
                return
            self.idle.clear()
            self.wake.set()
            if self.writer is None:
                self.writer = asyncio.create_task(self._write_compressed(), name="ws-writer")
            return
        self.outbox.append(ws_frame(data if isinstance(data, bytes) else data.encode(), self.binary))
        if not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the outbox's frames to the transport in one call (uncompressed sockets)."""
        self.flush_due = False
        frames, self.outbox = self.outbox, []
        if frames and not self.dropped and not self.ws.closed and not self.transport.is_closing():
            self.transport.writelines(frames)
            if self.transport.get_write_buffer_size() > self.frontend.limits.ws_send_buffer:
                self._drop()

    def _drop(self) -> None:
        """The client reads slower than its generations produce and its backlog passed --ws-max-send-buffer-mb."""
        self.drop(f"over {self.frontend.limits.ws_send_buffer} bytes of frames waiting (--ws-max-send-buffer-mb)")

    def drop(self, why: str) -> None:
        """Drop the connection of a client that does not read (a close frame could not get through); its loop
        ends and cancels its generations. Counted ws_closed_slow_reader, logged with `why`."""
        self.dropped = True
        self.outbox, self.outbox_bytes = [], 0
        self.frontend.hub.count("ws_closed_slow_reader")
        log.warning("dropping a WebSocket whose client does not read: %s; its %d generation(s) in flight are "
                    "cancelled", why, len(self.active))
        if self.transport is not None:
            self.transport.abort()

    async def _write_compressed(self) -> None:
        """The writer task of a permessage-deflate socket: aiohttp compresses and sends each frame in order."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            frames, self.outbox = self.outbox, []
            for data in frames:
                if self.dropped or self.ws.closed:
                    break
                self.outbox_bytes -= len(data)
                try:
                    if isinstance(data, bytes):
                        await self.ws.send_bytes(data)
                    else:
                        await self.ws.send_str(data)
                except ConnectionError:
                    break  # the client disconnected meanwhile
            if not self.outbox:
                self.idle.set()

    def admit_frame(self, invalid: bool = False) -> bool:
        """Charge the socket's frame bucket: False when the client exceeds its frame rate."""
        limits = self.frontend.limits
        return self.bucket.take(limits.ws_invalid_cost if invalid else 1.0)

    def error(self, cid: str | None, exc: ApiError) -> None:
        self.post({"type": "error", "id": cid, "error": {"code": exc.code, "message": redact(exc.message),
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

    def handle(self, msg) -> bool:
        """One client frame; any error is answered with an error frame (the socket goes on). False when the
        frame was invalid (it costs more of the socket's frame budget); a well-formed frame refused for
        capacity (429: too_many_generations, queue_full, slo_unattainable) is load, not abuse, and costs 1."""
        cid = None
        try:
            frame = self.decode(msg)
            cid = _valid_id(frame)
            self.dispatch(frame)
            return True
        except ApiError as exc:
            self.frontend.refused(exc)
            self.error(None if exc.code in _UNTIED else cid, exc)
            return exc.status == 429
        except Exception as exc:  # a bug must not end the socket or show the client a traceback
            ref = self.frontend.new_id("err")
            log.exception("ws frame failed (%s, id %r)", ref, cid)
            self.frontend.refused(internal_error(ref, exc))
            self.error(cid, internal_error(ref, exc))
        return False

    def dispatch(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "generate":
            self.generate(frame)
        elif kind == "cancel":
            stream = self.active.get(client_id(frame))
            for generation in stream.generations if stream is not None else ():
                generation.cancel()
        else:
            raise ApiError(400, "unknown_type", f"type: unknown frame type {show(kind)} (generate, cancel)", "type")

    def generate(self, frame: dict) -> None:
        cid = client_id(frame)
        if cid in self.active:
            raise ApiError(400, "duplicate_id", f"id: {cid!r} is already generating on this socket", "id")
        cap = self.frontend.limits.ws_generations
        if len(self.active) >= cap:
            raise ApiError(429, "too_many_generations", f"this socket already has {cap} generations in flight (the "
                           "per-connection limit); wait for one to end", None, 1.0)
        spec = parse_ws_generate(frame, self.frontend.ctx)
        self.active[cid] = WsStream(self, cid, self.frontend.start_choices(spec))

    def release(self, stream: WsStream) -> None:
        """Free the id before the final frame goes out: the client may reuse it as soon as it reads it."""
        if self.active.get(stream.cid) is stream:
            del self.active[stream.cid]

    async def close_socket(self, code: int, message: bytes = b"") -> None:
        """Send what is queued, then close the socket with `code` (its generations end when its loop does)."""
        if not self.ws.closed:
            if not self.compressed:
                self.flush()
            elif self.writer is not None:  # let the writer task send them, for a bounded time
                try:
                    await asyncio.wait_for(self.idle.wait(), CLOSE_DRAIN_S)
                except TimeoutError:
                    pass
            await self.ws.close(code=code, message=message)

    async def close(self) -> None:
        """The socket's loop ended: cancel its generations and its writer."""
        for stream in list(self.active.values()):
            stream.end()
        if self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)


class WsStream:
    """One client id's generations (its choices) on a socket, fed by the Router's callbacks — no task: once
    every choice is admitted an `accepted` frame, then delta frames as tokens arrive and one done frame per
    choice (`index`: prompt index * n + sample index); the id is released with the last done. A refusal or an
    error ends every choice of the id with one error frame."""

    def __init__(self, conn: WsConnection, cid: str, generations: list[Generation]) -> None:
        self.conn, self.cid, self.generations = conn, cid, generations
        self.pending = len(generations)  # choices whose admission is not known yet
        self.refusals: list[ApiError | None] = [None] * len(generations)
        self.admitted: list[bool] = [False] * len(generations)
        self.held: list[tuple[Generation, DeltaItem]] = []  # items that came before every choice was admitted
        self.open = len(generations)
        self.started: set[int] = set()
        self.prefixes: dict[int, str | bytes] = {}  # choice index -> its delta frames' encoded prefix
        self.ended = False
        router = conn.frontend.router
        for i, generation in enumerate(generations):
            router.attach(generation.request_id, partial(self.receive, i))

    def receive(self, i: int, msg: object) -> None:
        if self.ended:
            return
        try:
            if self.pending:
                self._admission(i, msg)
            else:
                self._item(self.generations[i], msg)
        except Exception as exc:  # a bug ends this id with an error frame; the socket and the router go on
            ref = self.conn.frontend.new_id("err")
            log.exception("generation %s failed (%s)", self.cid, ref)
            self._fail(internal_error(ref, exc))

    def _admission(self, i: int, msg: object) -> None:
        generation = self.generations[i]
        if self.admitted[i]:  # admitted, others still waiting: keep its items for after `accepted`
            assert isinstance(msg, DeltaItem), f"unexpected message {msg!r}"
            self.held.append((generation, msg))
            return
        self.refusals[i] = generation.resolve(msg)
        self.admitted[i] = self.refusals[i] is None
        self.pending -= 1
        if self.pending:
            return
        refusal = next((r for r in self.refusals if r is not None), None)
        if refusal is not None:  # the first refusal in choice order, as one error frame
            self._fail(refusal)
            return
        self.conn.post({"type": "accepted", "id": self.cid})
        held, self.held = self.held, []
        for generation, item in held:
            if not self.ended:
                self._item(generation, item)

    def _item(self, generation: Generation, item: object) -> None:
        assert isinstance(item, DeltaItem), f"unexpected message {item!r}"
        if generation.finished:
            return  # nothing follows a generation's last item
        spec, index = generation.spec, generation.spec.index
        tokenizer = self.conn.frontend.ctx.tokenizer
        if item.token_ids or item.text:
            text = item.text
            if spec.echo and index not in self.started and tokenizer is not None:  # echo: the prompt's text first
                text = tokenizer.decode(spec.prompt_ids, skip_special_tokens=True) + text
            self.started.add(index)
            self._delta(spec, index, text, item, tokenizer)
        if item.error_code is not None:
            generation.finished = True
            self._fail(item_error(item))
            return
        if item.finished:
            generation.finished = True
            self.open -= 1
            if self.open == 0:
                self.conn.release(self)
            self.conn.post({
                "type": "done", "id": self.cid, "index": index, "remaining": self.open,
                "finish_reason": item.finish_reason,
                "usage": {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens},
                "timing": {"queue_ms": item.queue_ms, "ttft_ms": item.ttft_ms, "e2e_ms": item.e2e_ms},
            })
            if self.open == 0:
                self.end()

    def _delta(self, spec: GenerationSpec, index: int, text: str, item: DeltaItem, tokenizer: Any) -> None:
        if spec.params.get("logprobs") is None and item.prompt_logprobs is None:
            prefix = self.prefixes.get(index)
            if prefix is None:
                prefix = self.prefixes[index] = self.conn.delta_prefix(self.cid, index)
            try:
                self.conn.post_delta(prefix, text, item.token_ids)
                return
            except (TypeError, ValueError, OverflowError):
                pass  # not a plain frame after all: the general encoder decides (and reports what fails)
        frame = {"type": "delta", "id": self.cid, "index": index, "text": text, "token_ids": item.token_ids}
        if spec.params.get("logprobs") is not None:
            frame["logprobs"] = ws_logprobs(item.logprobs, tokenizer)
        if item.prompt_logprobs is not None:
            frame["prompt_logprobs"] = ws_logprobs(item.prompt_logprobs, tokenizer)
        self.conn.post(frame)

    def _fail(self, exc: ApiError) -> None:
        self.conn.release(self)
        self.conn.error(self.cid, exc)
        self.end()

    def end(self) -> None:
        """Stop listening: every choice not finished is cancelled (idempotent)."""
        self.ended = True
        self.conn.release(self)
        for generation in self.generations:
            generation.close()


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
    conn = WsConnection(frontend, ws, request.transport)
    frontend.sockets.add(conn)
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not conn.admit_frame(invalid=not conn.handle(msg)):
                await _close_abusive(conn)
                break
            await asyncio.sleep(0)  # one socket's backlog of frames never holds the loop from the others
    finally:
        frontend.sockets.discard(conn)
        await conn.close()
    return ws


async def _close_abusive(conn: WsConnection) -> None:
    limits = conn.frontend.limits
    conn.frontend.hub.count("ws_closed_frame_rate")
    log.warning("closing a WebSocket (1008): frames over --ws-frame-rate %g/s; its %d generation(s) in flight "
                "are cancelled", limits.ws_frame_rate, len(conn.active))
    await conn.close_socket(WSCloseCode.POLICY_VIOLATION, f"frame rate over {limits.ws_frame_rate:g}/s "
                            f"(an invalid frame counts {limits.ws_invalid_cost:g})".encode())


def bad_body(exc: Exception) -> ApiError:
    return bad("body", f"is not valid JSON: {exc}", "invalid_json")

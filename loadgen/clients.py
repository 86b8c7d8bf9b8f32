"""Async network clients that replay a workload against a server and time every token.

Two protocols (docs/protocol.md of the server, summarised in docs/loadgen.md):

- ``ws``: WebSocket ``/v1/stream`` with JSON frames; one or several sockets, generations multiplexed by
  their ``id`` (request i goes to socket ``i % num_sockets``).
- ``openai``: ``POST /v1/completions`` with ``stream: true`` and ``stream_options.include_usage``,
  read as server-sent events until ``data: [DONE]``.

Every request records (in seconds since the run started, on one monotonic clock) when it was sent,
when each token arrived, when it ended, the token counts, the finish reason and any error (code,
message, HTTP status, and whether it came mid-stream, i.e. after the server had accepted the request).
This module imports nothing of the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from lorafleet.loadgen.workload import RequestSpec

OK_FINISH_REASONS = (None, "stop", "length")


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds since the start of the run."""

    index: int
    adapter: str | None
    model: str | None
    scheduled_s: float
    input_len: int
    max_tokens: int
    send_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    done_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    mid_stream: bool = False
    server_timing: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None and self.done_s is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first token (None when no token arrived)."""
        if self.send_s is None or not self.token_times:
            return None
        return self.token_times[0] - self.send_s

    @property
    def e2e(self) -> float | None:
        if self.send_s is None or self.done_s is None:
            return None
        return self.done_s - self.send_s

    def add_tokens(self, count: int, at: float) -> None:
        self.token_times.extend([at] * count)
        self.output_tokens = len(self.token_times)

    def fail(self, code: str, message: str, at: float, status: int | None = None) -> None:
        """Mark the request failed (the first error wins)."""
        if self.error_code is None:
            self.error_code, self.error_message = code, message
            self.http_status = status if status is not None else self.http_status
        self.done_s = at if self.done_s is None else self.done_s

    def finish(self, reason: str | None, at: float) -> None:
        self.finish_reason = reason
        self.done_s = at
        if reason not in OK_FINISH_REASONS:
            self.fail(f"finish_{reason}", f"server ended the request with finish_reason={reason!r}", at)


@dataclass(frozen=True)
class ClientConfig:
    """How to talk to the server."""

    url: str
    protocol: str = "ws"
    base_model: str | None = None
    num_sockets: int = 1
    max_concurrency: int | None = None
    request_timeout_s: float = 600.0
    temperature: float = 0.0
    ignore_eos: bool = True
    slo_ttft_ms: float | None = None
    drain_timeout_s: float | None = None
    api_key: str | None = None  # sent as Authorization: Bearer KEY (a server started with --api-key)

    def __post_init__(self) -> None:
        if self.protocol not in ("ws", "openai"):
            raise ValueError(f"protocol must be 'ws' or 'openai', got {self.protocol!r}")
        if self.num_sockets < 1:
            raise ValueError(f"num_sockets must be >= 1, got {self.num_sockets}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.drain_timeout_s is not None and self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")

    def headers(self) -> dict[str, str]:
        return auth_headers(self.api_key)

    def model_for(self, spec: RequestSpec) -> str | None:
        return spec.adapter if spec.adapter is not None else self.base_model


@dataclass
class Progress:
    """Live counters, read by the progress display."""

    total: int = 0
    sent: int = 0
    finished: int = 0
    failed: int = 0
    records: list[RequestRecord] = field(default_factory=list)

    def tokens_received(self) -> int:
        """Output tokens received so far over all requests (counted on arrival)."""
        return sum(len(r.token_times) for r in self.records)

    def record_end(self, record: RequestRecord) -> None:
        if record.ok:
            self.finished += 1
        else:
            self.failed += 1


@dataclass
class RunOutput:
    """Records of one run plus its wall-clock span."""

    records: list[RequestRecord]
    started_unix: float
    duration_s: float
    protocol_errors: list[str] = field(default_factory=list)


class Clock:
    """Seconds since construction on the monotonic performance counter."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._t0 = time.perf_counter()
        self.started_unix = time.time()

    def __call__(self) -> float:
        return time.perf_counter() - self._t0


def _error_from_body(status: int, body: str) -> tuple[str, str]:
    """(code, message) from an HTTP error body in the OpenAI shape, or from the status alone."""
    try:
        err = json.loads(body).get("error")
    except (json.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(code) if code else f"http_{status}", str(err.get("message", ""))
    return f"http_{status}", body[:500]


def _openai_body(spec: RequestSpec, cfg: ClientConfig) -> dict[str, object]:
    body: dict[str, object] = {
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": cfg.ignore_eos,
        "return_token_ids": True,
    }
    model = cfg.model_for(spec)
    if model is not None:
        body["model"] = model
    if cfg.slo_ttft_ms is not None:  # the same extension field the WebSocket frame carries
        body["slo_ttft_ms"] = cfg.slo_ttft_ms
    return body


def _apply_sse_chunk(record: RequestRecord, chunk: dict[str, object], now: float) -> None:
    """Update the record from one parsed SSE `data:` object of a completions stream."""
    if "error" in chunk:
        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        code = err.get("code") or err.get("type") or "stream_error"
        record.mid_stream = True
        record.fail(str(code), str(err.get("message", "")), now)
        return
    for choice in chunk.get("choices") or []:
        token_ids = choice.get("token_ids")
        count = len(token_ids) if isinstance(token_ids, list) else (1 if choice.get("text") else 0)
        record.add_tokens(count, now)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.output_tokens = int(usage.get("completion_tokens", record.output_tokens))


async def _read_sse(resp: aiohttp.ClientResponse, record: RequestRecord, clock: Clock) -> bool:
    """Consume an SSE body; True when `data: [DONE]` arrived."""
    data_lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            data_lines.append(line[5:].lstrip(" "))
            continue
        if line or not data_lines:
            continue
        data, data_lines = "\n".join(data_lines), []
        if data == "[DONE]":
            return True
        try:
            _apply_sse_chunk(record, json.loads(data), clock())
        except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not the shape of a chunk
            record.mid_stream = True
            record.fail("bad_sse_chunk", f"unparseable SSE data ({type(exc).__name__}): {data[:200]!r}", clock())
            return False
        if record.error_code is not None:
            return False
    return False


async def openai_request(
    session: aiohttp.ClientSession, cfg: ClientConfig, spec: RequestSpec, record: RequestRecord, clock: Clock
) -> None:
    """Send one streaming completions request and fill `record`."""
    record.send_s = clock()
    async with session.post(f"{cfg.url}/v1/completions", json=_openai_body(spec, cfg)) as resp:
        record.http_status = resp.status
        if resp.status != 200:
            code, message = _error_from_body(resp.status, await resp.text())
            record.fail(code, message, clock(), resp.status)
            return
        got_done = await _read_sse(resp, record, clock)
    if record.error_code is None and not got_done:
        record.mid_stream = True
        record.fail("stream_truncated", "the SSE stream ended without data: [DONE]", clock())
        return
    if record.error_code is None:
        record.finish(record.finish_reason, clock())


class WsMux:
    """One WebSocket carrying many generations, told apart by id; a reader task routes the frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, clock: Clock, protocol_errors: list[str]) -> None:
        self._ws = ws
        self._clock = clock
        self._pending: dict[str, tuple[RequestRecord, asyncio.Future[None]]] = {}
        self._protocol_errors = protocol_errors
        self._reader = asyncio.create_task(self._read_loop())

    async def generate(self, frame: dict[str, object], record: RequestRecord, timeout_s: float) -> None:
        """Send a generate frame and wait until its done/error frame (or the timeout) ends it."""
        req_id = str(frame["id"])
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (record, future)
        try:
            record.send_s = self._clock()
            await self._ws.send_str(json.dumps(frame))
            await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            record.fail("client_timeout", f"no done frame within {timeout_s} s", self._clock())
            await self._cancel(req_id)
        except asyncio.CancelledError:
            await self._cancel(req_id)  # tell the server to stop working on an abandoned request
            raise
        finally:
            self._pending.pop(req_id, None)

    async def _cancel(self, req_id: str) -> None:
        if not self._ws.closed:
            await self._ws.send_str(json.dumps({"type": "cancel", "id": req_id}))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read_loop(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_frame(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self._protocol_errors.append(f"websocket error: {self._ws.exception()}")
        finally:
            self._fail_all("ws_closed", "the WebSocket closed before the request ended")

    def _fail_all(self, code: str, message: str) -> None:
        for record, future in list(self._pending.values()):
            record.mid_stream = record.mid_stream or record.send_s is not None
            record.fail(code, message, self._clock())
            if not future.done():
                future.set_result(None)

    def _on_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
            kind, req_id = frame["type"], frame.get("id")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            self._protocol_errors.append(f"malformed frame from server ({exc!r}): {text[:200]}")
            return
        entry = self._pending.get(str(req_id)) if req_id is not None else None
        if entry is None:
            if kind == "error":
                self._protocol_errors.append(f"error frame without a known id: {text[:300]}")
            return
        record, future = entry
        try:
            ended = _apply_ws_frame(record, frame, kind, self._clock())
        except (ValueError, TypeError, AttributeError) as exc:  # a frame of the request, not of its shape
            self._protocol_errors.append(f"malformed frame from server ({exc!r}): {text[:200]}")
            record.fail("bad_frame", f"malformed {kind!r:.40} frame from the server ({type(exc).__name__})",
                        self._clock())
            ended = True
        if ended and not future.done():
            future.set_result(None)


def _apply_ws_frame(record: RequestRecord, frame: dict[str, object], kind: str, now: float) -> bool:
    """Update the record from one server frame; True when the request has ended."""
    if kind == "accepted":
        record.server_timing = record.server_timing or {}
        record.server_timing["accepted_s"] = now
    elif kind == "delta":
        token_ids = frame.get("token_ids")
        count = len(token_ids) if isinstance(token_ids, list) else (1 if frame.get("text") else 0)
        record.add_tokens(count, now)
    elif kind == "done":
        usage = frame.get("usage") if isinstance(frame.get("usage"), dict) else {}
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.output_tokens = int(usage.get("completion_tokens", record.output_tokens))
        if isinstance(frame.get("timing"), dict):
            record.server_timing = {**(record.server_timing or {}), **frame["timing"]}
        record.finish(frame.get("finish_reason"), now)
        return True
    elif kind == "error":
        err = frame.get("error") if isinstance(frame.get("error"), dict) else {}
        record.mid_stream = bool(record.server_timing and "accepted_s" in record.server_timing)
        record.fail(str(err.get("code") or "error"), str(err.get("message", "")), now)
        return True
    return False


def _ws_frame(spec: RequestSpec, cfg: ClientConfig) -> dict[str, object]:
    frame: dict[str, object] = {
        "type": "generate",
        "id": f"r{spec.index}",
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "ignore_eos": cfg.ignore_eos,
    }
    model = cfg.model_for(spec)
    if model is not None:
        frame["model"] = model
    if cfg.slo_ttft_ms is not None:
        frame["slo_ttft_ms"] = cfg.slo_ttft_ms
    return frame


def _new_record(spec: RequestSpec, cfg: ClientConfig) -> RequestRecord:
    return RequestRecord(
        index=spec.index,
        adapter=spec.adapter,
        model=cfg.model_for(spec),
        scheduled_s=spec.arrival_s,
        input_len=spec.input_len,
        max_tokens=spec.max_tokens,
    )


SendOne = Callable[[RequestSpec, RequestRecord], Awaitable[None]]


async def _guarded(
    send: SendOne,
    spec: RequestSpec,
    record: RequestRecord,
    clock: Clock,
    progress: Progress,
    slot: asyncio.Semaphore | None,
) -> None:
    """Run one request, turning network failures into recorded errors; always release the slot."""
    try:
        await send(spec, record)
    except asyncio.TimeoutError:
        record.fail("client_timeout", "the request timed out on the client", clock())
    except (aiohttp.ClientError, OSError) as exc:
        record.mid_stream = record.http_status == 200
        record.fail("connection_error", f"{type(exc).__name__}: {exc}", clock())
    finally:
        if slot is not None:
            slot.release()
        progress.record_end(record)


async def _acquire(slot: asyncio.Semaphore, deadline: float | None, clock: Clock) -> bool:
    """Take a concurrency slot; False when the drain deadline passes first."""
    if deadline is None:
        await slot.acquire()
        return True
    try:
        await asyncio.wait_for(slot.acquire(), max(0.0, deadline - clock()))
    except asyncio.TimeoutError:
        return False
    return True


async def dispatch(
    specs: list[RequestSpec], cfg: ClientConfig, send: SendOne, clock: Clock, progress: Progress
) -> list[RequestRecord]:
    """Send each request at its arrival time (bounded by max_concurrency) and wait for all of them.

    With `drain_timeout_s`, requests still running (or never sent) that long after the last scheduled
    arrival are abandoned (cancelled) and recorded with error code "drain_timeout".
    """
    slot = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    records = [_new_record(spec, cfg) for spec in specs]
    progress.records = records
    last = max((spec.arrival_s for spec in specs), default=0.0)
    deadline = None if cfg.drain_timeout_s is None else last + cfg.drain_timeout_s
    tasks: list[asyncio.Task[None]] = []
    try:
        for spec, record in zip(specs, records, strict=True):
            delay = spec.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if slot is not None and not await _acquire(slot, deadline, clock):
                break
            progress.sent += 1
            tasks.append(asyncio.create_task(_guarded(send, spec, record, clock, progress, slot)))
        if tasks:
            await asyncio.wait(tasks, timeout=None if deadline is None else max(0.0, deadline - clock()))
        _abandon(records, tasks, clock, progress)
        for task in tasks:
            if task.done():
                task.result()  # a bug in a client surfaces here instead of vanishing
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records


def _abandon(records: list[RequestRecord], tasks: list[asyncio.Task[None]], clock: Clock, progress: Progress) -> None:
    """Mark every request not finished by the drain deadline (the caller cancels the tasks)."""
    now = clock()
    for i, record in enumerate(records):
        running = i < len(tasks) and not tasks[i].done()
        if running or i >= len(tasks):
            record.mid_stream = running and bool(record.token_times)
            record.fail("drain_timeout", "abandoned at the drain deadline" if running else "never sent", now)
            if i >= len(tasks):
                progress.record_end(record)


async def run_workload(specs: list[RequestSpec], cfg: ClientConfig, progress: Progress | None = None) -> RunOutput:
    """Replay `specs` against the server described by `cfg`; returns every request's record."""
    progress = progress if progress is not None else Progress()
    progress.total = len(specs)
    limit = cfg.max_concurrency or 0
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout,
                                     headers=cfg.headers()) as session:
        clock = Clock()
        if cfg.protocol == "openai":

            async def send(spec: RequestSpec, record: RequestRecord) -> None:
                await openai_request(session, cfg, spec, record, clock)

            records = await dispatch(specs, cfg, send, clock, progress)
            return RunOutput(records, clock.started_unix, clock())
        return await _run_ws(session, specs, cfg, clock, progress)


async def _run_ws(
    session: aiohttp.ClientSession,
    specs: list[RequestSpec],
    cfg: ClientConfig,
    clock: Clock,
    progress: Progress,
) -> RunOutput:
    ws_url = cfg.url.replace("http", "ws", 1) + "/v1/stream"
    protocol_errors: list[str] = []
    muxes: list[WsMux] = []
    try:
        for _ in range(cfg.num_sockets):
            try:
                ws = await session.ws_connect(ws_url, heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                detail = str(exc) or f"no answer within {cfg.request_timeout_s:g} s"
                raise RuntimeError(f"could not open the WebSocket {ws_url}: {type(exc).__name__}: {detail}") from None
            muxes.append(WsMux(ws, clock, protocol_errors))
        clock.restart()  # the run starts once the sockets are open

        async def send(spec: RequestSpec, record: RequestRecord) -> None:
            await muxes[spec.index % len(muxes)].generate(_ws_frame(spec, cfg), record, cfg.request_timeout_s)

        records = await dispatch(specs, cfg, send, clock, progress)
        return RunOutput(records, clock.started_unix, clock(), protocol_errors)
    finally:
        await asyncio.gather(*(mux.close() for mux in muxes), return_exceptions=True)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header of a server started with --api-key (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> list[dict[str, object]]:
    """GET /v1/models; returns its `data` list, keeping only the entries that are objects with a string `id`.

    Raises RuntimeError saying what went wrong: no answer within `timeout_s`, a status other than 200, a body
    that is not JSON or has no `data` list; aiohttp.ClientError / OSError when the server cannot be reached."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                         headers=auth_headers(api_key)) as session:
            async with session.get(f"{url}/v1/models") as resp:
                if resp.status != 200:
                    detail = (await resp.text(errors="replace"))[:300]
                    hint = " (give the server's key: --api-key or $LORAFLEET_API_KEY)" if resp.status == 401 else ""
                    raise RuntimeError(f"GET {url}/v1/models answered HTTP {resp.status}{hint}: {detail}")
                body = await resp.json(content_type=None)
    except asyncio.TimeoutError:
        raise RuntimeError(f"GET {url}/v1/models: no answer within {timeout_s:g} s") from None
    except (ValueError, aiohttp.ContentTypeError) as exc:
        raise RuntimeError(f"GET {url}/v1/models: the answer is not JSON ({exc})") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise RuntimeError(f"GET {url}/v1/models: the answer has no 'data' list")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def split_models(models: list[dict[str, object]]) -> tuple[str | None, list[str]]:
    """(base model name, adapter names) from /v1/models entries.

    An entry with a non-null ``parent`` is an adapter of that parent; entries without one are base
    models. When no entry carries a ``parent`` field at all, the first entry is taken as the base.
    """
    models = [m for m in models if isinstance(m, dict) and "id" in m]
    ids = [str(m["id"]) for m in models]
    if not any("parent" in m for m in models):
        return (ids[0] if ids else None), ids[1:]
    bases = [str(m["id"]) for m in models if m.get("parent") is None]
    adapters = [str(m["id"]) for m in models if m.get("parent") is not None]
    return (bases[0] if bases else None), adapters

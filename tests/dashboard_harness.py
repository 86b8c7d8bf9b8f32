"""A small real server for the dashboard tests, until `lorafleet serve` exists: a synchronous `LLM` engine
stepped by an asyncio task, publishing to a Hub, with the /v1 endpoints the dashboard's playground and
admin panel use (GET /v1/models, WS /v1/stream per the protocol, POST /v1/{load,unload}_lora_adapter).

The stepping task can be paused (`await harness.pause()`) so a test can read /metrics and the hub at
the same moment.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import WSMsgType, web

from lorafleet.dashboard import Hub, RequestRecord, StepRecord, setup_routes
from lorafleet.engine import LLM
from lorafleet.engine.request import Request, SamplingParams
from lorafleet.engine.synthetic import write_adapter, write_model

BASE = "tiny-base"


def make_assets(root: Path, ranks: list[int]) -> tuple[Path, dict[str, str]]:
    """A tiny synthetic model and one adapter per rank (named lora-<i>-r<rank>)."""
    model = write_model("tiny", root / "model")
    adapters = {}
    for i, rank in enumerate(ranks):
        adapters[f"lora-{i}-r{rank}"] = str(write_adapter(root / f"lora-{i}", model, rank=rank, seed=i + 1))
    return model, adapters


@dataclass
class Stream:
    """One generation sent over a websocket."""

    ws: web.WebSocketResponse
    client_id: str
    adapter: str | None
    request: Request
    slo_ttft_ms: float | None
    sent_at: float = field(default_factory=time.monotonic)
    first_at: float | None = None


class Harness:
    """Engine + hub + aiohttp app. `start()` listens on a loopback port; `stop()` tears down."""

    def __init__(self, model: Path, adapters: dict[str, str], admin_key: str = "secret", step_delay: float = 0.0,
                 max_queue: int = 10_000, **engine_options) -> None:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the tiny model is far slower with 2 threads on a shared 2-core machine
        self.llm = LLM(str(model), adapters=adapters, **engine_options)
        self.engine = self.llm.engine
        self.hub = Hub()
        self.admin_key, self.step_delay, self.max_queue = admin_key, step_delay, max_queue
        self.streams: dict[str, Stream] = {}
        self.running = asyncio.Event()
        self.running.set()
        self.idle = asyncio.Event()
        self.parked = asyncio.Event()
        self.wake = asyncio.Event()
        self._next = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/stream", self.stream)
        self.app.router.add_post("/v1/load_lora_adapter", self.load_adapter)
        self.app.router.add_post("/v1/unload_lora_adapter", self.unload_adapter)
        setup_routes(self.app, self.hub, max_lora=self.engine.config.max_adapters_per_batch,
                     default_slo_ttft_ms=5000.0)
        self.runner: web.AppRunner | None = None
        self.task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> str:
        self.hub.publish_snapshot(self.engine.snapshot())
        self.runner = web.AppRunner(self.app, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.task = asyncio.create_task(self._drive())
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        torch.set_num_threads(self._threads)

    async def pause(self) -> None:
        """Stop stepping after the current step; returns once the stepping task is parked and frames the
        clients had in flight have landed (the hub then holds this moment's state)."""
        self.running.clear()
        self.wake.set()
        while not self.parked.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)

    def resume(self) -> None:
        self.running.set()

    # the stepping task ----------------------------------------------------------------------------
    async def _drive(self) -> None:
        while True:
            if not self.running.is_set():
                self.parked.set()
                await self.running.wait()
                self.parked.clear()
            await self._early_abort()
            if not self.engine.has_unfinished():
                self.idle.set()
                self.wake.clear()
                if self.running.is_set():
                    await self.wake.wait()
                continue
            self.idle.clear()
            await self._step()
            await asyncio.sleep(self.step_delay)

    async def _step(self) -> None:
        started = time.perf_counter()
        planned = self.engine.plan_step()
        if planned is None:
            self.hub.publish_snapshot(self.engine.snapshot())
            return
        schedule, plan = planned
        outputs = self.engine.complete_step(schedule, self.engine.executor.execute(plan))
        self.hub.publish_step(StepRecord(
            step=plan.step, batch_size=len(schedule.chunks), num_tokens=sum(c.length for c in schedule.chunks),
            duration_ms=(time.perf_counter() - started) * 1e3, adapters_in_batch=list(schedule.adapters),
            adapter_loads=list(schedule.loads)))
        self.hub.publish_snapshot(self.engine.snapshot())
        for out in outputs:
            await self._deliver(out)

    async def _deliver(self, out) -> None:
        stream = self.streams.get(out.request_id)
        if stream is None:
            return
        stream.first_at = stream.first_at or time.monotonic()
        await _send(stream.ws, {"type": "delta", "id": stream.client_id, "text": out.new_text,
                                "token_ids": out.new_token_ids})
        if out.finished:
            del self.streams[out.request_id]
            record = self._record(out.request_id, stream, out.finish_reason, None)
            await _send(stream.ws, {"type": "done", "id": stream.client_id, "finish_reason": out.finish_reason,
                                    "usage": {"prompt_tokens": out.prompt_tokens,
                                              "completion_tokens": out.completion_tokens},
                                    "timing": {"queue_ms": record.queue_ms, "ttft_ms": record.ttft_ms,
                                               "e2e_ms": record.e2e_ms}})

    def _record(self, rid: str, s: Stream, reason: str | None, error: str | None) -> RequestRecord:
        now = time.monotonic()
        req = s.request
        n = len(req.output_ids)
        ttft = (s.first_at - s.sent_at) * 1e3 if s.first_at else None
        record = RequestRecord(
            id=rid, adapter=s.adapter, prompt_tokens=len(req.prompt_ids), completion_tokens=n,
            finish_reason=reason, error_code=error,
            queue_ms=(req.scheduled_time - s.sent_at) * 1e3 if req.scheduled_time else None,
            ttft_ms=ttft, e2e_ms=(now - s.sent_at) * 1e3 if error is None else None,
            tpot_ms=((now - s.first_at) * 1e3 / (n - 1)) if s.first_at and n > 1 else None,
            slo_ttft_ms=s.slo_ttft_ms)
        self.hub.publish_record(record)
        return record

    async def _early_abort(self) -> None:
        """Drop waiting requests that already missed their TTFT SLO (S-LoRA's early abort, simplified)."""
        now = time.monotonic()
        for rid, s in list(self.streams.items()):
            late = s.slo_ttft_ms is not None and s.first_at is None and (now - s.sent_at) * 1e3 > s.slo_ttft_ms
            if late and s.request.scheduled_time is None:
                self.engine.abort(rid)
                del self.streams[rid]
                self.hub.count("early_aborted")
                self._record(rid, s, None, "early_aborted")
                await _send(s.ws, _error(s.client_id, "early_aborted", "TTFT SLO cannot be met"))

    # /v1 endpoints ---------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        names = [BASE, *self.engine.store.infos]
        data = [{"id": n, "object": "model", "owned_by": "lorafleet", "parent": None if n == BASE else BASE}
                for n in names]
        return web.json_response({"object": "list", "data": data})

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                frame = json.loads(msg.data)
            except ValueError:
                await _send(ws, _error(None, "bad_frame", "not JSON"))
                continue
            if frame.get("type") == "generate":
                await self._generate(ws, frame)
            elif frame.get("type") == "cancel":
                await self._cancel(ws, frame)
        for rid in [rid for rid, s in self.streams.items() if s.ws is ws]:
            self.engine.abort(rid)
            del self.streams[rid]
        return ws

    async def _generate(self, ws: web.WebSocketResponse, frame: dict) -> None:
        cid = str(frame.get("id", ""))
        model = frame.get("model") or BASE
        adapter = None if model == BASE else model
        if len(self.engine.scheduler.waiting) >= self.max_queue:
            self.hub.count("rejected_429")
            self.hub.publish_record(RequestRecord(cid, adapter, 0, 0, None, error_code="rejected"))
            await _send(ws, _error(cid, "rejected", "queue full"))
            return
        try:
            params = SamplingParams(max_tokens=int(frame.get("max_tokens", 16)),
                                    temperature=float(frame.get("temperature", 1.0)),
                                    seed=frame.get("seed"), ignore_eos=bool(frame.get("ignore_eos", False)))
            rid = f"ws-{self._next}"
            self._next += 1
            self.engine.add_request(rid, self.llm.encode(frame.get("prompt", "")), params, adapter)
        except (ValueError, TypeError) as exc:
            await _send(ws, _error(cid, "invalid_request", str(exc)))
            return
        slo = frame.get("slo_ttft_ms")
        self.streams[rid] = Stream(ws, cid, adapter, self.engine.requests[rid].request,
                                   float(slo) if slo is not None else None)
        await _send(ws, {"type": "accepted", "id": cid})
        self.hub.publish_snapshot(self.engine.snapshot())
        self.wake.set()

    async def _cancel(self, ws: web.WebSocketResponse, frame: dict) -> None:
        for rid, s in list(self.streams.items()):
            if s.ws is ws and s.client_id == str(frame.get("id")):
                self.engine.abort(rid)
                del self.streams[rid]
                self._record(rid, s, "cancelled", None)
                await _send(ws, {"type": "done", "id": s.client_id, "finish_reason": "cancelled",
                                 "usage": {"prompt_tokens": len(s.request.prompt_ids),
                                           "completion_tokens": len(s.request.output_ids)}, "timing": {}})

    def _admin(self, request: web.Request) -> web.Response | None:
        if self.admin_key and request.headers.get("Authorization") != f"Bearer {self.admin_key}":
            return _http_error(401, "invalid admin key", "authentication_error")
        return None

    async def load_adapter(self, request: web.Request) -> web.Response:
        denied = self._admin(request)
        if denied is not None:
            return denied
        body = await request.json()
        try:
            self.engine.add_adapter(body["lora_name"], body["lora_path"])
        except (KeyError, ValueError, OSError) as exc:
            return _http_error(400, str(exc), "invalid_request_error")
        self.hub.publish_snapshot(self.engine.snapshot())
        return web.json_response({"status": "ok", "lora_name": body["lora_name"]})

    async def unload_adapter(self, request: web.Request) -> web.Response:
        denied = self._admin(request)
        if denied is not None:
            return denied
        body = await request.json()
        try:
            self.engine.remove_adapter(body["lora_name"])
        except (KeyError, ValueError) as exc:
            return _http_error(400, str(exc), "invalid_request_error")
        self.hub.publish_snapshot(self.engine.snapshot())
        return web.json_response({"status": "ok", "lora_name": body["lora_name"]})


def _error(cid: str | None, code: str, message: str) -> dict:
    return {"type": "error", "id": cid, "error": {"code": code, "message": message}}


def _http_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


async def _send(ws: web.WebSocketResponse, payload: dict) -> None:
    if not ws.closed:
        try:
            await ws.send_str(json.dumps(payload))
        except ConnectionError:
            pass


async def traffic(base_url: str, adapters: list[str | None], count: int, concurrency: int = 6,
                  max_tokens: tuple[int, int] = (8, 40), seed: int = 0, slo_ttft_ms: float | None = None) -> list:
    """Send `count` generations over one /v1/stream socket, cycling through `adapters` with a skewed mix;
    returns the final events (done or error)."""
    import random

    import aiohttp

    rng = random.Random(seed)
    finals: list[dict] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(base_url + "/v1/stream") as ws:
        pending: set[str] = set()
        sent = 0
        while sent < count or pending:
            while sent < count and len(pending) < concurrency:
                cid = f"t{seed}-{sent}"
                model = adapters[min(len(adapters) - 1, int(rng.paretovariate(1.2)) - 1)]
                frame = {"type": "generate", "id": cid, "model": model or BASE, "prompt": f"hello {sent} " * 4,
                         "max_tokens": rng.randint(*max_tokens), "temperature": 0.0, "ignore_eos": True}
                if slo_ttft_ms is not None:
                    frame["slo_ttft_ms"] = slo_ttft_ms
                await ws.send_str(json.dumps(frame))
                pending.add(cid)
                sent += 1
            event = json.loads((await ws.receive()).data)
            if event["type"] in ("done", "error"):
                pending.discard(event["id"])
                finals.append(event)
    return finals

"""The HuggingFace transformers + PEFT baseline, served over lorafleet's client protocol subset.

Run: ``python -m lorafleet.loadgen.peft_server --model DIR --adapter name=DIR ... --port P``.

Endpoints: ``POST /v1/completions`` (SSE streaming or not), ``GET /v1/models`` (the base model, then
the adapters with ``parent`` = base), ``GET /v1/stream`` (WebSocket, JSON frames generate/cancel ->
accepted/delta/done/error), ``GET /metrics`` (Prometheus text: requests, tokens, errors, batches),
``GET /health``.

How it batches (its best honest shot; HF transformers has no continuous batching with per-request
adapters): one worker thread owns the model. Each iteration it takes every waiting request (up to
``--max-batch-size``) whose sampling parameters match the oldest waiting one, left-pads their prompts
into one batch and runs ONE ``generate`` call with ``adapter_names=[...]`` (PEFT's mixed-adapter batch,
``"__base__"`` for base-model requests). Tokens stream out every step through a batch streamer; a
per-row stopping criterion ends a row at its ``max_tokens`` (or at EOS unless ``ignore_eos``) or when
it is cancelled, and the batch ends when every row has. Requests arriving meanwhile wait for the next
batch (static batching). The event loop never touches the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lorafleet.args import Parser

BASE_ADAPTER = "__base__"


class ApiError(Exception):
    """A client error: HTTP status, machine-readable code, message and the offending field."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class SamplingKey:
    """Sampling parameters that must be equal within one generate() batch."""

    temperature: float
    top_p: float
    top_k: int


@dataclass
class Job:
    """One generation request; the worker thread fills it, the event loop reads its event queue."""

    model: str
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    sampling: SamplingKey
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    generated: int = 0
    finished: bool = False
    created: float = field(default_factory=time.monotonic)

    def emit(self, kind: str, payload: object) -> None:
        """Hand an event to the event loop (callable from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass(frozen=True)
class ServerConfig:
    """Command-line configuration of the baseline server."""

    model: str
    adapters: tuple[tuple[str, str], ...]
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    served_name: str | None = None
    torch_threads: int | None = None
    random_weights: bool = False
    synthetic_adapters: int = 0
    synthetic_ranks: tuple[int, ...] = (8, 16, 32, 64)
    synthetic_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.synthetic_adapters < 0 or not self.synthetic_ranks or min(self.synthetic_ranks) < 1:
            raise ValueError("synthetic_adapters must be >= 0 and synthetic_ranks positive integers")
        names = self.adapter_names()
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def base_name(self) -> str:
        return self.served_name or Path(self.model).name

    def synthetic(self) -> list[tuple[str, int]]:
        """(name, rank) of the random adapters: synthetic-i has rank synthetic_ranks[i % len]."""
        ranks = self.synthetic_ranks
        return [(f"synthetic-{i}", ranks[i % len(ranks)]) for i in range(self.synthetic_adapters)]

    def adapter_names(self) -> list[str]:
        """Disk adapters in command-line order, then the synthetic ones."""
        return [name for name, _ in self.adapters] + [name for name, _ in self.synthetic()]


class Metrics:
    """The server's own counts, exported in Prometheus text at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("peft_requests_received", "Requests accepted for generation", registry=r)
        self.finished = Counter("peft_requests_finished", "Requests finished", ["finish_reason"], registry=r)
        self.errors = Counter("peft_request_errors", "Requests refused or failed", ["code"], registry=r)
        self.prompt_tokens = Counter("peft_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("peft_generation_tokens", "Generated tokens sent", registry=r)
        self.batches = Counter("peft_batches", "generate() calls", registry=r)
        self.computed_tokens = Counter(
            "peft_computed_tokens", "Tokens the model produced for unfinished requests", registry=r
        )
        self.batch_size = Histogram(
            "peft_batch_size",
            "Requests per generate() call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.waiting = Gauge("peft_requests_waiting", "Requests waiting for a batch", registry=r)
        self.running = Gauge("peft_requests_running", "Requests in the running batch", registry=r)


class _BatchStreamer(BaseStreamer):
    """A generate() streamer that turns each step's token column into per-job events."""

    def __init__(self, jobs: list[Job], eos_id: int | None, metrics: Metrics) -> None:
        self._jobs, self._eos_id, self._metrics = jobs, eos_id, metrics
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # the first call carries the prompts
            self._seen_prompt = True
            return
        for job, token in zip(self._jobs, value.tolist(), strict=True):
            if not job.finished:
                self._step(job, int(token))

    def _step(self, job: Job, token: int) -> None:
        if job.cancelled:
            job.finished = True
            job.emit("done", "cancelled")
            return
        job.generated += 1
        self._metrics.computed_tokens.inc()
        job.emit("tokens", [token])
        if job.generated >= job.max_tokens:
            job.finished = True
            job.emit("done", "length")
        elif not job.ignore_eos and token == self._eos_id:
            job.finished = True
            job.emit("done", "stop")

    def end(self) -> None:
        for job in self._jobs:
            if not job.finished:
                job.finished = True
                job.emit("done", "cancelled" if job.cancelled else "length")


class _RowsDone(StoppingCriteria):
    """Stopping criterion: a row is done once its job is finished (or cancelled)."""

    def __init__(self, jobs: list[Job]) -> None:
        self._jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs: object) -> torch.Tensor:
        return torch.tensor([j.finished or j.cancelled for j in self._jobs], device=input_ids.device)


class PeftBackend:
    """HF model + PEFT adapters, driven by one worker thread that batches whatever is waiting."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.model, self.tokenizer = _load_model(config, self.device)
        self.adapters = tuple(config.adapter_names())
        self.pad_id = _pad_id(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="peft-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Cancel everything, let the running batch end, join the worker thread."""
        self._stopping = True
        for job in list(self._running):
            job.cancelled = True
        self._inbox.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def submit(self, job: Job) -> None:
        self.metrics.waiting.inc()
        self._inbox.put(job)

    def _run(self) -> None:
        while not self._stopping and self._take_waiting(block=not self._waiting):
            batch = self._next_batch()
            if batch:
                self._running = batch
                self._generate(batch)
                self._running = []
        self._take_waiting(block=False)
        for job in self._waiting:
            job.cancelled = True
        self._next_batch()  # ends the cancelled waiting jobs

    def _take_waiting(self, block: bool) -> bool:
        """Move jobs from the inbox to the waiting list; False once told to stop."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job plus every other one with its sampling key, up to the batch size."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self.metrics.waiting.dec()
            job.finished = True
            job.emit("done", "cancelled")
        if not self._waiting:
            return []
        key = self._waiting[0].sampling
        batch = [j for j in self._waiting if j.sampling == key][: self.config.max_batch_size]
        for job in batch:
            self._waiting.remove(job)
        self.metrics.waiting.dec(len(batch))
        return batch

    def _generate(self, batch: list[Job]) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.running.set(len(batch))
        try:
            with torch.inference_mode():
                self.model.generate(**self._generate_args(batch))
        except Exception as exc:  # a failed batch fails its requests; the worker keeps serving
            for job in batch:
                if not job.finished:
                    job.finished = True
                    job.emit("error", ("generate_failed", f"{type(exc).__name__}: {exc}"))
        finally:
            self.metrics.running.set(0)

    def _generate_args(self, batch: list[Job]) -> dict[str, object]:
        width = max(len(j.prompt_ids) for j in batch)
        ids = [[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch]
        mask = [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch]
        sampling = batch[0].sampling
        gen = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in batch),
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature or None,
            top_p=sampling.top_p if sampling.temperature else None,
            top_k=(sampling.top_k or None) if sampling.temperature else None,
            pad_token_id=self.pad_id,
            eos_token_id=None,
        )
        args: dict[str, object] = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
            "generation_config": gen,
            "streamer": _BatchStreamer(batch, self.eos_id, self.metrics),
            "stopping_criteria": StoppingCriteriaList([_RowsDone(batch)]),
        }
        if self.adapters:
            args["adapter_names"] = [j.adapter or BASE_ADAPTER for j in batch]
        return args


def _pad_id(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _load_model(config: ServerConfig, device: str) -> tuple[object, object]:
    """Load the base model and tokenizer, then every adapter into one PeftModel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, config.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if config.random_weights:
        from transformers import AutoConfig

        torch.manual_seed(config.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device)
    # EOS is handled per request by the streamer (ignore_eos must be able to run past it), so generate()
    # itself never stops or pads a row on EOS.
    model.generation_config.eos_token_id = None
    model = _add_adapters(model, config)
    # PEFT keeps adapter weights in fp32 by default; serve them in the model's dtype (its fastest path).
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def _add_adapters(model: torch.nn.Module, config: ServerConfig) -> torch.nn.Module:
    """Every disk adapter, then the synthetic random ones, into one PeftModel."""
    if not config.adapter_names():
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    for name, path in config.adapters:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
    torch.manual_seed(config.seed + 1)
    for name, rank in config.synthetic():
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(config.synthetic_targets), init_lora_weights=False
        )
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora)
        else:
            model = get_peft_model(model, lora, adapter_name=name)
    with torch.no_grad():  # small random A and B (like trained adapters' scale), not nn.Linear's init
        for param_name, param in model.named_parameters():
            if ".lora_A.synthetic-" in param_name or ".lora_B.synthetic-" in param_name:
                param.normal_(0.0, 0.02)
    return model


class Detokenizer:
    """Incremental detokenization: each call returns only the new text (holding back split characters)."""

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)  # type: ignore[attr-defined]
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)  # type: ignore[attr-defined]
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


def _int_field(body: dict[str, object], name: str, default: int, low: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ApiError(400, "invalid_value", f"'{name}' must be an integer >= {low}, got {value!r}", name)
    return value


def _float_field(body: dict[str, object], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        message = f"'{name}' must be a number in [{low}, {high}], got {value!r}"
        raise ApiError(400, "invalid_value", message, name)
    return float(value)


def _prompt_ids(backend: PeftBackend, prompt: object) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(backend.tokenizer(prompt)["input_ids"])  # type: ignore[operator]
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = int(backend.model.config.vocab_size)  # type: ignore[attr-defined]
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, "invalid_value", f"'prompt' token ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "invalid_value", "'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "invalid_value", "'prompt' is empty", "prompt")
    return ids


def make_job(backend: PeftBackend, body: dict[str, object], loop: asyncio.AbstractEventLoop) -> Job:
    """Validate a completions/generate body into a Job (raises ApiError naming the bad field)."""
    model = body.get("model") or backend.config.base_name
    if model != backend.config.base_name and model not in backend.adapters:
        message = f"model {model!r} is neither the base model nor an adapter"
        raise ApiError(404, "model_not_found", message, "model")
    for name in ("stop", "logprobs", "echo", "suffix"):
        if body.get(name):
            raise ApiError(400, "unsupported", f"'{name}' is not supported by the PEFT baseline", name)
    if body.get("n", 1) != 1:
        raise ApiError(400, "unsupported", "'n' must be 1", "n")
    prompt_ids = _prompt_ids(backend, body.get("prompt"))
    max_tokens = _int_field(body, "max_tokens", 16, 1)
    if len(prompt_ids) + max_tokens > backend.max_positions:
        message = f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) > {backend.max_positions}"
        raise ApiError(400, "context_length_exceeded", message, "max_tokens")
    sampling = SamplingKey(
        temperature=_float_field(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_float_field(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_int_field(body, "top_k", 0, 0),
    )
    return Job(
        model=str(model),
        adapter=None if model == backend.config.base_name else str(model),
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        sampling=sampling,
        loop=loop,
    )


@dataclass
class Outcome:
    """What a finished job produced, as the handlers report it."""

    finish_reason: str | None = None
    error: tuple[str, str] | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None


async def job_outputs(backend: PeftBackend, job: Job, outcome: Outcome) -> AsyncIterator[tuple[list[int], str]]:
    """Yield (token ids, text) as the worker produces them; fills `outcome`; cancels the job if abandoned."""
    detok = Detokenizer(backend.tokenizer)
    metrics = backend.metrics
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "tokens":
                ids = list(payload)  # type: ignore[call-overload]
                outcome.first_token_at = outcome.first_token_at or time.monotonic()
                outcome.completion_tokens += len(ids)
                metrics.generation_tokens.inc(len(ids))
                yield ids, detok.add(ids)
            elif kind == "done":
                outcome.finish_reason = str(payload)
                metrics.finished.labels(outcome.finish_reason).inc()
                return
            else:
                outcome.error = payload  # type: ignore[assignment]
                metrics.errors.labels(outcome.error[0]).inc()  # type: ignore[index]
                return
    finally:
        if outcome.finish_reason is None and outcome.error is None:  # the consumer gave up: client gone
            job.cancelled = True
            metrics.finished.labels("cancelled").inc()


BACKEND_KEY: web.AppKey[PeftBackend] = web.AppKey("backend", PeftBackend)


def _error_response(metrics: Metrics, err: ApiError) -> web.Response:
    metrics.errors.labels(err.code).inc()
    return web.json_response(err.body(), status=err.status)


async def _accept(request: web.Request) -> tuple[PeftBackend, Job, dict[str, object]]:
    backend = request.app[BACKEND_KEY]
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    job = make_job(backend, body, asyncio.get_running_loop())
    backend.metrics.received.inc()
    backend.metrics.prompt_tokens.inc(len(job.prompt_ids))
    backend.submit(job)
    return backend, job, body


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions: streams SSE chunks when `stream` is true, else one JSON answer."""
    try:
        backend, job, body = await _accept(request)
    except ApiError as err:
        return _error_response(request.app[BACKEND_KEY].metrics, err)
    if body.get("stream"):
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        return await _completions_sse(request, backend, job, bool(options.get("include_usage")))
    outcome, text = Outcome(), []
    async with aclosing(job_outputs(backend, job, outcome)) as outputs:  # closing cancels an abandoned job
        async for _, piece in outputs:
            text.append(piece)
    if outcome.error is not None:
        return web.json_response(ApiError(500, *outcome.error).body(), status=500)
    choice = {"index": 0, "text": "".join(text), "finish_reason": outcome.finish_reason}
    return web.json_response({**_chunk_head(job), "choices": [choice], "usage": _usage(job, outcome)})


def _chunk_head(job: Job) -> dict[str, object]:
    return {
        "id": f"cmpl-{job.id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": job.model,
    }


def _usage(job: Job, outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": len(job.prompt_ids) + outcome.completion_tokens,
    }


async def _completions_sse(
    request: web.Request, backend: PeftBackend, job: Job, include_usage: bool
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(obj: object) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    outcome = Outcome()
    usage_field = {"usage": None} if include_usage else {}
    async with aclosing(job_outputs(backend, job, outcome)) as outputs:  # a failed write cancels the job
        async for ids, text in outputs:
            choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": None}
            await send({**_chunk_head(job), "choices": [choice], **usage_field})
    if outcome.error is not None:
        await send(ApiError(500, *outcome.error).body())
    else:
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": outcome.finish_reason}
        await send({**_chunk_head(job), "choices": [choice], **usage_field})
        if include_usage:
            await send({**_chunk_head(job), "choices": [], "usage": _usage(job, outcome)})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the base model, then each adapter with `parent` naming the base."""
    backend = request.app[BACKEND_KEY]
    base = backend.config.base_name
    entries = [
        {
            "id": base,
            "object": "model",
            "owned_by": "peft-baseline",
            "root": backend.config.model,
            "parent": None,
        }
    ]
    roots = dict(backend.config.adapters) | {n: f"synthetic:r{r}" for n, r in backend.config.synthetic()}
    for name, path in roots.items():
        entries.append({"id": name, "object": "model", "owned_by": "peft-baseline", "root": path, "parent": base})
    return web.json_response({"object": "list", "data": entries})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the server's counters in Prometheus text."""
    body = generate_latest(request.app[BACKEND_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 once the model is loaded (the server listens only then)."""
    return web.json_response({"status": "ok"})


class WsSession:
    """One /v1/stream socket: many generations told apart by the client's id."""

    def __init__(self, ws: web.WebSocketResponse, backend: PeftBackend) -> None:
        self.ws, self.backend = ws, backend
        self._lock = asyncio.Lock()
        self._active: dict[str, tuple[Job, asyncio.Task[None]]] = {}

    async def send(self, frame: dict[str, object]) -> None:
        async with self._lock:
            await self.ws.send_str(json.dumps(frame))

    async def error(self, req_id: object, code: str, message: str) -> None:
        self.backend.metrics.errors.labels(code).inc()
        await self.send({"type": "error", "id": req_id, "error": {"code": code, "message": message}})

    async def serve(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == web.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == web.WSMsgType.BINARY:
                    await self.error(None, "bad_frame", "binary frames are not supported; send JSON text")
        finally:
            active = list(self._active.values())
            for job, task in active:
                job.cancelled = True
                task.cancel()
            await asyncio.gather(*(task for _, task in active), return_exceptions=True)

    async def _on_text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except json.JSONDecodeError as exc:
            await self.error(None, "bad_frame", f"the frame is not valid JSON: {exc}")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        req_id = frame.get("id") if isinstance(frame, dict) else None
        if kind == "cancel":
            entry = self._active.get(str(req_id))
            if entry is None:
                await self.error(req_id, "unknown_id", f"no running generation with id {req_id!r}")
            else:
                entry[0].cancelled = True
        elif kind == "generate":
            await self._start(frame, req_id)
        else:
            await self.error(req_id, "bad_frame", f"unknown frame type {kind!r}; use generate or cancel")

    async def _start(self, frame: dict[str, object], req_id: object) -> None:
        if not isinstance(req_id, str) or not req_id:
            await self.error(req_id, "invalid_value", "'id' must be a non-empty string")
            return
        if req_id in self._active:
            await self.error(req_id, "duplicate_id", f"a generation with id {req_id!r} is still running")
            return
        try:
            job = make_job(self.backend, frame, asyncio.get_running_loop())
        except ApiError as err:
            await self.error(req_id, err.code, err.message)
            return
        self.backend.metrics.received.inc()
        self.backend.metrics.prompt_tokens.inc(len(job.prompt_ids))
        await self.send({"type": "accepted", "id": req_id})
        self.backend.submit(job)
        self._active[req_id] = (job, asyncio.create_task(self._pump(req_id, job)))

    async def _pump(self, req_id: str, job: Job) -> None:
        outcome = Outcome()
        try:
            async with aclosing(job_outputs(self.backend, job, outcome)) as outputs:
                async for ids, text in outputs:
                    await self.send({"type": "delta", "id": req_id, "text": text, "token_ids": ids})
            if outcome.error is not None:
                code, message = outcome.error
                await self.send({"type": "error", "id": req_id, "error": {"code": code, "message": message}})
                return
            await self.send(
                {
                    "type": "done",
                    "id": req_id,
                    "finish_reason": outcome.finish_reason,
                    "usage": _usage(job, outcome),
                    "timing": _timing(job, outcome),
                }
            )
        finally:
            self._active.pop(req_id, None)


def _timing(job: Job, outcome: Outcome) -> dict[str, float]:
    now = time.monotonic()
    first = outcome.first_token_at or now
    return {"ttft_ms": (first - job.created) * 1e3, "e2e_ms": (now - job.created) * 1e3}


async def stream(request: web.Request) -> web.WebSocketResponse:
    """GET /v1/stream: the WebSocket protocol."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await WsSession(ws, request.app[BACKEND_KEY]).serve()
    return ws


def build_app(config: ServerConfig) -> web.Application:
    """The aiohttp application; the model loads (in a thread) before the server starts listening."""
    app = web.Application()

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        backend = await asyncio.to_thread(PeftBackend, config, Metrics())
        backend.start()
        app[BACKEND_KEY] = backend
        yield
        await backend.stop()

    async def on_shutdown(app: web.Application) -> None:
        backend = app.get(BACKEND_KEY)
        if backend is not None:
            await backend.stop()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects name=DIR, got {text!r}")
    if not (Path(path) / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{path!r} is not a PEFT adapter directory (no adapter_config.json)")
    return name, path


def _model_dir(text: str) -> str:
    """--model: an HF model directory (config.json in it), checked before anything loads."""
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an HF model directory (no config.json); the PEFT baseline "
                                         "loads directories only (`lorafleet serve` also takes synthetic:NAME)")
    return text


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def adapters_below(root: str) -> list[tuple[str, str]]:
    """(name, dir) of every PEFT adapter directly below `root`, in natural name order (a2 before a10)."""
    found = [(p.name, str(p)) for p in Path(root).iterdir() if (p / "adapter_config.json").is_file()]
    if not found:
        raise ValueError(f"--adapter-dir: no PEFT adapter (adapter_config.json) below {root!r}")
    return sorted(found, key=lambda item: _natural_key(item[0]))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The baseline server's argument parser."""
    parser = Parser(
        prog="python -m lorafleet.loadgen.peft_server",
        description="HF transformers + PEFT baseline server (static mixed-adapter batches).",
    )
    add = parser.add_argument
    add("--model", required=True, type=_model_dir, help="base model directory (HF format)")
    add("--adapter", action="append", default=[], type=_adapter_arg, help="name=DIR (repeatable)")
    add("--adapter-dir", default=None, help="serve every PEFT adapter directory below DIR, named by its folder")
    add("--random-weights", action="store_true", help="random base weights from config.json (no weight files)")
    add("--synthetic-adapters", type=int, default=0, help="add N random LoRA adapters named synthetic-0..N-1")
    add("--synthetic-ranks", type=_int_list, default=(8, 16, 32, 64), help="ranks, cycled (default 8,16,32,64)")
    add("--synthetic-targets", default="q_proj,k_proj,v_proj,o_proj", help="target modules of synthetic adapters")
    add("--seed", type=int, default=0, help="seed of random weights")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--max-batch-size", type=int, default=32, help="requests per generate() call (default 32)")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--dtype", default=None, help="float32|float16|bfloat16 (default bf16 on cuda, fp32 on cpu)")
    add("--served-model-name", default=None, help="the base model's name (default: dir name)")
    add("--torch-threads", type=int, default=None, help="torch CPU threads")
    return parser


def parse_args(argv: list[str]) -> ServerConfig:
    """The ServerConfig the command line describes (raises ValueError naming a bad option)."""
    args = build_parser().parse_args(argv)
    adapters = list(args.adapter) + (adapters_below(args.adapter_dir) if args.adapter_dir else [])
    return ServerConfig(
        model=args.model,
        adapters=tuple(adapters),
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        device=args.device,
        dtype=args.dtype,
        served_name=args.served_model_name,
        torch_threads=args.torch_threads,
        random_weights=args.random_weights,
        synthetic_adapters=args.synthetic_adapters,
        synthetic_ranks=args.synthetic_ranks,
        synthetic_targets=tuple(t for t in args.synthetic_targets.split(",") if t),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: load the model, then serve until SIGINT/SIGTERM; the exit status."""
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a bad flag (one line on stderr)
        return int(exc.code or 0)
    except ValueError as exc:
        print(f"peft_server: error: {exc}", file=sys.stderr)
        return 2
    ready = f"peft_server: listening on http://{config.host}:{config.port}"
    web.run_app(
        build_app(config),
        host=config.host,
        port=config.port,
        access_log=None,
        print=lambda _: print(ready, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

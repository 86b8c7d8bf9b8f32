"""The synchronous engine core: add_request / step / abort. No asyncio, usable and tested on CPU.

    step():  schedule (CPU books)  →  plan (plain data)  →  executor.execute(plan)  →  postprocess

The executor is anything with `execute(StepPlan) -> StepOutput`: the in-process ModelRunner here, or the
serving layer's proxy to executor processes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.adapters import AdapterError
from lorafleet.engine.config import EngineConfig, ModelConfig
from lorafleet.engine.detokenize import Detokenizer, TextStream
from lorafleet.engine.plan import AdapterLoad, SeqPlan, StepOutput, StepPlan
from lorafleet.engine.pool import PagePool
from lorafleet.engine.request import ParamError, Request, RequestOutput, SamplingParams, Status
from lorafleet.engine.roofline import StepCostModel
from lorafleet.engine.sampling import TokenLogprobs
from lorafleet.engine.scheduler import Chunk, Schedule, Scheduler


@dataclass
class EngineSnapshot:
    """The engine's state at one step. page_owner[p] is "" (free), "kv:<client request id>" or "adapter:<name>"."""

    step: int
    num_pages: int
    page_owner: list[str]
    usage: dict[str, int]
    evictions: int
    preemptions: int
    waiting: list[tuple[str, str | None]]
    running: list[tuple[str, str | None]]
    resident_adapters: list[str]
    host_cached_adapters: list[str]
    registered_adapters: list[str]
    cache_hits: int
    cache_misses: int


def _take_prompt_logprobs(request: Request, first: int, entries: list[TokenLogprobs]) -> None:
    """Append a chunk's prompt logprobs (position `first` on); a recompute after preemption repeats positions
    already taken, which are skipped."""
    taken = request.prompt_logprobs
    if not taken:
        taken.append(None)  # the first prompt token has no logprob
    skip = len(taken) - first
    if 0 <= skip < len(entries):
        taken.extend(entries[skip:])


def _owner_label(owner: tuple[str, object] | None, external: dict[int, str]) -> str:
    if owner is None:
        return ""
    kind, key = owner
    return f"{kind}:{external.get(key, key)}" if kind == "kv" else f"{kind}:{key}"


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepOutput: ...


@dataclass
class Tracked:
    """A request plus its output text stream, and the fields of its SeqPlans that never change (`head`:
    temperature, top_p, top_k, seed; `tail`: prompt_len .. logit_bias; `banned`: what min_tokens holds back;
    `logprobs`), built once instead of at every step."""

    request: Request
    text: TextStream
    detok: Detokenizer
    head: tuple = ()
    tail: tuple = ()
    banned: list[int] = field(default_factory=list)
    logprobs: int = -1


_PLAN_ORDER = ("request_id", "token_ids", "start", "block_table", "slot", "sample", "temperature", "top_p", "top_k",
               "seed", "sample_index", "prompt_len", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "logit_bias", "banned_ids", "logprobs", "prompt_logprobs")
assert tuple(f.name for f in fields(SeqPlan)) == _PLAN_ORDER, "Engine._seq_plan builds SeqPlan positionally"


def _fixed_plan_fields(request: Request, banned: list[int]) -> tuple[tuple, tuple, list[int], int]:
    """Tracked's head, tail, banned and logprobs for `request` (see Engine._seq_plan)."""
    p = request.params
    head = (p.temperature, p.top_p, p.top_k, request.seed)
    tail = (len(request.prompt_ids), p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
            [list(pair) for pair in p.logit_bias])
    return head, tail, banned, p.logprobs if p.logprobs is not None else -1


class Engine:
    """Continuous-batching engine over the unified page pool."""

    def __init__(
        self,
        model: ModelConfig,
        config: EngineConfig,
        store: AdapterStore,
        executor: Executor,
        decode: Callable[[list[int]], str] | None = None,
        block_tokens: int | None = None,
    ) -> None:
        self.model, self.config, self.store, self.executor = model, config, store, executor
        self.decode = decode or (lambda ids: "")
        self._token_texts: dict[int, str] = {}  # one token's text, for the detokenizers (at most the vocabulary)
        self.block_tokens = block_tokens or config.block_tokens
        self.pool = PagePool(config.num_pages)
        store.pool_pages = config.num_pages or None
        page_bytes = model.num_layers * store.page_elements * store.dtype.itemsize
        weights = StepCostModel(model, store.dtype.itemsize, config.tensor_parallel_size).weight_bytes(0)
        self.scheduler = Scheduler(config, self.pool, lambda name: store.infos[name].num_pages, page_bytes,
                                   store.is_ready, int(config.max_batch_adapter_fraction * weights))
        self.requests: dict[str, Tracked] = {}
        self.max_model_len = min(config.max_model_len or model.context_limit, model.context_limit)
        self._next_id = 0
        self._step = 0  # steps completed
        self._planned = 0  # steps planned (a plan's number)
        self._released: list[int] = []  # requests finished since the last plan (the runner drops their state)
        self._taken_back: tuple[list[str], list[str]] = ([], [])  # loads and evictions of plans never sent

    # requests ---------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> None:
        """Queue a generation; raises ParamError / AdapterError / ValueError naming the bad field."""
        if request_id in self.requests:
            raise ParamError("id", f"request {request_id!r} is already running")
        self._validate(prompt_ids, params, adapter)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        request = Request(self._next_id, request_id, list(prompt_ids), adapter, params, seed, time.monotonic())
        self._next_id += 1
        self.requests[request_id] = Tracked(request, TextStream(params.stop), Detokenizer(self.decode,
                                                                                          single=self._token_texts),
                                            *_fixed_plan_fields(request, self._banned_ids(params)))
        self.scheduler.add(request)

    def _validate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        if not prompt_ids:
            raise ParamError("prompt", "must not be empty")
        vocab = self.model.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ParamError("prompt", f"token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ParamError("stop_token_ids", f"token ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ParamError("logit_bias", f"token ids must be in [0, {vocab})")
        if params.top_k > vocab:
            raise ParamError("top_k", f"must be at most the vocabulary size {vocab}")
        if params.min_tokens > 0 and len(self._banned_ids(params)) >= vocab:
            raise ParamError("min_tokens", "cannot be met: stop_token_ids (with EOS) hold back every token of the "
                             "vocabulary until then")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ParamError("max_tokens", f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context length {self.max_model_len}")
        if adapter is not None and adapter not in self.store.infos:
            raise AdapterError(f"model: adapter {adapter!r} is not loaded")
        adapter_pages = self.store.infos[adapter].num_pages if adapter else 0
        if adapter_pages >= self.config.num_pages:  # no max_tokens could make it fit: name the adapter
            raise ParamError("model", f"adapter {adapter!r} needs {adapter_pages} pool pages, the pool has "
                             f"{self.config.num_pages} and a request needs KV pages beside it: serve it with more "
                             "pages (--num-pages, GPU memory) or at a lower rank")
        pages = self.scheduler.blocks_for(total) + adapter_pages
        if pages > self.config.num_pages:
            raise ParamError("max_tokens", f"the request needs {pages} pages, the pool has {self.config.num_pages}")

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages now; False if it is unknown or already finished."""
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return False
        self.scheduler.finish(tracked.request, "cancelled")
        self._released.append(tracked.request.id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # one step ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One synchronous step with the in-process executor."""
        planned = self.plan_step()
        if planned is None:
            return []
        schedule, plan = planned
        return self.complete_step(schedule, self.executor.execute(plan))

    def plan_step(self) -> tuple[Schedule, StepPlan] | None:
        """First half of a step (for callers that run the plan elsewhere, e.g. executor processes). The
        chunks count as in flight from here: the next step may be planned before this one completes."""
        schedule = self.scheduler.schedule()
        if not schedule.chunks:
            return None
        plan = self._plan(schedule)
        self._planned += 1
        for chunk in schedule.chunks:
            request = chunk.request
            request.num_computed += chunk.length
            request.in_flight += 1
            request.pending += chunk.sample
        return schedule, plan

    def unplan(self, schedule: Schedule, plan: StepPlan | None = None) -> None:
        """Take back a planned step that was never sent (its requests run again in the next step). With its
        `plan`, what the executors were to learn from it (adapters loaded into pages, adapters evicted,
        requests released) goes with the next plan instead: an adapter the pool's books already count as
        resident would otherwise never be written into the executor's pages."""
        if plan is not None:
            self._taken_back[0].extend(load.name for load in plan.loads)
            self._taken_back[1].extend(plan.evicted)
            self._released[:0] = plan.released
        for chunk in schedule.chunks:
            request = chunk.request
            request.in_flight -= 1
            request.pending -= chunk.sample
            if request.status is Status.RUNNING:
                request.num_computed -= chunk.length

    def complete_step(self, schedule: Schedule, output: StepOutput) -> list[RequestOutput]:
        """Second half: append the sampled tokens (steps complete in the order they were planned)."""
        self._step += 1
        return self._postprocess(schedule.chunks, output)

    def fail_step(self, schedule: Schedule) -> list[str]:
        """Second half of a step the executor could not run: the bookkeeping ends as in `complete_step`, with
        no tokens. Returns the external ids of the step's requests still running (the caller fails them)."""
        self._step += 1
        running = []
        for chunk in schedule.chunks:
            request = chunk.request
            request.in_flight -= 1
            request.pending -= chunk.sample
            if request.status is Status.RUNNING:
                running.append(request.external_id)
        return list(dict.fromkeys(running))

    def _plan(self, schedule: Schedule) -> StepPlan:
        slots = schedule.adapters
        slot_of = {name: i for i, name in enumerate(slots)}
        seqs = [self._seq_plan(chunk, slot_of) for chunk in schedule.chunks]
        (carried, evicted), self._taken_back = self._taken_back, ([], [])
        names = [n for n in dict.fromkeys([*carried, *schedule.loads]) if self.pool.is_resident(n)]
        loads = [AdapterLoad(name, list(self.pool.adapter_pages[name])) for name in names]
        released, self._released = self._released, []
        return StepPlan(self._planned, seqs, slots, loads, evicted + self.pool.drain_evicted(), released)

    def _seq_plan(self, chunk: Chunk, slot_of: dict[str, int]) -> SeqPlan:
        """The chunk's SeqPlan: the fields that change per step here, the request's fixed sampling fields from
        its Tracked entry (built once), positionally in SeqPlan's field order (checked in Tracked)."""
        r = chunk.request
        tracked = self.requests[r.external_id]
        index = len(r.output_ids) + r.pending
        return SeqPlan(
            r.id, r.token_slice(chunk.start, chunk.length), chunk.start, list(self.pool.kv_pages[r.id]),
            slot_of[r.adapter] if r.adapter is not None else -1, chunk.sample, *tracked.head, index, *tracked.tail,
            tracked.banned if chunk.sample and index < r.params.min_tokens else [], tracked.logprobs,
            self._prompt_logprobs_wanted(r, chunk) if r.params.prompt_logprobs is not None else -1,
        )

    def _banned_ids(self, params: SamplingParams) -> list[int]:
        """What min_tokens holds back (vLLM): the stop token ids, and EOS unless ignore_eos."""
        eos = () if params.ignore_eos else tuple(self.model.eos_token_ids)
        return sorted(set(params.stop_token_ids) | set(eos))

    @staticmethod
    def _prompt_logprobs_wanted(request: Request, chunk: Chunk) -> int:
        wanted = request.params.prompt_logprobs
        done = len(request.prompt_logprobs) >= len(request.prompt_ids)
        return -1 if wanted is None or done or chunk.start >= len(request.prompt_ids) else wanted

    def _postprocess(self, chunks: list[Chunk], output: StepOutput) -> list[RequestOutput]:
        """Requests finished or cancelled while the step ran drop their token (one wasted token each)."""
        sampled = iter(zip(output.sampled, output.logprobs))
        outputs = []
        for chunk in chunks:
            request = chunk.request
            request.in_flight -= 1
            if request.id in output.prompt_logprobs:
                _take_prompt_logprobs(request, *output.prompt_logprobs[request.id])
            if not chunk.sample:
                continue
            request.pending -= 1
            token, logprobs = next(sampled)
            if request.status is Status.RUNNING:
                outputs.append(self._append_token(request, token, logprobs))
        return outputs

    def _append_token(self, request: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        tracked = self.requests[request.external_id]
        request.output_ids.append(token)
        first = request.first_token_time is None
        request.first_token_time = request.first_token_time or time.monotonic()
        check_stop = len(request.output_ids) >= request.params.min_tokens
        delta = tracked.text.update(tracked.detok.push(request.output_ids), check_stop)
        reason = self._finish_reason(request, token, tracked.text)
        if reason is not None:
            self.scheduler.finish(request, reason)
            self._released.append(request.id)
            delta += tracked.text.update(tracked.detok.finish(request.output_ids))
            delta += tracked.text.flush()
            del self.requests[request.external_id]
        prompt = (request.prompt_logprobs or [None]) if first and request.params.prompt_logprobs is not None else None
        return RequestOutput(
            request.external_id, [token], delta, reason is not None, reason,
            len(request.prompt_ids), len(request.output_ids), [logprobs] if logprobs is not None else [], prompt,
        )

    def _finish_reason(self, request: Request, token: int, text: TextStream) -> str | None:
        params = request.params
        if len(request.output_ids) < params.min_tokens:
            return None
        if text.stopped or token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token in self.model.eos_token_ids:
            return "stop"
        if len(request.output_ids) >= params.max_tokens:
            return "length"
        return None

    # adapters ---------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        self.store.register(name, path)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter no request uses; its pages are freed."""
        busy = [t.request.external_id for t in self.requests.values() if t.request.adapter == name]
        if busy:
            raise AdapterError(f"lora_name: adapter {name!r} is in use by {len(busy)} request(s)")
        if self.pool.is_resident(name):
            self.pool.evict_adapter(name)
        self.store.unregister(name)

    def snapshot(self) -> EngineSnapshot:
        """Plain-data view of the engine for dashboards and metrics."""
        pool = self.pool
        external = {t.request.id: t.request.external_id for t in self.requests.values()}
        labels: dict[tuple[str, object] | None, str] = {None: ""}  # one label per owner, not per page
        owners = [labels[o] if o in labels else labels.setdefault(o, _owner_label(o, external)) for o in pool.owner]
        return EngineSnapshot(
            step=self._step,
            num_pages=pool.num_pages,
            page_owner=owners,
            usage=pool.usage(),
            evictions=pool.evictions,
            preemptions=self.scheduler.preemptions,
            waiting=[(r.external_id, r.adapter) for r in self.scheduler.waiting],
            running=[(r.external_id, r.adapter) for r in self.scheduler.running],
            resident_adapters=list(pool.lru),
            host_cached_adapters=list(self.store.cache),
            registered_adapters=list(self.store.infos),
            cache_hits=self.store.stats.hits,
            cache_misses=self.store.stats.misses,
        )

    @property
    def steps(self) -> int:
        """Steps executed so far."""
        return self._step

    @property
    def num_running(self) -> int:
        return sum(1 for r in self.scheduler.running if r.status is Status.RUNNING)

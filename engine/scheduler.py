"""Continuous batching over the unified pool (plain integers; no tensors, no event loop).

Each step: running requests first (oldest first), each gets its next chunk (a decode token, or the next
piece of a chunked prefill / recompute); then waiting requests are admitted within the token budget,
the sequence cap and the cap on distinct adapters per batch, preferring requests whose adapter is
already in the batch or resident (clustering), within a fairness window of the queue's head.
Out of pages: evict idle adapters (LRU), then preempt the youngest running request (it is requeued
at the front and recomputed); requests in a step still in flight are never preempted. A running request
is never failed for lack of pages.

Adapter loads: a waiting request whose adapter is not resident is admitted only once the adapter is ready
to load (`adapter_ready`: packed in host memory, for the server) and the step's loads stay within
`max_adapter_load_bytes_per_step` (a step's first load always fits); otherwise it waits while others pass
(a "load stall", counted), so one step's misses never stall the batch.

Adapter bytes per step: every distinct adapter of a batch has its rows read once per step, so besides the cap
on their number, `max_batch_adapter_bytes` bounds their bytes (the batch's first adapter always fits). To
keep the batch full under that bound, admission looks `cluster_window` requests deep for requests of adapters
already in the batch; a request passed over `fairness_window` times still ranks first.

Steps may be planned while the previous one runs (the serving scheduler overlaps them): the engine
advances `num_computed` when it plans a chunk, and a sampled token not yet returned counts as `pending`
(it reads as PENDING_TOKEN in the next plan; the executor substitutes the token it sampled).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from lorafleet.engine.config import EngineConfig
from lorafleet.engine.pool import PagePool
from lorafleet.engine.request import Request, Status


@dataclass(slots=True)
class Chunk:
    """`length` tokens of `request`, starting at token `start`, run this step; `sample` if it ends them."""

    request: Request
    start: int
    length: int
    sample: bool


@dataclass
class Schedule:
    """One step's decisions: chunks to run, adapters to load into pages, requests preempted."""

    chunks: list[Chunk] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    load_bytes: int = 0  # pool bytes (one rank) of `loads`

    @property
    def adapters(self) -> list[str]:
        """Distinct adapters of the batch, in first-use order."""
        names: dict[str, None] = {}
        for chunk in self.chunks:
            if chunk.request.adapter is not None:
                names[chunk.request.adapter] = None
        return list(names)


class Scheduler:
    """Owns the waiting queue, the running set and the page pool's books."""

    def __init__(self, config: EngineConfig, pool: PagePool, adapter_pages: Callable[[str], int],
                 page_bytes: int = 0, adapter_ready: Callable[[str], bool] | None = None,
                 max_batch_adapter_bytes: int = 0) -> None:
        self.config = config
        self.pool = pool
        self.adapter_pages = adapter_pages
        self.page_bytes = page_bytes  # one page's bytes in one rank's pool (all layers)
        self.adapter_ready = adapter_ready or (lambda name: True)
        self.max_batch_adapter_bytes = max_batch_adapter_bytes  # 0 = no bound
        self.load_stalls = 0  # (request, step) pairs where a request waited for its adapter's load
        self.loaded_bytes = 0  # pool bytes (one rank) of every load planned
        self.waiting: deque[Request] = deque()
        self.waiting_tokens = 0  # tokens the waiting requests have still to run (sum of num_tokens - num_computed)
        self.running: list[Request] = []
        self.preemptions = 0
        self.prefetched = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_tokens)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.waiting_tokens += request.num_tokens - request.num_computed

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # one step ---------------------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        plan = Schedule()
        budget = self.config.max_batch_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is Status.RUNNING and not request.ends_with_pending:
                budget -= self._continue(request, budget, plan)
        self._admit(budget, plan)
        if plan.chunks:  # loads ride on a step that runs; a step with no chunks is never executed
            self._prefetch(plan)
        self.loaded_bytes += plan.load_bytes
        return plan

    def _loadable(self, name: str, plan: Schedule) -> bool:
        """Whether this step may load adapter `name`: it is ready (packed on the host) and its bytes fit the
        step's load bound (the step's first load always fits)."""
        if not self.adapter_ready(name):
            return False
        bound = self.config.max_adapter_load_bytes_per_step
        return not (bound and plan.loads and plan.load_bytes + self.adapter_pages(name) * self.page_bytes > bound)

    def _record_load(self, name: str, pages: int, plan: Schedule) -> None:
        self.pool.load_adapter(name, pages)
        plan.loads.append(name)
        plan.load_bytes += pages * self.page_bytes

    def _prefetch(self, plan: Schedule) -> None:
        """Load the adapters of the next waiting requests into FREE pages now (never evicting anything or
        touching the KV headroom of the running requests), so they are resident when those requests are
        admitted. Prefetched adapters are idle: eviction may take them back first."""
        headroom = len(self.running)  # one page of KV growth per running request
        loaded = 0
        for request in islice(self.waiting, self.config.fairness_window):
            if loaded >= self.config.prefetch_adapters:
                return
            name = request.adapter
            if name is None or self.pool.is_resident(name) or not self._loadable(name, plan):
                continue
            pages = self.adapter_pages(name)
            if self.pool.num_free - pages < headroom:
                return
            self._record_load(name, pages, plan)
            self.prefetched += 1
            loaded += 1

    def _continue(self, request: Request, budget: int, plan: Schedule) -> int:
        length = min(request.num_tokens - request.num_computed, budget)
        while not self._reserve_kv(request, request.num_computed + length, plan):
            victim = self._youngest_running(plan)
            if victim is None:  # every other candidate is in flight: this request waits a step
                return 0
            self._preempt(victim, plan)
            if victim is request:
                return 0
        self._add_chunk(request, length, plan)
        return length

    def _admit(self, budget: int, plan: Schedule) -> None:
        in_batch = set(plan.adapters) | {r.adapter for r in self.running if r.adapter}
        batch_bytes = sum(self._adapter_bytes(name) for name in in_batch)
        for request in self._candidates(in_batch):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            new_adapter = request.adapter is not None and request.adapter not in in_batch
            if new_adapter and (len(in_batch) >= self.config.max_adapters_per_batch
                                or not self._fits_batch_bytes(request.adapter, batch_bytes, in_batch)):
                request.passed_over += 1
                continue
            if new_adapter and not self.pool.is_resident(request.adapter) and not self._loadable(request.adapter,
                                                                                                  plan):
                self.load_stalls += 1  # waits for its adapter (packing, or this step's load bytes are spent)
                continue
            length = min(request.num_tokens, budget)
            if not self._fit_new(request, length, plan):
                break
            self.waiting.remove(request)
            self.waiting_tokens -= request.num_tokens - request.num_computed
            request.status = Status.RUNNING
            request.scheduled_time = request.scheduled_time or time.monotonic()
            self.running.append(request)
            if request.adapter is not None:
                self.pool.pin(request.adapter)
                self.pool.touch(request.adapter)
                if new_adapter:
                    batch_bytes += self._adapter_bytes(request.adapter)
                in_batch.add(request.adapter)
            self._add_chunk(request, length, plan)
            budget -= length

    def _adapter_bytes(self, name: str) -> int:
        return self.adapter_pages(name) * self.page_bytes

    def _fits_batch_bytes(self, name: str, batch_bytes: int, in_batch: set[str]) -> bool:
        bound = self.max_batch_adapter_bytes
        return not bound or not in_batch or batch_bytes + self._adapter_bytes(name) <= bound

    def _candidates(self, in_batch: set[str]) -> list[Request]:
        """The first `cluster_window` (at least `fairness_window`) waiting requests, best-clustered first; a
        request passed over `fairness_window` times ranks first (no starvation)."""
        window = list(islice(self.waiting, max(self.config.fairness_window, self.config.cluster_window)))

        def rank(item: tuple[int, Request]) -> tuple[int, int]:
            position, request = item
            if request.passed_over >= self.config.fairness_window or request.adapter is None:
                return (0, position)
            if request.adapter in in_batch:
                return (0, position)
            return (1 if self.pool.is_resident(request.adapter) else 2, position)

        return [request for _, request in sorted(enumerate(window), key=rank)]

    def _fit_new(self, request: Request, length: int, plan: Schedule) -> bool:
        """Make room (evicting idle adapters only) for a new request's adapter and first chunk."""
        need = self.blocks_for(length)
        adapter = request.adapter
        load = adapter is not None and not self.pool.is_resident(adapter)
        if load:
            need += self.adapter_pages(adapter)
        if not self._evict_until(need, keep=adapter):
            return False
        if load:
            self._record_load(adapter, self.adapter_pages(adapter), plan)
        self.pool.grow_kv(request.id, self.blocks_for(length))
        return True

    def _reserve_kv(self, request: Request, num_tokens: int, plan: Schedule) -> bool:
        pages = self.pool.kv_pages.get(request.id)
        need = self.blocks_for(num_tokens) - (len(pages) if pages is not None else 0)
        if need <= 0:
            return True
        if not self._evict_until(need, keep=None):
            return False
        self.pool.grow_kv(request.id, need)
        return True

    def _evict_until(self, pages: int, keep: str | None) -> bool:
        """Evict idle adapters (LRU first, never `keep`) until `pages` are free; False if impossible."""
        if self.pool.num_free >= pages:  # the common case: no need to list the idle adapters
            return True
        idle = [name for name in self.pool.idle_adapters() if name != keep]
        while self.pool.num_free < pages and idle:
            self.pool.evict_adapter(idle.pop(0))
        return self.pool.num_free >= pages

    def _youngest_running(self, plan: Schedule) -> Request | None:
        """The preemption victim: the youngest running request not in this plan and not in a step in flight
        (preempting that one would throw away the step being computed for it: its token would be dropped and
        recomputed; correct, since steps run in order and samples are seeded by index, but wasted)."""
        scheduled = {id(c.request) for c in plan.chunks}
        candidates = [r for r in self.running if id(r) not in scheduled and not r.in_flight]
        return max(candidates, key=lambda r: (r.arrival, r.id), default=None)

    def _preempt(self, request: Request, plan: Schedule) -> None:
        self.release(request)
        request.status = Status.WAITING
        request.num_computed = 0
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)
        self.waiting_tokens += request.num_tokens - request.num_computed
        plan.preempted.append(request)

    def _add_chunk(self, request: Request, length: int, plan: Schedule) -> None:
        sample = request.num_computed + length == request.num_tokens
        plan.chunks.append(Chunk(request, request.num_computed, length, sample))

    # after the step ---------------------------------------------------------------------------------
    def release(self, request: Request) -> None:
        """Take a running request out of the batch: free its KV pages and unpin its adapter."""
        if request in self.running:
            self.running.remove(request)
            if request.adapter is not None:
                self.pool.unpin(request.adapter)
        self.pool.free_kv(request.id)

    def finish(self, request: Request, reason: str) -> None:
        self.release(request)
        if request.status is Status.WAITING:  # exactly the requests in `waiting` (not a scan of the queue)
            self.waiting.remove(request)
            self.waiting_tokens -= request.num_tokens - request.num_computed
        request.status = Status.FINISHED
        request.finish_reason = reason

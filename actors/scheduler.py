"""The scheduler actor: owns the Engine's planning side and drives the executors step by step.

    loop: drain mailbox (submit / cancel / admin / prefetched adapters)
          plan_step n+1  →  stage adapter pages + send the plan to every executor rank
          await step n's result  →  complete_step  →  one StepDeltas message with every request's news

So the next step is planned and queued while the executor runs the current one: its continuing sequences
name their next input as PENDING_TOKEN (the executor substitutes the token it just sampled), and a request
that finishes at step n has one wasted token in step n+1, dropped. Cancels free pages at once: the
executor runs steps in order, so a page reused by a later plan is written only after the step in flight.
If an executor dies, every in-flight request gets an `executor_failed` error and the actor stops stepping.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import time
from dataclasses import dataclass, field
from itertools import islice

from lorafleet.actors.admission import SHUTTING_DOWN, SLO_UNATTAINABLE
from lorafleet.actors.channels import Channel, LocalChannel, RingFull
from lorafleet.actors.executor import ExecutorDied
from lorafleet.actors.hub import RequestRecord, ServeHub, StepRecord
from lorafleet.actors.logs import adapter_log, event, steps_log
from lorafleet.actors.prefetcher import check_confined
from lorafleet.actors.protocol import params_from_wire
from lorafleet.actors.schema import (
    AdapterFetched,
    AdapterFetchFailed,
    AdminOp,
    AdminResult,
    Admitted,
    Cancel,
    DeltaItem,
    Drain,
    ExecutorDown,
    ExecutorUp,
    Prefetch,
    Rejected,
    SchedulerStats,
    StepDeltas,
    Submit,
)
from lorafleet.dashboard.hub import RooflineTotals, roofline_class
from lorafleet.engine.adapter_index import AdapterIndex
from lorafleet.engine.adapters import AdapterError
from lorafleet.engine.engine import Engine
from lorafleet.engine.plan import StepPlan
from lorafleet.engine.request import ParamError, Request, RequestOutput, Status
from lorafleet.engine.roofline import DevicePeak, StepCost, StepCostModel
from lorafleet.engine.scheduler import Schedule, Scheduler

EXECUTOR_FAILED = "executor_failed"
STEP_TOO_LARGE = "step_too_large"
INTERNAL_ERROR = "internal_error"
log = logging.getLogger("lorafleet.scheduler")
RING_FULL_PAUSE_S = (0.001, 0.05)  # waiting for room in the plan ring with nothing in flight: first, longest
ADAPTER_LOAD_BYTES = "adapter_load_bytes"  # hub counters (exported by dashboard/prom.py)
ADAPTER_LOAD_STALLS = "adapter_load_stalls"
OVERLAPPED_STEPS = "executor_overlapped_steps"  # steps the executor launched while the step before still ran
DEADLINE_SLACK_S = 1e-6  # deadlines this close ahead are checked exactly (their heap key is rounded)
SNAPSHOT_EVERY_S = 0.25  # engine snapshots (pool map, queues) while busy: at most 4/s, plus one whenever the
# engine turns busy or idle


GC_YOUNG_THRESHOLD = 10_000  # net container allocations between young collections (Python's default: 700)


def settle_heap() -> None:
    """Call once the serving process has started: collect, then move every object alive now (modules, the
    model's config, the tokenizer, the web app: hundreds of thousands of objects that live as long as the
    process) out of the cyclic collector's sight (`gc.freeze`), and collect the young generation after
    GC_YOUNG_THRESHOLD net allocations instead of 700. A step allocates thousands of short-lived containers
    (plans, chunks, deltas), almost all freed by reference counting; with the defaults the collector ran a few
    young collections per step and every few dozen steps a full one over the whole heap (up to ~0.2 s on the
    2-core dev machine): ~2.7 ms per step on average at 256 sequences (bench/scheduler_host.py). Reference
    counting still frees everything as before; only garbage in reference cycles waits a little longer."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def release_heap() -> None:
    """Undo `settle_heap`'s freeze before the process exits, so that its last collection sees every object
    again (extension modules such as Triton's report the objects still alive at exit as leaks)."""
    gc.unfreeze()


@dataclass
class StepLog:
    """Sums over the steps since the last `--log-steps` line: where a step's time went."""

    interval_s: float
    since: float = field(default_factory=time.monotonic)
    steps: int = 0
    seqs: int = 0
    tokens: int = 0
    step_ms: float = 0.0  # result to result (from the plan sent, after an idle executor)
    executor_ms: float = 0.0  # inside the executor (metadata, GPU, sampling)
    host_ms: float = 0.0  # this process's own work for the step (plan, stage, complete), overlapped with the
    # executor running the step before
    load_bytes: int = 0  # adapter bytes loaded into the pool (one rank)
    load_stalls: int = 0  # requests that waited a step for their adapter
    cost: dict[str, float] = field(default_factory=dict)  # roofline sums: ms, weights/kv/lora bytes, flops

    def add(self, seqs: int, tokens: int, step_ms: float, executor_ms: float, host_ms: float,
            cost: StepCost | None = None, roofline_ms: float = 0.0) -> None:
        self.steps, self.seqs, self.tokens = self.steps + 1, self.seqs + seqs, self.tokens + tokens
        self.step_ms, self.executor_ms, self.host_ms = (self.step_ms + step_ms, self.executor_ms + executor_ms,
                                                        self.host_ms + host_ms)
        if cost is not None:
            for key, value in (("ms", roofline_ms), ("weights", cost.weight_bytes), ("kv", cost.kv_bytes),
                               ("lora", cost.adapter_bytes), ("flops", cost.prefill_flops)):
                self.cost[key] = self.cost.get(key, 0.0) + value
        now = time.monotonic()
        if now - self.since >= self.interval_s:
            self._print(now)
            self.__init__(self.interval_s)

    def _print(self, now: float) -> None:
        n, seconds = self.steps, now - self.since
        event(steps_log, f"steps {n / seconds:.1f}/s  seqs {self.seqs / n:.1f}  tokens "
              f"{self.tokens / n:.1f}  step {self.step_ms / n:.1f} ms (executor {self.executor_ms / n:.1f})  "
              f"host {self.host_ms / n:.1f} ms  adapter loads {self.load_bytes / seconds / 1e6:.0f} MB/s "
              f"stalls {self.load_stalls}", steps_per_s=round(n / seconds, 1), seqs=round(self.seqs / n, 1),
              tokens=round(self.tokens / n, 1), step_ms=round(self.step_ms / n, 1),
              executor_ms=round(self.executor_ms / n, 1), host_ms=round(self.host_ms / n, 1),
              adapter_load_mb_per_s=round(self.load_bytes / seconds / 1e6, 1), load_stalls=self.load_stalls)
        if self.cost:
            c = {key: value / n for key, value in self.cost.items()}
            event(steps_log, f"roofline {c['ms']:.1f} ms (read weights {c['weights'] / 1e9:.2f} GB, kv "
                  f"{c['kv'] / 1e9:.2f} GB, lora {c['lora'] / 1e6:.0f} MB; prefill {c['flops'] / 1e12:.2f} TFLOP)  "
                  f"executor {self.executor_ms / n:.1f} ms = {self.executor_ms / n / max(c['ms'], 1e-9):.2f}x")


@dataclass
class StartRate:
    """Requests reaching their first token per second, measured only over windows (of at least
    `window_s`) in which the queue never emptied: the server's capacity to start requests, not the
    arrival rate. Smoothed (half old, half new); 0 until a saturated window has been seen, and again after a
    saturated window in which no request started."""

    window_s: float = 1.0
    rate: float = 0.0
    _at: float | None = None
    _started: int = 0
    _saturated: bool = False

    def update(self, now: float, started: int, waiting: int) -> float:
        if self._at is None or waiting == 0:
            self._at, self._started, self._saturated = now, started, waiting > 0
            return self.rate
        if now - self._at >= self.window_s:
            if self._saturated:
                sample = (started - self._started) / (now - self._at)
                # no start in a saturated window: the queue did not move, so no rate is known (the oldest
                # waiting request's age stands in); halving instead decayed it towards 1e-300 over a long stall,
                # and the absurd estimates it gave refused every request that would queue, after the stall too
                self.rate = 0.0 if sample == 0 else sample if self.rate == 0 else 0.5 * self.rate + 0.5 * sample
            self._at, self._started, self._saturated = now, started, True
        return self.rate


class QueueAge:
    """The earliest arrival (Live.arrival) among the live requests waiting in the engine's queue, without a
    walk over the queue on every step: a heap of live requests by arrival, whose head is dropped once it is
    no longer waiting (admitted, finished, cancelled). A running request goes back to the queue only when
    it is preempted; then (the engine's preemption count moved) the heap is rebuilt from the queue."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Live]] = []
        self._preemptions = 0

    def push(self, live: Live) -> None:
        heapq.heappush(self._heap, (live.arrival, live.request.id, live))

    def oldest(self, live_by_id: dict[str, Live], scheduler: Scheduler) -> float | None:
        heap = self._heap
        if scheduler.preemptions != self._preemptions:
            self._preemptions = scheduler.preemptions
            heap[:] = [(live.arrival, r.id, live) for r in scheduler.waiting
                       if (live := live_by_id.get(r.external_id)) is not None and live.request is r]
            heapq.heapify(heap)
        while heap:
            live = heap[0][2]
            if live.request.status is Status.WAITING and live_by_id.get(live.request.external_id) is live:
                return live.arrival
            heapq.heappop(heap)
        return None


@dataclass
class InFlight:
    """A step sent to the executors whose result has not been received."""

    schedule: Schedule
    plan: StepPlan
    sent_at: float
    plan_ms: float  # planning and staging it took here


@dataclass
class Completed:
    """A step whose result was processed by the engine but whose news is not sent yet."""

    step: InFlight
    outputs: list[RequestOutput]
    elapsed_ms: float
    executor_s: float
    complete_ms: float  # this process's time completing the step (engine postprocessing, detokenizing)


@dataclass
class Live:
    """A request the scheduler has accepted, with its timing."""

    request: Request
    arrival: float
    slo_ttft_ms: float | None
    first_token: float | None = None


class SchedulerActor:
    def __init__(self, engine: Engine, executors, inbox: LocalChannel, router: Channel, admission: Channel,
                 prefetcher: Channel, hub: ServeHub, log_steps_s: float = 0.0,
                 roofline: tuple[StepCostModel, DevicePeak] | None = None,
                 index: AdapterIndex | None = None) -> None:
        self.engine, self.executors, self.index = engine, executors, index
        self.roofline = roofline if roofline and roofline[1].bandwidth > 0 and roofline[1].matmul_flops > 0 else None
        self.parked: dict[str, list[Submit]] = {}  # adapter being read on first use -> the submits waiting for it
        self.step_log = StepLog(log_steps_s) if log_steps_s > 0 else None
        self._result_at: float | None = None
        self.in_flight: InFlight | None = None
        self._snapshot_at, self._snapshot_busy = 0.0, False
        self.inbox, self.router, self.admission, self.prefetcher, self.hub = inbox, router, admission, prefetcher, hub
        self.live: dict[str, Live] = {}
        self._deadlines: list[tuple[float, int, Live]] = []  # heap by first-token deadline (monotonic s) of
        # live requests with one; an entry stays until its deadline passes (then it is dropped if the request
        # has its first token or ended meanwhile)
        self._queue_age = QueueAge()
        self.dead: str | None = None
        self.draining = False
        self.seen_seq = 0
        self.step_ms = 0.0
        self.ring_full_pause = 0.0  # > 0 while the last step did not fit the plan ring: wait, then retry
        self.waiting_since: float | None = None  # monotonic time the wait for a step result began
        self.started = 0  # requests that got their first token
        self.start_rate = StartRate()
        self._asked: set[str] = set()
        self._loading: set[str] = set()  # names of runtime loads being read
        self._admin_tasks: set[asyncio.Task] = set()
        self._stalls_seen = 0
        self._unpublished: Completed | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        self.failed = asyncio.Event()
        self.recovered = asyncio.Event()

    async def run(self) -> None:
        while True:
            if self.in_flight is None and not self._runnable():
                if not any(self.parked.values()):
                    self.idle.set()
                await self._guarded(await self.inbox.recv())
            while (msg := self.inbox.poll()) is not None:
                await self._guarded(msg)
            self._drop_expired()
            sent = self._send_step() if self._runnable() else None
            previous, self.in_flight = self.in_flight, sent
            self._publish_outputs()  # the last completed step's news, now that the executor has its next plan
            if previous is not None:
                await self._complete(previous)  # step n+1 (if any) was sent first: it runs meanwhile
            elif sent is None and self.ring_full_pause > 0:
                await asyncio.sleep(self.ring_full_pause)  # the ring frees as the executor reads: retry soon
            elif sent is None and self._runnable():
                await self._guarded(await self.inbox.recv())  # nothing fits now: wait for news

    def _runnable(self) -> bool:
        return self.dead is None and self.engine.has_unfinished()

    async def wait_idle(self) -> None:
        """Return once no accepted request is unfinished."""
        await self.idle.wait()

    # one step -------------------------------------------------------------------------------------------
    def _send_step(self) -> InFlight | None:
        """Plan the next step and send it to the executors (while the previous one, if any, still runs)."""
        started = time.perf_counter()
        self.idle.clear()
        self._ensure_readable()
        planned = self.engine.plan_step()
        if planned is None:
            self._ask_prefetch()  # what waits may be waiting for its adapter
            return None
        schedule, plan = planned
        store = self.engine.store
        try:
            packed = [store.fetch(load.name) for load in plan.loads]
        except AdapterError as exc:
            self.engine.unplan(schedule, plan)
            self._staging_failed(plan, exc)
            return None
        if store.arena is not None:
            store.hold([load.name for load in plan.loads], plan.step)  # the executors read the extents
        try:
            self.executors.send(plan, packed)
        except ExecutorDied as exc:
            self._executor_died(str(exc))
            return None
        except RingFull as exc:
            self._ring_full(schedule, plan, exc)
            return None
        except Exception as exc:  # e.g. a value the plan's wire form cannot carry: its requests fail, not the actor
            self.engine.unplan(schedule, plan)
            self._fail_plan(plan, [c.request.external_id for c in schedule.chunks], f"step {plan.step} could not "
                            "be sent", exc)
            return None
        self.ring_full_pause = 0.0
        sent_at = time.perf_counter()
        return InFlight(schedule, plan, sent_at, (sent_at - started) * 1000)

    def _ring_full(self, schedule: Schedule, plan: StepPlan, exc: RingFull) -> None:
        """The step did not fit the plan ring: take it back. If it never can (larger than the ring), its
        requests fail (`step_too_large`) and the others go on; else it is planned again after the step in
        flight completes (the executor has read the ring by then) or after a short pause (1 ms, doubling
        to 50 ms) when none is in flight. The actor itself never stops for it."""
        self.engine.unplan(schedule, plan)
        self.hub.count("plan_ring_full")
        if not exc.never_fits:
            low, high = RING_FULL_PAUSE_S
            self.ring_full_pause = 0.0 if self.in_flight is not None else min(high, max(low, 2 * self.ring_full_pause))
            return
        self.ring_full_pause = 0.0
        for request_id in dict.fromkeys(chunk.request.external_id for chunk in schedule.chunks):
            self._cancel(request_id, "cancelled", STEP_TOO_LARGE, f"the step carrying this request does not fit "
                         f"the executor's plan ring: {exc}")

    async def _complete(self, step: InFlight) -> None:
        if self.dead is not None:  # its requests were failed when the executor died
            return
        self.waiting_since = time.monotonic()
        try:
            result = await self.executors.receive()
        except ExecutorDied as exc:
            self._executor_died(str(exc))
            self.in_flight = None  # the step sent after this one died with it
            return
        finally:
            self.waiting_since = None
        now = time.perf_counter()
        # the step's own time: from when the executor could start it (sent, or the previous result) to its result
        elapsed_ms = (now - max(step.sent_at, self._result_at or 0.0)) * 1000
        self._result_at = now
        self.step_ms = elapsed_ms if self.step_ms == 0 else 0.8 * self.step_ms + 0.2 * elapsed_ms
        if self.engine.store.arena is not None:
            self.engine.store.release_through(step.plan.step)
        self._count_loads(step.schedule)
        if result.overlapped:
            self.hub.count(OVERLAPPED_STEPS)
        if result.error is not None:
            self._step_failed(step, result.error)
            return
        try:
            outputs = self.engine.complete_step(step.schedule, result.output())
        except Exception as exc:  # a bug in postprocessing (detokenizer, stop strings): fail the step's requests
            self._fail_plan(step.plan, [c.request.external_id for c in step.schedule.chunks],
                            f"step {step.plan.step} could not be completed", exc)
            return
        self._unpublished = Completed(step, outputs, elapsed_ms, result.seconds, (time.perf_counter() - now) * 1000)
        if self.in_flight is None:  # nothing queued behind it: nothing to gain by waiting
            self._publish_outputs()

    def _publish_outputs(self) -> None:
        """Send the last completed step's news (deltas, records, stats, prefetch asks, roofline). The loop
        calls it right after sending the next plan, so this host work runs while the executor computes
        instead of between two steps; a request cancelled in between has already been answered."""
        done, self._unpublished = self._unpublished, None
        if done is None:
            return
        started = time.perf_counter()
        step = done.step
        try:
            items = [item for out in done.outputs if (item := self._item(out)) is not None]
        except Exception as exc:  # a bug in postprocessing: fail the step's requests
            self._fail_plan(step.plan, [c.request.external_id for c in step.schedule.chunks],
                            f"step {step.plan.step} could not be completed", exc)
            return
        if items:
            self.router.send(StepDeltas(step.plan.step, items))
        self._after_step(step.plan, done.elapsed_ms)
        cost, roofline_ms = self._roofline(step.plan, done.executor_s)
        if self.step_log is not None:
            # the step's own host work: its plan, its completion, its news; not the next step's plan, which is
            # sent between completing and publishing this one (and counts for the next step)
            host_ms = step.plan_ms + done.complete_ms + (time.perf_counter() - started) * 1000
            self.step_log.add(len(step.plan.seqs), step.plan.num_tokens, done.elapsed_ms, done.executor_s * 1000,
                              host_ms, cost, roofline_ms)

    def _step_failed(self, step: InFlight, error: str) -> None:
        """The executor could not run `step` (it said why in one line; its log has the traceback): the step's
        requests fail, and so do those of the step in flight behind it that use an adapter this step
        loaded (its pages may not have been written). The executor and every other request go on."""
        failed = self.engine.fail_step(step.schedule)
        loads = {load.name for load in step.plan.loads}
        behind = self.in_flight.schedule.chunks if self.in_flight is not None else []
        failed += [c.request.external_id for c in behind if c.request.adapter in loads]
        self._fail_plan(step.plan, failed, f"step {step.plan.step} failed in the executor", error)

    def _fail_plan(self, plan: StepPlan, request_ids: list[str], what: str, cause: object) -> None:
        """Fail `request_ids` with `internal_error` (a reference to the log, no traceback) and take the plan's
        adapter loads out of the pool's books (the executor may not hold them)."""
        ref = f"step-{plan.step}"
        if isinstance(cause, BaseException):
            log.error("%s (%s): %r", what, ref, cause, exc_info=cause)
        else:
            log.error("%s (%s): %s", what, ref, cause)
        self.hub.count("failed_steps")
        for request_id in dict.fromkeys(request_ids):
            self._cancel(request_id, "cancelled", INTERNAL_ERROR, f"{what}; the server log has the details under "
                         f"{ref}")
        pool = self.engine.pool
        for load in plan.loads:
            if pool.is_resident(load.name) and not pool.pins.get(load.name):
                pool.evict_adapter(load.name)
        self._publish()

    async def _guarded(self, msg: object) -> None:
        """One mailbox message; an exception fails the request it concerns (or the admin op), never the actor."""
        try:
            await self._handle(msg)
        except Exception as exc:
            ref = f"msg-{type(msg).__name__}-{getattr(msg, 'request_id', '')}"
            log.error("scheduler: %s failed (%s)", type(msg).__name__, ref, exc_info=exc)
            message = f"the scheduler failed on this request; the server log has the details under {ref}"
            if isinstance(msg, Submit) and msg.request_id in self.live:
                self._cancel(msg.request_id, "cancelled", INTERNAL_ERROR, message)
            elif isinstance(msg, Submit):
                self.engine.abort(msg.request_id)  # if it got that far
                self.router.send(Rejected(msg.request_id, INTERNAL_ERROR, message, 500))
            elif isinstance(msg, AdminOp):
                self.router.send(AdminResult(msg.request_id, False, INTERNAL_ERROR, message))

    def _roofline(self, plan: StepPlan, executor_s: float) -> tuple[StepCost | None, float]:
        """The step's roofline (engine/roofline.py), summed into the hub by batch-size class for /metrics."""
        if self.roofline is None:
            return None, 0.0
        model, peak = self.roofline
        infos = self.engine.store.infos
        cost = model.cost(plan, {name: infos[name].ranks for name in plan.slots if name in infos})
        seconds = cost.seconds(peak)
        totals = self.hub.roofline.setdefault(roofline_class(len(plan.seqs)), RooflineTotals())
        totals.steps += 1
        totals.executor_s += executor_s
        totals.roofline_s += seconds
        totals.weight_bytes += cost.weight_bytes
        totals.kv_bytes += cost.kv_bytes
        totals.adapter_bytes += cost.adapter_bytes
        totals.prefill_flops += cost.prefill_flops
        return cost, seconds * 1000

    def _count_loads(self, schedule: Schedule) -> None:
        """Adapter bytes the step loaded into the pool and the load stalls (requests that waited a step for
        their adapter) since the last step, for /metrics and the step log."""
        stalls = self.engine.scheduler.load_stalls - self._stalls_seen
        self._stalls_seen += stalls
        self.hub.count(ADAPTER_LOAD_BYTES, schedule.load_bytes)
        self.hub.count(ADAPTER_LOAD_STALLS, stalls)
        if self.step_log is not None:
            self.step_log.load_bytes += schedule.load_bytes
            self.step_log.load_stalls += stalls

    def _item(self, out: RequestOutput) -> DeltaItem | None:
        """The request's news of this step; None when its first token came after its first-token deadline
        (the request is ended with an error instead: a deadline is kept, never delivered late), or when it
        was cancelled after the step completed (its end was sent then)."""
        live = self.live.get(out.request_id)
        if live is None:
            return None
        now = time.monotonic()
        if live.first_token is None:
            if self._past_deadline(live, now, "its first token came"):
                return None
            self.started += 1
        live.first_token = live.first_token or now
        logprobs = [lp.to_wire() for lp in out.logprobs]
        prompt = ([e.to_wire() if e is not None else None for e in out.prompt_logprobs]
                  if out.prompt_logprobs is not None else None)
        if not out.finished:
            return DeltaItem(out.request_id, out.new_token_ids, out.new_text, logprobs=logprobs, prompt_logprobs=prompt)
        del self.live[out.request_id]
        item = DeltaItem(out.request_id, out.new_token_ids, out.new_text, True, out.finish_reason,
                         out.prompt_tokens, out.completion_tokens, None, None, *self._timing(live, now),
                         logprobs=logprobs, prompt_logprobs=prompt)
        self._record(live, item)
        return item

    def _timing(self, live: Live, now: float) -> tuple[float | None, float | None, float]:
        scheduled = live.request.scheduled_time
        queue_ms = (scheduled - live.arrival) * 1000 if scheduled is not None else None
        ttft_ms = (live.first_token - live.arrival) * 1000 if live.first_token is not None else None
        return queue_ms, ttft_ms, (now - live.arrival) * 1000

    def _record(self, live: Live, item: DeltaItem) -> None:
        r = live.request
        tpot = None
        if item.e2e_ms is not None and item.ttft_ms is not None and len(r.output_ids) > 1:
            tpot = (item.e2e_ms - item.ttft_ms) / (len(r.output_ids) - 1)
        self.hub.publish_record(RequestRecord(
            item.request_id, r.adapter, len(r.prompt_ids), len(r.output_ids), item.finish_reason, item.error_code,
            item.queue_ms, item.ttft_ms, item.e2e_ms, tpot, live.slo_ttft_ms))

    def _after_step(self, plan, elapsed_ms: float) -> None:
        timing = self.hub.timing
        timing.step, timing.step_ms, timing.step_ms_avg = plan.step, elapsed_ms, self.step_ms
        timing.batch_tokens, timing.batch_seqs = plan.num_tokens, len(plan.seqs)
        self.hub.publish_step(StepRecord(plan.step, len(plan.seqs), plan.num_tokens, elapsed_ms, list(plan.slots),
                                         adapter_loads=[load.name for load in plan.loads]))
        _log_pool_changes(plan)
        self._publish(throttled=True)
        self._ask_prefetch()

    def _publish(self, throttled: bool = False) -> None:
        scheduler = self.engine.scheduler
        waiting = scheduler.waiting
        now = time.monotonic()
        arrival = self._queue_age.oldest(self.live, scheduler)
        oldest = now - arrival if arrival is not None else 0.0
        rate = self.start_rate.update(now, self.started, len(waiting))
        self.admission.send(SchedulerStats(
            self.hub.timing.step, self.seen_seq, len(waiting), len(scheduler.running), scheduler.waiting_tokens,
            self.step_ms, oldest * 1000, rate))
        busy = self.engine.has_unfinished()
        if not throttled or now - self._snapshot_at >= SNAPSHOT_EVERY_S or busy != self._snapshot_busy:
            self._snapshot_at, self._snapshot_busy = now, busy
            self.hub.publish_snapshot(self.engine.snapshot())

    def _ask_prefetch(self) -> None:
        """Ask the prefetcher for the adapters of the queue's next requests that are neither resident nor in
        the host cache. With the host arena each gets an extent now (evicting cached adapters that neither a
        step in flight nor the queue's next requests need); when none can be made, asking waits for later."""
        store, pool = self.engine.store, self.engine.pool
        config = self.engine.config
        window = islice(self.engine.scheduler.waiting, max(config.fairness_window, config.cluster_window,
                                                          config.max_num_seqs))
        names = list(dict.fromkeys(r.adapter for r in window if r.adapter is not None))
        keep = {name for name in names if not pool.is_resident(name)}
        wanted, targets = {}, {}
        for name in names:
            if name in self._asked or store.is_cached(name) or pool.is_resident(name) or name not in store.infos:
                continue
            if store.arena is not None:
                try:
                    target = store.reserve(name, keep)
                except AdapterError as exc:
                    self._adapter_unreadable(name, exc)
                    continue
                if target is None:
                    break
                targets[name] = target
            wanted[name] = store.infos[name].path
        if wanted:
            self._asked.update(wanted)
            self.prefetcher.send(Prefetch(wanted, targets))

    # mailbox --------------------------------------------------------------------------------------------
    async def _handle(self, msg: object) -> None:
        if isinstance(msg, Submit):
            self._submit(msg)
        elif isinstance(msg, Cancel):
            self._cancel(msg.request_id, "cancelled")
        elif isinstance(msg, AdminOp):
            await self._admin(msg)
        elif isinstance(msg, AdapterFetched):
            self._fetched(msg)
            self._ask_prefetch()
        elif isinstance(msg, AdapterFetchFailed):
            self._fetch_failed(msg)
        elif isinstance(msg, ExecutorDown):
            if self.dead is None:
                self._executor_died(f"executor rank {msg.rank}: {msg.message}")
        elif isinstance(msg, ExecutorUp):
            self._executor_up(msg.group)
        elif isinstance(msg, Drain):
            self.draining = True
            if msg.cancel_all:  # the drain deadline: an error, so no client takes a cut answer for a whole one
                for request_id in [*self.live, *(s.request_id for w in self.parked.values() for s in w)]:
                    self._cancel(request_id, "cancelled", SHUTTING_DOWN, "the server shut down before this request "
                                 "finished (drain deadline, --drain-timeout)")
        else:
            raise TypeError(f"scheduler got unexpected message {type(msg).__name__}")

    def _submit(self, msg: Submit) -> None:
        self.seen_seq = max(self.seen_seq, msg.seq)
        refusal = self._check_submit(msg)
        if refusal is None and self._first_use(msg):
            return
        if refusal is None:
            try:
                self.engine.add_request(msg.request_id, msg.prompt_ids, params_from_wire(msg.params), msg.adapter)
            except ParamError as exc:
                refusal = Rejected(msg.request_id, "invalid_parameter", str(exc), 400, exc.field)
            except AdapterError as exc:
                refusal = Rejected(msg.request_id, "model_not_found", str(exc), 404, "model")
        if refusal is not None:
            self.router.send(refusal)
            self._publish()
            return
        request = self.engine.requests[msg.request_id].request
        live = self.live[msg.request_id] = Live(request, msg.arrival, msg.slo_ttft_ms)
        if live.slo_ttft_ms is not None:
            heapq.heappush(self._deadlines, (live.arrival + live.slo_ttft_ms / 1000, request.id, live))
        self._queue_age.push(live)
        self.idle.clear()
        self.router.send(Admitted(msg.request_id))

    def _check_submit(self, msg: Submit) -> Rejected | None:
        if self.dead is not None:
            return Rejected(msg.request_id, EXECUTOR_FAILED, f"the executor failed: {self.dead}", 503)
        if self.draining:
            return Rejected(msg.request_id, SHUTTING_DOWN, "the server is shutting down", 503)
        return None

    def _cancel(self, request_id: str, reason: str, code: str | None = None, message: str | None = None) -> None:
        live = self.live.pop(request_id, None)
        if live is None:
            self._cancel_parked(request_id, reason, code, message)
            return
        self.engine.abort(request_id)
        now = time.monotonic()
        item = DeltaItem(request_id, [], "", True, reason if code is None else None, len(live.request.prompt_ids),
                         len(live.request.output_ids), code, message, *self._timing(live, now))
        self._record(live, item)
        self.router.send(StepDeltas(self.hub.timing.step, [item]))
        self._publish(throttled=True)  # admission's stats every time; the engine snapshot at most 4/s

    def _drop_expired(self) -> None:
        """Queue-age eviction: a request still without its first token past its first-token deadline
        (`slo_ttft_ms`, else `--slo-ttft-ms`) ends with a `slo_unattainable` error, waiting or prefilling.
        Only the requests whose deadline has passed are looked at (the heap's head), not every request with
        a deadline on every loop; one that got its first token or ended meanwhile is dropped then."""
        now = time.monotonic()
        heap, kept = self._deadlines, []
        while heap and heap[0][0] <= now + DEADLINE_SLACK_S:
            entry = heapq.heappop(heap)
            live = entry[2]
            if live.first_token is not None or self.live.get(live.request.external_id) is not live:
                continue
            if not self._past_deadline(live, now, "waited" if live.request.scheduled_time is None else "prefilled"):
                kept.append(entry)  # at its deadline only to the rounding of the key: looked at again later
        for entry in kept:
            heapq.heappush(heap, entry)

    def _past_deadline(self, live: Live, now: float, what: str) -> bool:
        """End `live` with `slo_unattainable` if it has no first token and its deadline has passed."""
        waited_ms = (now - live.arrival) * 1000
        if live.slo_ttft_ms is None or waited_ms <= live.slo_ttft_ms:
            return False
        self.hub.count("evicted_deadline")
        self._cancel(live.request.external_id, "cancelled", SLO_UNATTAINABLE,
                     f"slo_ttft_ms: {what} {waited_ms:.0f} ms without a first token, past the {live.slo_ttft_ms:g} "
                     "ms first-token deadline; dropped")
        return True

    def _ensure_readable(self) -> None:
        """Without a host arena (a store that reads misses in place): before planning, read into the host
        cache any adapter the scheduler may load now that the prefetcher has not brought in yet; an
        unreadable one fails its requests (`adapter_invalid`) and is unregistered, so a plan never loads an
        adapter that cannot be staged. With the arena (the server) nothing is read here: the scheduler admits
        a request once the prefetcher has packed its adapter, and a failed prefetch fails its requests."""
        store, pool = self.engine.store, self.engine.pool
        if store.arena is not None:
            return
        window = islice(self.engine.scheduler.waiting, self.engine.config.fairness_window)
        for name in dict.fromkeys(r.adapter for r in window if r.adapter is not None):
            if name in store.infos and not store.is_cached(name) and not pool.is_resident(name):
                try:
                    store.fetch(name)
                except AdapterError as exc:
                    self._adapter_unreadable(name, exc)

    def _adapter_unreadable(self, name: str, exc: AdapterError) -> None:
        for request_id, live in list(self.live.items()):
            if live.request.adapter == name:
                self._cancel(request_id, "cancelled", "adapter_invalid", f"adapter {name!r} can no longer be "
                             f"read: {exc}")
        if self.engine.pool.is_resident(name):
            self.engine.pool.evict_adapter(name)
        self.engine.store.unregister(name)
        self._adapters_changed()
        self.hub.count("adapter_read_failures")
        event(adapter_log, f"adapter unregistered: it can no longer be read: {exc}", logging.WARNING, adapter=name)

    def _staging_failed(self, plan, exc: AdapterError) -> None:
        """An adapter this plan loads can no longer be read (e.g. its files changed on disk). The plan is
        not sent: requests on the plan's new adapters fail with `adapter_invalid`, those adapters leave the
        pool's books (the executor never received them) and the unreadable one is unregistered. The
        plan's other requests simply run again in the next step."""
        loads = {load.name for load in plan.loads}
        for request_id, live in list(self.live.items()):
            if live.request.adapter in loads:
                self._cancel(request_id, "cancelled", "adapter_invalid", f"adapter {live.request.adapter!r} "
                             f"could not be staged: {exc}")
        for name in loads:
            if self.engine.pool.is_resident(name):
                self.engine.pool.evict_adapter(name)
            if name not in self.engine.store.cache:
                self.engine.store.unregister(name)
        self._adapters_changed()
        self.hub.count("adapter_staging_failures")
        self._publish()

    def _executor_died(self, reason: str) -> None:
        self.dead = reason
        self.hub.mark_unhealthy(f"executor failed: {reason}")
        self.hub.executors = self.executors.info()
        self.failed.set()
        for request_id in list(self.live):
            self._cancel(request_id, "cancelled", EXECUTOR_FAILED, f"the executor failed: {reason}")

    def _executor_up(self, group) -> None:
        """Resume on a fresh executor group: its pool is empty, so no adapter is resident any more (every
        request was failed when the old one died, so none is pinned)."""
        pool = self.engine.pool
        if self.engine.store.arena is not None:  # the dead group's steps read no host extent any more
            self.engine.store.release_through(1 << 62)
        for name in list(pool.lru):
            pool.evict_adapter(name)
        pool.drain_evicted()
        pool.check()
        self.executors, self.dead = group, None
        self.failed.clear()
        self.hub.healthy, self.hub.health_reason = True, ""
        self.hub.executors = group.info()
        self.hub.count("executor_restarts")
        self._publish()
        self.recovered.set()

    async def _admin(self, msg: AdminOp) -> None:
        refusal = self._admin_refusal(msg)
        if refusal is not None:
            self.router.send(refusal)
            return
        if msg.op == "load":  # read off the step loop: the running requests keep streaming meanwhile
            self._loading.add(msg.name)
            task = asyncio.create_task(self._admin_load(msg), name=f"admin-load-{msg.name}")
            self._admin_tasks.add(task)
            task.add_done_callback(self._admin_tasks.discard)
            return
        try:
            self.engine.remove_adapter(msg.name)
        except AdapterError as exc:
            self.router.send(AdminResult(msg.request_id, False, "adapter_invalid", str(exc)))
            return
        self._admin_done(msg)

    async def _admin_load(self, msg: AdminOp) -> None:
        """A runtime load: the directory is read and validated in a worker thread (seconds for a large adapter,
        during which steps go on), then registered here on the loop. Any failure answers the op, never the actor."""
        store = self.engine.store
        root = self.index.root if self.index is not None else None

        def read() -> tuple:
            check_confined(root, msg.path)  # again, now that it is read: a file may have become a link out
            return store.prepare(msg.name, msg.path)

        try:
            prepared = await asyncio.to_thread(read)
            if msg.name in store.infos:  # resolved from the adapter root on first use meanwhile
                self.router.send(AdminResult(msg.request_id, False, "adapter_exists",
                                             f"lora_name: {msg.name!r} is already loaded"))
                return
            store.check_fits(prepared[0])
            store.add(*prepared)
        except AdapterError as exc:
            self.router.send(AdminResult(msg.request_id, False, "adapter_invalid", str(exc)))
            return
        except Exception as exc:
            ref = f"msg-AdminOp-{msg.request_id}"
            log.error("scheduler: AdminOp failed (%s)", ref, exc_info=exc)
            self.router.send(AdminResult(msg.request_id, False, INTERNAL_ERROR, "the scheduler failed on this "
                                         f"request; the server log has the details under {ref}"))
            return
        finally:
            self._loading.discard(msg.name)
        self._admin_done(msg)

    def _admin_done(self, msg: AdminOp) -> None:
        if self.index is not None:
            self.index.invalid.pop(msg.name, None)
        self._adapters_changed()
        self._publish()
        event(adapter_log, "adapter registered" if msg.op == "load" else "adapter unregistered", adapter=msg.name,
              path=msg.path, via="admin")
        self.router.send(AdminResult(msg.request_id, True, None, f"{msg.op} {msg.name}: ok"))

    def _admin_refusal(self, msg: AdminOp) -> AdminResult | None:
        """The stable error of an admin op that cannot apply, decided before touching the engine."""
        known = msg.name in self.engine.store.infos
        if msg.op not in ("load", "unload"):
            return AdminResult(msg.request_id, False, "invalid_parameter", f"op: unknown operation {msg.op!r}")
        if msg.op == "load" and known:
            return AdminResult(msg.request_id, False, "adapter_exists", f"lora_name: {msg.name!r} is already loaded")
        if msg.op == "load" and msg.name in self._loading:
            return AdminResult(msg.request_id, False, "adapter_exists", f"lora_name: {msg.name!r} is being loaded")
        if msg.op == "unload" and not known:
            return AdminResult(msg.request_id, False, "model_not_found", f"lora_name: {msg.name!r} is not loaded")
        users = sum(1 for live in self.live.values() if live.request.adapter == msg.name)
        if msg.op == "unload" and users:
            return AdminResult(msg.request_id, False, "adapter_in_use",
                               f"lora_name: {msg.name!r} is in use by {users} request(s)")
        return None

    def _fetched(self, msg: AdapterFetched) -> None:
        self._asked.discard(msg.name)
        waiting = self.parked.pop(msg.name, None)
        if waiting is not None:
            self._resolved(msg, waiting)
            return
        store = self.engine.store
        if msg.packed.arena_offset is not None:
            store.commit(msg.name, msg.packed.arena_offset)  # False (extent freed) if unregistered meanwhile
            return
        info = store.infos.get(msg.name)
        if info is None or info.path != msg.path or store.is_cached(msg.name):
            return
        store.put(msg.packed)  # the store's LRU insert (bounded in bytes)

    def _fetch_failed(self, msg: AdapterFetchFailed) -> None:
        """A prefetch could not read the adapter: its requests fail (`adapter_invalid`), it is unregistered
        (or, read on first use from the adapter root, remembered as invalid)."""
        self._asked.discard(msg.name)
        store = self.engine.store
        if msg.target is not None:
            store.abandon(msg.name, msg.target.arena_offset)
        waiting = self.parked.pop(msg.name, None)
        if waiting is not None:
            self._refuse_parked(msg.name, msg.path, msg.message, waiting)
            return
        info = store.infos.get(msg.name)
        if info is not None and info.path == msg.path and not store.is_cached(msg.name):
            self._adapter_unreadable(msg.name, AdapterError(msg.message))
            self._publish()

    # adapters under --adapter-root, read on first use (docs/adapters.md) -------------------------------
    def _first_use(self, msg: Submit) -> bool:
        """True when `msg` names an adapter under the adapter root that is not loaded: it waits (parked)
        while the prefetcher reads and validates the directory off the loop, or, if the directory was
        found invalid before and has not changed, it is refused at once. False when there is nothing to
        resolve (the base model, a loaded adapter, or a name that is not under the root)."""
        name = msg.adapter
        if name is None or self.index is None or name in self.engine.store.infos:
            return False
        path = self.index.find(name)
        if path is None:
            return False
        why = self.index.refusal(name, path)
        if why is not None:
            self.router.send(_invalid(msg.request_id, name, why))
            self._publish()
            return True
        waiting = self.parked.setdefault(name, [])
        if not waiting and name not in self._asked:
            self._asked.add(name)
            self.prefetcher.send(Prefetch({name: path}))
        waiting.append(msg)
        self.idle.clear()
        return True

    def _resolved(self, msg: AdapterFetched, waiting: list[Submit]) -> None:
        if msg.name not in self.engine.store.infos:  # else an admin load registered it meanwhile
            try:
                self.engine.store.register_packed(msg.packed)
            except AdapterError as exc:  # e.g. larger than the whole host cache
                self._refuse_parked(msg.name, msg.path, str(exc), waiting)
                return
            self._adapters_changed()
            event(adapter_log, "adapter registered from the adapter root on first use", adapter=msg.name,
                  path=msg.path, read_ms=round(msg.seconds * 1000, 1))
        for submit in waiting:
            self._submit(submit)

    def _refuse_parked(self, name: str, path: str, message: str, waiting: list[Submit]) -> None:
        """An adapter read on first use failed validation: its requests are refused (400 adapter_invalid)
        and it is remembered as invalid, listed in a warning; the server goes on serving everything else."""
        if self.index is not None:
            self.index.mark_invalid(name, path, message)
        self.hub.count("adapter_invalid")
        event(adapter_log, f"adapter {name!r} under the adapter root is invalid and refused: {message}",
              logging.WARNING, adapter=name)
        for submit in waiting:
            self.router.send(_invalid(submit.request_id, name, message))
        self._adapters_changed()
        self._publish()

    def _cancel_parked(self, request_id: str, reason: str = "cancelled", code: str | None = None,
                       message: str | None = None) -> None:
        for waiting in self.parked.values():
            for submit in waiting:
                if submit.request_id == request_id:
                    waiting.remove(submit)
                    self.router.send(Admitted(request_id))
                    self.router.send(StepDeltas(self.hub.timing.step, [DeltaItem(
                        request_id, [], "", True, reason if code is None else None, len(submit.prompt_ids), 0,
                        code, message)]))
                    return

    def _adapters_changed(self) -> None:
        """What /v1/models lists: the loaded adapters, and the root's indexed ones not found invalid."""
        listed = self.index.listed() if self.index is not None else {}
        listed.update((name, info.path) for name, info in self.engine.store.infos.items())
        self.hub.adapters = listed
        if self.index is not None:
            self.hub.invalid_adapters = {name: why for name, (_, why) in self.index.invalid.items()}


def _invalid(request_id: str, name: str, why: str) -> Rejected:
    return Rejected(request_id, "adapter_invalid", f"model: adapter {name!r} is invalid: {why}", 400, "model")


def _log_pool_changes(plan: StepPlan) -> None:
    """One lorafleet.adapters line per adapter a step loads into the pool or evicts from it."""
    for load in plan.loads:
        event(adapter_log, "adapter loaded into the pool", adapter=load.name, pages=len(load.pages), step=plan.step)
    for name in plan.evicted:
        event(adapter_log, "adapter evicted from the pool", adapter=name, step=plan.step)

"""Aggregation of the hub's publications into the figures the dashboard and /metrics show.

`FleetStats` listens to a `Hub`: cumulative totals (latency histograms, finish reasons, error codes,
tokens, adapter loads and prefetch hits) never drop anything, while the windowed figures (percentiles,
rates, SLO attainment) are computed on demand over the last `window_s` / `rate_window_s` seconds of the
hub's bounded record history. Everything here is plain Python over plain data; no event loop needed.

Definitions (also in docs/dashboard.md):
- SLO attainment: requests finished in the window that succeeded with TTFT <= their SLO (the request's
  `slo_ttft_ms`, else `default_slo_ttft_ms`, else any TTFT), divided by ALL requests finished or failed in
  the window — the same definition as the load generator's.
- adapter load: an adapter observed entering the GPU pool between two snapshots (those resident at the
  first snapshot seen are not counted). Its load wait is the time from the first snapshot in which a
  waiting request needed it (not resident) to the first snapshot in which it is resident.
- adapter load latency: from the step records that carry `adapter_loads`: the measured copy time
  (`adapter_load_ms`) when the serving layer provides it, else the duration of the step that loaded it
  (an upper bound: the copy happens inside that step).
- prefetch hit: a request first seen running whose adapter was already resident in the previous snapshot.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field

from lorafleet.dashboard.hub import Hub, RequestRecord, StepRecord
from lorafleet.engine.engine import EngineSnapshot

# Bucket bounds in seconds (the vLLM ones, so existing dashboards and alerts carry over).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
EARLY_ABORTED = "early_aborted"
REJECTED = "rejected_429"


@dataclass
class Histogram:
    """A cumulative histogram: per-bucket counts (last one is +Inf), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, weight: int = 1) -> None:
        """Add `weight` observations of `value`."""
        self.counts[bisect.bisect_left(self.bounds, value)] += weight
        self.total += value * weight
        self.count += weight

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs as Prometheus exposes them, ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return out


@dataclass
class AdapterTotals:
    """Cumulative per-adapter figures."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    loads: int = 0
    load_wait_ms: float = 0.0
    load_waits: int = 0
    last_load_wait_ms: float | None = None
    load_ms: float = 0.0
    load_timings: int = 0

    @property
    def mean_load_wait_ms(self) -> float | None:
        return self.load_wait_ms / self.load_waits if self.load_waits else None

    @property
    def mean_load_ms(self) -> float | None:
        """Mean load latency from step records, else the mean load wait from snapshots."""
        return self.load_ms / self.load_timings if self.load_timings else self.mean_load_wait_ms


def batch_means(steps: list[StepRecord]) -> tuple[float, float]:
    """(sequences, distinct adapters) per step over `steps`, each step weighted by its duration: the batch
    a running step had on average while the engine was busy (0 when no step ran). Short requests leave a
    step's own size flickering between 0 and 1; this is what an operator means by "the batch size"."""
    busy = sum(step.duration_ms for step in steps)
    if busy <= 0:
        return 0.0, 0.0
    seqs = sum(step.batch_size * step.duration_ms for step in steps) / busy
    adapters = sum(len(set(step.adapters_in_batch) - {None, ""}) * step.duration_ms for step in steps) / busy
    return round(seqs, 1), round(adapters, 1)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Summary:
    """Windowed load figures at one moment (times in ms, rates per second; None when no data)."""

    at: float
    window_s: float
    requests: int
    req_per_s: float
    tokens_per_s: float
    gen_tokens_per_s: float
    batch_size: float
    adapters_in_batch: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    slo_met: int
    slo_attainment: float | None


class FleetStats:
    """Listens to a Hub and keeps the cumulative and derived figures."""

    def __init__(self, hub: Hub, window_s: float = 60.0, rate_window_s: float = 10.0,
                 default_slo_ttft_ms: float | None = None, history: int = 1200) -> None:
        self.hub = hub
        self.window_s, self.rate_window_s = window_s, rate_window_s
        self.default_slo_ttft_ms = default_slo_ttft_ms
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(TPOT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)
        self.adapter_load = Histogram(TTFT_BUCKETS)
        self.success: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.adapters: dict[str, AdapterTotals] = {}
        self.adapter_loads = 0
        self.prefetch_hits = 0
        self.prefetch_misses = 0
        self.occupancy: deque[tuple[float, int, int, int]] = deque(maxlen=history)
        self._resident: set[str] = set()
        self._running: set[str] = set()
        self._needed_since: dict[str, float] = {}
        self._seen = False
        for record in list(hub.records):
            self.on_record(record)
        if hub.snapshot is not None:
            self.on_snapshot(hub.snapshot)
        hub.add_listener(self)

    def close(self) -> None:
        self.hub.remove_listener(self)

    def __call__(self, kind: str, item: object) -> None:
        if kind == "record":
            self.on_record(item)  # type: ignore[arg-type]
        elif kind == "snapshot":
            self.on_snapshot(item)  # type: ignore[arg-type]
        elif kind == "step":
            self.on_step(item)  # type: ignore[arg-type]

    def adapter(self, name: str) -> AdapterTotals:
        totals = self.adapters.get(name)
        if totals is None:
            totals = self.adapters[name] = AdapterTotals()
        return totals

    # records ----------------------------------------------------------------------------------------
    def on_record(self, record: RequestRecord) -> None:
        """Fold one finished or failed request into the cumulative totals."""
        self.prompt_tokens += record.prompt_tokens
        self.generation_tokens += record.completion_tokens
        if record.error_code is None:
            reason = record.finish_reason or "unknown"
            self.success[reason] = self.success.get(reason, 0) + 1
        else:
            self.failures[record.error_code] = self.failures.get(record.error_code, 0) + 1
        if record.ttft_ms is not None:
            self.ttft.observe(record.ttft_ms / 1e3)
        if record.e2e_ms is not None:
            self.e2e.observe(record.e2e_ms / 1e3)
        if record.queue_ms is not None:
            self.queue.observe(record.queue_ms / 1e3)
        if record.tpot_ms is not None and record.completion_tokens > 1:
            self.tpot.observe(record.tpot_ms / 1e3)
            self.itl.observe(record.tpot_ms / 1e3, weight=record.completion_tokens - 1)
        if record.adapter is not None:
            totals = self.adapter(record.adapter)
            totals.requests += 1
            totals.errors += record.error_code is not None
            totals.prompt_tokens += record.prompt_tokens
            totals.completion_tokens += record.completion_tokens

    def on_step(self, step: StepRecord) -> None:
        """Time the adapter loads a step reports (see the module docstring)."""
        for name in step.adapter_loads:
            ms = step.adapter_load_ms.get(name, step.duration_ms)
            totals = self.adapter(name)
            totals.load_ms += ms
            totals.load_timings += 1
            self.adapter_load.observe(ms / 1e3)

    # snapshots --------------------------------------------------------------------------------------
    def on_snapshot(self, snapshot: EngineSnapshot, now: float | None = None) -> None:
        """Derive adapter loads, load waits, prefetch hits and the occupancy history."""
        now = time.time() if now is None else now
        resident = set(snapshot.resident_adapters)
        first = not self._seen
        self._seen = True
        self._count_prefetch(snapshot, self._resident, first)
        for name in resident - self._resident if not first else ():
            self.adapter_loads += 1
            totals = self.adapter(name)
            totals.loads += 1
            since = self._needed_since.pop(name, None)
            if since is not None:
                wait = (now - since) * 1e3
                totals.load_wait_ms += wait
                totals.load_waits += 1
                totals.last_load_wait_ms = wait
        needed = {a for _, a in snapshot.waiting if a is not None and a not in resident}
        for name in needed:
            self._needed_since.setdefault(name, now)
        for name in list(self._needed_since):
            if name not in needed:
                del self._needed_since[name]
        self._resident = resident
        if not self.occupancy or now - self.occupancy[-1][0] >= 0.2:
            usage = snapshot.usage
            self.occupancy.append((now, usage.get("free", 0), usage.get("kv", 0), usage.get("adapter", 0)))

    def _count_prefetch(self, snapshot: EngineSnapshot, was_resident: set[str], first: bool) -> None:
        running = {rid for rid, _ in snapshot.running}
        for rid, adapter in snapshot.running:
            if first or rid in self._running or adapter is None:
                continue
            if adapter in was_resident:
                self.prefetch_hits += 1
            else:
                self.prefetch_misses += 1
        self._running = running

    @property
    def prefetch_hit_rate(self) -> float | None:
        total = self.prefetch_hits + self.prefetch_misses
        return self.prefetch_hits / total if total else None

    # windowed figures -------------------------------------------------------------------------------
    def window_records(self, now: float, window_s: float) -> list[RequestRecord]:
        """Records that finished within the last `window_s` seconds (newest last)."""
        out: list[RequestRecord] = []
        for record in reversed(self.hub.records):
            if record.finished_at < now - window_s:
                break
            out.append(record)
        out.reverse()
        return out

    def window_steps(self, now: float, window_s: float) -> list[StepRecord]:
        out: list[StepRecord] = []
        for step in reversed(self.hub.steps):
            if step.at < now - window_s:
                break
            out.append(step)
        return out

    def meets_slo(self, record: RequestRecord) -> bool:
        slo = record.slo_ttft_ms if record.slo_ttft_ms is not None else self.default_slo_ttft_ms
        ok = record.error_code is None and record.ttft_ms is not None
        return ok and (slo is None or record.ttft_ms <= slo)

    def summary(self, now: float | None = None) -> Summary:
        """Percentiles and SLO attainment over `window_s`, rates over `rate_window_s`."""
        now = time.time() if now is None else now
        records = self.window_records(now, self.window_s)
        recent = [r for r in records if r.finished_at >= now - self.rate_window_s]
        steps = self.window_steps(now, self.rate_window_s)
        ttft = sorted(r.ttft_ms for r in records if r.ttft_ms is not None)
        tpot = sorted(r.tpot_ms for r in records if r.tpot_ms is not None and r.completion_tokens > 1)
        e2e = sorted(r.e2e_ms for r in records if r.e2e_ms is not None)
        met = sum(self.meets_slo(r) for r in records)
        batch, adapters = batch_means(steps)
        return Summary(
            at=now, window_s=self.window_s, requests=len(records),
            req_per_s=len(recent) / self.rate_window_s,
            tokens_per_s=sum(s.num_tokens for s in steps) / self.rate_window_s,
            gen_tokens_per_s=sum(r.completion_tokens for r in recent) / self.rate_window_s,
            batch_size=batch, adapters_in_batch=adapters,
            ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
            tpot_p50_ms=percentile(tpot, 50), tpot_p99_ms=percentile(tpot, 99),
            e2e_p50_ms=percentile(e2e, 50), e2e_p99_ms=percentile(e2e, 99),
            slo_met=met, slo_attainment=met / len(records) if records else None,
        )

    def adapter_rates(self, now: float | None = None) -> dict[str, float]:
        """Requests per second per adapter over `rate_window_s`."""
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        for record in self.window_records(now, self.rate_window_s):
            if record.adapter is not None:
                counts[record.adapter] = counts.get(record.adapter, 0) + 1
        return {name: n / self.rate_window_s for name, n in counts.items()}

    def counter(self, name: str) -> int:
        return self.hub.counters.get(name, 0)

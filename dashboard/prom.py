"""Prometheus export: one collector that reads the hub's latest snapshot and the FleetStats totals at
scrape time, so every family of one scrape describes the same moment.

Names use the `lorafleet:` prefix with vLLM's metric names where vLLM has one (so the vLLM Grafana
dashboards and the Kubernetes inference gateway's `lora_requests_info` routing work unchanged).
docs/dashboard.md lists every family.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lorafleet.dashboard.stats import EARLY_ABORTED, REJECTED, FleetStats, Histogram

PREFIX = "lorafleet:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector(Collector):
    """Yields every lorafleet family from one read of the hub and the stats. `prefix` is prepended to
    every name ("lorafleet:" by default; "vllm:" makes the vLLM-named families drop-in for vLLM tooling)."""

    def __init__(self, stats: FleetStats, max_lora: int | None = None, prefix: str = PREFIX,
                 model_name: str | None = None) -> None:
        self.stats = stats
        self.max_lora = max_lora
        self.prefix = prefix
        # vLLM labels every family of a served model with model_name (all but lora_requests_info)
        self.const = {"model_name": model_name} if model_name else {}

    def _labels(self, *names: str) -> list[str]:
        return [*names, *self.const]

    def _values(self, *values: str) -> list[str]:
        return [*values, *self.const.values()]

    def _histogram(self, name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.prefix + name, doc, labels=self._labels())
        family.add_metric(self._values(), hist.cumulative(), hist.total)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(self.prefix + name, doc, labels=self._labels())
        family.add_metric(self._values(), value)
        return family

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.prefix + name, doc, labels=self._labels())
        family.add_metric(self._values(), value)
        return family

    def _labelled(self, name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
        family = CounterMetricFamily(self.prefix + name, doc, labels=self._labels(label))
        for key, value in sorted(values.items()):
            family.add_metric(self._values(key), value)
        return family

    def _gauges(self, name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.prefix + name, doc, labels=self._labels(label))
        for key, value in values.items():
            family.add_metric(self._values(key), value)
        return family

    def collect(self) -> Iterator[Metric]:
        yield from self._engine_families()
        yield from self._request_families()
        yield from self._adapter_families()
        yield from self._roofline_families()
        yield from self._window_families()

    def _engine_families(self) -> Iterator[Metric]:
        snap = self.stats.hub.snapshot
        num_pages = snap.num_pages if snap else 0
        usage = snap.usage if snap else {}
        yield self._gauge("engine_step", "Engine steps completed at the latest snapshot.", snap.step if snap else 0)
        yield self._gauge("num_requests_running", "Requests in the running batch.", len(snap.running) if snap else 0)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.", len(snap.waiting) if snap else 0)
        kv = usage.get("kv", 0)
        yield self._gauge("kv_cache_usage_perc", "Fraction (0-1) of the unified pool's pages holding KV cache.",
                     kv / num_pages if num_pages else 0.0)
        yield self._gauge("pool_usage_perc", "Fraction (0-1) of the unified pool's pages in use (KV + adapters).",
                     (num_pages - usage.get("free", num_pages)) / num_pages if num_pages else 0.0)
        yield self._gauge("pool_capacity_pages", "Pages in the unified pool (a gauge; was pool_pages_total).",
                          num_pages)
        yield self._gauges("pool_pages", "Unified pool pages by kind.", "kind",
                           {kind: usage.get(kind, 0) for kind in ("free", "kv", "adapter")})
        yield self._counter("num_preemptions", "Requests preempted (KV freed, recomputed later).",
                       snap.preemptions if snap else 0)
        yield self._counter("adapter_evictions", "Adapters evicted from the pool.", snap.evictions if snap else 0)
        yield self._lora_info(snap)
        yield self._cache_config_info()

    def _lora_info(self, snap) -> GaugeMetricFamily:
        running = sorted({a for _, a in snap.running if a}) if snap else []
        waiting = sorted({a for _, a in snap.waiting if a}) if snap else []
        family = GaugeMetricFamily(
            self.prefix + "lora_requests_info", "Running and waiting LoRA adapters; value is the scrape time.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        max_lora = "" if self.max_lora is None else str(self.max_lora)
        family.add_metric([",".join(running), ",".join(waiting), max_lora], time.time())
        return family

    def _cache_config_info(self) -> GaugeMetricFamily:
        """vLLM's cache_config_info: the pool's geometry as labels, value 1. `block_size` is tokens per KV
        page and `num_gpu_blocks` the pages of the unified pool (KV and adapter pages share them)."""
        info = getattr(self.stats.hub, "info", {})
        config = info.get("config", {})
        labels = {"block_size": info.get("block_size", config.get("block_tokens")),
                  "num_gpu_blocks": config.get("num_pages"),
                  "cache_dtype": config.get("dtype"), "gpu_memory_utilization": config.get("gpu_memory_utilization"),
                  "enable_prefix_caching": False}
        family = GaugeMetricFamily(self.prefix + "cache_config_info", "Page pool configuration; value is 1.",
                                   labels=list(labels))
        family.add_metric(["" if v is None else str(v) for v in labels.values()], 1.0)
        return family

    def _request_families(self) -> Iterator[Metric]:
        s = self.stats
        yield self._histogram("time_to_first_token_seconds", "Time to first token.", s.ttft)
        yield self._histogram("inter_token_latency_seconds",
                         "Inter-token latency (each request's mean, counted once per gap).", s.itl)
        yield self._histogram("time_per_output_token_seconds", "Mean time per output token of a request.", s.tpot)
        yield self._histogram("e2e_request_latency_seconds", "End-to-end request latency.", s.e2e)
        yield self._histogram("request_queue_time_seconds", "Time a request waited before it was scheduled.", s.queue)
        yield self._labelled("request_success", "Requests finished, by finish reason.",
                                "finished_reason", s.success)
        yield self._labelled("request_failure", "Requests that failed or were refused, by error code.",
                                "code", s.failures)
        yield self._counter("prompt_tokens", "Prompt tokens of finished requests.", s.prompt_tokens)
        yield self._counter("generation_tokens", "Generated tokens of finished requests.", s.generation_tokens)
        yield self._counter("early_aborted_requests", "Requests early-aborted for their TTFT SLO.",
                       s.counter(EARLY_ABORTED))
        yield self._counter("rejected_requests", "Requests refused with 429 (queue full).", s.counter(REJECTED))
        yield self._labelled("events", "Named server events counted by the serving layer.",
                                "event", dict(s.hub.counters))

    def _adapter_families(self) -> Iterator[Metric]:
        s = self.stats
        snap = s.hub.snapshot
        yield self._counter("adapter_cache_hits", "Host adapter cache hits.", snap.cache_hits if snap else 0)
        yield self._counter("adapter_cache_misses", "Host adapter cache misses (read from disk).",
                       snap.cache_misses if snap else 0)
        yield self._counter("adapter_loads", "Adapters observed entering the GPU pool.", s.adapter_loads)
        yield self._histogram("adapter_load_seconds", "Adapter load latency into the pool (see docs/dashboard.md).",
                         s.adapter_load)
        yield self._counter("adapter_prefetch_hits", "Requests scheduled with their adapter already resident.",
                       s.prefetch_hits)
        yield self._counter("adapter_prefetch_misses", "Requests scheduled that had to wait for an adapter load.",
                       s.prefetch_misses)
        counters = s.hub.counters
        yield self._counter("adapter_load_bytes", "Adapter bytes copied into the GPU pool (one rank's share); "
                            "rate() gives bytes loaded per second.", counters.get("adapter_load_bytes", 0))
        yield self._counter("adapter_load_stalls", "Times a waiting request waited a step for its adapter (not yet "
                            "packed in host memory, or the step's load-bytes bound was spent).",
                            counters.get("adapter_load_stalls", 0))
        yield self._gauges("adapters", "Registered adapters by storage tier.", "tier",
                           adapter_tiers(snap, getattr(s.hub, "adapters", None)))

    def _roofline_families(self) -> Iterator[Metric]:
        """Executor time beside the step roofline, summed per batch-size class (label `seqs`)."""
        hub = self.stats.hub
        yield self._gauge("device_copy_bandwidth_bytes", "Device copy bandwidth used by the roofline (bytes/s, "
                          "read + write).", hub.device_peak[0])
        yield self._gauge("device_matmul_flops", "Device matmul peak used by the roofline (FLOP/s).",
                          hub.device_peak[1])
        fields = (("roofline_steps", "steps", "Steps by batch size."),
                  ("roofline_executor_seconds", "executor_s", "Executor time of those steps (s)."),
                  ("roofline_seconds", "roofline_s", "Roofline time of those steps: bytes at the copy bandwidth "
                   "plus prefill FLOPs at the matmul peak (s)."),
                  ("roofline_weight_bytes", "weight_bytes", "Weight bytes those steps had to read."),
                  ("roofline_kv_bytes", "kv_bytes", "KV-cache bytes those steps had to read."),
                  ("roofline_adapter_bytes", "adapter_bytes", "Distinct adapters' bytes those steps had to read."),
                  ("roofline_prefill_flops", "prefill_flops", "Prefill FLOPs of those steps."))
        for name, attr, doc in fields:
            family = CounterMetricFamily(self.prefix + name, doc, labels=self._labels("seqs"))
            for label, totals in sorted(hub.roofline.items()):
                family.add_metric(self._values(label), getattr(totals, attr))
            yield family

    def _window_families(self) -> Iterator[Metric]:
        summary = self.stats.summary()
        yield self._gauge("slo_attainment", f"Fraction of requests of the last {summary.window_s:g}s that met their "
                     "TTFT SLO (NaN when none finished).",
                     float("nan") if summary.slo_attainment is None else summary.slo_attainment)
        yield self._gauge("window_requests", "Requests finished or failed in the sliding window.", summary.requests)


def adapter_tiers(snap, listed=None) -> dict[str, int]:
    """Registered adapters by tier: gpu (resident in the pool), host (cached, not resident), disk (also the
    `listed` names the serving layer indexed under --adapter-root and has not read yet)."""
    if snap is None:
        return {"gpu": 0, "host": 0, "disk": 0}
    registered = set(snap.registered_adapters) | set(listed or ())
    gpu = registered & set(snap.resident_adapters)
    host = (registered & set(snap.host_cached_adapters)) - gpu
    return {"gpu": len(gpu), "host": len(host), "disk": len(registered) - len(gpu) - len(host)}


def make_registry(stats: FleetStats, max_lora: int | None = None, prefix: str = PREFIX,
                  model_name: str | None = None) -> CollectorRegistry:
    """A fresh registry (never the process-global one) holding the fleet collector; `model_name` (the
    served base model) labels every family but lora_requests_info, as vLLM does."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(stats, max_lora, prefix, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

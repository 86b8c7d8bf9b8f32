"""The hub between the serving actors and the dashboard/metrics: the only thing they share.

The scheduler actor publishes an EngineSnapshot (plain data) after steps and the frontend/scheduler
publish one RequestRecord per finished or failed request; the dashboard and /metrics read from here.
It lives in the asyncio process; it holds copies, never the Engine.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.engine.engine import EngineSnapshot


@dataclass(frozen=True)
class RequestRecord:
    """One finished (or refused/failed) request. Times in milliseconds; None where not reached. `status`
    is the HTTP status the client got when it was not a plain 200 finish (refusals, client errors)."""

    id: str
    adapter: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    error_code: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    tpot_ms: float | None = None
    slo_ttft_ms: float | None = None
    finished_at: float = field(default_factory=time.time)
    status: int | None = None


@dataclass
class StepRecord:
    """Per-step figures from the scheduler actor."""

    step: int
    batch_size: int
    num_tokens: int
    duration_ms: float
    adapters_in_batch: list[str]
    at: float = field(default_factory=time.time)
    adapter_loads: list[str] = field(default_factory=list)
    adapter_load_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class RooflineTotals:
    """Sums over the steps of one batch-size class: the executor's time beside the step roofline (the bytes
    the steps had to read at the device's copy bandwidth plus their prefill FLOPs at its matmul peak)."""

    steps: int = 0
    executor_s: float = 0.0
    roofline_s: float = 0.0
    weight_bytes: int = 0
    kv_bytes: int = 0
    adapter_bytes: int = 0
    prefill_flops: float = 0.0


ROOFLINE_CLASSES = ((200, "200+"), (64, "64-199"), (0, "1-63"))  # batch sizes (sequences), largest first


def roofline_class(num_seqs: int) -> str:
    return next(label for low, label in ROOFLINE_CLASSES if num_seqs >= low)


Listener = Callable[[str, object], None]
"""Called synchronously as listener(kind, item) with kind "snapshot", "step", "record" or "count"
(item = (name, amount)). It must be cheap and must not raise."""


class Hub:
    """Latest snapshot + bounded history of request and step records + subscriber queues."""

    def __init__(self, history: int = 10_000) -> None:
        self.snapshot: EngineSnapshot | None = None
        self.records: deque[RequestRecord] = deque(maxlen=history)
        self.steps: deque[StepRecord] = deque(maxlen=history)
        self.counters: dict[str, int] = {}
        self.roofline: dict[str, RooflineTotals] = {}  # by roofline_class of the batch size
        self.device_peak: tuple[float, float] = (0.0, 0.0)  # copy bytes/s, matmul FLOP/s (0: unknown)
        self._subscribers: set[asyncio.Queue] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Have `listener` see every later publication (the metrics aggregator uses this)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, kind: str, item: object) -> None:
        for listener in list(self._listeners):
            listener(kind, item)

    def publish_snapshot(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot
        self._notify("snapshot", snapshot)

    def publish_step(self, record: StepRecord) -> None:
        self.steps.append(record)
        self._notify("step", record)

    def publish_record(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._notify("record", record)
        for queue in list(self._subscribers):
            if queue.qsize() < 10_000:
                queue.put_nowait(record)

    def count(self, name: str, amount: int = 1) -> None:
        """Bump a named counter (e.g. 'rejected_429', 'early_aborted')."""
        self.counters[name] = self.counters.get(name, 0) + amount
        self._notify("count", (name, amount))

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

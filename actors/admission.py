"""Admission: bounds the waiting queue (429 + Retry-After) and early-aborts requests whose first token
cannot meet their TTFT SLO (S-LoRA's early abort), before they reach the scheduler.

`AdmissionPolicy` is the plain decision logic (no event loop, unit-tested); `AdmissionActor` owns one and
a mailbox: it receives Submit/Cancel from the frontend and SchedulerStats from the scheduler, forwards
what it admits to the scheduler (in order, so a Cancel never overtakes its Submit) and answers refusals
directly to the frontend's router.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from lorafleet.actors.channels import Channel
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.schema import Cancel, Drain, Rejected, SchedulerStats, Submit

QUEUE_FULL = "queue_full"
SLO_UNATTAINABLE = "slo_unattainable"
SHUTTING_DOWN = "server_shutting_down"


@dataclass
class AdmissionPolicy:
    """Queue bound and first-token-time estimate from the scheduler's latest stats.

    The waiting queue seen by a new request = the scheduler's waiting count + the submits forwarded that
    the scheduler has not seen yet. The first-token estimate is the larger of two measured views:

    * compute: the prompt tokens ahead of it (and its own), prefilled at `max_batch_tokens - running`
      tokens per step, plus one step, times the smoothed step time;
    * queue: the requests ahead of it divided by the measured start rate (requests reaching their first
      token per second while the queue never emptied), plus one step; before a rate is measured, the age
      of the oldest waiting request (a queue that has not moved for that long will not move faster).

    The queue view is what keeps first-token times bounded when capacity drops (slow steps, long decodes
    holding every sequence slot): the compute view alone assumes free slots. With no step measured yet,
    nothing is refused for its SLO. `retry_after` is derived from the same measurements.
    """

    max_queue: int
    max_batch_tokens: int
    stats: SchedulerStats | None = None
    forwarded_seq: int = 0
    unseen: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, prompt tokens) not yet seen

    def observe(self, stats: SchedulerStats) -> None:
        self.stats = stats
        while self.unseen and self.unseen[0][0] <= stats.seen_seq:
            self.unseen.popleft()

    @property
    def unseen_tokens(self) -> int:
        return sum(tokens for _, tokens in self.unseen)

    def queue_length(self) -> int:
        if self.stats is None:
            return self.forwarded_seq
        return self.stats.num_waiting + max(0, self.forwarded_seq - self.stats.seen_seq)

    def estimate_ttft_ms(self, prompt_tokens: int) -> float | None:
        if self.stats is None or self.stats.step_ms <= 0:
            return None
        ahead = self.stats.waiting_tokens + self.unseen_tokens + prompt_tokens
        per_step = max(1, self.max_batch_tokens - self.stats.num_running)
        compute = (math.ceil(ahead / per_step) + 1) * self.stats.step_ms
        return max(compute, self.queue_wait_ms(self.queue_length()))

    def queue_wait_ms(self, requests_ahead: int) -> float:
        """How long `requests_ahead` waiting requests take to start, from the measured start rate (or, before
        one is measured, the oldest waiting request's age)."""
        if requests_ahead == 0 or self.stats is None:
            return 0.0
        if self.stats.start_rate > 0:
            return requests_ahead / self.stats.start_rate * 1000 + self.stats.step_ms
        return self.stats.oldest_wait_ms

    def retry_after(self, excess_ms: float = 0.0) -> float:
        """Whole seconds (1..60) until a new request would likely be admitted: the time for the queue to drain
        `excess_ms` of estimated wait, or one request's start when the queue is merely full."""
        if excess_ms <= 0:
            rate = self.stats.start_rate if self.stats else 0.0
            step_ms = self.stats.step_ms if self.stats and self.stats.step_ms > 0 else 100.0
            excess_ms = 1000 / rate if rate > 0 else self.queue_length() * step_ms
        return float(min(60, max(1, math.ceil(excess_ms / 1000))))

    def idle(self) -> bool:
        """Nothing running, waiting or forwarded unseen. An idle server admits whatever its estimate says: the
        step time behind the estimate is only refreshed by steps, so a refusal here (e.g. after one slow cold
        step of kernel compilation) would stand forever with nothing left to measure."""
        return self.stats is not None and self.stats.num_running == 0 and self.queue_length() == 0

    def decide(self, submit: Submit) -> Rejected | None:
        """None to admit, else the refusal."""
        if self.queue_length() >= self.max_queue:
            return Rejected(submit.request_id, QUEUE_FULL, f"the queue is full ({self.max_queue} waiting); retry "
                            "later", 429, None, self.retry_after())
        estimate = None if self.idle() else self.estimate_ttft_ms(len(submit.prompt_ids))
        if submit.slo_ttft_ms is not None and estimate is not None and estimate > submit.slo_ttft_ms:
            return Rejected(submit.request_id, SLO_UNATTAINABLE, f"slo_ttft_ms: the first token is estimated at "
                            f"{estimate:.0f} ms, over the {submit.slo_ttft_ms:g} ms first-token deadline", 429,
                            "slo_ttft_ms", self.retry_after(estimate - submit.slo_ttft_ms))
        return None

    def admitted(self, submit: Submit) -> int:
        self.forwarded_seq += 1
        self.unseen.append((self.forwarded_seq, len(submit.prompt_ids)))
        return self.forwarded_seq


class AdmissionActor:
    """Mailbox owner around an AdmissionPolicy."""

    def __init__(self, policy: AdmissionPolicy, inbox: Channel, scheduler: Channel, router: Channel,
                 hub: ServeHub) -> None:
        self.policy, self.inbox, self.scheduler, self.router, self.hub = policy, inbox, scheduler, router, hub
        self.draining = False

    async def run(self) -> None:
        while True:
            msg = await self.inbox.recv()
            if isinstance(msg, Submit):
                self._submit(msg)
            elif isinstance(msg, Cancel):
                self.scheduler.send(msg)
            elif isinstance(msg, SchedulerStats):
                self.policy.observe(msg)
            elif isinstance(msg, Drain):
                self.draining = True
                self.scheduler.send(msg)
            else:
                raise TypeError(f"admission got unexpected message {type(msg).__name__}")

    def _submit(self, submit: Submit) -> None:
        refusal = self.policy.decide(submit)
        if self.draining:
            refusal = Rejected(submit.request_id, SHUTTING_DOWN, "the server is shutting down", 503)
        if refusal is None:
            seq = self.policy.admitted(submit)
            self.scheduler.send(Submit(submit.request_id, submit.prompt_ids, submit.params, submit.adapter,
                                       submit.slo_ttft_ms, submit.arrival, seq))
            return
        self.router.send(refusal)
        self.hub.count("early_aborted" if refusal.code == SLO_UNATTAINABLE else "rejected_429")
        # the frontend records the refused request (Generation.admitted), as it does for every refusal

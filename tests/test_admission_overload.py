"""Admission under overload, as plain policy (no event loop): the queue view of the first-token estimate
from the measured start rate (or the oldest request's age before one is measured), Retry-After derived
from the same measurements, and the start rate measured only while the queue never emptied."""

from __future__ import annotations

import math

import pytest

from lorafleet.actors.admission import AdmissionPolicy
from lorafleet.actors.scheduler import StartRate
from lorafleet.actors.schema import SchedulerStats, Submit


def _submit(tokens: int = 10, slo: float | None = 2000.0) -> Submit:
    return Submit("r", list(range(tokens)), {}, None, slo, 0.0)


def _stats(waiting: int, rate: float = 0.0, oldest_ms: float = 0.0, step_ms: float = 20.0) -> SchedulerStats:
    return SchedulerStats(1, seen_seq=0, num_waiting=waiting, num_running=64, waiting_tokens=10 * waiting,
                          step_ms=step_ms, oldest_wait_ms=oldest_ms, start_rate=rate)


def test_the_queue_view_bounds_the_estimate_when_slots_are_full():
    policy = AdmissionPolicy(max_queue=1000, max_batch_tokens=512)
    policy.observe(_stats(waiting=50, rate=10.0))
    # compute view: 510 tokens at 448 per step = 2 steps + 1 = 60 ms; queue view: 50 ahead at 10/s = 5 s + a step
    assert policy.estimate_ttft_ms(10) == pytest.approx(5020.0)
    refusal = policy.decide(_submit(slo=2000.0))
    assert refusal is not None and refusal.code == "slo_unattainable" and refusal.status == 429
    assert refusal.retry_after == math.ceil((5020.0 - 2000.0) / 1000)  # the excess drains at the measured rate
    assert policy.decide(_submit(slo=6000.0)) is None


def test_before_a_rate_is_measured_the_oldest_wait_stands_in():
    policy = AdmissionPolicy(max_queue=1000, max_batch_tokens=512)
    policy.observe(_stats(waiting=5, oldest_ms=2500.0))
    assert policy.estimate_ttft_ms(10) == pytest.approx(2500.0)
    assert policy.decide(_submit(slo=2000.0)).code == "slo_unattainable"
    policy.observe(_stats(waiting=0, oldest_ms=0.0))  # an empty queue: only the compute view
    assert policy.estimate_ttft_ms(10) == pytest.approx(40.0)


def test_queue_full_retry_after_is_one_start_at_the_measured_rate():
    policy = AdmissionPolicy(max_queue=3, max_batch_tokens=512)
    policy.observe(_stats(waiting=3, rate=0.25))
    refusal = policy.decide(_submit(slo=None))
    assert refusal.code == "queue_full" and refusal.retry_after == 4.0
    policy.observe(_stats(waiting=3, rate=0.001))
    assert policy.decide(_submit(slo=None)).retry_after == 60.0  # capped


def test_start_rate_counts_only_saturated_windows():
    rate = StartRate(window_s=1.0)
    assert rate.update(0.0, started=0, waiting=5) == 0.0
    assert rate.update(1.0, started=20, waiting=5) == pytest.approx(20.0)  # a full window with a queue
    assert rate.update(1.5, started=25, waiting=0) == pytest.approx(20.0)  # the queue emptied: window restarts
    assert rate.update(2.0, started=26, waiting=3) == pytest.approx(20.0)  # the new window is not over yet
    assert rate.update(2.6, started=30, waiting=3) == pytest.approx(20.0)  # it began empty: not saturated
    assert rate.update(3.6, started=40, waiting=3) == pytest.approx(15.0)  # half old (20), half new (10)


def test_an_idle_server_admits_after_a_slow_cold_step_and_the_next_step_refreshes_the_estimate():
    """One cold step (kernel compilation) measured at 3.7 s must not refuse every later request for a 6 s SLO:
    with nothing running or waiting no step would ever run to refresh the measurement (seen on a GPU: 0 of
    3675 requests served). The idle server admits; requests behind the admitted one still get the estimate."""
    policy = AdmissionPolicy(max_queue=1000, max_batch_tokens=4096)
    idle = SchedulerStats(1, seen_seq=0, num_waiting=0, num_running=0, waiting_tokens=0, step_ms=3742.0)
    policy.observe(idle)
    assert policy.estimate_ttft_ms(400) > 6000.0  # what the estimate says ...
    first = _submit(tokens=400, slo=6000.0)
    assert policy.decide(first) is None  # ... but an idle server admits
    policy.admitted(first)
    refusal = policy.decide(_submit(tokens=400, slo=6000.0))  # one ahead, not yet seen: not idle
    assert refusal is not None and refusal.code == "slo_unattainable"
    policy.observe(SchedulerStats(2, seen_seq=1, num_waiting=0, num_running=1, waiting_tokens=0, step_ms=40.0))
    assert policy.decide(_submit(tokens=400, slo=6000.0)) is None  # steps ran: the estimate is fresh again


def test_a_stalled_queue_does_not_leave_an_absurd_start_rate_behind():
    """Two minutes of saturated windows in which no request started (long decodes holding every slot while
    preempted requests wait) used to halve the rate each window, down to ~1e-35 requests/s, which then stood
    after the stall: every request that would queue behind even one other was refused with a first-token
    estimate of ~1e37 ms. A window with no start means the queue did not move: the oldest waiting request's
    age stands in again, and the next saturated window with starts measures afresh."""
    rate = StartRate(window_s=1.0)
    rate.update(0.0, started=0, waiting=5)
    assert rate.update(1.0, started=20, waiting=5) == pytest.approx(20.0)
    for now in range(2, 122):
        rate.update(float(now), started=20, waiting=5)
    assert rate.rate == 0.0
    policy = AdmissionPolicy(max_queue=1000, max_batch_tokens=512)
    policy.observe(_stats(waiting=1, rate=rate.rate, oldest_ms=300.0))
    assert policy.estimate_ttft_ms(10) == pytest.approx(300.0)
    assert policy.decide(_submit(slo=2000.0)) is None
    assert rate.update(123.0, started=20, waiting=5) == 0.0  # still no start
    assert rate.update(124.0, started=26, waiting=5) == pytest.approx(6.0)  # measured afresh

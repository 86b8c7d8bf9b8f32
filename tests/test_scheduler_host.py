"""The scheduler's per-step host work kept cheap (bench/scheduler_host.py), checked against a full recompute on
every step of random workloads: SeqPlans built from per-request fixed fields against the field-by-field
build, the waiting queue's token sum, the oldest waiting request's arrival, and the first-token deadlines
looked up in a heap instead of a scan of every request with a deadline."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.schema import Cancel, DeltaItem, RunStep, StepDeltas, StepResult, Submit, decode, encode
from lorafleet.actors.server import RemoteOnly
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.config import EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.engine import Engine
from lorafleet.engine.plan import SeqPlan, StepOutput
from lorafleet.engine.request import PENDING_TOKEN, SamplingParams, Status
from lorafleet.engine.synthetic import synthetic_adapter_path, write_model
from lorafleet.engine.tokenizer import load_tokenizer, text_decoder

ADAPTERS = 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(write_model("tiny", tmp_path_factory.mktemp("tiny")))


class CheckedEngine(Engine):
    """The engine, with every plan's SeqPlans compared to the field-by-field build from the request's state."""

    def _plan(self, schedule):
        plan = super()._plan(schedule)
        slot_of = {name: i for i, name in enumerate(schedule.adapters)}
        assert plan.seqs == [self.reference_seq_plan(chunk, slot_of) for chunk in schedule.chunks]
        return plan

    def reference_seq_plan(self, chunk, slot_of) -> SeqPlan:
        r, p = chunk.request, chunk.request.params
        index = len(r.output_ids) + r.pending
        eos = () if p.ignore_eos else tuple(self.model.eos_token_ids)
        wanted, done = p.prompt_logprobs, len(r.prompt_logprobs) >= len(r.prompt_ids)
        return SeqPlan(
            request_id=r.id,
            token_ids=(r.prompt_ids + r.output_ids + [PENDING_TOKEN] * r.pending)[chunk.start:][:chunk.length],
            start=chunk.start, block_table=list(self.pool.kv_pages[r.id]),
            slot=slot_of[r.adapter] if r.adapter is not None else -1, sample=chunk.sample,
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=r.seed, sample_index=index,
            prompt_len=len(r.prompt_ids), min_p=p.min_p, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
            logit_bias=[list(pair) for pair in p.logit_bias],
            banned_ids=sorted(set(p.stop_token_ids) | set(eos)) if chunk.sample and index < p.min_tokens else [],
            logprobs=p.logprobs if p.logprobs is not None else -1,
            prompt_logprobs=-1 if wanted is None or done or chunk.start >= len(r.prompt_ids) else wanted,
        )


def planning_engine(model_dir: str, num_pages: int, cls: type[Engine] = CheckedEngine, max_adapters: int = 3
                    ) -> Engine:
    cfg = ModelConfig.from_dir(model_dir)
    config = EngineConfig(num_pages=num_pages, max_num_seqs=12, max_batch_tokens=64,
                          max_adapters_per_batch=max_adapters)
    block_tokens, page_elements = page_geometry(cfg, 4)
    store = AdapterStore(cfg, page_elements, torch.float32, 8, 1 << 30)
    engine = cls(cfg, config, store, RemoteOnly(), text_decoder(load_tokenizer(model_dir)), block_tokens)
    for i in range(ADAPTERS):
        engine.add_adapter(f"a{i}", synthetic_adapter_path((2, 4, 8)[i % 3], i))
    return engine


def random_params(rng: random.Random) -> SamplingParams:
    max_tokens = rng.randint(1, 12)
    return SamplingParams(
        max_tokens=max_tokens, temperature=rng.choice([0.0, 0.7]), top_p=rng.choice([1.0, 0.9]),
        top_k=rng.choice([0, 5]), seed=rng.choice([None, rng.randrange(100)]), stop_token_ids=tuple(
            rng.sample(range(2, 20), rng.randint(0, 2))), ignore_eos=rng.random() < 0.3,
        min_p=rng.choice([0.0, 0.1]), presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -1.0]),
        repetition_penalty=rng.choice([1.0, 1.2]), min_tokens=rng.randint(0, max_tokens),
        logit_bias=tuple((rng.randrange(512), 1.5) for _ in range(rng.randint(0, 2))),
        logprobs=rng.choice([None, 2]), prompt_logprobs=rng.choice([None, None, 1]))


def check_queue(engine: Engine) -> None:
    """The waiting queue's books against a walk over it: its token sum, and exactly the WAITING requests in it."""
    sched = engine.scheduler
    assert sched.waiting_tokens == sum(r.num_tokens - r.num_computed for r in sched.waiting)
    tracked = {id(t.request) for t in engine.requests.values() if t.request.status is Status.WAITING}
    assert {id(r) for r in sched.waiting} == tracked and len(sched.waiting) == len(tracked)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([24, 40, 400]))
def test_engine_books_equal_a_full_recompute_every_step(tiny_dir, seed, num_pages):
    """Random requests (every sampling option), aborts of waiting and running ones, a pool small enough to
    preempt, steps planned one ahead as the server does: each plan's SeqPlans and the queue's books equal
    their full recompute."""
    rng = random.Random(seed)
    engine = planning_engine(tiny_dir, num_pages)
    in_flight, key = None, 0
    for _ in range(60):
        for _ in range(rng.choice([0, 0, 1, 3])):
            adapter = rng.choice([None, *(f"a{i}" for i in range(ADAPTERS))])
            prompt = [rng.randrange(2, 512) for _ in range(rng.randint(1, 30))]
            engine.add_request(f"r{key}", prompt, random_params(rng), adapter)
            key += 1
        if engine.requests and rng.random() < 0.15:
            engine.abort(rng.choice(sorted(engine.requests)))
        check_queue(engine)
        planned = engine.plan_step()
        check_queue(engine)
        if in_flight is not None:
            schedule, plan = in_flight
            tokens = [rng.choice([1, rng.randrange(2, 20), rng.randrange(512)]) for s in plan.seqs if s.sample]
            engine.complete_step(schedule, StepOutput(tokens))
            check_queue(engine)
        in_flight = planned
    assert key > 0


class CheckingExecutors:
    """The executor stand-in of bench/scheduler_host.py (results at once, through the wire frames) that, on
    every plan, checks the actor's incremental books against their full recompute and then plays the
    clients: the clock moves, requests arrive (some with short first-token deadlines) and are cancelled."""

    def __init__(self, rng: random.Random, clock: list[float], steps: int, most_live: int) -> None:
        self.rng, self.clock, self.steps_left, self.most_live = rng, clock, steps, most_live
        self.actor, self.results, self.key = None, [], 0
        self.done = asyncio.Event()

    def send(self, plan, packed) -> None:
        self.check(self.actor)
        encode(RunStep(plan.to_wire(), []))
        tokens = [self.rng.randrange(2, 512) for s in plan.seqs if s.sample]
        self.results.append(encode(StepResult(plan.step, 0, tokens, 0.0)))
        self.clock[0] += self.rng.choice([0.0, 0.001, 0.02, 0.1]) if plan.step > 1 else 0.1
        for _ in range(self.rng.choice([0, 1, 1, 3]) if len(self.actor.live) < self.most_live else 0):
            self.submit()
        cancellable = sorted(set(self.actor.live) - {"r0"})
        if cancellable and self.rng.random() < 0.1:
            self.actor.inbox.send(Cancel(self.rng.choice(cancellable)))
        self.steps_left -= 1
        if self.steps_left <= 0:
            self.done.set()

    async def receive(self) -> StepResult:
        await asyncio.sleep(0)
        return decode(self.results.pop(0))

    def submit(self) -> None:
        rng = self.rng
        adapter = rng.choice([None, *(f"a{i}" for i in range(ADAPTERS))])
        prompt = [rng.randrange(2, 512) for _ in range(rng.randint(1, 30))]
        slo = rng.choice([None, 5.0, 50.0, 300.0, 1e5]) if self.key else 5.0  # r0: always too late
        self.actor.inbox.send(Submit(f"r{self.key}", prompt, {"max_tokens": rng.randint(1, 12), "ignore_eos": True},
                                     adapter, slo, self.clock[0] - rng.choice([0.0, 0.01]), self.key + 1))
        self.key += 1

    def check(self, actor) -> None:
        sched, now = actor.engine.scheduler, self.clock[0]
        arrivals = [actor.live[r.external_id].arrival for r in sched.waiting if r.external_id in actor.live]
        assert actor._queue_age.oldest(actor.live, sched) == (min(arrivals) if arrivals else None)
        assert sched.waiting_tokens == sum(r.num_tokens - r.num_computed for r in sched.waiting)
        late = [rid for rid, live in actor.live.items() if live.slo_ttft_ms is not None and live.first_token is None
                and (now - live.arrival) * 1000 > live.slo_ttft_ms]
        assert not late, f"past their first-token deadline and still live: {late}"


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([20, 24, 400]), st.sampled_from([3, ADAPTERS + 1]),
       st.sampled_from([6, 30]))
def test_actor_books_equal_a_full_recompute_every_step(tiny_dir, monkeypatch_module, seed, num_pages, max_adapters,
                                                       most_live):
    """The scheduler actor over random arrivals, cancels, deadlines and preemptions: on every plan, the oldest
    waiting request's arrival and the queue's token sum equal a walk over the queue, and no live request is
    past its first-token deadline without its first token (every such one was dropped, as the scan did)."""
    from lorafleet.actors import scheduler as actor_module

    rng, clock = random.Random(seed), [1000.0]
    monkeypatch_module.setattr(actor_module, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                                     perf_counter=time.perf_counter))
    engine = planning_engine(tiny_dir, num_pages, Engine, max_adapters)
    group = CheckingExecutors(rng, clock, 80, most_live)
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    actor = actor_module.SchedulerActor(engine, group, inbox, router, admission, prefetch, ServeHub())
    group.actor = actor
    expired = []

    async def run() -> None:
        for _ in range(8):
            group.submit()
        task = asyncio.create_task(actor.run())

        async def drain() -> None:
            while True:
                msg = await router.recv()
                for item in msg.items if isinstance(msg, StepDeltas) else []:
                    if isinstance(item, DeltaItem) and item.error_code == "slo_unattainable":
                        expired.append(item.request_id)
                    if item.finished and len(actor.live) < group.most_live:  # a finished request is replaced
                        group.submit()
        drainer = asyncio.create_task(drain())
        await asyncio.wait_for(group.done.wait(), 60)
        task.cancel()
        drainer.cancel()
        await asyncio.gather(task, drainer, return_exceptions=True)

    asyncio.run(run())
    assert group.key > 8 and "r0" in expired  # deadlines did fire (r0's always passes)
    engine.pool.check()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("num_pages", [6, 8])
def test_queue_age_sees_preempted_requests_again(tiny_dir, num_pages):
    """A request preempted back into the queue counts for the oldest waiting arrival again (its heap entry was
    dropped while it ran); steps here run one at a time, so nothing is in flight and preemption happens."""
    from lorafleet.actors.scheduler import Live, QueueAge

    engine = planning_engine(tiny_dir, num_pages, Engine)
    age, live, rng = QueueAge(), {}, random.Random(num_pages)
    for i in range(6):
        engine.add_request(f"r{i}", [rng.randrange(2, 512) for _ in range(6)], SamplingParams(max_tokens=14,
                                                                                                ignore_eos=True))
        live[f"r{i}"] = Live(engine.requests[f"r{i}"].request, float(i), None)
        age.push(live[f"r{i}"])
    while engine.has_unfinished():
        arrivals = [live[r.external_id].arrival for r in engine.scheduler.waiting]
        assert age.oldest(live, engine.scheduler) == (min(arrivals) if arrivals else None)
        planned = engine.plan_step()
        assert planned is not None
        schedule, plan = planned
        for out in engine.complete_step(schedule, StepOutput([rng.randrange(2, 512) for s in plan.seqs if s.sample])):
            if out.finished:
                del live[out.request_id]
    assert engine.scheduler.preemptions > 0

"""An exception inside an actor or an executor step fails the requests it concerns, never the actor or the
executor: the scheduler actor over the engine's own runner, with a fault injected where a bad request used
to kill it (an executor step that raises, a plan the wire cannot carry, a message the engine chokes on)."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.executor import MAX_STEP_FAILURES, run_step
from lorafleet.actors.schema import Admitted, Rejected, StepDeltas, Submit

GREEDY = {"max_tokens": 5, "temperature": 0.0}


class _Group:
    """ExecutorGroup stand-in running each plan through the executor's own `run_step`; `poison(plan)` makes
    the runner raise (a failing step) and `unsendable(plan)` makes sending raise (a plan msgpack refuses)."""

    def __init__(self, runner, poison=lambda plan: False, unsendable=lambda plan: False) -> None:
        self.runner, self.poison, self.unsendable = runner, poison, unsendable
        self.results = []
        self.failed_steps = 0

    def send(self, plan, packed):
        if self.unsendable(plan):
            raise OverflowError("int too big to convert")
        launch = self.runner.launch
        if self.poison(plan):
            def launch(plan):
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0 "
                                   "(/usr/lib/python3/site-packages/torch/x.py)")
        original, self.runner.launch = self.runner.launch, launch
        try:
            result = run_step(0, self.runner, plan)
        finally:
            self.runner.launch = original
        self.failed_steps += result.error is not None
        self.results.append(result)

    async def receive(self):
        await asyncio.sleep(0)
        return self.results.pop(0)


@pytest.fixture(scope="module")
def truth(tiny_llama):
    from lorafleet.engine import LLM

    prompts = {"a": [5, 9, 30], "b": [7, 11, 40, 2], "c": [3, 3, 3]}
    results = LLM(str(tiny_llama)).generate(list(prompts.values()), max_tokens=5)
    return prompts, {name: r.token_ids for name, r in zip(prompts, results)}


async def _actor(tiny_llama, **faults):
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.scheduler import SchedulerActor
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {})
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    group = _Group(engine.executor, **{k: v(engine) for k, v in faults.items()})
    actor = SchedulerActor(engine, group, inbox, router, admission, prefetch, ServeHub())
    return actor, asyncio.create_task(actor.run()), inbox, router


async def _run(inbox, router, request_id: str, prompt, params=GREEDY) -> dict:
    """Submit one request and collect its fate: tokens, finish reason or error."""
    inbox.send(Submit(request_id, prompt, params, None, None, 0.0))
    out = {"tokens": [], "error": None, "message": "", "finish": None}
    while True:
        msg = await asyncio.wait_for(router.recv(), 60)
        if isinstance(msg, Rejected):
            return {**out, "error": msg.code, "message": msg.message, "status": msg.status}
        if isinstance(msg, Admitted) or not isinstance(msg, StepDeltas):
            continue
        for item in msg.items:
            assert item.request_id == request_id
            out["tokens"] += item.token_ids
            if item.finished:
                return {**out, "finish": item.finish_reason, "error": item.error_code,
                        "message": item.error_message or ""}


def _marked(engine, external_id: str):
    """A predicate: the plan carries request `external_id`."""
    def carries(plan) -> bool:
        tracked = engine.requests.get(external_id)
        return tracked is not None and any(s.request_id == tracked.request.id for s in plan.seqs)
    return carries


def _clean(message: str) -> None:
    assert "Traceback" not in message and "/usr/" not in message and 'File "' not in message, message


@pytest.mark.parametrize("fault", ["poison", "unsendable"])
async def test_a_failing_step_fails_its_requests_and_the_actor_goes_on(tiny_llama, truth, fault):
    prompts, want = truth
    actor, task, inbox, router = await _actor(tiny_llama, **{fault: lambda engine: _marked(engine, "bad")})
    assert (await _run(inbox, router, "a", prompts["a"]))["tokens"] == want["a"]
    bad = await _run(inbox, router, "bad", prompts["c"])
    assert bad["error"] == "internal_error" and bad["tokens"] == []
    _clean(bad["message"])
    for _ in range(MAX_STEP_FAILURES + 1):  # more failures than would make an executor count as broken,
        again = await _run(inbox, router, "bad", prompts["c"])  # each followed by a good step
        assert again["error"] == "internal_error"
        assert (await _run(inbox, router, "b", prompts["b"]))["tokens"] == want["b"]
    assert not task.done() and actor.dead is None
    assert actor.engine.pool.usage()["kv"] == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_message_the_engine_chokes_on_is_refused_alone(tiny_llama, truth):
    """`stop: 5` in a Submit's params (an int where the engine iterates) raised TypeError inside the actor."""
    prompts, want = truth
    actor, task, inbox, router = await _actor(tiny_llama)
    bad = await _run(inbox, router, "bad", prompts["a"], {**GREEDY, "stop": 5})
    assert (bad["error"], bad["status"]) == ("internal_error", 500)
    _clean(bad["message"])
    assert (await _run(inbox, router, "c", prompts["c"]))["tokens"] == want["c"]
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_run_step_reports_one_line_and_forgets_the_failed_requests(tiny_llama):
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig
    from lorafleet.engine.request import SamplingParams

    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {})
    engine.add_request("x", [5, 9, 30], SamplingParams(max_tokens=3, temperature=0.0))
    _, plan = engine.plan_step()
    runner = engine.executor
    launch = runner.launch

    def failing(plan):
        launch(plan)
        raise ValueError("bad\nsecond line /srv/secret/file.py")

    runner.launch = failing
    result = run_step(0, runner, plan)
    assert result.error == "ValueError: bad" and result.sampled == []
    assert runner.last.on_host() == {plan.seqs[0].request_id: 0}  # a queued plan continuing it still resolves


async def test_prefetcher_turns_any_read_failure_into_a_failed_fetch():
    """An adapter whose reading raises something unforeseen fails that fetch (its requests get an error);
    the prefetcher goes on to the next adapter."""
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.prefetcher import PrefetcherActor
    from lorafleet.actors.schema import AdapterFetched, AdapterFetchFailed, Prefetch

    class Loader:
        def load(self, name, path):
            if name == "bad":
                raise TypeError("'NoneType' object is not subscriptable")
            return f"packed {name}"

    inbox, scheduler = LocalChannel(), LocalChannel()
    task = asyncio.create_task(PrefetcherActor(Loader(), inbox, scheduler, ServeHub()).run())
    inbox.send(Prefetch({"bad": "/x/bad"}))
    inbox.send(Prefetch({"good": "/x/good"}))
    first, second = [await asyncio.wait_for(scheduler.recv(), 30) for _ in range(2)]
    assert isinstance(first, AdapterFetchFailed) and first.name == "bad" and "TypeError" in first.message
    assert isinstance(second, AdapterFetched) and second.packed == "packed good"
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_plan_taken_back_hands_its_adapter_loads_to_the_next(tiny_llama, tmp_path):
    """A plan that is never sent (the ring is full, or it could not be encoded) leaves its adapters resident
    in the pool's books: the next plan must carry their loads, or the executor never writes their pages."""
    from conftest import make_peft_adapter
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig
    from lorafleet.engine.request import SamplingParams

    adapters = {"a": str(make_peft_adapter(tiny_llama, tmp_path / "a", 4, seed=3))}
    want = LLM(str(tiny_llama), adapters=adapters).generate([[5, 9, 30]], adapters=["a"], max_tokens=4)[0]
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    engine.add_request("x", [5, 9, 30], SamplingParams(max_tokens=4, temperature=0.0), "a")
    schedule, plan = engine.plan_step()
    assert [load.name for load in plan.loads] == ["a"]
    engine.unplan(schedule, plan)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == want.token_ids

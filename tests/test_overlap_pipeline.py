"""CPU/GPU overlap in the executor: `ModelRunner.launch`/`finish` and the executor's `StepPipeline`, which
launches step n+1 before it finishes step n (pending tokens filled on the device from step n's sampled ids).
Truth: the synchronous offline engine (itself checked against HF + PEFT in test_equivalence/test_engine)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
import torch

from conftest import make_peft_adapter
from lorafleet.actors.executor import StepPipeline
from lorafleet.engine.build import build_engine
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.request import PENDING_TOKEN, SamplingParams

PROMPTS = [[5, 9, 30], [7, 11, 40, 2], [3, 3, 3], [12, 13, 14, 15, 16], [8, 1], [21, 22, 23]]


@dataclass
class Piped:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[float]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    held_launches: int = 0  # steps launched while an earlier step was launched and not finished


def run_pipelined(engine, poison=lambda step, plan: None) -> Piped:
    """Drive the engine as the serving scheduler drives the executors through the executor's own StepPipeline
    on the engine's runner: plan and send step n+1, then complete step n's result (one result per plan sent,
    so a failed step's requests may still be continued by the plan sent after it, as in a server); every
    plan is launched while the step before it is held. `poison(index, plan)` may replace the runner's
    launch/finish for one step (an injected failure)."""
    runner, results, queued, out = engine.executor, [], deque(), Piped()
    pipeline = StepPipeline(0, runner, results.append)
    index = 0
    while engine.has_unfinished() or queued:
        planned = engine.plan_step() if len(queued) < 2 else None
        if planned is not None:
            queued.append(planned)
            out.held_launches += pipeline.held is not None
            with poison(index, planned[1]) or _nothing():
                pipeline.launch(planned[1])
            index += 1
        else:
            assert queued, "unfinished requests but nothing planned or in flight"
            pipeline.flush()
        for _ in range(min(len(results), 1 if planned is not None else len(results))):
            _complete(engine, *queued.popleft(), results.pop(0), out, queued)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _complete(engine, schedule, plan, result, out: Piped, behind=()) -> None:
    """A failed step fails its requests and, as the serving scheduler does, those of the step sent behind it
    that use an adapter it loaded; its loads leave the pool's books."""
    assert result.step == plan.step
    if result.error is not None:
        loads = {load.name for load in plan.loads}
        failed = engine.fail_step(schedule) + [c.request.external_id for later, _ in behind for c in later.chunks
                                               if c.request.adapter in loads]
        for request_id in failed:
            engine.abort(request_id)
            out.failed.add(request_id)
        for name in loads:
            if engine.pool.is_resident(name) and not engine.pool.pins.get(name):
                engine.pool.evict_adapter(name)
        return
    for o in engine.complete_step(schedule, result.output()):
        if o.request_id in out.failed:
            continue
        out.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        out.logprobs.setdefault(o.request_id, []).extend(lp.logprob for lp in o.logprobs)
        if o.prompt_logprobs:
            out.prompt_logprobs.setdefault(o.request_id, []).extend(
                None if lp is None else (lp.token_id, lp.logprob) for lp in o.prompt_logprobs)


def _engine(model, adapters, **config):
    engine, _ = build_engine(str(model), EngineConfig(**config), adapters)
    return engine


def _submit(engine, specs, prefix: str = "r") -> None:
    for i, (prompt, params, adapter) in enumerate(specs):
        engine.add_request(f"{prefix}{i}", prompt, params, adapter)


def _synchronous(engine) -> Piped:
    out = Piped()
    while engine.has_unfinished():
        for o in engine.step():
            out.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            out.logprobs.setdefault(o.request_id, []).extend(lp.logprob for lp in o.logprobs)
            if o.prompt_logprobs:
                out.prompt_logprobs.setdefault(o.request_id, []).extend(
                    None if lp is None else (lp.token_id, lp.logprob) for lp in o.prompt_logprobs)
    return out


def _truth_and_queued(model, adapters, specs, **config):
    """(the synchronous engine's outputs of `specs`, a second engine of the same config with `specs` queued
    for a pipelined run)."""
    sync = _engine(model, adapters, **config)
    _submit(sync, specs)
    want = _synchronous(sync)
    piped = _engine(model, adapters, **config)
    _submit(piped, specs)
    return want, piped


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap-adapters")
    return {f"r{r}": str(make_peft_adapter(tiny_llama, root / f"r{r}", r, seed=r)) for r in (2, 8)}


def _specs(penalized: bool = False):
    names = ["r2", "r8", None, "r2", None, "r8"]
    specs = []
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        params = dict(max_tokens=7 + i % 3, temperature=0.0 if i % 2 else 0.9, seed=100 + i, top_p=0.9)
        if i == 1:
            params.update(logprobs=2, prompt_logprobs=1)
        if penalized and i in (2, 5):
            params.update(repetition_penalty=1.3, frequency_penalty=0.4)
        specs.append((prompt, SamplingParams(**params), name))
    return specs


@pytest.mark.parametrize("penalized", [False, True])
def test_pipeline_with_held_steps_matches_the_synchronous_engine(tiny_llama, adapters, penalized):
    """Greedy and seeded-sampling requests with adapters, logprobs and prompt logprobs; with `penalized`, two
    requests with penalties, whose pending token must reach the host (the sync rule) while the others' are
    filled on the device."""
    want, piped = _truth_and_queued(tiny_llama, adapters, _specs(penalized), max_num_seqs=4)
    got = run_pipelined(piped)
    assert got.tokens == want.tokens and got.prompt_logprobs == want.prompt_logprobs
    assert got.logprobs.keys() == want.logprobs.keys()
    for request_id, values in want.logprobs.items():
        assert got.logprobs[request_id] == pytest.approx(values, abs=1e-5)
    runner = piped.executor
    assert got.held_launches > 5
    if penalized:  # a plan with a penalized pending sequence reads the step before on the host
        assert runner.pending_on_host > 5
    else:
        assert runner.pending_on_device > 5 and runner.pending_on_host == 0


def test_pipeline_with_graph_buffers_matches(tiny_llama, adapters):
    """The CUDA-graph static buffers without capture (decode and piecewise): pending ids scattered into the
    static input buffer."""
    sync = _engine(tiny_llama, adapters, max_num_seqs=4)
    _submit(sync, _specs())
    want = _synchronous(sync)
    piped = _engine(tiny_llama, adapters, max_num_seqs=4)
    piped.executor.enable_cuda_graphs(4, 8, 4, 8, max_tokens=32, capture=False)
    _submit(piped, _specs())
    got = run_pipelined(piped)
    assert got.tokens == want.tokens
    runner = piped.executor
    assert runner.decode_graph_steps > 3 and runner.piecewise_steps > 0 and runner.pending_on_device > 3


@pytest.mark.parametrize("where", ["launch", "finish"])
def test_a_failing_step_in_the_middle_fails_only_its_requests(tiny_llama, where):
    """Step 3 raises in launch (the held step 2 is finished and sent first) or in finish (after step 4 was
    launched on its pending ids); step 4, planned before step 3's result, still continues step 3's requests.
    Exactly step 3's requests fail; the requests admitted after them get the synchronous engine's tokens."""
    specs = [(p, SamplingParams(max_tokens=6, temperature=0.0), None) for p in PROMPTS]
    want, piped = _truth_and_queued(tiny_llama, {}, specs, max_num_seqs=3)
    runner, poisoned = piped.executor, []

    def poison(index, plan):
        if index != 3:
            return None
        poisoned.extend(s.request_id for s in plan.seqs)
        return _raising(runner, where)

    got = run_pipelined(piped, poison)
    assert len(got.failed) == len(poisoned) == 3
    survivors = set(want.tokens) - got.failed
    assert len(survivors) == 3 and {r: got.tokens[r] for r in survivors} == {r: want.tokens[r] for r in survivors}
    for request_id in got.failed:  # what a failed request streamed before its failure was right
        assert want.tokens[request_id][:len(got.tokens.get(request_id, []))] == got.tokens.get(request_id, [])


@pytest.mark.parametrize("kind", ["penalized", "prompt_logprobs"])
def test_a_failing_step_leaves_the_next_steps_requests_alone(tiny_llama, kind):
    """Step 2 raises inside launch (its forward pass). Step 3 was planned before that failure was known: it
    continues step 2's requests (which fail: their results are dropped) beside requests step 2 did not have.
    The runner state forgotten for the failed requests (penalty histories, prompt-logprob tails) must not fail
    step 3: only step 2's requests fail, and the executor keeps running."""
    extra = dict(repetition_penalty=1.3) if kind == "penalized" else dict(prompt_logprobs=1)
    prompts = [[3 + i, 5, 7, 9, 11, 13, 17, 19, 23, 29] for i in range(5)]
    specs = [(p, SamplingParams(max_tokens=4, temperature=0.0, **extra), None) for p in prompts]
    options = dict(max_num_seqs=6, max_batch_tokens=14)  # prefills chunked, requests admitted step by step
    want, piped = _truth_and_queued(tiny_llama, {}, specs, **options)
    runner, plans = piped.executor, []

    def poison(index, plan):
        plans.append({f"r{s.request_id}" for s in plan.seqs})
        return _raising_forward(runner) if index == 2 else None

    got = run_pipelined(piped, poison)
    assert plans[3] - plans[2] and plans[3] & plans[2], "step 3 has step 2's requests and others"
    assert got.failed == plans[2]
    survivors = set(want.tokens) - got.failed
    assert survivors and {r: got.tokens[r] for r in survivors} == {r: want.tokens[r] for r in survivors}


def test_a_failing_step_leaves_the_next_steps_other_adapters_alone(tiny_llama, adapters):
    """Step 2 loads adapter r2 and raises in its forward pass; step 3, planned before that was known, still
    runs r2's request (the executor dropped r2: its pages may not have been written) beside a request whose
    adapter r8 step 3 loads. Only step 2's requests fail (and, as the server does, step 3's on r2); the r8
    requests get the synchronous engine's tokens and the executor keeps running."""
    prompts = [[3 + i, 5, 7, 9, 11, 13, 17, 19, 23, 29] for i in range(6)]
    names = [None, None, "r2", "r8", "r8", None]
    specs = [(p, SamplingParams(max_tokens=4, temperature=0.0), name) for p, name in zip(prompts, names)]
    options = dict(max_num_seqs=6, max_batch_tokens=14, prefetch_adapters=0)
    want, piped = _truth_and_queued(tiny_llama, adapters, specs, **options)
    runner, plans = piped.executor, []

    def poison(index, plan):
        plans.append(plan)
        return _raising_forward(runner) if index == 2 else None

    got = run_pipelined(piped, poison)
    assert [load.name for load in plans[2].loads] == ["r2"] and plans[3].slots == ["r2", "r8"]
    assert got.failed == {f"r{s.request_id}" for s in plans[2].seqs}
    survivors = set(want.tokens) - got.failed
    assert {"r3", "r4"} <= survivors and {r: got.tokens[r] for r in survivors} == {r: want.tokens[r] for r in survivors}


class _raising_forward:
    """Makes the runner's forward pass raise once (inside `launch`, after its bookkeeping)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __enter__(self):
        def forward(*args, **kwargs):
            raise RuntimeError("injected forward failure")
        self.runner._forward = forward
        return self

    def __exit__(self, *exc):
        del self.runner._forward
        return False


class _raising:
    """Makes the runner's `launch` raise for the next call, or `finish` raise for the step launched next."""

    def __init__(self, runner, where: str) -> None:
        self.runner, self.where = runner, where

    def __enter__(self):
        runner = self.runner
        if self.where == "launch":
            def launch(plan):
                raise RuntimeError("injected launch failure")
            runner.launch = launch
            return self
        launch, finish = runner.launch, runner.finish
        marked = []

        def marking(plan):
            step = launch(plan)
            marked.append(step)
            runner.launch = launch
            return step

        def failing(step):
            if step in marked:
                raise RuntimeError("injected finish failure")
            return finish(step)

        runner.launch, runner.finish = marking, failing
        return self

    def __exit__(self, *exc):
        if self.where == "launch":
            del self.runner.launch
        return False


def test_device_side_pending_equals_host_resolution(tiny_llama):
    """`_pending`'s device scatter gives the same step inputs as replacing PENDING_TOKEN on the host."""
    engine = _engine(tiny_llama, {}, max_num_seqs=4)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0.8, seed=i))
    runner = engine.executor
    _, first = engine.plan_step()
    launched = runner.launch(first)
    _, second = engine.plan_step()  # planned before the first step completed
    assert any(s.token_ids[0] == PENDING_TOKEN for s in second.seqs)
    plan, (positions, values) = runner._pending(second)
    flat = torch.tensor([t for s in plan.seqs for t in s.token_ids])
    flat[positions] = values
    host = runner._resolve_pending(second)
    assert flat.tolist() == [t for s in host.seqs for t in s.token_ids]
    assert PENDING_TOKEN not in flat.tolist()
    sampled = dict(zip([s.request_id for s in first.seqs if s.sample], runner.finish(launched).sampled))
    filled = {s.request_id: flat[p].item() for s, p in zip([s for s in plan.seqs if s.token_ids[0] == PENDING_TOKEN],
                                                            positions.tolist())}
    assert filled and filled.items() <= sampled.items()


def _pipelined_with_slow_loads(tiny_llama, adapters, specs, config: dict):
    """(the synchronous engine's run, the pipelined run, its plans) of `specs`, the pipelined runner's adapter
    copies each delayed ~0.3 s on the load stream by a sleep kernel queued there first."""
    want, piped = _truth_and_queued(tiny_llama, adapters, specs, **config)
    runner, plans = piped.executor, []
    load = runner._load_adapter

    def slow_load(name, pages):
        torch.cuda._sleep(500_000_000)  # on the load stream (the caller's): ~0.3 s before the copy
        load(name, pages)

    runner._load_adapter = slow_load
    return want, run_pipelined(piped, lambda index, plan: plans.append(plan)), plans


@pytest.mark.gpu
def test_gpu_prefetched_adapter_used_by_the_next_step_waits_for_its_copy(tiny_llama, adapters):
    """Step 0 runs a 16-token prefill and prefetches r8 for the request its token budget left waiting; step 1
    (launched while step 0 is held) admits that request on r8 without a load. Its pages were copied on the load
    stream, slowed here by a sleep kernel queued there before each copy: step 1 must still read the adapter,
    not the pages before the copy (the synchronous engine's tokens)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    specs = [(list(range(3, 19)), SamplingParams(max_tokens=6, temperature=0.0), None),
             (list(range(40, 55)), SamplingParams(max_tokens=6, temperature=0.0), "r8")]
    config = dict(max_batch_tokens=16, prefetch_adapters=1, device="cuda", dtype="float32")
    want, got, plans = _pipelined_with_slow_loads(tiny_llama, adapters, specs, config)
    assert [load.name for load in plans[0].loads] == ["r8"] and not plans[0].slots
    assert plans[1].slots == ["r8"] and not plans[1].loads and got.held_launches >= 1
    assert got.tokens == want.tokens


@pytest.mark.gpu
def test_gpu_prefetched_adapter_evicted_by_the_next_step_is_copied_before_its_pages_take_kv(tiny_llama, adapters):
    """Step 0 prefetches r8 into pages 2-6 for a waiting request; step 1 (launched while step 0 is held)
    evicts it, unused, and writes a new request's KV into pages 2-3. The copy, slowed on the load stream,
    must land before those KV writes, not over them (the synchronous engine's tokens)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    specs = [(list(range(3, 3 + n)), SamplingParams(max_tokens=6, temperature=0.0), name)
             for n, name in zip([24, 32, 29, 24], [None, "r8", None, None])]
    config = dict(num_pages=8, max_batch_tokens=24, prefetch_adapters=1, max_adapters_per_batch=1, device="cuda",
                  dtype="float32")
    want, got, plans = _pipelined_with_slow_loads(tiny_llama, adapters, specs, config)
    assert [load.name for load in plans[0].loads] == ["r8"] and not plans[0].slots
    assert plans[1].evicted == ["r8"] and not plans[1].loads
    assert set(plans[0].loads[0].pages) & {p for s in plans[1].seqs for p in s.block_table}
    assert got.tokens == want.tokens


@pytest.mark.gpu
def test_gpu_pipeline_equals_synchronous_greedy_and_launch_does_not_sync(tiny_llama, adapters):
    """On CUDA with graphs: the pipelined run equals the synchronous one greedily, and once the graphs of the
    run's buckets are captured (a first run), a decode step's launch queues its work without a host sync
    (torch's sync debug mode raises on one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    specs = [(p, SamplingParams(max_tokens=12, temperature=0.0), n)
             for p, n in zip(PROMPTS, ["r2", "r8", None, "r2", None, "r8"])]
    config = dict(max_num_seqs=8, device="cuda", dtype="float32")
    want, piped = _truth_and_queued(tiny_llama, adapters, specs, **config)
    got = run_pipelined(piped)  # also captures the graphs of the buckets the second run uses
    assert got.tokens == want.tokens and got.held_launches > 5
    runner = piped.executor
    launch, strict_launches, synced = runner.launch, [], []

    def strict(plan):
        if not plan.is_decode or plan.loads:
            return launch(plan)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = launch(plan)
        except RuntimeError as exc:
            synced.append(exc)
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")
        strict_launches.append(step)
        return step

    runner.launch = strict
    _submit(piped, specs, prefix="again")
    again = run_pipelined(piped)
    assert not synced, f"a decode launch synchronized with the device: {synced[0]}"
    assert {k.replace("again", "r"): v for k, v in again.tokens.items()} == want.tokens
    assert len(strict_launches) > 5 and runner.decode_graph_steps > 5


def test_transfer_helpers_keep_values_and_dtypes():
    """engine/transfer.py on the CPU: the same values and dtypes as torch.tensor / copy_."""
    from lorafleet.engine.transfer import copy_into, to_device, to_host

    cpu = torch.device("cpu")
    for values, dtype in (([3, -1, 7], torch.int64), ([0.5, 2.25], torch.float32), ([True, False], torch.bool)):
        got = to_device(values, dtype, cpu)
        assert got.dtype == dtype and got.tolist() == torch.tensor(values, dtype=dtype).tolist()
    target = torch.zeros(3, dtype=torch.int32)
    copy_into(target, [4, 5, 6])
    assert target.tolist() == [4, 5, 6]
    copy_into(target, torch.tensor([7, 8, 9], dtype=torch.int64))
    assert target.tolist() == [7, 8, 9] and to_host(target) is target


@pytest.mark.gpu
def test_gpu_transfers_do_not_wait_for_queued_work():
    """On CUDA, per-step copies in both directions are queued behind running kernels without a host sync
    (torch's sync debug mode raises on one), and carry the right values once the stream ran."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lorafleet.engine.transfer import copy_into, to_device, to_host

    device = torch.device("cuda")
    big = torch.randn(4096, 4096, device=device)
    target = torch.zeros(4, dtype=torch.int32, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            big = big @ big / 64  # keeps the stream busy while the copies are queued
        ids = to_device([1, 2, 3, 4], torch.int64, device)
        copy_into(target, [5, 6, 7, 8])
        back = to_host(ids * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert ids.tolist() == [1, 2, 3, 4] and target.tolist() == [5, 6, 7, 8] and back.tolist() == [2, 4, 6, 8]

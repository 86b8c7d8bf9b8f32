"""Greedy token-for-token equality with HF transformers + PEFT for one mixed-adapter engine batch."""

from __future__ import annotations

import random

import pytest

from conftest import ALL_TARGETS, PeftOracle, make_hf_model, make_peft_adapter, run_overlapped
from lorafleet.engine import LLM
from lorafleet.engine.request import SamplingParams

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [  # name, rank, targets, extra PEFT options
    ("r2-attn", 2, ATTN, {}),
    ("r4-mlp", 4, MLP, {}),
    ("r8-all", 8, ALL_TARGETS, {}),
    ("r16-qv", 16, ("q_proj", "v_proj"), {"use_rslora": True}),
    ("r32-all", 32, ALL_TARGETS, {}),
    ("r64-all", 64, ALL_TARGETS, {}),
    ("r8-down", 8, ("down_proj", "o_proj"), {"layers_to_transform": [1]}),
]
MAX_TOKENS = 12
# Pool sizes per config: just above the rank-64 adapter's pages, so adapters must be evicted and the
# growing KV of the running requests forces a preemption.
POOL_PAGES = {"mha": 40, "gqa": 140, "qwen2": 78}


@pytest.fixture(scope="module", params=["mha", "gqa", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"eq-{request.param}")
    base = make_hf_model(request.param, root / "base", seed=1)
    adapters = {
        name: make_peft_adapter(base, root / name, rank, targets, seed=10 + i, **extra)
        for i, (name, rank, targets, extra) in enumerate(ADAPTERS)
    }
    return request.param, base, adapters


def _workload(adapters: dict) -> list[tuple[list[int], str | None]]:
    rng = random.Random(7)
    names = [*adapters, None, None]
    return [([rng.randrange(3, 300) for _ in range(rng.randint(3, 20))], names[i % len(names)]) for i in range(27)]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_mixed_batch_matches_peft_with_eviction_and_preemption(setup, overlap):
    """`overlapped`: each step is planned before the previous one completes, as the serving scheduler runs."""
    kind, base, adapters = setup
    work = _workload(adapters)
    oracle = PeftOracle(base, adapters)
    expected = [oracle.greedy(prompt, adapter, MAX_TOKENS) for prompt, adapter in work]
    llm = LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, num_pages=POOL_PAGES[kind],
              max_adapters_per_batch=4, max_batch_tokens=96, max_num_seqs=16)
    if overlap:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for i, (prompt, adapter) in enumerate(work):
            llm.engine.add_request(f"q{i}", prompt, params, adapter)
        run = run_overlapped(llm.engine)
        assert run.plans_with_pending > 0, "no step was planned ahead of its predecessor's result"
        got = [run.tokens[f"q{i}"] for i in range(len(work))]
    else:
        got = [out.token_ids for out in llm.generate([p for p, _ in work], adapters=[a for _, a in work],
                                                     max_tokens=MAX_TOKENS, ignore_eos=True)]
    for (prompt, adapter), tokens, want in zip(work, got, expected):
        assert tokens == want, f"adapter {adapter} prompt {prompt}"
    engine = llm.engine
    assert engine.pool.evictions > 0, "the pool was meant to be small enough to evict adapters"
    assert engine.scheduler.preemptions > 0, "the pool was meant to be small enough to preempt a request"
    engine.pool.check()
    assert engine.pool.usage()["kv"] == 0


def test_load_bound_and_late_adapters_wait_without_changing_outputs(setup):
    """The per-step adapter load bound (here: one adapter per step) and adapters that become loadable only
    later (as when the prefetcher is still packing them) make requests wait a step while others run; outputs
    stay those of HF+PEFT, with steps planned ahead as the server plans them."""
    kind, base, adapters = setup
    if kind != "gqa":
        pytest.skip("the load bound is model-independent: one model kind keeps CI time down")
    work = _workload(adapters)
    oracle = PeftOracle(base, adapters)
    expected = [oracle.greedy(prompt, adapter, MAX_TOKENS) for prompt, adapter in work]
    llm = LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, num_pages=POOL_PAGES[kind],
              max_adapters_per_batch=4, max_batch_tokens=96, max_num_seqs=16, max_adapter_load_bytes_per_step=1)
    engine = llm.engine
    late = {"r8-all": 4, "r64-all": 9}  # adapter -> first planned step at which it may load

    def ready(name: str) -> bool:
        return engine._planned >= late.get(name, 0)

    engine.scheduler.adapter_ready = ready
    loads_per_step = []
    plan_step = engine.plan_step

    def counting_plan_step():
        planned = plan_step()
        if planned is not None:
            loads_per_step.append(planned[1].loads)
            for load in planned[1].loads:
                assert ready(load.name), f"{load.name} loaded before it was ready"
        return planned

    engine.plan_step = counting_plan_step
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(work):
        engine.add_request(f"q{i}", prompt, params, adapter)
    run = run_overlapped(engine)
    got = [run.tokens[f"q{i}"] for i in range(len(work))]
    for (prompt, adapter), tokens, want in zip(work, got, expected):
        assert tokens == want, f"adapter {adapter} prompt {prompt}"
    assert max(len(loads) for loads in loads_per_step) == 1, "the bound allows one load per step here"
    assert engine.scheduler.load_stalls > 0, "no request had to wait for its adapter"
    assert engine.scheduler.loaded_bytes > 0
    engine.pool.check()
    assert engine.pool.usage()["kv"] == 0

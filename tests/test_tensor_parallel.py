"""Tensor parallelism on CPU (gloo, 2 rank processes): tp=2 equals tp=1 for a batch mixing adapters of
different ranks and targets plus base-only requests; ranks agree on the pool; a killed rank fails cleanly."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_TARGETS, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM
from lorafleet.engine.parallel import ExecutorDied
from lorafleet.engine.request import SamplingParams

ADAPTERS = [(2, ("q_proj", "v_proj")), (4, ("gate_proj", "up_proj", "down_proj")), (8, ALL_TARGETS),
            (16, ("o_proj", "down_proj")), (32, ("q_proj", "k_proj", "v_proj", "o_proj")), (64, ALL_TARGETS)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    base = make_hf_model("qwen2", root / "base", seed=3)  # GQA + QKV bias: 2 kv heads -> 1 per rank
    adapters = {f"r{r}": str(make_peft_adapter(base, root / f"r{r}", rank=r, targets=t, seed=r)) for r, t in ADAPTERS}
    return base, adapters


def test_tp2_equals_tp1_and_ranks_agree(assets):
    base, adapters = assets
    prompts = [[i + 3, 2 * i + 5, 7, 11, 13 + i, 40 + i][: 3 + i % 4] for i in range(14)]
    names = [*adapters, None]
    which = [names[i % len(names)] for i in range(14)]
    # 80 pages: every adapter fits (r64 needs 64), but not all at once -> evictions happen at both sizes.
    options = dict(num_pages=80, max_adapters_per_batch=3)
    expected = LLM(str(base), adapters=adapters, **options).generate(prompts, adapters=which, max_tokens=8,
                                                                     ignore_eos=True)
    with LLM(str(base), adapters=adapters, tp=2, **options) as llm:
        outs = llm.generate(prompts, adapters=which, max_tokens=8, ignore_eos=True)
        assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
        assert llm.engine.pool.evictions > 0
        stats = llm.engine.executor.rank_stats()
        resident = sorted(llm.engine.pool.adapter_pages)
        assert [s["resident"] for s in stats] == [resident, resident]
        assert stats[0]["pool_shape"] == stats[1]["pool_shape"]


def test_killed_rank_fails_the_step_without_hanging(assets):
    base, adapters = assets
    llm = LLM(str(base), adapters=adapters, tp=2, num_pages=80)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0), "r8")
    engine.step()
    engine.executor.procs[1].kill()
    with pytest.raises(ExecutorDied, match="rank 1"):
        for _ in range(50):
            engine.step()
    assert not engine.executor.procs, "every rank process was stopped"
    assert torch.distributed.is_available()

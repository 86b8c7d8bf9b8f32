"""The engine on CUDA (skipped without it): bf16 logits against HF+PEFT in bf16 on the GPU, CUDA-graph
decode and piecewise-graph steps equal to eager steps, and tensor parallelism on two GPUs."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_TARGETS, PeftOracle, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ADAPTERS = [(2, ("q_proj", "v_proj")), (8, ALL_TARGETS), (16, ("gate_proj", "up_proj", "down_proj")),
            (32, ("q_proj", "k_proj", "v_proj", "o_proj")), (64, ALL_TARGETS), (4, ("o_proj", "down_proj"))]
# bf16 tolerance: max |ours - HF| over the vocabulary, relative to the std of HF's logits (docs/kernels.md).
BF16_LOGIT_TOLERANCE = 0.08


@pytest.fixture(scope="module", params=["gqa", "qwen2"])
def assets(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gpu-{request.param}")
    base = make_hf_model(request.param, root / "base", seed=5)
    adapters = {f"r{r}": str(make_peft_adapter(base, root / f"r{r}", rank=r, targets=t, seed=r)) for r, t in ADAPTERS}
    # per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern): the kernels see a different rank per module
    patterns = {"rank_pattern": {"q_proj": 12, "down_proj": 3}, "alpha_pattern": {"v_proj": 4}}
    adapters["pattern"] = str(make_peft_adapter(base, root / "pattern", rank=8, targets=ALL_TARGETS, seed=40,
                                                **patterns))
    return base, adapters


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 300, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@torch.no_grad()
def test_bf16_logits_match_hf_peft_on_gpu(assets):
    base, adapters = assets
    names = [*adapters, None]
    prompts = _prompts(14)
    which = [names[i % len(names)] for i in range(len(prompts))]
    llm = LLM(str(base), adapters=adapters, device="cuda", dtype="bfloat16", num_pages=512)
    llm.generate(prompts, adapters=which, max_tokens=1, ignore_eos=True)
    ours = llm.engine.executor.last_logits
    oracle = PeftOracle(base, adapters, dtype=torch.bfloat16, device="cuda")
    worst = 0.0
    for i, (prompt, adapter) in enumerate(zip(prompts, which)):
        want = oracle.last_logits(prompt, adapter)
        error = float((ours[i].float() - want).abs().max() / want.std())
        worst = max(worst, error)
    print(f"bf16 worst relative logit error vs HF+PEFT: {worst:.4f}")
    assert worst < BF16_LOGIT_TOLERANCE


@pytest.mark.parametrize("with_adapters", [True, False])
def test_cuda_graph_decode_equals_eager(assets, with_adapters):
    base, adapters = assets
    names = [*adapters, None] if with_adapters else [None]
    prompts = _prompts(20)
    which = [names[i % len(names)] for i in range(len(prompts))]
    runs = []
    for graphs in (False, True):
        llm = LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512, cuda_graphs=graphs)
        runs.append([o.token_ids for o in llm.generate(prompts, adapters=which, max_tokens=16, ignore_eos=True)])
        assert (llm.engine.executor.graphs is not None) == graphs
    assert runs[0] == runs[1]


def test_piecewise_graph_steps_equal_eager(assets):
    """Chunked prefills beside decodes (a small token budget): those steps replay piecewise graphs."""
    base, adapters = assets
    names = [*adapters, None]
    prompts = _prompts(20)
    which = [names[i % len(names)] for i in range(len(prompts))]
    runs = []
    for graphs in (False, True):
        llm = LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512, cuda_graphs=graphs,
                  max_batch_tokens=48, max_num_seqs=8)
        runs.append([o.token_ids for o in llm.generate(prompts, adapters=which, max_tokens=10, ignore_eos=True)])
        assert (llm.engine.executor.piecewise_steps > 0) == graphs
    assert runs[0] == runs[1]
    # one prefill step, then decode steps only: no step attends in two parts (decode kernel + prefill kernel)
    whole = LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512, cuda_graphs=False)
    assert runs[0] == [o.token_ids for o in whole.generate(prompts, adapters=which, max_tokens=10, ignore_eos=True)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_equals_tp1_on_gpus(assets):
    base, adapters = assets
    names = [*adapters, None]
    prompts = _prompts(16)
    which = [names[i % len(names)] for i in range(len(prompts))]
    one = LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512)
    want = [o.token_ids for o in one.generate(prompts, adapters=which, max_tokens=12, ignore_eos=True)]
    with LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512, tp=2) as two:
        got = [o.token_ids for o in two.generate(prompts, adapters=which, max_tokens=12, ignore_eos=True)]
    assert got == want

"""Tensor parallelism on two GPUs (skipped without them): every rank replays CUDA graphs (decode steps whole,
prefill steps piecewise, NCCL collectives captured) and gives tp=1's greedy tokens in fp32 and eager tp=2's;
bf16 logits at tp=2 stay within the documented tolerance of HF+PEFT; `lorafleet serve --tensor-parallel-size 2`
on the GPUs equals the offline engine. Adapters of ranks 3, 5, 7, 8, 16 and 64 (cut along the base layers' split,
never along the rank: no LoRA collective)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_gpu_engine import BF16_LOGIT_TOLERANCE
from test_serve_support import post_json, start_server, stop_server

from conftest import ALL_TARGETS, PeftOracle, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [(3, ATTENTION), (5, MLP), (7, ALL_TARGETS), (8, ("q_proj", "v_proj")), (16, ALL_TARGETS),
            (64, ("o_proj", "down_proj"))]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-tp")
    base = make_hf_model("qwen2", root / "base", seed=5)  # GQA + QKV bias
    adapters = {f"r{r}": str(make_peft_adapter(base, root / f"r{r}", rank=r, targets=t, seed=r)) for r, t in ADAPTERS}
    return base, adapters


def _work(adapters: dict[str, str], count: int) -> tuple[list[list[int]], list[str | None]]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (int(torch.randint(4, 60, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(count)]
    names = [*adapters, None]
    return prompts, [names[i % len(names)] for i in range(count)]


def test_tp2_graphs_equal_eager_and_tp1_in_fp32(assets):
    """Chunked prefills beside decodes (48-token budget): piecewise steps and decode graphs on both ranks."""
    base, adapters = assets
    prompts, which = _work(adapters, 20)
    options = dict(device="cuda", dtype="float32", num_pages=512, max_batch_tokens=48, max_num_seqs=8)
    one = LLM(str(base), adapters=adapters, cuda_graphs=False, **options)
    want = [o.token_ids for o in one.generate(prompts, adapters=which, max_tokens=12, ignore_eos=True)]
    runs, stats = {}, {}
    for graphs in (False, True):
        with LLM(str(base), adapters=adapters, tp=2, cuda_graphs=graphs, **options) as two:
            outs = two.generate(prompts, adapters=which, max_tokens=12, ignore_eos=True)
            runs[graphs], stats[graphs] = [o.token_ids for o in outs], two.engine.executor.rank_stats()
    assert runs[False] == want, "eager tp=2 equals tp=1"
    assert runs[True] == want, "graphed tp=2 equals tp=1"
    keys = ("piecewise_steps", "decode_graph_steps", "decode_graphs")
    print("tp=2 rank stats with graphs:", [{k: s[k] for k in keys} for s in stats[True]])
    for s in stats[True]:
        assert s["piecewise_steps"] > 0 and s["decode_graph_steps"] > 0 and s["decode_graphs"] > 0, s
    assert all(s[k] == 0 for s in stats[False] for k in keys)


@torch.no_grad()
def test_tp2_bf16_logits_match_hf_peft(assets):
    base, adapters = assets
    prompts, which = _work(adapters, 14)
    with LLM(str(base), adapters=adapters, tp=2, device="cuda", dtype="bfloat16", num_pages=512,
             max_batch_tokens=2048) as two:  # one prefill step: last_logits holds every prompt
        two.generate(prompts, adapters=which, max_tokens=1, ignore_eos=True)
        ours = two.engine.executor.last_logits
    oracle = PeftOracle(base, adapters, dtype=torch.bfloat16, device="cuda")
    worst = 0.0
    for i, (prompt, adapter) in enumerate(zip(prompts, which)):
        want = oracle.last_logits(prompt, adapter)
        worst = max(worst, float((ours[i].float() - want.cpu()).abs().max() / want.std()))
    print(f"tp=2 bf16 worst relative logit error vs HF+PEFT: {worst:.4f}")
    assert worst < BF16_LOGIT_TOLERANCE


def test_served_tp2_on_gpus_equals_offline(assets):
    base, adapters = assets
    prompts, which = _work(adapters, 24)
    llm = LLM(str(base), adapters=adapters, device="cuda", dtype="float32", num_pages=512)
    want = [o.token_ids for o in llm.generate(prompts, adapters=which, max_tokens=10, ignore_eos=True)]
    args = [a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]
    server = start_server(["--model", str(base), *args, "--device", "cuda", "--dtype", "float32",
                           "--tensor-parallel-size", "2", "--max-adapters-per-batch", "3"])

    async def ask() -> list:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[post_json(session, server.url + "/v1/completions", {
                "model": a, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}) for p, a in zip(prompts, which)])

    try:
        answers = asyncio.run(ask())
    finally:
        code = stop_server(server)
    for (status, body, _), w in zip(answers, want):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == w
    assert code == 0, server.output()

"""Prefill attention through flex_attention over the pages against the PyTorch reference (fp32/fp16 on the
CPU, eager flex_attention), and the engine switched to it against HF+PEFT."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_kv_case

from lorafleet import kernels
from lorafleet.kernels.attention_flex import paged_prefill_attention_flex
from lorafleet.kernels.attention_ref import paged_prefill_attention_ref

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("lens,new", [([5, 19, 40, 1, 3], [5, 2, 21, 1, 0]),  # prefixes, an empty chunk
                                      ([33], [33]), ([7, 1, 64], [1, 1, 1])])  # one fresh prefill; decode-like
def test_flex_prefill_attention_matches_reference(dtype, heads, kv_heads, lens, new):
    case = make_kv_case(lens, kv_heads, 16, 4, dtype=dtype, seed=len(lens))
    q = torch.randn(sum(new), heads, 16).to(dtype)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_prefill_attention_flex(q, case.kv, case.block_tables, case.context_lens, starts, 0.25)
    ref = paged_prefill_attention_ref(q, case.kv, case.block_tables, case.context_lens, starts, 0.25)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.fixture()
def flex_engine_switch():
    yield
    kernels.use_prefill_attention("triton")


def test_engine_on_flex_prefill_attention_matches_peft(tiny_llama, tmp_path, flex_engine_switch):
    from conftest import PeftOracle, make_peft_adapter
    from lorafleet.engine import LLM

    adapters = {f"a{r}": make_peft_adapter(tiny_llama, tmp_path / f"a{r}", r, seed=r) for r in (2, 8)}
    prompts = [[5, 9, 13, 2, 7, 7, 1], [40, 41, 42], [3] * 20, [100, 7]]
    names = ["a2", None, "a8", "a2"]
    oracle = PeftOracle(tiny_llama, adapters)
    want = [oracle.greedy(p, a, 6) for p, a in zip(prompts, names)]
    llm = LLM(str(tiny_llama), adapters={k: str(v) for k, v in adapters.items()}, prefill_attention="flex",
              max_batch_tokens=16)  # chunked prefill: later chunks attend to a cached prefix
    got = llm.generate(prompts, adapters=names, max_tokens=6, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    assert kernels._PREFILL[0] == "flex"

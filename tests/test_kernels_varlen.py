"""Prefill attention through PyTorch's varlen_attn (kernels/attention_varlen.py) against the PyTorch reference.

varlen_attn is CUDA-only, so on the CPU the library call is replaced by `sdpa_varlen`: a stand-in with the
library's signature that loops over the sequences and runs SDPA with the bottom-right causal mask, reading the
pages itself in block_table mode and refusing page sizes that are not a multiple of `page_multiple` the way
FlashAttention-2 refuses them. That checks the wrapper (cumulative lengths, longest chunks, gather indices,
GQA, the mode fallback) in fp32; the `gpu` tests run the library itself in fp16/bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import make_kv_case

from lorafleet import kernels
from lorafleet.kernels import attention_varlen
from lorafleet.kernels.attention_ref import paged_prefill_attention_ref

CASES = [([5, 19, 40, 1, 3], [5, 2, 21, 1, 0]),  # cached prefixes, an empty chunk
         ([33], [33]),  # one fresh prefill
         ([7, 1, 64], [1, 1, 1]),  # decode-like chunks
         ([0, 50, 17], [0, 50, 3])]  # a sequence with no context at all beside a fresh one


def sdpa_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa,
                seqused_k=None, block_table=None, page_multiple=1, calls=None):
    """The library's contract in plain PyTorch: causal (bottom-right) attention of each sequence's queries
    over its keys; with `block_table`, the keys of sequence b are the first seqused_k[b] rows of its pages."""
    assert window_size == (-1, 0) and enable_gqa
    if block_table is not None and key.shape[1] % page_multiple:
        raise RuntimeError(f"Paged KV cache block size must be divisible by {page_multiple}")
    if calls is not None:
        calls.append("block_table" if block_table is not None else "gather")
    out = torch.zeros_like(query)
    for b in range(cu_seq_q.shape[0] - 1):
        q = query[int(cu_seq_q[b]):int(cu_seq_q[b + 1])]
        if block_table is None:
            k, v = (t[int(cu_seq_k[b]):int(cu_seq_k[b + 1])] for t in (key, value))
        else:
            k, v = (t[block_table[b].long()].flatten(0, 1)[:int(seqused_k[b])] for t in (key, value))
        if q.shape[0] == 0:
            continue
        assert q.shape[0] <= max_q and k.shape[0] <= max_k, "max_q / max_k below a sequence's length"
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out[int(cu_seq_q[b]):int(cu_seq_q[b + 1])] = o.transpose(0, 1)
    return out


@pytest.fixture()
def library(monkeypatch):
    """Install the stand-in (refusing pages that are not a multiple of 256, like FlashAttention-2) and
    forget earlier mode decisions; yields the list of the calls' modes."""
    calls: list[str] = []
    monkeypatch.setattr(attention_varlen, "VARLEN_ATTN",
                        lambda *a, **k: sdpa_varlen(*a, **k, page_multiple=256, calls=calls))
    monkeypatch.setattr(attention_varlen, "_MODE", {})
    monkeypatch.setattr(attention_varlen, "FORCED_MODE", [None])
    return calls


def _case(lens, new, heads, kv_heads, block_tokens, dtype=torch.float32, device="cpu", head_dim=16):
    case = make_kv_case(lens, kv_heads, head_dim, block_tokens, dtype=dtype, device=device, seed=len(lens))
    q = torch.randn(sum(new), heads, head_dim, device=device).to(dtype)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return case, q, starts


def _check(case, q, starts, tol=1e-5):
    args = (q, case.kv, case.block_tables, case.context_lens, starts, 0.25)
    out = attention_varlen.paged_prefill_attention_varlen(*args)
    ref = paged_prefill_attention_ref(*args)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", attention_varlen.MODES)
@pytest.mark.parametrize("block_tokens", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("lens,new", CASES)
def test_varlen_prefill_attention_matches_reference(library, monkeypatch, mode, block_tokens, heads, kv_heads, lens,
                                                    new):
    monkeypatch.setattr(attention_varlen, "VARLEN_ATTN", lambda *a, **k: sdpa_varlen(*a, **k, calls=library))
    monkeypatch.setattr(attention_varlen, "FORCED_MODE", [mode])
    _check(*_case(lens, new, heads, kv_heads, block_tokens))
    assert set(library) == {mode}


@pytest.mark.parametrize("block_tokens,mode", [(16, "gather"), (32, "gather"), (256, "block_table")])
def test_first_call_picks_the_mode_the_library_accepts(library, block_tokens, mode):
    case, q, starts = _case([5, 19, 40], [5, 2, 21], 8, 2, block_tokens)
    _check(case, q, starts)
    assert attention_varlen.chosen_mode("cpu", block_tokens) == mode
    del library[:]
    _check(case, q, starts + 0)  # a new step: no second try of a refused mode
    assert library == [mode]


def test_step_plan_is_built_once_for_all_layers(library, monkeypatch):
    built = []
    plan = attention_varlen.varlen_plan
    monkeypatch.setattr(attention_varlen, "varlen_plan", lambda *a, **k: built.append(1) or plan(*a, **k))
    monkeypatch.setattr(attention_varlen, "FORCED_MODE", ["gather"])
    case, q, starts = _case([5, 19, 40], [5, 2, 21], 8, 2, 16)
    for _ in range(3):  # three layers of one step
        _check(case, q, starts)
    assert len(built) == 1
    plan = attention_varlen.varlen_plan(16, case.block_tables, case.context_lens, starts, gather=True)
    assert (plan.max_q, plan.max_k) == (21, 40) and plan.cu_seq_k.tolist() == [0, 5, 24, 64]


def test_empty_step_and_dispatch(library):
    case, _, _ = _case([3], [0], 2, 2, 16)
    q = torch.empty(0, 2, 16)
    starts = torch.zeros(2, dtype=torch.int32)
    assert attention_varlen.paged_prefill_attention_varlen(q, case.kv, case.block_tables, case.context_lens, starts,
                                                           0.25).shape == (0, 2, 16)
    assert library == []
    with pytest.raises(ValueError, match="prefill attention must be one of"):
        kernels.use_prefill_attention("flash2")


def test_serve_refuses_flash_off_cuda_or_in_fp32(capsys):
    from lorafleet.actors.serve import parse_args

    for argv in (["--prefill-attention", "flash"], ["--prefill-attention", "flash", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "flash needs --device cuda and --dtype float16 or bfloat16" in capsys.readouterr().err
    assert parse_args(["--prefill-attention", "flash", "--device", "cuda", "--dtype", "bfloat16"]).prefill_attention \
        == "flash"


@pytest.fixture()
def flash_engine(library):
    yield library
    kernels.use_prefill_attention("triton")


def test_engine_on_varlen_prefill_attention_matches_peft(tiny_llama, tmp_path, flash_engine):
    from conftest import PeftOracle, make_peft_adapter
    from lorafleet.engine import LLM

    adapters = {f"a{r}": make_peft_adapter(tiny_llama, tmp_path / f"a{r}", r, seed=r) for r in (2, 8)}
    prompts = [[5, 9, 13, 2, 7, 7, 1], [40, 41, 42], [3] * 20, [100, 7]]
    names = ["a2", None, "a8", "a2"]
    oracle = PeftOracle(tiny_llama, adapters)
    want = [oracle.greedy(p, a, 6) for p, a in zip(prompts, names)]
    llm = LLM(str(tiny_llama), adapters={k: str(v) for k, v in adapters.items()}, prefill_attention="flash",
              max_batch_tokens=16)  # chunked prefill: later chunks attend to a cached prefix
    got = llm.generate(prompts, adapters=names, max_tokens=6, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    assert "gather" in flash_engine  # the engine's prefill steps went through the wrapper


# ----------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_tokens", [16, 256])
@pytest.mark.parametrize("heads,kv_heads,lens,new", [(32, 8, [7, 300, 8192, 515], [7, 37, 512, 1]),
                                                     (32, 32, [1, 128, 4096], [1, 128, 100])])
def test_gpu_varlen_library_matches_reference(monkeypatch, dtype, block_tokens, heads, kv_heads, lens, new):
    """The library itself: the mode the first call picks, then gather mode forced, against the reference;
    block_table mode forced where the library accepts the page size."""
    monkeypatch.setattr(attention_varlen, "_MODE", {})
    case, q, starts = _case(lens, new, heads, kv_heads, block_tokens, dtype, "cuda", head_dim=128)
    _check(case, q, starts, tol=2e-2)
    picked = attention_varlen.chosen_mode(q.device, block_tokens)
    assert picked in attention_varlen.MODES
    for mode in attention_varlen.MODES if picked == "block_table" else ("gather",):
        monkeypatch.setattr(attention_varlen, "FORCED_MODE", [mode])
        _check(case, q, starts + 0, tol=2e-2)

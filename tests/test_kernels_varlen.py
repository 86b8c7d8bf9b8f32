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
from lorafleet.kernels.attention_ref import paged_decode_attention_ref, paged_prefill_attention_ref

CASES = [([5, 19, 40, 1, 3], [5, 2, 21, 1, 0]),  # cached prefixes, an empty chunk
         ([33], [33]),  # one fresh prefill
         ([7, 1, 64], [1, 1, 1]),  # decode-like chunks
         ([0, 50, 17], [0, 50, 3])]  # a sequence with no context at all beside a fresh one


def sdpa_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa,
                seqused_k=None, block_table=None, page_multiple=1, calls=None):
    """The library's contract in plain PyTorch: causal (bottom-right, window (-1, 0)) or full (window (-1, -1))
    attention of each sequence's queries over its keys; with `block_table`, the keys of sequence b are the first
    seqused_k[b] rows of its pages."""
    assert window_size in ((-1, 0), (-1, -1)) and enable_gqa
    if block_table is not None and key.shape[1] % page_multiple:
        raise RuntimeError(f"Paged KV cache block size must be divisible by {page_multiple}")
    if calls is not None:
        calls.append(("block_table" if block_table is not None else "gather") + (" full" if window_size[1] else ""))
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
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
        mask = mask.tril(k.shape[0] - q.shape[0]) if window_size[1] == 0 else mask
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out[int(cu_seq_q[b]):int(cu_seq_q[b + 1])] = o.transpose(0, 1)
    return out


@pytest.fixture(params=[256])
def library(request, monkeypatch):
    """Install the stand-in (refusing pages that are not a multiple of `request.param`: 256 like
    FlashAttention-2) and forget earlier mode decisions; yields the list of the calls' modes."""
    calls: list[str] = []
    monkeypatch.setattr(attention_varlen, "VARLEN_ATTN",
                        lambda *a, **k: sdpa_varlen(*a, **k, page_multiple=request.param, calls=calls))
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


@pytest.mark.parametrize("library", [1], indirect=True)
@pytest.mark.parametrize("block_tokens", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_varlen_decode_reads_pages_in_place(library, block_tokens, heads, kv_heads):
    case = make_kv_case([5, 19, 40, 1, 33], kv_heads, 16, block_tokens, seed=block_tokens)
    q = torch.randn(5, heads, 16)
    args = (q, case.kv, case.block_tables, case.context_lens, 0.25)
    out = attention_varlen.decode_or_none(*args)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args), rtol=1e-5, atol=1e-5)
    assert library == ["block_table full"] and attention_varlen.chosen_mode("cpu", block_tokens) == "block_table"


def test_varlen_decode_refused_stays_on_our_kernel(library, monkeypatch):
    monkeypatch.setattr(kernels, "_DECODE", ["flash"])
    case = make_kv_case([5, 19, 40], 2, 16, 16)
    q = torch.randn(3, 8, 16)
    args = (q, case.kv, case.block_tables, case.context_lens, 0.25)
    for _ in range(2):
        torch.testing.assert_close(kernels.paged_decode_attention(*args), paged_decode_attention_ref(*args))
    assert library == [] and attention_varlen.chosen_mode("cpu", 16) == "gather"  # refused once, then not asked


def test_empty_step_and_dispatch(library):
    case, _, _ = _case([3], [0], 2, 2, 16)
    q = torch.empty(0, 2, 16)
    starts = torch.zeros(2, dtype=torch.int32)
    assert attention_varlen.paged_prefill_attention_varlen(q, case.kv, case.block_tables, case.context_lens, starts,
                                                           0.25).shape == (0, 2, 16)
    assert library == []
    with pytest.raises(ValueError, match="prefill attention must be one of"):
        kernels.use_prefill_attention("flash2")
    with pytest.raises(ValueError, match="decode attention must be one of"):
        kernels.use_decode_attention("flex")


def test_serve_refuses_flash_off_cuda_or_in_fp32(capsys):
    from lorafleet.actors.serve import parse_args

    for argv in (["--prefill-attention", "flash"], ["--decode-attention", "flash", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert f"{argv[0]} flash needs --device cuda and --dtype float16 or bfloat16" in capsys.readouterr().err
    assert parse_args(["--prefill-attention", "flash", "--device", "cuda", "--dtype", "bfloat16"]).prefill_attention \
        == "flash"


def test_engine_refuses_flash_where_the_library_cannot_run(tiny_llama):
    from lorafleet.engine import LLM
    from lorafleet.engine.config import ConfigError

    for option in ("prefill_attention", "decode_attention"):
        with pytest.raises(ConfigError, match="FlashAttention-2 runs on CUDA in float16/bfloat16, not on cpu"):
            LLM(str(tiny_llama), **{option: "flash"})
    assert kernels._PREFILL == ["triton"] and kernels._DECODE == ["triton"]


@pytest.fixture()
def flash_engine(library, monkeypatch):
    monkeypatch.setattr(attention_varlen, "unsupported", lambda device, dtype: None)  # the stand-in runs anywhere
    yield library
    kernels.use_prefill_attention("triton")
    kernels.use_decode_attention("triton")


@pytest.mark.parametrize("library,modes", [(256, {"gather"}), (1, {"block_table", "block_table full"})],
                         indirect=["library"])
def test_engine_on_varlen_attention_matches_peft(tiny_llama, tmp_path, flash_engine, modes):
    """Pages the library refuses: prefill gathers, decode stays on our kernel; pages it takes: both in place."""
    from conftest import PeftOracle, make_peft_adapter
    from lorafleet.engine import LLM

    adapters = {f"a{r}": make_peft_adapter(tiny_llama, tmp_path / f"a{r}", r, seed=r) for r in (2, 8)}
    prompts = [[5, 9, 13, 2, 7, 7, 1], [40, 41, 42], [3] * 20, [100, 7]]
    names = ["a2", None, "a8", "a2"]
    oracle = PeftOracle(tiny_llama, adapters)
    want = [oracle.greedy(p, a, 6) for p, a in zip(prompts, names)]
    llm = LLM(str(tiny_llama), adapters={k: str(v) for k, v in adapters.items()}, prefill_attention="flash",
              decode_attention="flash", max_batch_tokens=16)  # chunked prefill: later chunks see a cached prefix
    got = llm.generate(prompts, adapters=names, max_tokens=6, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    assert set(flash_engine) == modes  # the engine's attention went through the wrapper


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
    qd = torch.randn(len(lens), heads, 128, device="cuda", dtype=dtype)
    args = (qd, case.kv, case.block_tables, case.context_lens, 128**-0.5)
    out = attention_varlen.decode_or_none(*args)
    assert (out is None) == (picked == "gather")
    if out is not None:
        torch.testing.assert_close(out.float(), paged_decode_attention_ref(*args).float(), rtol=2e-2, atol=2e-2)


@pytest.fixture()
def attention_switches(monkeypatch):
    monkeypatch.setattr(attention_varlen, "_MODE", {})
    yield
    kernels.use_prefill_attention("triton")
    kernels.use_decode_attention("triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("block_tokens", [16, 256])
def test_gpu_engine_on_varlen_attention_matches_peft(tmp_path, monkeypatch, attention_switches, block_tokens):
    """bf16 logits of the last decode step (CUDA graphs on) after chunked prefills, against HF+PEFT in bf16."""
    from conftest import PeftOracle, make_hf_model, make_peft_adapter
    from lorafleet.engine import LLM

    base = make_hf_model("gqa", tmp_path / "base", seed=5)
    adapters = {f"r{r}": str(make_peft_adapter(base, tmp_path / f"r{r}", r, seed=r)) for r in (4, 16)}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (7, 300, 40, 1, 129)]
    which = ["r4", None, "r16", "r4", "r16"]
    llm = LLM(str(base), adapters=adapters, device="cuda", dtype="bfloat16", num_pages=256, block_tokens=block_tokens,
              prefill_attention="flash", decode_attention="flash", max_batch_tokens=128)
    runner, ours = llm.engine.executor, {}
    execute = runner.execute

    def keep_logits(plan):  # requests finish in different steps: keep each one's logits of its last sample
        output = execute(plan)
        ours.update(runner.last_logits)
        return output

    monkeypatch.setattr(runner, "execute", keep_logits)
    got = llm.generate(prompts, adapters=which, max_tokens=3, ignore_eos=True)
    oracle = PeftOracle(base, adapters, dtype=torch.bfloat16, device="cuda")
    for i, (prompt, adapter) in enumerate(zip(prompts, which)):
        want = oracle.last_logits(prompt + got[i].token_ids[:-1], adapter)
        assert float((ours[i].float().to(want.device) - want).abs().max() / want.std()) < 0.08
    assert attention_varlen.chosen_mode(torch.device("cuda", torch.cuda.current_device()), block_tokens) \
        in attention_varlen.MODES

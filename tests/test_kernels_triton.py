"""Every Triton kernel against its PyTorch reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on small shapes in fp16/fp32 (bf16 tl.dot is wrong
in the interpreter). With CUDA (and the interpreter off) the `gpu` tests run the same checks at real sizes
in bf16, plus the engine on the GPU against HF+PEFT."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# without CUDA, conftest.py has set TRITON_INTERPRET=1 before anything imported triton
triton = pytest.importorskip("triton")

from kernel_cases import dense_lora, make_kv_case, make_lora_case, make_multi_lora_case  # noqa: E402

from lorafleet.kernels import attention_ref, lora_ref, norm_ref  # noqa: E402
from lorafleet.kernels import triton_ops as tops  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, interpreter off")
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- LoRA
def _check_lora(case, dtype, out_dim):
    v = tops.lora_shrink(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    v_ref = lora_ref.lora_shrink_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    assert not v.isnan().any(), "shrink read past a rank or outside its rows"
    out = torch.randn(case.x.shape[0], out_dim, device=case.x.device).to(dtype)
    out_ref = out.clone()
    tops.lora_expand(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, out)
    lora_ref.lora_expand_ref(v_ref, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, out_ref)
    assert not out.isnan().any(), "expand read past a rank or outside its rows"
    torch.testing.assert_close(v, v_ref, **TOL[dtype])
    torch.testing.assert_close(out.float(), out_ref.float(), **TOL[dtype])
    base = (case.token_slots < 0).nonzero()[:, 0]
    return v, out, base


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_decode_ragged_ranks_with_base_tokens(dtype):
    slots = [2, -1, 0, 3, 3, 1, -1, 4, 2, 0, 3]  # slot 4 does not target this module (rank 0)
    case = make_lora_case([1, 3, 8, 64, 0], slots, in_dim=48, out_dim=80, dtype=dtype, page_elements=192)
    v, _, base = _check_lora(case, dtype, 80)
    assert torch.count_nonzero(v[base]) == 0
    assert torch.count_nonzero(v[case.token_slots == 0][:, 1:]) == 0, "a rank-1 slot must leave v[:, 1:] zero"


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_prefill_segments(dtype):
    # long segments of one adapter each (64-token tiles), in unsorted order, base tokens interleaved
    slots = [1] * 70 + [-1] * 5 + [0] * 66 + [1] * 3
    case = make_lora_case([3, 16], slots, in_dim=32, out_dim=48, dtype=dtype, page_elements=96, seed=3)
    _check_lora(case, dtype, 48)


@interpreter
def test_lora_shrink_split_k_accumulates():
    case = make_lora_case([16], [0], in_dim=1024, out_dim=16, page_elements=2048, seed=5)
    _check_lora(case, torch.float32, 16)


@interpreter
def test_lora_all_base_tokens_cost_nothing():
    case = make_lora_case([8], [-1, -1], in_dim=16, out_dim=16)
    v, out, _ = _check_lora(case, torch.float32, 16)
    assert torch.count_nonzero(v) == 0


@interpreter
def test_lora_tiles_follow_in_place_changes_of_token_slots():
    case = make_lora_case([2, 5], [0, 1, 1], in_dim=16, out_dim=16, seed=9)
    _check_lora(case, torch.float32, 16)
    case.token_slots.copy_(torch.tensor([1, -1, 0], dtype=torch.int32))
    _check_lora(case, torch.float32, 16)


@interpreter
def test_lora_expand_with_wider_v_and_own_ranks():
    """expand reads only each slot's first `ranks[s]` columns of v, whatever v's width and the tables' width."""
    case = make_lora_case([5, 16], [1, 0, 1, -1], in_dim=16, out_dim=32, seed=6)
    v = torch.randn(4, 20)  # 4 columns past the tables' width: never read
    expand_ranks = torch.tensor([3, 16], dtype=torch.int32)
    out = torch.randn(4, 32)
    expected = out.clone()
    lora_ref.lora_expand_ref(v, case.pool_flat, case.b_rows, expand_ranks, case.scales, case.token_slots, expected)
    tops.lora_expand(v, case.pool_flat, case.b_rows, expand_ranks, case.scales, case.token_slots, out)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 3, 8, 17, 64]), min_size=1, max_size=4), st.integers(1, 24), st.integers(0, 99))
def test_lora_random_batches(ranks, num_tokens, seed):
    if not INTERPRET:
        pytest.skip("interpreter tests need TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, len(ranks), (num_tokens,), generator=gen).tolist()
    case = make_lora_case(ranks, slots, in_dim=32, out_dim=24, page_elements=96, seed=seed)
    _check_lora(case, torch.float32, 24)


@interpreter
def test_lora_under_inference_mode():
    """The engine runs under torch.inference_mode, whose tensors have no version counter."""
    with torch.inference_mode():
        case = make_lora_case([4, 2], [1, 0, -1], in_dim=16, out_dim=16, seed=4)
        _check_lora(case, torch.float32, 16)


# ------------------------------------------------------------------ fused LoRA (modules sharing an input)
def _check_lora_multi(case, dtype, fused_output=False):
    """The fused kernels against the fused reference and against one single-module reference call per module;
    with `fused_output` the outputs are column slices of one [T, sum of widths] tensor."""
    tol, dims = TOL[dtype], case.out_dims
    v = tops.lora_shrink_multi(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    v_ref = lora_ref.lora_shrink_multi_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    assert v.shape == v_ref.shape and v.dtype == torch.float32
    assert not v.isnan().any(), "shrink read past a rank or outside its rows"
    torch.testing.assert_close(v, v_ref, **tol)
    whole = torch.randn(case.x.shape[0], sum(dims)).to(dtype)
    before = list(whole.clone().split(dims, dim=1))
    outs = list(whole.split(dims, dim=1)) if fused_output else [t.clone() for t in before]
    outs_ref = [t.clone() for t in before]
    tops.lora_expand_multi(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, outs)
    lora_ref.lora_expand_multi_ref(v_ref, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots,
                                   outs_ref)
    base = case.token_slots < 0
    for m, module in enumerate(case.modules):
        single_v = lora_ref.lora_shrink_ref(case.x, case.pool_flat, module.a_rows, module.ranks, case.token_slots)
        torch.testing.assert_close(v[m], single_v, **tol)
        single_out = before[m].clone()
        lora_ref.lora_expand_ref(single_v, case.pool_flat, module.b_rows, module.ranks, case.scales,
                                 case.token_slots, single_out)
        assert not outs[m].isnan().any(), "expand read past a rank or outside its rows"
        torch.testing.assert_close(outs[m].float(), outs_ref[m].float(), **tol)
        torch.testing.assert_close(outs[m].float(), single_out.float(), **tol)
        assert torch.equal(outs[m][base], before[m][base]), "base-only tokens must be untouched"
    if fused_output:
        assert torch.equal(whole, torch.cat(outs, dim=1))
    return v


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_multi_qkv_decode_ragged_ranks_gqa_widths(dtype):
    # q/k/v over 5 slots: ranks 1, 3, 8, 64 side by side; slot 4 without q, slot 1 without v; v's own table is
    # 8 wide (padded to 64 in the stack); k and v are narrower than q (GQA); base-only tokens interleaved
    ranks = [[1, 3, 8, 64, 0], [1, 3, 8, 64, 4], [1, 0, 8, 2, 4]]
    slots = [2, -1, 0, 3, 3, 1, -1, 4, 2, 0, 3]
    case = make_multi_lora_case(ranks, slots, in_dim=48, out_dims=[64, 16, 16], dtype=dtype, page_elements=192)
    v = _check_lora_multi(case, dtype)
    assert v.shape == (3, len(slots), 64)
    assert torch.count_nonzero(v[:, case.token_slots < 0]) == 0
    assert torch.count_nonzero(v[0, case.token_slots == 4]) == 0, "slot 4 has rank 0 on module 0"
    assert torch.count_nonzero(v[:, case.token_slots == 0, 1:]) == 0, "a rank-1 slot must leave v[:, 1:] zero"


@interpreter
def test_lora_multi_into_column_slices_of_one_output():
    ranks = [[8, 3, 0], [8, 3, 5], [8, 1, 5]]
    case = make_multi_lora_case(ranks, [1, 0, -1, 2, 0], in_dim=32, out_dims=[48, 16, 16], page_elements=192, seed=7)
    _check_lora_multi(case, torch.float32, fused_output=True)


@interpreter
def test_lora_multi_gate_up_prefill_segments():
    # two modules, long segments of one adapter each (64-token tiles), base tokens interleaved
    slots = [1] * 70 + [-1] * 5 + [0] * 66 + [1] * 3
    case = make_multi_lora_case([[3, 16], [3, 16]], slots, in_dim=32, out_dims=[40, 40], page_elements=160, seed=3)
    _check_lora_multi(case, torch.float32)


@interpreter
def test_lora_multi_split_k_accumulates():
    case = make_multi_lora_case([[16], [5]], [0, -1], in_dim=1024, out_dims=[16, 8], page_elements=2048, seed=5)
    _check_lora_multi(case, torch.float32)


@interpreter
def test_lora_multi_one_module_equals_single_kernels():
    case = make_lora_case([4, 16, 0], [1, 2, 0, -1, 1], in_dim=32, out_dim=24, seed=8)
    v = tops.lora_shrink_multi(case.x, case.pool_flat, case.a_rows[None], case.ranks[None], case.token_slots)
    assert torch.equal(v[0], tops.lora_shrink(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots))
    out = torch.randn(5, 24)
    expected = out.clone()
    tops.lora_expand_multi(v, case.pool_flat, case.b_rows[None], case.ranks[None], case.scales, case.token_slots,
                           [out])
    tops.lora_expand(v[0], case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, expected)
    assert torch.equal(out, expected)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 3, 8, 17]), min_size=3, max_size=3), min_size=1, max_size=3),
       st.integers(1, 16), st.integers(0, 99))
def test_lora_multi_random_batches(module_ranks, num_tokens, seed):
    if not INTERPRET:
        pytest.skip("interpreter tests need TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, 3, (num_tokens,), generator=gen).tolist()
    dims = [24, 8, 16][: len(module_ranks)]
    case = make_multi_lora_case(module_ranks, slots, in_dim=32, out_dims=dims, page_elements=96, seed=seed)
    _check_lora_multi(case, torch.float32)


# ----------------------------------------------------------------------------------------- attention
def _prefill_case(lens, new, heads, kv_heads, head_dim, block_tokens, dtype, device="cpu"):
    case = make_kv_case(lens, kv_heads, head_dim, block_tokens, dtype=dtype, device=device)
    q = torch.randn(sum(new), heads, head_dim, device=device).to(dtype)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return case, q, starts


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,pack", [(2, 2, False), (8, 2, False), (8, 1, False), (8, 2, True),
                                                 (8, 1, True)])
def test_paged_prefill_attention(dtype, heads, kv_heads, pack, monkeypatch):
    from lorafleet.kernels import attention_triton

    if pack and dtype == torch.float16:
        pytest.skip("GQA packing is covered in fp32 (keeps the interpreter suite short)")
    monkeypatch.setattr(attention_triton, "TUNE", dataclasses.replace(attention_triton.TUNE, prefill_pack_gqa=pack))
    case, q, starts = _prefill_case([5, 19, 40, 1, 3], [5, 2, 21, 1, 0], heads, kv_heads, 16, 4, dtype)
    out = tops.paged_prefill_attention(q, case.kv, case.block_tables, case.context_lens, starts, 0.25)
    ref = attention_ref.paged_prefill_attention_ref(q, case.kv, case.block_tables, case.context_lens, starts, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_paged_decode_attention_split_k(dtype, heads, kv_heads):
    # a 150-token context forces several context splits that the merge kernel combines
    case = make_kv_case([150, 1, 17], kv_heads, 16, 4, dtype=dtype, seed=2)
    q = torch.randn(3, heads, 16).to(dtype)
    out = tops.paged_decode_attention(q, case.kv, case.block_tables, case.context_lens, 0.25)
    ref = attention_ref.paged_decode_attention_ref(q, case.kv, case.block_tables, case.context_lens, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv(dtype):
    case = make_kv_case([9, 4], 2, 16, 4, dtype=dtype)
    k, v = torch.randn(3, 2, 16).to(dtype), torch.randn(3, 2, 16).to(dtype)
    slots = torch.tensor([int(case.block_tables[0, 2]) * 4 + 1, int(case.block_tables[1, 0]) * 4 + 3, 0])
    expected = case.kv.clone()
    attention_ref.write_kv_ref(expected, k, v, slots)
    tops.write_kv(case.kv, k, v, slots)
    assert torch.equal(case.kv.nan_to_num(), expected.nan_to_num())


# ---------------------------------------------------------------------------------------- norms, rope
@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norms(dtype):
    x, res, w = torch.randn(5, 48).to(dtype), torch.randn(5, 48).to(dtype), torch.randn(48).to(dtype)
    torch.testing.assert_close(tops.rms_norm(x, w, 1e-5), norm_ref.rms_norm_ref(x, w, 1e-5), **TOL[dtype])
    out, summed = tops.add_rms_norm(x, res, w, 1e-5)
    out_ref, summed_ref = norm_ref.add_rms_norm_ref(x, res, w, 1e-5)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    assert torch.equal(summed, summed_ref)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    freqs = torch.outer(torch.arange(32).float(), torch.rand(8))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q, k, pos = torch.randn(4, 4, 16).to(dtype), torch.randn(4, 2, 16).to(dtype), torch.tensor([0, 5, 31, 2])
    for got, want in zip(tops.rotary(q, k, pos, cos_sin), norm_ref.rotary_ref(q, k, pos, cos_sin)):
        torch.testing.assert_close(got, want, **TOL[dtype])


# -------------------------------------------------------------------------------- GPU, real sizes, bf16
def _gpu_lora_case(in_dim, out_dim, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    ranks = [8, 16, 32, 64, 1, 3, 0]
    slots = torch.randint(-1, len(ranks), (batch,), generator=gen).tolist()
    return make_lora_case(ranks, slots, in_dim, out_dim, dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.mark.parametrize("in_dim,out_dim,batch", [(4096, 4096, 64), (4096, 14336, 256), (14336, 4096, 512)])
@pytest.mark.gpu
@needs_cuda
def test_gpu_lora_bf16(in_dim, out_dim, batch):
    case = _gpu_lora_case(in_dim, out_dim, batch, seed=batch)
    v = tops.lora_shrink(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    v_dense, _ = dense_lora(case, torch.zeros(batch, out_dim, device="cuda"))
    assert _relative(v, v_dense) < 1e-2
    out = torch.randn(batch, out_dim, device="cuda", dtype=torch.bfloat16)
    before = out.clone()
    tops.lora_expand(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, out)
    _, out_dense = dense_lora(case, before.float())
    assert _relative(out.float() - before.float(), out_dense - before.double()) < 2e-2
    base = case.token_slots < 0
    assert torch.equal(out[base], before[base])


@pytest.mark.parametrize("out_dims,batch", [([4096, 1024, 1024], 64), ([14336, 14336], 256)])
@pytest.mark.gpu
@needs_cuda
def test_gpu_lora_multi_bf16(out_dims, batch):
    """q/k/v (Llama-3-8B, GQA) and gate/up widths: the fused kernels against fp64 dense per module."""
    gen = torch.Generator().manual_seed(batch)
    ranks = [8, 16, 32, 64, 1, 3, 0]
    module_ranks = [ranks, ranks[::-1], [0 if i % 3 == 0 else r for i, r in enumerate(ranks)]][: len(out_dims)]
    slots = torch.randint(-1, len(ranks), (batch,), generator=gen).tolist()
    case = make_multi_lora_case(module_ranks, slots, 4096, out_dims, dtype=torch.bfloat16, device="cuda", seed=batch)
    v = tops.lora_shrink_multi(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    outs = [torch.randn(batch, d, device="cuda", dtype=torch.bfloat16) for d in out_dims]
    before = [out.clone() for out in outs]
    tops.lora_expand_multi(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, outs)
    base = case.token_slots < 0
    for m, module in enumerate(case.modules):
        v_dense, out_dense = dense_lora(module, before[m].float())
        assert _relative(v[m], v_dense) < 1e-2
        assert _relative(outs[m].float() - before[m].float(), out_dense - before[m].double()) < 2e-2
        assert torch.equal(outs[m][base], before[m][base])


@pytest.mark.parametrize("heads,kv_heads,lens", [(32, 32, [1, 128, 515, 4096]), (32, 8, [7, 300, 8192]),
                                                 (32, 4, [64] * 48)])
@pytest.mark.gpu
@needs_cuda
def test_gpu_attention_bf16(heads, kv_heads, lens):
    new = [min(n, 37 + i) for i, n in enumerate(lens)]
    case, q, starts = _prefill_case(lens, new, heads, kv_heads, 128, 16, torch.bfloat16, device="cuda")
    out = tops.paged_prefill_attention(q, case.kv, case.block_tables, case.context_lens, starts, 128**-0.5)
    ref = attention_ref.paged_prefill_attention_ref(q, case.kv, case.block_tables, case.context_lens, starts,
                                                    128**-0.5)
    assert _relative(out, ref) < 1e-2
    qd = torch.randn(len(lens), heads, 128, device="cuda", dtype=torch.bfloat16)
    out = tops.paged_decode_attention(qd, case.kv, case.block_tables, case.context_lens, 128**-0.5)
    ref = attention_ref.paged_decode_attention_ref(qd, case.kv, case.block_tables, case.context_lens, 128**-0.5)
    assert _relative(out, ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_norms_bf16():
    x, res = torch.randn(300, 4096, device="cuda").bfloat16(), torch.randn(300, 4096, device="cuda").bfloat16()
    w = torch.randn(4096, device="cuda").bfloat16()
    assert _relative(tops.rms_norm(x, w, 1e-5), norm_ref.rms_norm_ref(x, w, 1e-5)) < 1e-2
    out, summed = tops.add_rms_norm(x, res, w, 1e-5)
    assert _relative(out, norm_ref.add_rms_norm_ref(x, res, w, 1e-5)[0]) < 1e-2 and torch.equal(summed, x + res)
    freqs = torch.outer(torch.arange(8192.0), torch.rand(64)).cuda()
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q, k = torch.randn(300, 32, 128, device="cuda").bfloat16(), torch.randn(300, 8, 128, device="cuda").bfloat16()
    pos = torch.randint(0, 8192, (300,), device="cuda")
    for got, want in zip(tops.rotary(q, k, pos, cos_sin), norm_ref.rotary_ref(q, k, pos, cos_sin)):
        assert _relative(got, want) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_gpu_engine_matches_peft(kind, tmp_path):
    """The whole engine on CUDA (Triton kernels) in fp32: greedy tokens equal HF+PEFT's on the CPU, with
    mixed adapters, eviction and preemption; in bf16 it runs the same workload to completion."""
    from test_equivalence import ADAPTERS, MAX_TOKENS, POOL_PAGES, _workload

    from conftest import PeftOracle, make_hf_model, make_peft_adapter
    from lorafleet.engine import LLM

    base = make_hf_model(kind, tmp_path / "base", seed=1)
    adapters = {name: make_peft_adapter(base, tmp_path / name, rank, targets, seed=10 + i, **extra)
                for i, (name, rank, targets, extra) in enumerate(ADAPTERS)}
    work = _workload(adapters)
    oracle = PeftOracle(base, adapters)
    expected = [oracle.greedy(prompt, adapter, MAX_TOKENS) for prompt, adapter in work]
    options = dict(adapters={k: str(v) for k, v in adapters.items()}, device="cuda", num_pages=POOL_PAGES[kind],
                   max_adapters_per_batch=4, max_batch_tokens=96, max_num_seqs=16)
    outs = LLM(str(base), dtype="float32", **options).generate(
        [p for p, _ in work], adapters=[a for _, a in work], max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.token_ids for o in outs] == expected
    outs = LLM(str(base), dtype="bfloat16", **options).generate(
        [p for p, _ in work], adapters=[a for _, a in work], max_tokens=MAX_TOKENS, ignore_eos=True)
    first = sum(o.token_ids[0] == want[0] for o, want in zip(outs, expected)) / len(expected)
    print(f"bf16 engine on CUDA: first generated token equals fp32 HF+PEFT for {first:.0%} of prompts")
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs)

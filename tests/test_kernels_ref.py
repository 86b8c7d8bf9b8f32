"""The PyTorch references (the CPU engine's kernels) against dense computations: LoRA over scattered pool
pages vs per-token matmuls on contiguous matrices; paged attention vs torch SDPA on contiguous K/V."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import dense_attention, dense_lora, make_kv_case, make_lora_case, make_multi_lora_case

from lorafleet.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)
from lorafleet.kernels.lora_ref import (
    lora_expand_multi_ref,
    lora_expand_ref,
    lora_shrink_multi_ref,
    lora_shrink_ref,
)
from lorafleet.kernels.norm_ref import add_rms_norm_ref, rms_norm_ref, rotary_ref

RANKS = [1, 3, 8, 0, 64]
SLOTS = [2, -1, 0, 4, 4, 1, -1, 3, 2, 0, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_ref_matches_dense(dtype):
    case = make_lora_case(RANKS, SLOTS, in_dim=24, out_dim=40, dtype=dtype, page_elements=96)
    out = torch.randn(len(SLOTS), 40, dtype=dtype)
    v_dense, out_dense = dense_lora(case, out)
    v = lora_shrink_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    assert v.dtype == torch.float32 and v.shape == (len(SLOTS), 64)
    torch.testing.assert_close(v.double(), v_dense, rtol=1e-5, atol=1e-5)
    lora_expand_ref(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, out)
    torch.testing.assert_close(out.double(), out_dense, rtol=1e-4, atol=1e-4)


def test_lora_ref_leaves_base_tokens_alone():
    case = make_lora_case([4], [-1, -1, -1], in_dim=8, out_dim=8)
    v = lora_shrink_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    assert torch.count_nonzero(v) == 0
    out = torch.randn(3, 8)
    before = out.clone()
    lora_expand_ref(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, out)
    assert torch.equal(out, before)


# q/k/v-like modules over 5 slots: ragged ranks, slot 4 without q, slot 1 without v, GQA-like output widths
MULTI_RANKS = [[1, 3, 8, 64, 0], [1, 3, 8, 64, 4], [1, 0, 8, 2, 4]]
MULTI_OUT_DIMS = [40, 16, 16]


def test_lora_multi_ref_equals_single_module_calls():
    case = make_multi_lora_case(MULTI_RANKS, SLOTS, in_dim=24, out_dims=MULTI_OUT_DIMS, page_elements=160)
    v = lora_shrink_multi_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    assert v.dtype == torch.float32 and v.shape == (3, len(SLOTS), 64)
    outs = [torch.randn(len(SLOTS), d) for d in MULTI_OUT_DIMS]
    expected = [out.clone() for out in outs]
    lora_expand_multi_ref(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, outs)
    for m, module in enumerate(case.modules):
        single = lora_shrink_ref(case.x, case.pool_flat, module.a_rows, module.ranks, case.token_slots)
        assert torch.equal(v[m], single)
        lora_expand_ref(single, case.pool_flat, module.b_rows, module.ranks, case.scales, case.token_slots, expected[m])
        assert torch.equal(outs[m], expected[m])
        v_dense, _ = dense_lora(module, torch.zeros(len(SLOTS), MULTI_OUT_DIMS[m]))
        torch.testing.assert_close(v[m].double(), v_dense, rtol=1e-5, atol=1e-5)
    base = case.token_slots < 0
    assert torch.count_nonzero(v[:, base]) == 0
    assert torch.count_nonzero(v[0, case.token_slots == 4]) == 0, "slot 4 does not target module 0"


def test_lora_multi_ref_into_column_slices_of_one_output():
    case = make_multi_lora_case(MULTI_RANKS, SLOTS, in_dim=24, out_dims=MULTI_OUT_DIMS, page_elements=160, seed=2)
    v = lora_shrink_multi_ref(case.x, case.pool_flat, case.a_rows, case.ranks, case.token_slots)
    fused = torch.randn(len(SLOTS), sum(MULTI_OUT_DIMS))
    separate = [t.clone() for t in fused.split(MULTI_OUT_DIMS, dim=1)]
    lora_expand_multi_ref(
        v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, fused.split(MULTI_OUT_DIMS, dim=1)
    )
    lora_expand_multi_ref(v, case.pool_flat, case.b_rows, case.ranks, case.scales, case.token_slots, separate)
    assert torch.equal(fused, torch.cat(separate, dim=1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_paged_prefill_ref_matches_sdpa(heads, kv_heads):
    lens, new = [5, 17, 33, 1], [5, 3, 16, 1]
    case = make_kv_case(lens, kv_heads, 8, block_tokens=4)
    q = torch.randn(sum(new), heads, 8)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_prefill_attention_ref(q, case.kv, case.block_tables, case.context_lens, starts, 0.3)
    for b in range(len(lens)):
        s, e = int(starts[b]), int(starts[b + 1])
        expected = dense_attention(q[s:e], case.keys[b], case.values[b], 0.3)
        torch.testing.assert_close(out[s:e], expected, rtol=1e-5, atol=1e-5)


def test_paged_decode_ref_matches_sdpa():
    lens = [1, 9, 40]
    case = make_kv_case(lens, 2, 16, block_tokens=8)
    q = torch.randn(3, 8, 16)
    out = paged_decode_attention_ref(q, case.kv, case.block_tables, case.context_lens, 0.25)
    for b in range(3):
        expected = dense_attention(q[b : b + 1], case.keys[b], case.values[b], 0.25)
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-5, atol=1e-5)


def test_write_kv_ref_round_trips():
    case = make_kv_case([6, 3], 2, 4, block_tokens=4)
    k, v = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    table = case.block_tables[0]
    slots = torch.tensor([int(table[1]) * 4 + 2, int(table[0]) * 4 + 0])
    write_kv_ref(case.kv, k, v, slots)
    assert torch.equal(case.kv[table[1], 0, 2], k[0]) and torch.equal(case.kv[table[0], 1, 0], v[1])


def test_norm_refs_match_dense():
    x, res, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), expected)
    normed, summed = add_rms_norm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, rms_norm_ref(x + res, w, 1e-6))


def test_rotary_ref_is_a_complex_rotation():
    dim, pos = 8, torch.tensor([0, 3, 7])
    freqs = torch.outer(torch.arange(10).float(), 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q, k = torch.randn(3, 2, dim), torch.randn(3, 1, dim)
    rq, rk = rotary_ref(q, k, pos, cos_sin)
    as_complex = lambda t: torch.complex(t[..., : dim // 2], t[..., dim // 2 :])  # noqa: E731
    turn = torch.polar(torch.ones_like(freqs[pos]), freqs[pos])[:, None, :]
    torch.testing.assert_close(as_complex(rq), as_complex(q) * turn)
    torch.testing.assert_close(as_complex(rk), as_complex(k) * turn)

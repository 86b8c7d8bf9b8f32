"""Triton paged attention over the unified pool (same contract as `attention_ref`).

kv is one layer's pool viewed as [num_pages, 2, block_tokens, kv_heads, head_dim]; token j of sequence b
lives in page block_tables[b, j // block_tokens], row j % block_tokens. The kernels gather keys/values
token by token through the block table, so the key block size BLOCK_N is independent of block_tokens.

- write_kv: one program per new token, stores its K and V rows at its slot.
- decode (one query per sequence): flash-decoding. A program owns one (sequence, kv head, context split)
  and all query heads of that kv head's GQA group (padded to 16 rows for the tensor cores), so each key
  and value is read once. Splits are sized from the block table's width (a host-side bound) so the grid
  fills the GPU even at batch 1; a second kernel merges the splits by their log-sum-exp.
- prefill: flash attention per (tile of BLOCK_M query tokens of one sequence, query head), causal with
  the queries aligned to the END of the context (cached prefix + new tokens, already written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lorafleet.kernels.segments import new_cache, query_tiles

_TILE_CACHE = new_cache()
_LOG2E = 1.4426950408889634


@dataclass
class AttentionTuning:
    """Launch parameters on CUDA (measured on an H200, see docs/kernels.md; the benchmark sweeps them).
    The interpreter uses 16-row blocks so that tests on tiny shapes still cross several blocks."""

    decode_block_n: int = 128
    decode_min_blocks_per_split: int = 2
    decode_warps: int = 4
    decode_stages: int = 2
    prefill_block_m: int = 64
    prefill_block_n: int = 64
    prefill_warps: int = 4
    prefill_stages: int = 2
    prefill_pack_gqa: bool = False  # one program per (query tile, kv head) covering the whole GQA group


TUNE = AttentionTuning()


@triton.jit
def _write_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slots_ptr, kv_heads, head_dim, block_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_page, stride_kind, stride_row, stride_head,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    page, row = slot // block_tokens, slot % block_tokens
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < kv_heads) & (offs_d[None, :] < head_dim)
    key = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    value = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = kv_ptr + page * stride_page + row * stride_row + offs_h[:, None] * stride_head + offs_d[None, :]
    tl.store(dst, key.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kind, value.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_block(
    q, m_i, l_i, acc, kv_ptr, table_ptr, offs_n, n_valid, kv_head, qk_scale,
    stride_page, stride_kind, stride_row, stride_head, offs_d, d_mask,
    BLOCK_TOKENS: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """One online-softmax step over the keys offs_n. MASKED: n_valid ([M, N], causal and length) applies;
    otherwise every key is visible to every query row."""
    if MASKED:
        column = tl.max(n_valid.to(tl.int32), 0) > 0
        page = tl.load(table_ptr + offs_n // BLOCK_TOKENS, mask=column, other=0).to(tl.int64)
        ld_mask = column[:, None] & d_mask[None, :]
    else:
        page = tl.load(table_ptr + offs_n // BLOCK_TOKENS).to(tl.int64)
        ld_mask = d_mask[None, :]
    base = page * stride_page + (offs_n % BLOCK_TOKENS) * stride_row + kv_head * stride_head
    key = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
    value = tl.load(kv_ptr + stride_kind + base[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(key), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(n_valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, qk_scale,
    group, head_dim, tokens_per_split, num_splits,
    stride_qb, stride_qh, stride_tb, stride_ob, stride_oh,
    stride_page, stride_kind, stride_row, stride_head,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    b, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    context = tl.load(lens_ptr + b)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, context)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < group
    heads = kv_head * group + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    table = tables_ptr + b * stride_tb
    full_stop = start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, kv_ptr, table, offs_n, offs_n, kv_head, qk_scale,
            stride_page, stride_kind, stride_row, stride_head, offs_d, d_mask, BLOCK_TOKENS, PRECISION, False,
        )
    if full_stop < stop:
        offs_n = full_stop + tl.arange(0, BLOCK_N)
        n_valid = (offs_n < stop)[None, :] & h_mask[:, None]
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, kv_ptr, table, offs_n, n_valid, kv_head, qk_scale,
            stride_page, stride_kind, stride_row, stride_head, offs_d, d_mask, BLOCK_TOKENS, PRECISION, True,
        )
    mask = h_mask[:, None] & d_mask[None, :]
    if SPLIT:
        row = (b * num_splits + split) * (group * tl.num_programs(1)) + heads  # [B, splits, H] layout
        tl.store(part_acc_ptr + row[:, None] * head_dim + offs_d[None, :], acc, mask=mask)
        tl.store(part_ml_ptr + 2 * row, m_i, mask=h_mask)
        tl.store(part_ml_ptr + 2 * row + 1, l_i, mask=h_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_heads, head_dim, num_splits, stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    row = (b * num_splits + offs_s) * num_heads + h
    m = tl.load(part_ml_ptr + 2 * row, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + 2 * row + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    parts = tl.load(part_acc_ptr + row[:, None] * head_dim + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(l_s * weight, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, tables_ptr, lens_ptr, starts_ptr, tiles_ptr, out_ptr, qk_scale,
    num_tiles, group, head_dim,
    stride_qt, stride_qh, stride_tb, stride_ot, stride_oh,
    stride_page, stride_kind, stride_row, stride_head,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    PRECISION: tl.constexpr, PACK: tl.constexpr,
):
    """Rows of a tile are (query, head) pairs: BLOCK_M // PACK queries times PACK consecutive query heads.
    PACK = 1: one query head per program (grid axis 1 = heads). PACK = group: the whole GQA group of one kv
    head (grid axis 1 = kv heads), so each key/value block is loaded once for the group."""
    tile, head_block = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)
    if seq < 0:
        return
    first = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    seq = seq.to(tl.int64)
    context = tl.load(lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    offs_m = first + rows // PACK  # query index of each row
    heads = head_block * PACK + rows % PACK
    m_mask = offs_m < end
    q_end = tl.load(starts_ptr + seq + 1)
    positions = context - q_end + offs_m  # query t sits at context - (q_end - t)
    kv_head = head_block * PACK // group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_rows = offs_m.to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    table = tables_ptr + seq * stride_tb
    stop = context - q_end + end  # one past the last valid query's position
    # One masked loop over all key blocks: a separate unmasked loop for the blocks below the diagonal
    # measured 1.5x SLOWER on the H200 with Triton 3.6 (docs/kernels.md), so it is not used here.
    for n0 in range(0, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = (offs_n[None, :] <= positions[:, None]) & m_mask[:, None] & (offs_n < stop)[None, :]
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, kv_ptr, table, offs_n, n_valid, kv_head, qk_scale,
            stride_page, stride_kind, stride_row, stride_head, offs_d, d_mask, BLOCK_TOKENS, PRECISION, True,
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = offs_m.to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _kv_strides(kv: torch.Tensor) -> tuple[int, int, int, int]:
    assert kv.dim() == 5 and kv.shape[1] == 2 and kv.stride(4) == 1, "kv: [pages, 2, block_tokens, kv_heads, D]"
    return kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)


def _check_tables(kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, batch: int) -> None:
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1, \
        "block_tables: [B, max_blocks] with unit inner stride"
    assert context_lens.shape == (batch,), "context_lens: [B]"
    assert block_tables.device == kv.device == context_lens.device, "tensors must share a device"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new tokens' keys/values ([T, kv_heads, head_dim]) at the given slots, in place."""
    strides = _kv_strides(kv)
    num_tokens, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv.shape[3:] == (kv_heads, head_dim), "k, v: [T, kv_heads, head_dim] matching kv"
    assert k.stride(2) == 1 and v.stride(2) == 1 and slots.shape == (num_tokens,), "k, v: unit inner stride"
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        kv, k, v, slots, kv_heads, head_dim, kv.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *strides,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )


def _decode_splits(batch: int, kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Context splits so that about two programs per SM exist; each split keeps a few key blocks."""
    want = triton.cdiv(2 * _num_sms(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_context, TUNE.decode_min_blocks_per_split * block_n), 64))


def paged_decode_attention(
    q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode form: one query token per sequence (q: [B, heads, head_dim]), the last of its context."""
    batch, heads, head_dim = q.shape
    strides = _kv_strides(kv)
    _check_tables(kv, block_tables, context_lens, batch)
    kv_heads = kv.shape[3]
    assert heads % kv_heads == 0 and kv.shape[4] == head_dim and q.stride(2) == 1, "q: [B, heads, D], GQA groups"
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group, block_n, block_tokens = heads // kv_heads, TUNE.decode_block_n if q.is_cuda else 16, kv.shape[2]
    splits = _decode_splits(batch, kv_heads, block_tables.shape[1] * block_tokens, block_n, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(block_tables.shape[1] * block_tokens, splits), block_n) * block_n
    splits = triton.cdiv(block_tables.shape[1] * block_tokens, tokens_per_split)
    part_acc = torch.empty(batch, splits, heads, head_dim, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_ml = torch.empty(batch, splits, heads, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_kernel[(batch, kv_heads, splits)](
        q, kv, block_tables, context_lens, out, part_acc, part_ml, scale * _LOG2E,
        group, head_dim, tokens_per_split, splits,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), *strides,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_TOKENS=block_tokens,
        SPLIT=splits > 1, PRECISION=_precision(q.dtype), num_warps=TUNE.decode_warps, num_stages=TUNE.decode_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](
            part_acc, part_ml, out, heads, head_dim, splits, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention for packed query chunks: sequence b owns q[query_starts[b]:query_starts[b+1]], the LAST
    tokens of its context of context_lens[b] tokens (cached prefix + new tokens, already written)."""
    num_tokens, heads, head_dim = q.shape
    strides = _kv_strides(kv)
    batch = block_tables.shape[0]
    _check_tables(kv, block_tables, context_lens, batch)
    assert query_starts.shape == (batch + 1,), "query_starts: [B + 1]"
    kv_heads = kv.shape[3]
    assert heads % kv_heads == 0 and kv.shape[4] == head_dim and q.stride(2) == 1, "q: [T, heads, D], GQA groups"
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    tune, group = TUNE, heads // kv_heads
    block_m, block_n = (tune.prefill_block_m, tune.prefill_block_n) if q.is_cuda else (16, 16)
    pack_ok = tune.prefill_pack_gqa and group > 1 and group & (group - 1) == 0 and block_m >= 2 * group
    pack = group if pack_ok else 1
    block_q = block_m // pack
    tiles = _TILE_CACHE.get(query_starts, (block_q, num_tokens), lambda: query_tiles(query_starts, block_q, num_tokens))
    _prefill_kernel[(tiles.shape[1], heads // pack)](
        q, kv, block_tables, context_lens, query_starts, tiles, out, scale * _LOG2E,
        tiles.shape[1], heads // kv_heads, head_dim,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_TOKENS=kv.shape[2], PRECISION=_precision(q.dtype), PACK=pack, num_warps=tune.prefill_warps,
        num_stages=tune.prefill_stages,
    )
    return out


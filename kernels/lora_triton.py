"""Triton kernels for heterogeneous LoRA over unified-pool pages (same contract as `lora_ref`).

Tokens are grouped by adapter slot (a stable sort on the device, cached per step, see `segments`), and
every program works on one tile of up to BLOCK_M tokens of ONE slot, so an adapter's rows are read once
per tile, not once per token. Decode batches use BLOCK_M = 16 (the smallest tensor-core tile; a tile with
one token still reads the adapter's rows once, S-LoRA's MBGMV), prefill batches with long segments use 64.

No padding to the max rank: the rank dimension is cut into blocks of BLOCK_R = 16 rows; shrink programs
whose rank block starts past their slot's rank return at once, and expand loops only over the slot's own
rank blocks. Loads past the rank inside the last block are masked (no memory traffic). Base-only tokens
(slot -1) belong to no tile and cost nothing.

Both kernels serve M modules that share their input in one launch (q/k/v, gate/up: the `*_multi` wrappers;
the single-module wrappers are the M = 1 case). Row tables are [M, S, R] and ranks [M, S]:

shrink: v[m, t, r] = sum_k x[t, k] · pool[a_rows[m, s, r] + k]
        grid (tiles, modules × rank blocks, k splits)
expand: outs[m][t, n] += scale[s] · sum_r v[m, t, r] · pool[b_rows[m, s, r] + n]
        grid (tiles, column blocks of module 0, then of module 1, then of module 2)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lorafleet.kernels.segments import SlotTiles, new_cache, slot_tiles

BLOCK_R = 16
MAX_FUSED_MODULES = 3  # outputs one expand launch can update (q, k, v)


@dataclass
class LoraTuning:
    """Launch parameters (measured on an H200, see docs/kernels.md; the benchmark sweeps them)."""

    shrink_k_chunk: int = 1024  # K columns per shrink program (split-K, fp32 atomics) for decode tiles
    shrink_block_k: int = 128
    shrink_warps: int = 4
    shrink_stages: int = 4
    expand_block_n: int = 128
    expand_warps: int = 4
    expand_stages: int = 3


TUNE = LoraTuning()
ASSUME_ALIGNED_ROWS = True  # row offsets are multiples of 8 elements whenever the row width is (see _aligned)
_TILE_CACHE = new_cache()


@triton.jit
def _tile_of(tiles_ptr, num_tiles, tile):
    """(slot, first sorted row, end sorted row) of a tile."""
    slot = tl.load(tiles_ptr + tile)
    first = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    return slot, first, end


@triton.jit
def _shrink_kernel(
    x_ptr, pool_ptr, a_rows_ptr, ranks_ptr, order_ptr, tiles_ptr, v_ptr,
    in_dim, k_per_split, num_tiles, rank_blocks, stride_xt, stride_am, stride_ar, stride_rm, stride_vm, stride_vt,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    slot, first, end = _tile_of(tiles_ptr, num_tiles, tl.program_id(0))
    if slot < 0:
        return
    module = tl.program_id(1) // rank_blocks  # axis 1 enumerates (module, rank block)
    rank = tl.load(ranks_ptr + module * stride_rm + slot)
    r0 = (tl.program_id(1) % rank_blocks) * BLOCK_R
    if r0 >= rank:
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    rows = tl.load(a_rows_ptr + module * stride_am + slot * stride_ar + offs_r, mask=r_mask, other=0)
    if ALIGNED:
        rows = tl.multiple_of(rows, 8)  # 16-byte vector loads along the row
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = tl.program_id(2) * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, in_dim)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_stop
        xt = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        at = tl.load(pool_ptr + rows[:, None] + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(xt.to(at.dtype), tl.trans(at), input_precision=PRECISION)
    v_ptrs = v_ptr + module * stride_vm + tokens[:, None] * stride_vt + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if ATOMIC:
        tl.atomic_add(v_ptrs, acc, mask=mask)
    else:
        tl.store(v_ptrs, acc, mask=mask)


@triton.jit
def _expand_tile(
    v_ptr, pool_ptr, rows_ptr, order_ptr, out_ptr, first, end, rank, scale, n_block, out_dim, v_width,
    stride_vt, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """out[tile's tokens, n block] += scale · v · Bᵀ for one module: `v_ptr` and `rows_ptr` already point at
    the module's v and at the slot's row of the module's Bᵀ row table."""
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_dim
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = (offs_r < rank) & (offs_r < v_width)
        rows = tl.load(rows_ptr + offs_r, mask=r_mask, other=0)
        if ALIGNED:
            rows = tl.multiple_of(rows, 8)
        vt = tl.load(v_ptr + tokens[:, None] * stride_vt + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)
        bt = tl.load(pool_ptr + rows[:, None] + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(vt.to(bt.dtype), bt, input_precision=PRECISION)
    o_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    current = tl.load(o_ptrs, mask=mask, other=0.0)
    tl.store(o_ptrs, (current.to(tl.float32) + acc * scale).to(current.dtype), mask=mask)


@triton.jit
def _expand_kernel(
    v_ptr, pool_ptr, b_rows_ptr, ranks_ptr, scales_ptr, order_ptr, tiles_ptr, out0_ptr, out1_ptr, out2_ptr,
    dim0, dim1, dim2, stride_o0, stride_o1, stride_o2, end0, end1,
    v_width, num_tiles, stride_vm, stride_vt, stride_bm, stride_br, stride_rm,
    NUM_MODULES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    slot, first, end = _tile_of(tiles_ptr, num_tiles, tl.program_id(0))
    if slot < 0:
        return
    # axis 1 enumerates the column blocks of module 0, then of module 1 (from end0), then of module 2 (from end1)
    pid_n = tl.program_id(1)
    module = (pid_n >= end0).to(tl.int32) + (pid_n >= end1).to(tl.int32)
    rank = tl.load(ranks_ptr + module * stride_rm + slot)
    if rank == 0:
        return
    scale = tl.load(scales_ptr + slot)
    v_ptr += module * stride_vm
    rows_ptr = b_rows_ptr + module * stride_bm + slot * stride_br
    # one branch per output keeps each output pointer's own alignment and stride specialisation
    if pid_n < end0:
        _expand_tile(v_ptr, pool_ptr, rows_ptr, order_ptr, out0_ptr, first, end, rank, scale, pid_n, dim0, v_width,
                     stride_vt, stride_o0, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION, ALIGNED)
    else:
        if NUM_MODULES == 2:
            _expand_tile(v_ptr, pool_ptr, rows_ptr, order_ptr, out1_ptr, first, end, rank, scale, pid_n - end0, dim1,
                         v_width, stride_vt, stride_o1, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION, ALIGNED)
        if NUM_MODULES == 3:
            if pid_n < end1:
                _expand_tile(v_ptr, pool_ptr, rows_ptr, order_ptr, out1_ptr, first, end, rank, scale, pid_n - end0,
                             dim1, v_width, stride_vt, stride_o1, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION, ALIGNED)
            else:
                _expand_tile(v_ptr, pool_ptr, rows_ptr, order_ptr, out2_ptr, first, end, rank, scale, pid_n - end1,
                             dim2, v_width, stride_vt, stride_o2, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION, ALIGNED)


def _block_m(num_tokens: int, num_slots: int) -> int:
    """16 when slots hold few tokens each (decode), 64 for long segments (prefill)."""
    return 64 if num_tokens >= 64 * num_slots else 16


def _precision(dtype: torch.dtype) -> str:
    """fp32 pools use exact fp32 products (the fp32 engine must equal the reference), others tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _aligned(pool_flat: torch.Tensor, width: int) -> bool:
    """Whether rows may be read as 16-byte vectors. The pool layout starts every row at a multiple of the
    gcd of all row widths and the page size; for Llama-family models (all widths multiples of 8) that
    makes every row offset a multiple of 8 elements. Set ASSUME_ALIGNED_ROWS = False for other layouts."""
    return ASSUME_ALIGNED_ROWS and width % 8 == 0 and pool_flat.data_ptr() % 16 == 0


def tiles_for(token_slots: torch.Tensor, num_slots: int) -> SlotTiles:
    """The step's token grouping, built once per token_slots tensor and reused by every layer and module."""
    block_m = _block_m(token_slots.shape[0], num_slots)
    return _TILE_CACHE.get(token_slots, (num_slots, block_m), lambda: slot_tiles(token_slots, num_slots, block_m))


def _check_rows(pool_flat: torch.Tensor, rows: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor) -> None:
    assert pool_flat.dim() == 1 and pool_flat.is_contiguous(), "pool_flat must be a contiguous 1-D buffer"
    assert rows.dim() == 3 and rows.dtype == torch.int64 and rows.stride(2) == 1, "row tables: [M, S, max_rank] int64"
    assert ranks.shape == rows.shape[:2] and ranks.dtype == torch.int32, "ranks: [M, S] int32"
    assert ranks.shape[1] <= 1 or ranks.stride(1) == 1, "ranks: unit inner stride"
    assert token_slots.dim() == 1 and token_slots.dtype == torch.int32, "token_slots: [T] int32"


def _check_single(rows: torch.Tensor, ranks: torch.Tensor) -> None:
    assert rows.dim() == 2 and ranks.shape == (rows.shape[0],), "row table [S, max_rank], ranks [S]"


def lora_shrink(
    x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """v[t, :r] = x[t] · Aᵀ for the adapter of token t; returns [T, max_rank] fp32, zeros past each rank."""
    _check_single(a_rows, ranks)
    return lora_shrink_multi(x, pool_flat, a_rows[None], ranks[None], token_slots)[0]


def lora_expand(
    v: torch.Tensor,
    pool_flat: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[t] += scale · v[t, :r] · Bᵀ for the adapter of token t, in place; base-only tokens untouched.
    `ranks` are the Bᵀ row counts; v may be wider than the row tables (columns past a rank are never read)."""
    _check_single(b_rows, ranks)
    assert v.dim() == 2, "v: [T, >= rank] fp32"
    lora_expand_multi(v[None], pool_flat, b_rows[None], ranks[None], scales, token_slots, (out,))


def lora_shrink_multi(
    x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """lora_shrink for M modules that share x, in one launch: a_rows [M, S, R], ranks [M, S] (0 = the slot's
    adapter does not target that module); returns v [M, T, R] fp32, zeros past each rank."""
    _check_rows(pool_flat, a_rows, ranks, token_slots)
    num_tokens, in_dim = x.shape
    assert x.stride(1) == 1 and token_slots.shape == (num_tokens,), "x: [T, in_dim] with unit inner stride"
    num_modules, num_slots, max_rank = a_rows.shape
    v = torch.zeros(num_modules, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_modules == 0 or max_rank == 0:
        return v
    tiles = tiles_for(token_slots, num_slots)
    rank_blocks = triton.cdiv(max_rank, BLOCK_R)
    tune = TUNE
    block_k = min(tune.shrink_block_k, max(16, triton.next_power_of_2(in_dim)))
    # decode tiles are few: split K so every program streams one chunk; prefill tiles are many: 4x chunks
    chunk = tune.shrink_k_chunk * (1 if tiles.block_m == 16 else 4)
    k_per_split = triton.cdiv(min(chunk, in_dim), block_k) * block_k
    splits = triton.cdiv(in_dim, k_per_split)
    grid = (tiles.num_tiles, num_modules * rank_blocks, splits)
    _shrink_kernel[grid](
        x, pool_flat, a_rows, ranks, tiles.order, tiles.tiles, v,
        in_dim, k_per_split, tiles.num_tiles, rank_blocks, x.stride(0), a_rows.stride(0), a_rows.stride(1),
        ranks.stride(0), v.stride(0), v.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_R=BLOCK_R, BLOCK_K=block_k, ATOMIC=splits > 1,
        PRECISION=_precision(pool_flat.dtype), ALIGNED=_aligned(pool_flat, in_dim), num_warps=tune.shrink_warps,
        num_stages=tune.shrink_stages,
    )
    return v


def lora_expand_multi(
    v: torch.Tensor,
    pool_flat: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    outs: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> None:
    """lora_expand for M <= 3 modules in one launch: outs[m][t] += scale · v[m, t, :r] · Bᵀ_m, in place.

    v [M, T, >= R] fp32, b_rows [M, S, R], ranks [M, S]; outs are M separate tensors [T, out_dim_m] of one
    dtype with unit inner stride; widths and row strides may differ, so they may be whole tensors or column
    slices of one fused [T, q + k + v] output."""
    _check_rows(pool_flat, b_rows, ranks, token_slots)
    num_modules, num_slots, _ = b_rows.shape
    num_tokens = token_slots.shape[0]
    assert 1 <= num_modules <= MAX_FUSED_MODULES and len(outs) == num_modules, "one output per module, at most 3"
    assert v.dim() == 3 and v.shape[:2] == (num_modules, num_tokens) and v.dtype == torch.float32, \
        "v: [M, T, >= rank] fp32"
    assert v.stride(2) == 1, "v: unit inner stride"
    for out in outs:
        assert out.dim() == 2 and out.shape[0] == num_tokens and out.stride(1) == 1, \
            "outs: [T, out_dim] with unit inner stride"
        assert out.dtype == outs[0].dtype and out.device == outs[0].device, "outs: one dtype and device"
    assert scales.shape == (num_slots,) and scales.dtype == torch.float32, "scales: [S] fp32"
    if num_tokens == 0:
        return
    tiles = tiles_for(token_slots, num_slots)
    dims = [out.shape[1] for out in outs]
    tune = TUNE
    block_n = min(tune.expand_block_n, max(16, triton.next_power_of_2(max(dims))))
    ends = list(itertools.accumulate(triton.cdiv(d, block_n) for d in dims))
    ends += [ends[-1]] * (MAX_FUSED_MODULES - num_modules)
    padded = list(outs) + [outs[0]] * (MAX_FUSED_MODULES - num_modules)
    grid = (tiles.num_tiles, ends[-1])
    _expand_kernel[grid](
        v, pool_flat, b_rows, ranks, scales, tiles.order, tiles.tiles, *padded,
        *[out.shape[1] for out in padded], *[out.stride(0) for out in padded], ends[0], ends[1],
        v.shape[2], tiles.num_tiles, v.stride(0), v.stride(1), b_rows.stride(0), b_rows.stride(1), ranks.stride(0),
        NUM_MODULES=num_modules, BLOCK_M=tiles.block_m, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
        PRECISION=_precision(pool_flat.dtype), ALIGNED=all(_aligned(pool_flat, d) for d in dims),
        num_warps=tune.expand_warps, num_stages=tune.expand_stages,
    )

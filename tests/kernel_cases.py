"""Random inputs for the kernel tests: LoRA row tables over scattered pool pages, paged KV caches with
holes and out-of-order pages, plus the dense (contiguous) form of the same data for cross-checks.

Unused pool memory is filled with NaN, and row-table entries past a slot's rank point into NaN pages, so a
kernel that reads anything it should not shows up as NaN in its output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class LoraCase:
    """One layer's pool with the A and Bᵀ rows of S adapter slots, and a batch of tokens over them."""

    x: torch.Tensor  # [T, in_dim]
    pool_flat: torch.Tensor  # [num_pages * page_elements]
    a_rows: torch.Tensor  # [S, max_rank] int64
    b_rows: torch.Tensor  # [S, max_rank] int64
    ranks: torch.Tensor  # [S] int32
    scales: torch.Tensor  # [S] fp32
    token_slots: torch.Tensor  # [T] int32, -1 = base only
    a_dense: list[torch.Tensor]  # per slot [rank, in_dim]
    bt_dense: list[torch.Tensor]  # per slot [rank, out_dim]


def _place_rows(count: int, width: int, page_elements: int, cursor: int) -> tuple[list[int], int]:
    starts = []
    for _ in range(count):
        if cursor % page_elements + width > page_elements:
            cursor += page_elements - cursor % page_elements
        starts.append(cursor)
        cursor += width
    return starts, cursor


def make_lora_case(
    ranks: list[int],
    token_slots: list[int],
    in_dim: int,
    out_dim: int,
    dtype: torch.dtype = torch.float32,
    page_elements: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> LoraCase:
    """Adapters of the given ranks (0 = slot does not target this module), each packed into its own pages,
    and the pages scattered out of order over a pool with free (NaN) pages between them."""
    gen = torch.Generator().manual_seed(seed)
    page_elements = page_elements or 4 * max(in_dim, out_dim)
    virtual: list[tuple[list[int], list[int], int]] = []
    for rank in ranks:
        a, cursor = _place_rows(rank, in_dim, page_elements, 0)
        b, cursor = _place_rows(rank, out_dim, page_elements, cursor)
        virtual.append((a, b, max(1, -(-cursor // page_elements))))
    used = sum(n for _, _, n in virtual)
    num_pages = 2 * used + 2
    order = torch.randperm(num_pages, generator=gen).tolist()
    nan_page = order.pop()
    pool = torch.full((num_pages * page_elements,), float("nan"), dtype=dtype)
    max_rank = max(max(ranks), 1)
    pad = nan_page * page_elements
    a_rows = torch.full((len(ranks), max_rank), pad, dtype=torch.long)
    b_rows = torch.full((len(ranks), max_rank), pad, dtype=torch.long)
    a_dense, bt_dense = [], []
    for slot, (rank, (a, b, n)) in enumerate(zip(ranks, virtual)):
        pages = [order.pop() for _ in range(n)]
        del order[-n:]  # leave holes between adapters
        phys = lambda v, pages=pages: pages[v // page_elements] * page_elements + v % page_elements  # noqa: E731
        a_mat = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
        bt_mat = torch.randn(rank, out_dim, generator=gen)
        for i in range(rank):
            a_rows[slot, i] = phys(a[i])
            b_rows[slot, i] = phys(b[i])
            pool[a_rows[slot, i] : a_rows[slot, i] + in_dim] = a_mat[i].to(dtype)
            pool[b_rows[slot, i] : b_rows[slot, i] + out_dim] = bt_mat[i].to(dtype)
        a_dense.append(a_mat.to(dtype))
        bt_dense.append(bt_mat.to(dtype))
    x = torch.randn(len(token_slots), in_dim, generator=gen).to(dtype)
    scales = torch.rand(len(ranks), generator=gen) + 0.5
    to = lambda t: t.to(device)  # noqa: E731
    return LoraCase(
        to(x), to(pool), to(a_rows), to(b_rows), to(torch.tensor(ranks, dtype=torch.int32)), to(scales),
        to(torch.tensor(token_slots, dtype=torch.int32)), [to(a) for a in a_dense], [to(b) for b in bt_dense],
    )


def dense_lora(case: LoraCase, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, out + delta) computed token by token from the dense matrices, in fp64."""
    max_rank = case.a_rows.shape[1]
    v = torch.zeros(case.x.shape[0], max_rank, dtype=torch.float64, device=case.x.device)
    result = out.double().clone()
    for t, slot in enumerate(case.token_slots.tolist()):
        if slot < 0 or int(case.ranks[slot]) == 0:
            continue
        rank = int(case.ranks[slot])
        v[t, :rank] = case.a_dense[slot].double() @ case.x[t].double()
        result[t] += float(case.scales[slot]) * (v[t, :rank] @ case.bt_dense[slot].double())
    return v, result


@dataclass
class MultiLoraCase:
    """M modules that share one input (q/k/v, gate/up), their rows in one pool: the stacked tables the fused
    kernels take, and each module as a single-module LoraCase over the same pool, input and scales."""

    x: torch.Tensor  # [T, in_dim]
    pool_flat: torch.Tensor
    a_rows: torch.Tensor  # [M, S, R] int64, R = the widest module's table
    b_rows: torch.Tensor  # [M, S, R] int64
    ranks: torch.Tensor  # [M, S] int32
    scales: torch.Tensor  # [S] fp32
    token_slots: torch.Tensor  # [T] int32
    modules: list[LoraCase]

    @property
    def out_dims(self) -> list[int]:
        return [m.bt_dense[0].shape[1] for m in self.modules]


def make_multi_lora_case(
    module_ranks: list[list[int]],
    token_slots: list[int],
    in_dim: int,
    out_dims: list[int],
    dtype: torch.dtype = torch.float32,
    page_elements: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> MultiLoraCase:
    """One make_lora_case per module (module_ranks[m][s] = slot s's rank on module m, 0 = not targeted), their
    pools laid one after another with a NaN block at the end; table columns added to reach the widest module's
    width point into that NaN block, as do all entries past a slot's rank."""
    cases = [make_lora_case(ranks, token_slots, in_dim, out_dim, dtype, page_elements, device, seed + m)
             for m, (ranks, out_dim) in enumerate(zip(module_ranks, out_dims))]
    sizes = [c.pool_flat.shape[0] for c in cases]
    nan_start = sum(sizes)
    nan_block = torch.full((max(in_dim, *out_dims),), float("nan"), dtype=dtype, device=device)
    pool = torch.cat([c.pool_flat for c in cases] + [nan_block])
    width = max(c.a_rows.shape[1] for c in cases)
    x, scales = cases[0].x, cases[0].scales
    modules = []
    for case, offset in zip(cases, [0, *torch.tensor(sizes).cumsum(0).tolist()]):
        pad = lambda t, o=offset: torch.nn.functional.pad(t + o, (0, width - t.shape[1]), value=nan_start)  # noqa: E731
        modules.append(dataclasses.replace(case, x=x, pool_flat=pool, scales=scales, a_rows=pad(case.a_rows),
                                           b_rows=pad(case.b_rows)))
    stack = lambda name: torch.stack([getattr(m, name) for m in modules])  # noqa: E731
    return MultiLoraCase(x, pool, stack("a_rows"), stack("b_rows"), stack("ranks"), scales, cases[0].token_slots,
                         modules)


@dataclass
class KvCase:
    """A paged KV cache of B sequences plus each sequence's contiguous keys/values."""

    kv: torch.Tensor  # [num_pages, 2, block_tokens, kv_heads, head_dim]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [len, kv_heads, head_dim]
    values: list[torch.Tensor]


def make_kv_case(
    context_lens: list[int],
    kv_heads: int,
    head_dim: int,
    block_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> KvCase:
    """Sequences' K/V written into randomly chosen (out-of-order, non-adjacent) pages; free pages hold NaN
    and block-table padding points at a NaN page."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_tokens) for n in context_lens]
    num_pages = 2 * sum(blocks) + 2
    order = torch.randperm(num_pages, generator=gen).tolist()
    nan_page = order.pop()
    kv = torch.full((num_pages, 2, block_tokens, kv_heads, head_dim), float("nan"), dtype=dtype)
    width = max(max(blocks), 1)
    tables = torch.full((len(context_lens), width), nan_page, dtype=torch.int32)
    keys, values = [], []
    for b, (length, n) in enumerate(zip(context_lens, blocks)):
        pages = order[:n]
        order = order[2 * n :] + order[n : 2 * n]  # skip n pages: holes between sequences
        tables[b, :n] = torch.tensor(pages, dtype=torch.int32)
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        for j in range(length):
            kv[pages[j // block_tokens], 0, j % block_tokens] = k[j]
            kv[pages[j // block_tokens], 1, j % block_tokens] = v[j]
        keys.append(k.to(device))
        values.append(v.to(device))
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return KvCase(kv.to(device), tables.to(device), lens.to(device), keys, values)


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal (bottom-right aligned) GQA attention of q [n, H, D] over [ctx, Hk, D] through torch SDPA, fp32."""
    n, heads, _ = q.shape
    ctx, kv_heads = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    qh = q.float().transpose(0, 1)[None]
    kh = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vh = values.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)

"""PyTorch reference for heterogeneous LoRA over unified-pool pages (the CPU engine's LoRA path).

Adapter weights live in the unified pool. For one layer the pool is a flat buffer `pool_flat`; every row
of an adapter's A matrix (length in_dim) and every column of its B matrix (stored as a row of Bᵀ, length
out_dim) sits inside one page, and the row's first element is at the flat offset given by the row tables:

    a_rows[s, i] = flat offset of row i of A   for adapter slot s (i < ranks[s])
    b_rows[s, i] = flat offset of row i of Bᵀ  for adapter slot s

Each token carries the slot of its request's adapter (`token_slots[t]`, -1 = base model only). Ranks may
differ per slot; entries past a slot's rank are never read, so nothing is padded to the largest rank.

The `*_multi` forms do the same for M modules that share their input (q/k/v, gate/up): row tables
[M, S, R] and ranks [M, S] (0 = the slot's adapter does not target that module), one v [M, T, R], and one
output tensor per module. They equal M calls of the single-module functions.
"""

from __future__ import annotations

import torch


def _gather_rows(pool_flat: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Rows [len(starts), width] read from the flat pool at the given start offsets."""
    index = starts.to(torch.long)[:, None] + torch.arange(width, device=pool_flat.device)[None, :]
    return pool_flat[index]


def _slot_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, indices of its tokens) for every adapter slot present in the batch; base-only tokens excluded."""
    return [
        (slot, (token_slots == slot).nonzero(as_tuple=True)[0])
        for slot in torch.unique(token_slots).tolist()
        if slot >= 0
    ]


def _shrink_into(
    v: torch.Tensor,
    x: torch.Tensor,
    pool_flat: torch.Tensor,
    a_rows: torch.Tensor,
    ranks: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]],
) -> None:
    for slot, idx in groups:
        rank = int(ranks[slot])
        if rank > 0:
            a = _gather_rows(pool_flat, a_rows[slot, :rank], x.shape[1]).float()
            v[idx, :rank] = x[idx].float() @ a.T


def _expand_into(
    out: torch.Tensor,
    v: torch.Tensor,
    pool_flat: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]],
) -> None:
    for slot, idx in groups:
        rank = int(ranks[slot])
        if rank > 0:
            bt = _gather_rows(pool_flat, b_rows[slot, :rank], out.shape[1]).float()
            delta = (v[idx, :rank].float() @ bt) * float(scales[slot])
            out[idx] += delta.to(out.dtype)


def lora_shrink_ref(
    x: torch.Tensor,
    pool_flat: torch.Tensor,
    a_rows: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """v[t, :r] = x[t] · Aᵀ for the adapter of token t; returns [T, max_rank] in fp32, zeros past each rank."""
    v = torch.zeros(x.shape[0], a_rows.shape[1], dtype=torch.float32, device=x.device)
    _shrink_into(v, x, pool_flat, a_rows, ranks, _slot_groups(token_slots))
    return v


def lora_expand_ref(
    v: torch.Tensor,
    pool_flat: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[t] += scale · v[t, :r] · Bᵀ for the adapter of token t, in place; base-only tokens untouched."""
    _expand_into(out, v, pool_flat, b_rows, ranks, scales, _slot_groups(token_slots))


def lora_shrink_multi_ref(
    x: torch.Tensor,
    pool_flat: torch.Tensor,
    a_rows: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """lora_shrink for M modules sharing x: a_rows [M, S, R], ranks [M, S]; returns v [M, T, R] in fp32."""
    num_modules, _, max_rank = a_rows.shape
    v = torch.zeros(num_modules, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    groups = _slot_groups(token_slots)
    for m in range(num_modules):
        _shrink_into(v[m], x, pool_flat, a_rows[m], ranks[m], groups)
    return v


def lora_expand_multi_ref(
    v: torch.Tensor,
    pool_flat: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    outs: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> None:
    """lora_expand for M modules: v [M, T, >= R], b_rows [M, S, R], ranks [M, S], outs[m] [T, out_dim_m]
    (widths may differ), each updated in place."""
    assert len(outs) == b_rows.shape[0] == v.shape[0], "one output and one v per module"
    groups = _slot_groups(token_slots)
    for m, out in enumerate(outs):
        _expand_into(out, v[m], pool_flat, b_rows[m], ranks[m], scales, groups)

"""PyTorch reference for heterogeneous LoRA over unified-pool pages (the CPU engine's LoRA path).

Adapter weights live in the unified pool. For one layer the pool is a flat buffer `pool_flat`; every row
of an adapter's A matrix (length in_dim) and every column of its B matrix (stored as a row of Bᵀ, length
out_dim) sits inside one page, and the row's first element is at the flat offset given by the row tables:

    a_rows[s, i] = flat offset of row i of A   for adapter slot s (i < ranks[s])
    b_rows[s, i] = flat offset of row i of Bᵀ  for adapter slot s

Each token carries the slot of its request's adapter (`token_slots[t]`, -1 = base model only). Ranks may
differ per slot; entries past a slot's rank are never read, so nothing is padded to the largest rank.
"""

from __future__ import annotations

import torch


def _gather_rows(pool_flat: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Rows [len(starts), width] read from the flat pool at the given start offsets."""
    index = starts.to(torch.long)[:, None] + torch.arange(width, device=pool_flat.device)[None, :]
    return pool_flat[index]


def lora_shrink_ref(
    x: torch.Tensor,
    pool_flat: torch.Tensor,
    a_rows: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """v[t, :r] = x[t] · Aᵀ for the adapter of token t; returns [T, max_rank] in fp32, zeros past each rank."""
    num_tokens, in_dim = x.shape
    max_rank = a_rows.shape[1]
    v = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    for slot in torch.unique(token_slots).tolist():
        rank = int(ranks[slot]) if slot >= 0 else 0
        if rank == 0:
            continue
        idx = (token_slots == slot).nonzero(as_tuple=True)[0]
        a = _gather_rows(pool_flat, a_rows[slot, :rank], in_dim).float()
        v[idx, :rank] = x[idx].float() @ a.T
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
    out_dim = out.shape[1]
    for slot in torch.unique(token_slots).tolist():
        rank = int(ranks[slot]) if slot >= 0 else 0
        if rank == 0:
            continue
        idx = (token_slots == slot).nonzero(as_tuple=True)[0]
        bt = _gather_rows(pool_flat, b_rows[slot, :rank], out_dim).float()
        delta = (v[idx, :rank].float() @ bt) * float(scales[slot])
        out[idx] += delta.to(out.dtype)

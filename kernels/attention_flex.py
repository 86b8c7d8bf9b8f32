"""Paged prefill attention through PyTorch's `flex_attention` (a well-kept library path beside our Triton
kernel, `attention_triton._prefill_kernel`; docs/kernels.md says which one serves and why).

Same signature and result as `paged_prefill_attention_ref`. Per step (cached against the `query_starts`
tensor, like the Triton kernels' tiles, so every layer reuses it):

- the slots of every context token of the step's sequences, in sequence order (one host sync: their count);
- the packed queries' and keys' sequence ids and positions, and a `BlockMask` built from them with
  `create_block_mask`: a query attends to keys of its own sequence at positions up to its own (the queries
  are the LAST tokens of each context, so a cached prefix is visible and the new tokens are causal).
  Blocks of the mask that no sequence shares are skipped by flex_attention's kernel.

Per layer the keys and values are gathered from the pool pages into contiguous [kv_heads, S, head_dim]
tensors (the bytes attention reads anyway) and `flex_attention` runs with `enable_gqa`. On CUDA it is
compiled once (`torch.compile(dynamic=True)`, as PyTorch documents for flex_attention); elsewhere the eager
flex_attention runs (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lorafleet.kernels.segments import new_cache

_CACHE = new_cache()
_COMPILED: dict[str, object] = {}


@dataclass(frozen=True)
class FlexPlan:
    """One step's gather indices and block mask."""

    pages: torch.Tensor  # [S] page of each context token (all sequences, in order)
    rows: torch.Tensor  # [S] row in its page
    block_mask: BlockMask


def _flex(device: torch.device):
    if device.type != "cuda":
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=True)
    return _COMPILED["flex"]


def flex_plan(block_tokens: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
              query_starts: torch.Tensor, num_queries: int) -> FlexPlan:
    """The step's gather indices and block mask (see the module docstring)."""
    device = block_tables.device
    batch, width = block_tables.shape[0], block_tables.shape[1] * block_tokens
    ctx = context_lens.long()
    pos = torch.arange(width, device=device)
    valid = pos[None, :] < ctx[:, None]
    pages_all = block_tables.long().gather(1, (pos // block_tokens)[None, :].expand(batch, -1))
    pages = pages_all[valid]  # the host sync: how many context tokens the step has
    rows = (pos % block_tokens)[None, :].expand(batch, -1)[valid]
    kv_seq = torch.arange(batch, device=device)[:, None].expand(batch, width)[valid]
    kv_pos = pos[None, :].expand(batch, width)[valid]
    starts = query_starts.long()
    q_lens = starts[1:] - starts[:-1]
    q_seq = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=num_queries)
    q_pos = ctx[q_seq] - q_lens[q_seq] + torch.arange(num_queries, device=device) - starts[q_seq]

    def causal_same_sequence(b, h, q_idx, kv_idx):
        return (q_seq[q_idx] == kv_seq[kv_idx]) & (kv_pos[kv_idx] <= q_pos[q_idx])

    mask = create_block_mask(causal_same_sequence, None, None, num_queries, pages.shape[0], device=device,
                             _compile=device.type == "cuda")
    return FlexPlan(pages, rows, mask)


def paged_prefill_attention_flex(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention for packed query chunks over the paged KV (contract of `paged_prefill_attention_ref`):
    q [T, heads, head_dim] in the pool's dtype, kv [pages, 2, block_tokens, kv_heads, head_dim],
    block_tables [B, blocks] int32, context_lens [B] int32, query_starts [B + 1] int32; returns
    [T, heads, head_dim] in q's dtype."""
    assert q.dim() == 3 and kv.dim() == 5 and q.shape[2] == kv.shape[4] and q.dtype == kv.dtype
    assert q.shape[1] % kv.shape[3] == 0, "heads must be a multiple of kv heads"
    if q.shape[0] == 0:
        return torch.empty_like(q)
    key = (id(block_tables), id(context_lens), kv.shape[2], q.shape[0])
    plan = _CACHE.get(query_starts, key, lambda: flex_plan(kv.shape[2], block_tables, context_lens, query_starts,
                                                          q.shape[0]))
    keys = kv[plan.pages, 0, plan.rows].transpose(0, 1)[None]  # [1, kv_heads, S, head_dim]
    values = kv[plan.pages, 1, plan.rows].transpose(0, 1)[None]
    out = _flex(q.device)(q.transpose(0, 1)[None], keys, values, block_mask=plan.block_mask, scale=scale,
                          enable_gqa=True)
    return out[0].transpose(0, 1).contiguous()

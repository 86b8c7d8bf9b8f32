"""PyTorch reference for paged attention over the unified pool (the CPU engine's attention path).

KV layout of one layer's pool buffer, viewed as `kv[num_pages, 2, block_tokens, kv_heads, head_dim]`:
`kv[p, 0]` holds the keys and `kv[p, 1]` the values of `block_tokens` consecutive tokens of one sequence.
A sequence's block table lists its pages in token order; token j of the sequence lives in page
`block_table[j // block_tokens]`, row `j % block_tokens`. A slot number is `page * block_tokens + row`.
"""

from __future__ import annotations

import torch


def write_kv_ref(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new tokens' keys/values ([T, kv_heads, head_dim]) at the given slots, in place."""
    block_tokens = kv.shape[2]
    pages = torch.div(slots, block_tokens, rounding_mode="floor").long()
    rows = (slots % block_tokens).long()
    kv[pages, 0, rows] = k.to(kv.dtype)
    kv[pages, 1, rows] = v.to(kv.dtype)


def gather_kv(kv: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous keys and values [length, kv_heads, head_dim] of one sequence."""
    block_tokens = kv.shape[2]
    num_blocks = (length + block_tokens - 1) // block_tokens
    pages = block_table[:num_blocks].long()
    keys = kv[pages, 0].reshape(-1, kv.shape[3], kv.shape[4])[:length]
    values = kv[pages, 1].reshape(-1, kv.shape[3], kv.shape[4])[:length]
    return keys, values


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last len(q) positions of a context of len(keys) tokens, with GQA."""
    num_new, num_heads, _ = q.shape
    context = keys.shape[0]
    group = num_heads // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    query_pos = torch.arange(context - num_new, context, device=q.device)[:, None]
    key_pos = torch.arange(context, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention for packed query chunks: sequence b owns q[query_starts[b]:query_starts[b+1]], which are
    the LAST tokens of its context of context_lens[b] tokens (cached prefix + new tokens, already written).
    q: [T, heads, head_dim]; returns [T, heads, head_dim] in q's dtype."""
    out = torch.empty_like(q)
    for b in range(block_tables.shape[0]):
        start, end = int(query_starts[b]), int(query_starts[b + 1])
        if end == start:
            continue
        keys, values = gather_kv(kv, block_tables[b], int(context_lens[b]))
        out[start:end] = _attend(q[start:end], keys, values, scale).to(q.dtype)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode form: one query token per sequence (q: [B, heads, head_dim]), the last of its context."""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_prefill_attention_ref(q, kv, block_tables, context_lens, starts, scale)

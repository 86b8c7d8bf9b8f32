"""Paged prefill attention through PyTorch's `varlen_attn` (`torch.nn.attention.varlen`: FlashAttention-2 over
packed variable-length sequences; CUDA, fp16/bf16), a well-kept library path beside our Triton kernel
(`attention_triton._prefill_kernel`) and flex_attention (`attention_flex.py`); docs/kernels.md says which serves.

Same signature and result as `paged_prefill_attention_ref`. FlashAttention's causal mask with fewer queries
than keys is aligned bottom-right (query i of a sequence sees keys 0..i + len_k - len_q), which is exactly our
contract: a sequence's queries are the LAST tokens of its context. Two modes:

- ``block_table``: the library reads the pool pages itself (keys `kv[:, 0]`, values `kv[:, 1]`, each
  [pages, block_tokens, kv_heads, head_dim] with the pool's page stride; `block_table` = our block tables,
  `seqused_k` = the context lengths). FlashAttention-2 accepts only some page sizes (a multiple of 256 in the
  upstream kernels), so this mode is tried at the first call per (device, block_tokens) and, on the library's
  RuntimeError, the decision falls to ``gather`` for good.
- ``gather``: once per step (cached against the `query_starts` tensor, like attention_flex's plan; one host
  sync for the context-token count and the longest query chunk and context) the pages and rows of every
  context token of the sequences that have queries, in sequence order; per layer the keys and values are
  gathered into contiguous [S, kv_heads, head_dim] tensors (the bytes attention reads anyway) and
  `varlen_attn` runs over them with `cu_seq_k` = the cumulative context lengths.

`paged_decode_attention_varlen` is the decode form (one query per sequence), in block_table mode only: gathering
a decode batch's whole context would double the bytes decode reads. It builds no plan that needs the host (its
longest context is bounded by the block-table width), so it runs inside the engine's decode CUDA graphs.

GQA is FlashAttention's own. `VARLEN_ATTN` is the library call (`flash_varlen`: varlen_attn's arguments on
the FlashAttention-2 op under it, the same in every torch release that has varlen_attn); tests replace it with a
PyTorch stand-in to check this wrapper on the CPU (the library is CUDA-only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lorafleet.kernels.segments import new_cache


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                 cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float, window_size: tuple[int, int],
                 enable_gqa: bool = True, seqused_k: torch.Tensor | None = None,
                 block_table: torch.Tensor | None = None) -> torch.Tensor:
    """`varlen_attn`'s call (same arguments) made on PyTorch's FlashAttention-2 op itself. Across torch
    releases `varlen_attn` gained `enable_gqa`, `seqused_k` and `block_table` and may pick a cuDNN backend that
    refuses GQA; the op under it (`aten::_flash_attention_forward`) takes GQA as it is (query heads a multiple
    of kv heads) in every release that has varlen_attn. A torch whose op lacks `block_table` raises here, which
    the callers treat as a refusal of in-place pages. Returns [T_q, heads, head_dim]."""
    del enable_gqa  # FlashAttention-2 always serves GQA when heads % kv_heads == 0
    extra = {"seqused_k": seqused_k} if seqused_k is not None else {}
    if block_table is not None:
        extra["block_table"] = block_table
    try:
        out = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, window_size == (-1, 0), False, scale=scale,
            window_size_left=window_size[0], window_size_right=window_size[1], **extra)
    except TypeError as exc:  # an argument this torch's op does not know (block_table before it existed)
        raise RuntimeError(f"aten::_flash_attention_forward: {exc}") from exc
    return out[0]


try:  # torch >= 2.10 (the engine runs without it: this module is imported only when chosen)
    from torch.nn.attention.varlen import varlen_attn as _LIBRARY  # noqa: F401  (its presence gates the path)

    VARLEN_ATTN = flash_varlen
except ImportError:  # pragma: no cover - an older torch
    VARLEN_ATTN = None

MODES = ("block_table", "gather")
FORCED_MODE: list[str | None] = [None]  # benchmarks and tests pin a mode; None = probe at first call
_MODE: dict[tuple[str, int], str] = {}  # (device, block_tokens) -> the mode the library accepted
_CACHE = new_cache()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VarlenPlan:
    """One step's cumulative lengths, longest chunks and (gather mode) gather indices."""

    cu_seq_q: torch.Tensor  # [B + 1] int32: query_starts
    cu_seq_k: torch.Tensor  # [B + 1] int32: cumulative context lengths (0 for a sequence without queries)
    seq_k: torch.Tensor  # [B] int32: context length of each sequence (0 without queries)
    max_q: int
    max_k: int
    pages: torch.Tensor | None  # gather mode: [S] page of each context token, sequences in order
    rows: torch.Tensor | None  # gather mode: [S] its row in the page


def varlen_plan(block_tokens: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
                query_starts: torch.Tensor, gather: bool) -> VarlenPlan:
    """The step's plan (see the module docstring). A sequence without queries gets no keys."""
    starts = query_starts.long()
    q_lens = starts[1:] - starts[:-1]
    seq_k = torch.where(q_lens > 0, context_lens.long(), 0)
    cu_k = torch.nn.functional.pad(torch.cumsum(seq_k, 0), (1, 0))
    total, max_q, max_k = torch.stack([cu_k[-1], q_lens.max(), seq_k.max()]).tolist()  # the one host sync
    pages = rows = None
    if gather:
        seq = torch.repeat_interleave(torch.arange(seq_k.shape[0], device=seq_k.device), seq_k, output_size=total)
        pos = torch.arange(total, device=seq_k.device) - cu_k[seq]
        pages = block_tables.long()[seq, torch.div(pos, block_tokens, rounding_mode="floor")]
        rows = pos % block_tokens
    return VarlenPlan(query_starts.to(torch.int32), cu_k.to(torch.int32), seq_k.to(torch.int32), max_q, max_k,
                      pages, rows)


def _attend_block_table(q, kv, block_tables, plan: VarlenPlan, scale: float) -> torch.Tensor:
    return VARLEN_ATTN(q, kv[:, 0], kv[:, 1], plan.cu_seq_q, plan.cu_seq_k, plan.max_q, plan.max_k, scale=scale,
                       window_size=(-1, 0), enable_gqa=True, seqused_k=plan.seq_k,
                       block_table=block_tables.to(torch.int32).contiguous())


def _attend_gather(q, kv, plan: VarlenPlan, scale: float) -> torch.Tensor:
    keys, values = kv[plan.pages, 0, plan.rows], kv[plan.pages, 1, plan.rows]  # [S, kv_heads, head_dim]
    return VARLEN_ATTN(q, keys, values, plan.cu_seq_q, plan.cu_seq_k, plan.max_q, plan.max_k, scale=scale,
                       window_size=(-1, 0), enable_gqa=True)


def _plan(kv, block_tables, context_lens, query_starts, gather: bool) -> VarlenPlan:
    key = (id(block_tables), id(context_lens), kv.shape[2], gather)
    return _CACHE.get(query_starts, key, lambda: varlen_plan(kv.shape[2], block_tables, context_lens, query_starts,
                                                            gather))


def paged_prefill_attention_varlen(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention for packed query chunks over the paged KV (contract of `paged_prefill_attention_ref`):
    q [T, heads, head_dim] in the pool's dtype (fp16/bf16 on CUDA), kv [pages, 2, block_tokens, kv_heads,
    head_dim], block_tables [B, blocks] int32, context_lens [B] int32, query_starts [B + 1] int32; returns
    [T, heads, head_dim] in q's dtype. Raises RuntimeError when torch has no `varlen_attn`, and the library's
    own errors (e.g. fp32 inputs, head_dim over 256) in gather mode."""
    assert q.dim() == 3 and kv.dim() == 5 and q.shape[2] == kv.shape[4] and q.dtype == kv.dtype
    assert q.shape[1] % kv.shape[3] == 0, "heads must be a multiple of kv heads"
    if VARLEN_ATTN is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    decided = (str(q.device), kv.shape[2])
    mode = FORCED_MODE[0] or _MODE.get(decided, "block_table")
    if mode == "block_table":
        plan = _plan(kv, block_tables, context_lens, query_starts, gather=False)
        try:
            out = _attend_block_table(q, kv, block_tables, plan, scale)
        except RuntimeError:
            if FORCED_MODE[0] or decided in _MODE:
                raise
            _MODE[decided] = mode = "gather"
        else:
            _MODE.setdefault(decided, "block_table")
            return out
    return _attend_gather(q, kv, _plan(kv, block_tables, context_lens, query_starts, gather=True), scale)


def unsupported(device: str, dtype: torch.dtype) -> str | None:
    """Why varlen_attn cannot serve an engine on `device` in `dtype` (FlashAttention-2: CUDA, fp16/bf16; a torch
    with `torch.nn.attention.varlen`), or None where it can."""
    if VARLEN_ATTN is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    if not str(device).startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 runs on CUDA in float16/bfloat16, not on {device} in {dtype}"
    return None


def chosen_mode(device: torch.device | str, block_tokens: int) -> str | None:
    """The mode the first call on this (device, block_tokens) settled on; None before it."""
    return _MODE.get((str(device), block_tokens))


def paged_decode_attention_varlen(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over the pool pages in place (contract of `paged_decode_attention_ref`): q [B, heads,
    head_dim], one query per sequence, the last token of its context; returns [B, heads, head_dim]. Every key
    is visible to that query, so the call is non-causal (FlashAttention then packs GQA query heads together).
    Raises RuntimeError when the library refuses the page size (see `decode_or_none`)."""
    assert q.dim() == 3 and kv.dim() == 5 and q.shape[2] == kv.shape[4] and q.dtype == kv.dtype
    if VARLEN_ATTN is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    cu_q, cu_k, seq_k = _CACHE.get(context_lens, ("decode", q.shape[0]), lambda: _decode_lengths(context_lens))
    return VARLEN_ATTN(q, kv[:, 0], kv[:, 1], cu_q, cu_k, 1, block_tables.shape[1] * kv.shape[2], scale=scale,
                       window_size=(-1, -1), enable_gqa=True, seqused_k=seq_k,
                       block_table=block_tables.to(torch.int32).contiguous())


def _decode_lengths(context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq_k = context_lens.to(torch.int32)
    cu_k = torch.nn.functional.pad(torch.cumsum(seq_k, 0, dtype=torch.int32), (1, 0))
    return torch.arange(seq_k.shape[0] + 1, dtype=torch.int32, device=seq_k.device), cu_k, seq_k


def decode_or_none(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   scale: float) -> torch.Tensor | None:
    """`paged_decode_attention_varlen` where the library reads this page size in place, None where it does not
    (the caller runs its own decode kernel). The first call per (device, block_tokens) that settles it, here
    or in prefill, is remembered; a refusal is logged once."""
    decided = (str(q.device), kv.shape[2])
    if _MODE.get(decided) == "gather":
        return None
    try:
        out = paged_decode_attention_varlen(q, kv, block_tables, context_lens, scale)
    except RuntimeError as exc:
        if decided in _MODE:
            raise
        _MODE[decided] = "gather"
        log.warning("varlen_attn refuses pages of %d tokens in place (%s): decode attention stays on our kernel",
                    kv.shape[2], exc)
        return None
    _MODE.setdefault(decided, "block_table")
    return out

"""Kernels: each operation has a PyTorch reference (`*_ref`, the CPU engine) and, where it pays, a Triton
kernel with the same signature. The functions exported here dispatch: Triton for CUDA tensors when the
Triton implementation is importable, the reference otherwise. Model code calls only these names."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

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

__all__ = [
    "lora_shrink",
    "lora_expand",
    "lora_shrink_multi",
    "lora_expand_multi",
    "write_kv",
    "paged_prefill_attention",
    "paged_decode_attention",
    "rms_norm",
    "add_rms_norm",
    "rotary",
    "use_prefill_attention",
    "PREFILL_ATTENTION",
    "use_decode_attention",
    "DECODE_ATTENTION",
]

_TRITON_MODULE = "lorafleet.kernels.triton_ops"


def _triton_impl(name: str) -> Callable | None:
    """The Triton implementation of `name`, or None when Triton or that kernel is unavailable."""
    try:
        module = importlib.import_module(_TRITON_MODULE)
    except ImportError:
        return None
    return getattr(module, name, None)


def _dispatch(name: str, reference: Callable) -> Callable:
    cache: dict[bool, Callable] = {}

    def run(first: torch.Tensor, *args, **kwargs):
        on_cuda = first.is_cuda
        if on_cuda not in cache:
            cache[on_cuda] = (_triton_impl(name) if on_cuda else None) or reference
        return cache[on_cuda](first, *args, **kwargs)

    run.__name__ = name
    run.__doc__ = reference.__doc__
    return run


lora_shrink = _dispatch("lora_shrink", lora_shrink_ref)
lora_expand = _dispatch("lora_expand", lora_expand_ref)
lora_shrink_multi = _dispatch("lora_shrink_multi", lora_shrink_multi_ref)
lora_expand_multi = _dispatch("lora_expand_multi", lora_expand_multi_ref)
write_kv = _dispatch("write_kv", write_kv_ref)
_paged_prefill_attention = _dispatch("paged_prefill_attention", paged_prefill_attention_ref)
PREFILL_ATTENTION = ("triton", "flex", "flash")
_PREFILL = ["triton"]


def use_prefill_attention(name: str) -> None:
    """Which prefill attention this process runs: "triton" (our kernel on CUDA, the reference elsewhere), "flex"
    (PyTorch's flex_attention over the pages, `attention_flex.py`) or "flash" (PyTorch's varlen_attn,
    FlashAttention-2, `attention_varlen.py`; CUDA fp16/bf16). flex and flash run on every device they are
    asked to. Raises ValueError for another name."""
    if name not in PREFILL_ATTENTION:
        raise ValueError(f"prefill attention must be one of {PREFILL_ATTENTION}, got {name!r}")
    _PREFILL[0] = name


def paged_prefill_attention(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # the library paths are imported on use: they need a recent torch, the rest of the engine does not
    if _PREFILL[0] == "flex":
        from lorafleet.kernels.attention_flex import paged_prefill_attention_flex

        return paged_prefill_attention_flex(q, *args, **kwargs)
    if _PREFILL[0] == "flash":
        from lorafleet.kernels.attention_varlen import paged_prefill_attention_varlen

        return paged_prefill_attention_varlen(q, *args, **kwargs)
    return _paged_prefill_attention(q, *args, **kwargs)


paged_prefill_attention.__doc__ = paged_prefill_attention_ref.__doc__
_paged_decode_attention = _dispatch("paged_decode_attention", paged_decode_attention_ref)
DECODE_ATTENTION = ("triton", "flash")
_DECODE = ["triton"]


def use_decode_attention(name: str) -> None:
    """Which decode attention this process runs: "triton" (our kernel on CUDA, the reference elsewhere) or
    "flash" (PyTorch's varlen_attn reading the pool pages in place, `attention_varlen.py`, where the library
    accepts the page size; our kernel where it does not). Raises ValueError for another name."""
    if name not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}, got {name!r}")
    _DECODE[0] = name


def paged_decode_attention(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if _DECODE[0] == "flash":
        from lorafleet.kernels.attention_varlen import decode_or_none

        out = decode_or_none(q, *args, **kwargs)
        if out is not None:
            return out
    return _paged_decode_attention(q, *args, **kwargs)


paged_decode_attention.__doc__ = paged_decode_attention_ref.__doc__
rms_norm = _dispatch("rms_norm", rms_norm_ref)
add_rms_norm = _dispatch("add_rms_norm", add_rms_norm_ref)
rotary = _dispatch("rotary", rotary_ref)

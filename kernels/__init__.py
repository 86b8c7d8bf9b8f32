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
    "use_flex_prefill_attention",
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
_FLEX_PREFILL = [False]


def use_flex_prefill_attention(enabled: bool) -> None:
    """Run prefill attention through PyTorch's flex_attention over the pages (`attention_flex.py`) on every
    device, instead of the Triton kernel on CUDA and the reference elsewhere (per process)."""
    _FLEX_PREFILL[0] = enabled


def paged_prefill_attention(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if _FLEX_PREFILL[0]:  # imported on use: flex_attention needs a recent torch, the rest of the engine does not
        from lorafleet.kernels.attention_flex import paged_prefill_attention_flex

        return paged_prefill_attention_flex(q, *args, **kwargs)
    return _paged_prefill_attention(q, *args, **kwargs)


paged_prefill_attention.__doc__ = paged_prefill_attention_ref.__doc__
paged_decode_attention = _dispatch("paged_decode_attention", paged_decode_attention_ref)
rms_norm = _dispatch("rms_norm", rms_norm_ref)
add_rms_norm = _dispatch("add_rms_norm", add_rms_norm_ref)
rotary = _dispatch("rotary", rotary_ref)

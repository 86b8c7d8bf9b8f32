"""The Triton implementations that `lorafleet.kernels` dispatches to for CUDA tensors.

Importing this module imports Triton; where Triton is missing the ImportError tells the dispatcher to keep
the PyTorch references. Each name has the signature of its `*_ref` counterpart. See docs/kernels.md for
the design, the measured choices and the bf16 tolerances."""

from __future__ import annotations

from lorafleet.kernels.attention_triton import paged_decode_attention, paged_prefill_attention, write_kv
from lorafleet.kernels.lora_triton import lora_expand, lora_expand_multi, lora_shrink, lora_shrink_multi
from lorafleet.kernels.norm_triton import add_rms_norm, rms_norm, rotary

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
]

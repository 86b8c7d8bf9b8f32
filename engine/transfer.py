"""Per-step host↔device copies that never make the host wait for the device.

A copy from pageable host memory to a CUDA device (`torch.tensor(values, device="cuda")`, `.to("cuda")` of a
plain CPU tensor) synchronizes the stream: the host waits until every kernel queued before it has run, so the
next step's inputs could not be built while the current step computes. These helpers copy through
page-locked memory (PyTorch's caching host allocator) with `non_blocking=True`; the allocator records the copy
on the stream, so the page-locked block is not handed out again before the copy ran. On a CPU device they are
plain copies (same values, same dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pinned(values: Sequence | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a page-locked host tensor of `dtype` (a new one unless it already is one)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    host = host.to(dtype)
    return host if host.is_pinned() else host.pin_memory()


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a host tensor) as a tensor of `dtype` on `device`; on CUDA an asynchronous copy
    from page-locked memory (no host sync)."""
    if device.type != "cuda":
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        return host.to(device, dtype)
    return pinned(values, dtype).to(device, non_blocking=True)


def copy_into(target: torch.Tensor, values: Sequence | torch.Tensor) -> None:
    """`target.copy_(values)` from the host (a list or a host tensor, `target`'s dtype) without a host sync."""
    if target.device.type != "cuda":
        target.copy_(values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=target.dtype))
        return
    target.copy_(pinned(values, target.dtype), non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued on the current stream (readable once the stream has run up to
    here: wait on an event recorded after it). On the CPU the tensor itself."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host

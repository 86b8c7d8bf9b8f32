"""Tiles over segments, computed on the device without a host sync (so it can be captured in a CUDA graph).

The Triton kernels work on tiles of up to `block_m` consecutive rows of one segment: the tokens of one
adapter slot (LoRA, after a stable sort of the tokens by slot) or the query tokens of one sequence
(prefill attention). `segment_tiles` turns per-segment counts and starts into a [3, max_tiles] int32 table
(segment, first row, end row) where unused tiles have segment -1; `max_tiles` is a host-side upper bound,
so the launch grid never depends on device values.

Every layer of a step passes the same `token_slots` / `query_starts` tensor, so the metadata is cached
against that tensor object (and its version counter) and built once per step."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch


def max_tiles(total_rows: int, num_segments: int, block_m: int) -> int:
    """Upper bound of sum(ceil(count_i / block_m)) over segments whose counts sum to total_rows."""
    return max(1, -(-total_rows // block_m) + min(num_segments, total_rows))


def segment_tiles(counts: torch.Tensor, starts: torch.Tensor, block_m: int, num_tiles: int) -> torch.Tensor:
    """[3, num_tiles] int32: for each tile its segment (-1 = unused), first row and end row (exclusive)."""
    counts, starts = counts.long(), starts.long()
    num_segments = counts.shape[0]
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(num_tiles, device=counts.device)
    seg = torch.searchsorted(ends, ids, right=True)
    clamped = seg.clamp(max=num_segments - 1)
    first_row = starts[clamped] + (ids - (ends[clamped] - tiles[clamped])) * block_m
    end_row = starts[clamped] + counts[clamped]
    seg = torch.where(seg < num_segments, seg, torch.full_like(seg, -1))
    return torch.stack((seg, first_row, end_row)).to(torch.int32)


@dataclass(frozen=True)
class SlotTiles:
    """Tokens sorted by adapter slot (base-only tokens last, in no tile) and the tiles over the slots."""

    order: torch.Tensor  # [T] int32: token index at each sorted position
    tiles: torch.Tensor  # [3, num_tiles] int32
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]


def slot_tiles(token_slots: torch.Tensor, num_slots: int, block_m: int) -> SlotTiles:
    """Group the batch's tokens by adapter slot; slot -1 (base only) gets no tile."""
    key = torch.where(token_slots >= 0, token_slots.long(), torch.full_like(token_slots, num_slots, dtype=torch.long))
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    starts = torch.cumsum(counts, 0) - counts
    num_tiles = max_tiles(token_slots.shape[0], num_slots, block_m)
    return SlotTiles(order.to(torch.int32), segment_tiles(counts, starts, block_m, num_tiles), block_m)


def query_tiles(query_starts: torch.Tensor, block_m: int, total_rows: int) -> torch.Tensor:
    """Tiles over the packed query chunks of a prefill batch (segment = sequence)."""
    starts = query_starts[:-1].long()
    counts = query_starts[1:].long() - starts
    num_tiles = max_tiles(total_rows, counts.shape[0], block_m)
    return segment_tiles(counts, starts, block_m, num_tiles)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none (identity is the key)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


REBUILD_IN_CAPTURE = True  # benchmarks of single kernels turn this off to time the kernels alone


def _capturing(tensor: torch.Tensor) -> bool:
    return REBUILD_IN_CAPTURE and tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class TensorKeyedCache:
    """Remembers the last few values computed from a tensor, keyed by the tensor object, its version
    counter and a hashable extra key; an entry dies with its tensor.

    Entries made while a CUDA graph is being captured are kept apart from eager ones, so a captured graph
    always contains the ops that build its metadata from its (static) input buffer and replays them.
    The runner must call `clear_caches()` before capturing another graph from the same input tensor.
    Inference tensors have no version counter: changing one in place outside a capture and calling again
    returns stale metadata, so pass a new tensor per step (the runner does)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref, tuple, object, object]] = []

    def get(self, tensor: torch.Tensor, extra: object, build: Callable[[], object]) -> object:
        version = (_version(tensor), _capturing(tensor))
        self.entries = [e for e in self.entries if e[0]() is not None]
        for ref, ver, key, value in self.entries:
            if ref() is tensor and ver == version and key == extra:
                return value
        value = build()
        self.entries.append((weakref.ref(tensor), version, extra, value))
        del self.entries[: -self.size]
        return value

    def clear(self) -> None:
        self.entries.clear()


CACHES: list[TensorKeyedCache] = []


def new_cache() -> TensorKeyedCache:
    cache = TensorKeyedCache()
    CACHES.append(cache)
    return cache


def clear_caches() -> None:
    """Forget all cached step metadata (call before capturing a CUDA graph)."""
    for cache in CACHES:
        cache.clear()

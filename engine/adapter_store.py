"""Tiered adapter storage: a registry of adapters on disk and a host-memory LRU cache bounded in bytes.

Registering an adapter validates it fully (the weights are read once) and records what the scheduler
needs without the weights: its ranks, scale and page count. The cache keeps adapters packed in the
pool's page format, ready to copy into pool pages (or into shared memory for executor processes).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.engine.adapters import AdapterError, AdapterWeights, load_adapter, pack_adapter, shard_adapter
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.layout import AdapterLayout
from lorafleet.engine.synthetic import SYNTHETIC_ADAPTER


@dataclass(frozen=True)
class AdapterInfo:
    """What is known about a registered adapter without holding its weights."""

    name: str
    path: str
    rank: int
    scale: float
    ranks: dict[str, int]
    layout: AdapterLayout

    @property
    def num_pages(self) -> int:
        return self.layout.num_pages


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter in page format: `pages[layer, j]` goes to pool page `page_table[j]` of that layer.
    Under tensor parallelism `pages` is [ranks, layers, n, page_elements], one shard per rank."""

    info: AdapterInfo
    pages: torch.Tensor
    shards: int = 1

    def for_rank(self, rank: int) -> torch.Tensor:
        return self.pages if self.shards == 1 else self.pages[rank]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0


@dataclass
class AdapterStore:
    """Disk registry + host LRU of packed adapters (at most `host_cache_bytes`)."""

    model: ModelConfig
    page_elements: int
    dtype: torch.dtype
    max_rank: int
    host_cache_bytes: int = 8 << 30
    shards: int = 1
    infos: dict[str, AdapterInfo] = field(default_factory=dict)
    cache: OrderedDict[str, PackedAdapter] = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)

    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate the PEFT directory and make it servable as `name` (replacing nothing). A directory is
        read, packed and cached; a `synthetic:` adapter (made in memory) is packed on first use."""
        if not name or not isinstance(name, str):
            raise AdapterError("lora_name: must be a non-empty string")
        if name in self.infos:
            raise AdapterError(f"lora_name: adapter {name!r} is already loaded")
        info, parts = self._read(name, str(path))
        self.infos[name] = info
        if not info.path.startswith(SYNTHETIC_ADAPTER):
            self._put(self._pack(info, parts))
        return info

    def load_packed(self, name: str, path: str) -> PackedAdapter:
        """Read, validate, shard (one part per tensor-parallel rank) and pack an adapter; touches no state."""
        return self._pack(*self._read(name, path))

    def _read(self, name: str, path: str) -> tuple[AdapterInfo, list[AdapterWeights]]:
        weights = load_adapter(name, path, self.model, self.max_rank)
        parts = [shard_adapter(weights, rank, self.shards) for rank in range(self.shards)]
        layout = AdapterLayout.from_matrices(parts[0].matrices(), self.page_elements)
        return AdapterInfo(name, path, weights.rank, weights.scale, weights.ranks(), layout), parts

    def _pack(self, info: AdapterInfo, parts: list[AdapterWeights]) -> PackedAdapter:
        pages = [pack_adapter(part, info.layout, self.dtype) for part in parts]
        stacked = pages[0] if self.shards == 1 else torch.stack(pages)
        return PackedAdapter(info, stacked, self.shards)

    def unregister(self, name: str) -> None:
        if name not in self.infos:
            raise AdapterError(f"lora_name: adapter {name!r} is not loaded")
        del self.infos[name]
        self.cache.pop(name, None)

    def is_cached(self, name: str) -> bool:
        return name in self.cache

    def fetch(self, name: str) -> PackedAdapter:
        """The packed adapter, from the host cache or (a miss) read again from disk."""
        if name in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(name)
            return self.cache[name]
        self.stats.misses += 1
        started = time.perf_counter()
        packed = self.load_packed(name, self.infos[name].path)
        self.stats.load_seconds += time.perf_counter() - started
        self._put(packed)
        return packed

    def put(self, packed: PackedAdapter) -> None:
        """Insert an adapter packed elsewhere (e.g. by the prefetcher) into the host LRU cache."""
        if packed.info.name not in self.infos:
            raise AdapterError(f"lora_name: adapter {packed.info.name!r} is not registered")
        self._put(packed)

    def _put(self, packed: PackedAdapter) -> None:
        self.cache[packed.info.name] = packed
        self.cache.move_to_end(packed.info.name)
        while self.cached_bytes() > self.host_cache_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)

    def cached_bytes(self) -> int:
        return sum(p.pages.numel() * p.pages.element_size() for p in self.cache.values())

"""Tiered adapter storage: a registry of adapters on disk and a host-memory LRU cache bounded in bytes.

Registering an adapter validates it fully (the weights are read once) and records what the scheduler
needs without the weights: its ranks, scale and page count. The cache keeps adapters packed in the
pool's page format, ready to copy into pool pages (or into shared memory for executor processes).

With a `HostArena` (the server) the cache lives in one shared-memory segment that executors page-lock
once: an adapter is packed straight into an extent reserved for it (`reserve` → fill off the event loop →
`commit`), a step that loads it only names the extent, and an extent read by a step in flight (`hold` up
to `release_through`) is never evicted or reused. Without an arena (the offline engine) `fetch` reads and
packs on a miss.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.engine.adapters import (
    AdapterError,
    AdapterWeights,
    adapter_errors,
    adapter_files_stamp,
    load_adapter,
    pack_adapter,
    shard_adapter,
    shard_matrices,
)
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.host_arena import HostArena
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
    files: tuple | None = None  # adapter_files_stamp of the directory when it was read (None: not from files)

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
    arena_offset: int | None = None  # where `pages` sits in the host arena (it is a view of it), if it does

    def for_rank(self, rank: int) -> torch.Tensor:
        return self.pages if self.shards == 1 else self.pages[rank]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0


@dataclass
class AdapterStore:
    """Disk registry + host LRU of packed adapters (at most `host_cache_bytes`, or the arena's capacity)."""

    model: ModelConfig
    page_elements: int
    dtype: torch.dtype
    max_rank: int
    host_cache_bytes: int = 8 << 30
    shards: int = 1
    infos: dict[str, AdapterInfo] = field(default_factory=dict)
    cache: OrderedDict[str, PackedAdapter] = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)
    arena: HostArena | None = None
    reserved: dict[str, PackedAdapter] = field(default_factory=dict)  # extents being filled
    busy: dict[str, int] = field(default_factory=dict)  # name -> last planned step that reads its extent
    _orphans: list[tuple[int, int]] = field(default_factory=list)  # (step, offset) freed once that step is done
    pool_pages: int | None = None  # pages of the device pool (set by the engine): an adapter must leave room for KV

    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate the PEFT directory and make it servable as `name` (replacing nothing). A directory is
        read, packed and cached; a `synthetic:` adapter (made in memory) is packed on first use."""
        self._check_new_name(name)
        return self.add(*self.prepare(name, str(path)))

    def prepare(self, name: str, path: str) -> tuple[AdapterInfo, PackedAdapter | None]:
        """`register`'s reading part, which touches no state (a worker thread may run it while the store is
        used): the adapter read and validated, and packed unless the arena's cache fills on demand (or it is
        `synthetic:`). AdapterError naming the field or tensor at fault."""
        info, weights = self._read(name, path)
        if self.arena is not None or info.path.startswith(SYNTHETIC_ADAPTER):
            return info, None
        return info, self._pack(info, weights)

    def add(self, info: AdapterInfo, packed: PackedAdapter | None) -> AdapterInfo:
        """`register`'s second part: make an adapter `prepare` read servable (AdapterError if its name is taken)."""
        self._check_new_name(info.name)
        self.infos[info.name] = info
        if packed is not None:
            self._put(packed)
        return info

    def register_packed(self, packed: PackedAdapter) -> AdapterInfo:
        """Make an adapter read, validated and packed elsewhere (by `load_packed` in a worker thread, e.g.
        on first use of an adapter under the adapter root) servable under its name, and cache its pages
        (with an arena: copied into an extent when one can be made now, else packed again on demand).
        AdapterError if the name is taken, the adapter is larger than the whole host cache or fills the pool."""
        name = packed.info.name
        self._check_new_name(name)
        self.check_fits(packed.info)
        self.infos[name] = packed.info
        if self.arena is None:
            self._put(packed)
            return packed.info
        try:
            target = self.reserve(name)
        except AdapterError:
            del self.infos[name]
            raise
        if target is not None:
            target.pages.copy_(packed.pages)
            self.commit(name, target.arena_offset)
        return packed.info

    def _check_new_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise AdapterError("lora_name: must be a non-empty string")
        if name in self.infos:
            raise AdapterError(f"lora_name: adapter {name!r} is already loaded")

    def check_fits(self, info: AdapterInfo) -> None:
        """AdapterError (naming `r`) if the adapter's pages fill the whole device pool: it could never run a
        request, each needs KV pages beside it. Runtime loads and first use under the adapter root are refused
        with it; start-up only warns (the demo's adapters with a small --num-pages)."""
        if self.pool_pages is not None and info.num_pages >= self.pool_pages:
            raise AdapterError(f"r: adapter {info.name!r} (rank {info.rank}, {len(info.ranks)} modules) needs "
                               f"{info.num_pages} pool pages, the pool has {self.pool_pages} and its requests "
                               "need KV pages beside it: serve it with more pages (--num-pages, GPU memory) or at "
                               "a lower rank")

    def load_packed(self, name: str, path: str) -> PackedAdapter:
        """Read, validate, shard (one part per tensor-parallel rank) and pack an adapter; touches no state."""
        return self._pack(*self._read(name, path))

    def _read(self, name: str, path: str) -> tuple[AdapterInfo, AdapterWeights]:
        """Read and validate; the page layout comes from the shards' shapes (nothing is sharded or copied
        here: registering N adapters at any tensor-parallel size costs what it costs at tp=1)."""
        with adapter_errors(path):
            stamp = adapter_files_stamp(path)
            weights = load_adapter(name, path, self.model, self.max_rank)
            if adapter_files_stamp(path) != stamp:
                raise AdapterError(f"lora_path: adapter {name!r} changed on disk while it was read; try again")
            layout = AdapterLayout.from_matrices(shard_matrices(weights, self.shards), self.page_elements)
            info = AdapterInfo(name, path, weights.rank, weights.scale, weights.ranks(), layout, stamp)
            return info, weights

    def _pack(self, info: AdapterInfo, weights: AdapterWeights) -> PackedAdapter:
        with adapter_errors(info.path):
            pages = [pack_adapter(shard_adapter(weights, rank, self.shards), info.layout, self.dtype)
                     for rank in range(self.shards)]
            stacked = pages[0] if self.shards == 1 else torch.stack(pages)
            return PackedAdapter(info, stacked, self.shards)

    def pack_into(self, target: PackedAdapter, path: str) -> None:
        """Read, validate and pack the adapter at `path` into `target.pages` (a reserved extent); touches no
        state, so a worker thread may run it. AdapterError if its files changed since it was registered (a
        different stamp, or another shape or scale): the pages must be the registered adapter's, never a mix of
        its registered scale and new weights."""
        info, weights = self._read(target.info.name, path)
        _check_unchanged(target.info, info)
        with adapter_errors(path):
            for rank in range(self.shards):
                pack_adapter(shard_adapter(weights, rank, self.shards), info.layout, self.dtype,
                             out=target.for_rank(rank))

    def packed_shape(self, info: AdapterInfo) -> tuple[int, ...]:
        """Shape of the packed pages: [layers, pages, page_elements], with a leading [ranks] when sharded."""
        shape = (self.model.num_layers, info.num_pages, self.page_elements)
        return shape if self.shards == 1 else (self.shards, *shape)

    def packed_bytes(self, name: str) -> int:
        """Host bytes of the packed adapter (all ranks' shards)."""
        count = 1
        for dim in self.packed_shape(self.infos[name]):
            count *= dim
        return count * self.dtype.itemsize

    def unregister(self, name: str) -> None:
        if name not in self.infos:
            raise AdapterError(f"lora_name: adapter {name!r} is not loaded")
        del self.infos[name]
        self._drop(name)
        reserved = self.reserved.pop(name, None)
        if reserved is not None:  # its fill is running in a worker: the extent is freed when it reports
            self._orphans.append((-1, reserved.arena_offset))

    # the arena: reserve → fill (elsewhere) → commit, and holds by steps in flight -----------------------
    def reserve(self, name: str, keep: set[str] = frozenset()) -> PackedAdapter | None:
        """An arena extent for adapter `name`'s packed pages (to fill with `pack_into`, then `commit`),
        evicting least recently used cached adapters that no step in flight reads and that are not in `keep`;
        None if no room can be made now."""
        assert self.arena is not None and name not in self.cache and name not in self.reserved
        info = self.infos[name]
        nbytes = self.packed_bytes(name)
        if nbytes > self.arena.capacity:
            raise AdapterError(f"lora_name: adapter {name!r} needs {nbytes} bytes, more than the host cache holds")
        offset = self.arena.allocate(nbytes)
        victims = [n for n in self.cache if n not in self.busy and n not in keep]
        while offset is None and victims:
            self._drop(victims.pop(0))
            offset = self.arena.allocate(nbytes)
        if offset is None:
            return None
        pages = self.arena.tensor(offset, self.dtype, self.packed_shape(info))
        packed = PackedAdapter(info, pages, self.shards, offset)
        self.reserved[name] = packed
        return packed

    def commit(self, name: str, offset: int) -> bool:
        """The extent at `offset` reserved for `name` is filled: it joins the cache (False, and the extent is
        freed, if the adapter was unregistered meanwhile)."""
        packed = self.reserved.get(name)
        if packed is None or packed.arena_offset != offset:
            self._release_orphan_fill(offset)
            return False
        del self.reserved[name]
        self.cache[name] = packed
        return True

    def abandon(self, name: str, offset: int) -> None:
        """The fill of the extent at `offset` reserved for `name` failed: free it."""
        packed = self.reserved.get(name)
        if packed is not None and packed.arena_offset == offset:
            del self.reserved[name]
            self.arena.release(offset)
        else:
            self._release_orphan_fill(offset)

    def _release_orphan_fill(self, offset: int) -> None:
        """A worker finished with an extent whose adapter was unregistered while it was filled: free it."""
        if (-1, offset) in self._orphans:
            self._orphans.remove((-1, offset))
            self.arena.release(offset)

    def hold(self, names: list[str], step: int) -> None:
        """Step `step` reads these adapters' extents (its loads): they stay until `release_through(step)`."""
        for name in names:
            self.busy[name] = step

    def release_through(self, step: int) -> None:
        """Steps up to `step` completed: their executors' copies from the extents are done."""
        self.busy = {name: s for name, s in self.busy.items() if s > step}
        keep = []
        for held, offset in self._orphans:
            if 0 <= held <= step:
                self.arena.release(offset)
            else:
                keep.append((held, offset))
        self._orphans = keep

    def _drop(self, name: str) -> None:
        """Take `name` out of the cache; its extent is freed now, or after the last step that reads it."""
        packed = self.cache.pop(name, None)
        if packed is None or packed.arena_offset is None:
            return
        if name in self.busy:
            self._orphans.append((self.busy.pop(name), packed.arena_offset))
        else:
            self.arena.release(packed.arena_offset)

    def is_cached(self, name: str) -> bool:
        return name in self.cache

    def fetch(self, name: str) -> PackedAdapter:
        """The packed adapter, from the host cache or (a miss, without an arena) read again from disk. With
        an arena a miss is an error: the server only plans loads of cached adapters."""
        if name in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(name)
            return self.cache[name]
        self.stats.misses += 1
        if self.arena is not None:
            raise AdapterError(f"lora_name: adapter {name!r} is not in the host cache")
        started = time.perf_counter()
        packed = self.load_packed(name, self.infos[name].path)
        _check_unchanged(self.infos[name], packed.info)
        self.stats.load_seconds += time.perf_counter() - started
        self._put(packed)
        return packed

    def put(self, packed: PackedAdapter) -> None:
        """Insert an adapter packed elsewhere (e.g. by the prefetcher) into the host LRU cache."""
        if packed.info.name not in self.infos:
            raise AdapterError(f"lora_name: adapter {packed.info.name!r} is not registered")
        assert self.arena is None, "with an arena adapters enter the cache through reserve/commit"
        self._put(packed)

    def _put(self, packed: PackedAdapter) -> None:
        self.cache[packed.info.name] = packed
        self.cache.move_to_end(packed.info.name)
        while self.cached_bytes() > self.host_cache_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)

    def cached_bytes(self) -> int:
        return sum(p.pages.numel() * p.pages.element_size() for p in self.cache.values())

    def is_ready(self, name: str) -> bool:
        """Whether a step may load `name` now: always without an arena (a miss is read in place), with one
        only once it is packed in the cache."""
        return self.arena is None or name in self.cache


def _check_unchanged(registered: AdapterInfo, read: AdapterInfo) -> None:
    """AdapterError unless `read` (the adapter read again from disk, e.g. to refill the host cache) is the
    adapter registered as `registered`: same files (stamp), shape and scale. Pages of new weights under the
    registered scale would serve an adapter that never existed."""
    if (read.files, read.layout, read.scale, read.ranks) != (registered.files, registered.layout, registered.scale,
                                                             registered.ranks):
        raise AdapterError(f"lora_path: adapter {read.name!r} changed on disk since it was registered (its files "
                           "were modified or replaced); load it again")

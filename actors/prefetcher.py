"""Prefetcher: loads the adapters that waiting requests need from disk into the host cache before the
scheduler stages them into pool pages, off the event loop (a worker thread), one at a time.

The scheduler sends `Prefetch({name: path})` for waiting requests' adapters missing from the host cache;
the prefetcher reads and packs each (the same validation and packing as AdapterStore.register) and sends
`AdapterFetched` back, which the scheduler inserts into the store's LRU. Counters go to the hub.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from lorafleet.actors.channels import Channel
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.schema import AdapterFetched, Prefetch
from lorafleet.engine.adapter_store import AdapterStore, PackedAdapter
from lorafleet.engine.adapters import AdapterError
from lorafleet.engine.config import ModelConfig


@dataclass(frozen=True)
class AdapterLoader:
    """Reads, validates and packs one PEFT directory exactly as the engine's AdapterStore does (through
    a private scratch store, so nothing the scheduler owns is touched; safe in a worker thread)."""

    model: ModelConfig
    page_elements: int
    dtype: torch.dtype
    max_rank: int
    shards: int = 1

    def load(self, name: str, path: str) -> PackedAdapter:
        scratch = AdapterStore(self.model, self.page_elements, self.dtype, self.max_rank, 1 << 62, shards=self.shards)
        return scratch.load_packed(name, path)


class PrefetcherActor:
    def __init__(self, loader: AdapterLoader, inbox: Channel, scheduler: Channel, hub: ServeHub) -> None:
        self.loader, self.inbox, self.scheduler, self.hub = loader, inbox, scheduler, hub

    async def run(self) -> None:
        while True:
            msg = await self.inbox.recv()
            if not isinstance(msg, Prefetch):
                raise TypeError(f"prefetcher got unexpected message {type(msg).__name__}")
            for name, path in msg.adapters.items():
                await self._fetch(name, path)

    async def _fetch(self, name: str, path: str) -> None:
        stats = self.hub.prefetch
        stats.requested += 1
        started = time.perf_counter()
        try:
            packed = await asyncio.to_thread(self.loader.load, name, path)
        except (AdapterError, OSError) as exc:
            stats.failed += 1
            print(f"lorafleet: prefetch of adapter {name!r} failed: {exc}", flush=True)
            return
        seconds = time.perf_counter() - started
        stats.loaded += 1
        stats.load_seconds += seconds
        self.scheduler.send(AdapterFetched(name, path, packed, seconds))

"""Prefetcher: reads and packs the adapters that waiting requests need, off the event loop (worker threads),
before the scheduler may load them into pool pages.

The scheduler sends `Prefetch` for waiting requests' adapters missing from the host cache. With the
server's host arena each comes with the extent reserved for it: a worker packs the adapter straight into
that page-locked shared memory (the same validation and packing as AdapterStore.register) and the
prefetcher answers `AdapterFetched`, after which the scheduler commits the extent to the cache; without an
arena the worker returns a packed tensor that the scheduler inserts. A failure answers `AdapterFetchFailed`
(the scheduler fails that adapter's requests). Up to `workers` adapters are packed at once. The
scheduler also asks it to read adapters under --adapter-root on first use (docs/adapters.md). Counters
go to the hub.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.actors.channels import Channel
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.logs import adapter_log, event
from lorafleet.actors.schema import AdapterFetched, AdapterFetchFailed, Prefetch
from lorafleet.engine.adapter_index import outside_root
from lorafleet.engine.adapter_store import AdapterStore, PackedAdapter
from lorafleet.engine.adapters import AdapterError
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.synthetic import SYNTHETIC_ADAPTER


@dataclass(frozen=True)
class AdapterLoader:
    """Reads, validates and packs one PEFT directory exactly as the engine's AdapterStore does (through
    a private scratch store, so nothing the scheduler owns is touched; safe in a worker thread)."""

    model: ModelConfig
    page_elements: int
    dtype: torch.dtype
    max_rank: int
    shards: int = 1
    root: str | None = None  # --adapter-root: a directory under it is read only while nothing in it links out

    def _scratch(self) -> AdapterStore:
        return AdapterStore(self.model, self.page_elements, self.dtype, self.max_rank, 1 << 62, shards=self.shards)

    def load(self, name: str, path: str) -> PackedAdapter:
        self._check_confined(path)
        return self._scratch().load_packed(name, path)

    def pack_into(self, target: PackedAdapter, path: str) -> PackedAdapter:
        """Pack the adapter at `path` into `target`'s pages (a reserved host-arena extent); returns `target`."""
        self._check_confined(path)
        self._scratch().pack_into(target, path)
        return target

    def _check_confined(self, path: str) -> None:
        check_confined(self.root, path)


def check_confined(root: str | Path | None, path: str) -> None:
    """AdapterError if `path` lies under the adapter root `root` and it, or a file read from it, now links
    outside the root: an adapter is read again from disk whenever the host cache refills it (and a runtime
    load reads it after the request was checked), and its files may have been replaced by links meanwhile
    (docs/adapters.md). A path outside the root (an --adapter NAME=DIR) is the operator's own."""
    if root is None or path.startswith(SYNTHETIC_ADAPTER):
        return
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.abspath(path)]) != real_root:  # by name: the path may be a link now
        return
    outside = outside_root(real_root, path)
    if outside is not None:
        raise AdapterError(f"lora_path: {outside!r} links outside the adapter root")


class PrefetcherActor:
    def __init__(self, loader: AdapterLoader, inbox: Channel, scheduler: Channel, hub: ServeHub,
                 workers: int = 1) -> None:
        self.loader, self.inbox, self.scheduler, self.hub = loader, inbox, scheduler, hub
        self.workers = asyncio.Semaphore(max(1, workers))

    async def run(self) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                msg = await self.inbox.recv()
                if not isinstance(msg, Prefetch):
                    raise TypeError(f"prefetcher got unexpected message {type(msg).__name__}")
                for name, path in msg.adapters.items():
                    await self.workers.acquire()
                    task = asyncio.create_task(self._fetch(name, path, msg.targets.get(name)), name=f"prefetch-{name}")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:  # the actor owns its fetches: cancel and await them
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, name: str, path: str, target: PackedAdapter | None) -> None:
        stats = self.hub.prefetch
        stats.requested += 1
        started = time.perf_counter()
        try:
            if target is None:
                packed = await asyncio.to_thread(self.loader.load, name, path)
            else:
                packed = await asyncio.to_thread(self.loader.pack_into, target, path)
        except Exception as exc:  # whatever reading the adapter raised fails that adapter's requests, not the actor
            if not isinstance(exc, (AdapterError, OSError, ValueError)):
                exc = AdapterError(f"{type(exc).__name__}: {exc}")
            stats.failed += 1
            event(adapter_log, f"prefetch of adapter {name!r} failed: {exc}", logging.WARNING, adapter=name)
            self.scheduler.send(AdapterFetchFailed(name, path, str(exc), target))
            return
        finally:
            self.workers.release()
        seconds = time.perf_counter() - started
        stats.loaded += 1
        stats.load_seconds += seconds
        event(adapter_log, "adapter read into the host cache", adapter=name, read_ms=round(seconds * 1e3, 1))
        self.scheduler.send(AdapterFetched(name, path, packed, seconds))

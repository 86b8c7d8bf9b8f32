"""The /ws/dashboard feed: a first full state, then deltas of only what changed.

The pool map travels as run-length-encoded owner codes (`[code, run, code, run, ...]`) with an owner-name
table that only grows within a generation (`owners_from` + `owners`), and later as patches of the
page ranges that changed. Adapter rows travel as changed rows only. All heavy work (encoding the pool,
building adapter rows, windowed percentiles) happens once per view and is shared by every connection.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from lorafleet.dashboard.prom import adapter_tiers
from lorafleet.dashboard.stats import EARLY_ABORTED, REJECTED, FleetStats
from lorafleet.engine.engine import EngineSnapshot

PATCH_GAP = 64  # changed pages closer than this share one patch


def rle(codes: np.ndarray) -> list[int]:
    """[code, run, code, run, ...] of an int array."""
    if codes.size == 0:
        return []
    starts = np.concatenate(([0], np.flatnonzero(np.diff(codes)) + 1))
    runs = np.diff(np.concatenate((starts, [codes.size])))
    out = np.empty(2 * starts.size, dtype=np.int64)
    out[0::2], out[1::2] = codes[starts], runs
    return out.tolist()


def unrle(runs: list[int]) -> list[int]:
    """The inverse of rle (tests and debugging)."""
    out: list[int] = []
    for code, run in zip(runs[0::2], runs[1::2]):
        out.extend([code] * run)
    return out


def patches(old: np.ndarray, new: np.ndarray) -> list[list]:
    """[[start, rle of new[start:end]], ...] covering every page where old and new differ."""
    changed = np.flatnonzero(old != new)
    if changed.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(changed) > PATCH_GAP)
    firsts = np.concatenate(([0], breaks + 1))
    lasts = np.concatenate((breaks, [changed.size - 1]))
    return [[int(changed[a]), rle(new[changed[a]: changed[b] + 1])] for a, b in zip(firsts, lasts)]


class OwnerTable:
    """Owner label → small int code; code 0 is free. Rebuilt (new generation) when it grows too large."""

    def __init__(self) -> None:
        self.generation = 0
        self.names: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def code(self, name: str) -> int:
        code = self.index.get(name)
        if code is None:
            code = self.index[name] = len(self.names)
            self.names.append(name)
        return code

    def encode(self, owners: list[str]) -> np.ndarray:
        if len(self.names) > max(4096, 4 * len(owners)):
            self.generation += 1
            self.names, self.index = [""], {"": 0}
        for name in dict.fromkeys(owners):  # first-seen order: codes do not depend on string hashing
            if name not in self.index:
                self.code(name)
        return np.fromiter(map(self.index.__getitem__, owners), dtype=np.int32, count=len(owners))


@dataclass
class View:
    """Everything one update needs, built once and shared by every connection."""

    at: float
    generation: int
    names: list[str]
    codes: np.ndarray
    engine: dict
    load: dict
    adapters: dict[str, list]
    occupancy: list[list[float]] = field(default_factory=list)


class Feed:
    """Builds Views from a FleetStats (cached for `min_interval` seconds)."""

    def __init__(self, stats: FleetStats, min_interval: float = 0.2) -> None:
        self.stats = stats
        self.owners = OwnerTable()
        self.min_interval = min_interval
        self._view: View | None = None
        self._encoded: tuple[EngineSnapshot | None, np.ndarray] = (None, np.zeros(0, dtype=np.int32))
        self._pages: tuple[np.ndarray | None, dict[str, int]] = (None, {})

    def view(self, now: float | None = None) -> View:
        now = time.time() if now is None else now
        if self._view is not None and now - self._view.at < self.min_interval:
            return self._view
        snap = self.stats.hub.snapshot
        codes = self._codes(snap)
        self._view = View(
            at=now, generation=self.owners.generation, names=self.owners.names, codes=codes,
            engine=self._engine(snap), load=self._load(now), adapters=self._adapters(snap, codes, now),
            occupancy=[list(o) for o in self.stats.occupancy],
        )
        return self._view

    def _codes(self, snap: EngineSnapshot | None) -> np.ndarray:
        if snap is None:
            return np.zeros(0, dtype=np.int32)
        if self._encoded[0] is not snap:
            self._encoded = (snap, self.owners.encode(snap.page_owner))
        return self._encoded[1]

    def _engine(self, snap: EngineSnapshot | None) -> dict:
        s = self.stats
        lookups = (snap.cache_hits + snap.cache_misses) if snap else 0
        return {
            "step": snap.step if snap else 0,
            "num_pages": snap.num_pages if snap else 0,
            "usage": dict(snap.usage) if snap else {"free": 0, "kv": 0, "adapter": 0},
            "evictions": snap.evictions if snap else 0,
            "preemptions": snap.preemptions if snap else 0,
            "waiting": len(snap.waiting) if snap else 0,
            "running": len(snap.running) if snap else 0,
            "cache_hits": snap.cache_hits if snap else 0,
            "cache_misses": snap.cache_misses if snap else 0,
            "host_hit_rate": snap.cache_hits / lookups if lookups else None,
            "prefetch_hits": s.prefetch_hits,
            "prefetch_misses": s.prefetch_misses,
            "prefetch_hit_rate": s.prefetch_hit_rate,
            "adapter_loads": s.adapter_loads,
            "tiers": adapter_tiers(snap, getattr(s.hub, "adapters", None)),
            **serving_extras(s.hub),
        }

    def _load(self, now: float) -> dict:
        s = self.stats
        out = asdict(s.summary(now))
        out.update(
            early_aborted=s.counter(EARLY_ABORTED), rejected=s.counter(REJECTED),
            succeeded=sum(s.success.values()), failed=sum(s.failures.values()),
            counters=dict(s.hub.counters), default_slo_ttft_ms=s.default_slo_ttft_ms,
        )
        return out

    def _adapters(self, snap: EngineSnapshot | None, codes: np.ndarray, now: float) -> dict[str, list]:
        """name → [tier, in_batch, running, waiting, requests, tokens, req/s, load ms, pages, loads]."""
        s = self.stats
        if snap is None:
            return {}
        pages = self._adapter_pages(codes)
        resident, cached = set(snap.resident_adapters), set(snap.host_cached_adapters)
        # the serving hub also lists adapters indexed under --adapter-root and not read yet (on disk)
        listed = list(getattr(s.hub, "adapters", None) or ())
        registered = set(snap.registered_adapters) | set(listed)
        running = _count(a for _, a in snap.running)
        waiting = _count(a for _, a in snap.waiting)
        rates = s.adapter_rates(now)
        rows = {}
        for name in dict.fromkeys([*snap.registered_adapters, *listed, *s.adapters]):
            totals = s.adapters.get(name)
            tier = "gpu" if name in resident else "host" if name in cached else "disk"
            if name not in registered:
                tier = "gone"
            wait = totals.mean_load_ms if totals else None
            rows[name] = [
                tier, int(name in running), running.get(name, 0), waiting.get(name, 0),
                totals.requests if totals else 0,
                (totals.prompt_tokens + totals.completion_tokens) if totals else 0,
                round(rates.get(name, 0.0), 3), None if wait is None else round(wait, 1),
                pages.get(name, 0), totals.loads if totals else 0,
            ]
        return rows

    def _adapter_pages(self, codes: np.ndarray) -> dict[str, int]:
        """Pages per adapter (computed once per encoded snapshot)."""
        if self._pages[0] is not codes:
            counts = np.bincount(codes) if codes.size else np.zeros(0, np.int64)
            names = self.owners.names
            pages = {names[c][8:]: int(counts[c]) for c in np.flatnonzero(counts) if names[c].startswith("adapter:")}
            self._pages = (codes, pages)
        return self._pages[1]


def serving_extras(hub: object) -> dict:
    """Health and the disk → host prefetcher's counters, when the serving layer's hub carries them."""
    out: dict = {}
    if hasattr(hub, "healthy"):
        out["health"] = {"healthy": bool(hub.healthy), "reason": str(getattr(hub, "health_reason", "")),
                         "draining": bool(getattr(hub, "draining", False))}
    prefetch = getattr(hub, "prefetch", None)
    if dataclasses.is_dataclass(prefetch) and not isinstance(prefetch, type):
        out["prefetcher"] = dataclasses.asdict(prefetch)
    return out


def _count(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        if name is not None:
            out[name] = out.get(name, 0) + 1
    return out


class Subscriber:
    """One connection's memory of what it was sent; `message()` returns the next frame's payload."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.sent: View | None = None
        self.names_sent = 0

    def message(self, now: float | None = None) -> dict:
        view = self.feed.view(now)
        prev = self.sent
        full = prev is None or prev.generation != view.generation or prev.codes.size != view.codes.size
        msg: dict = {"type": "snapshot" if full else "delta", "at": view.at, "engine": view.engine,
                     "load": view.load}
        if full:
            self.names_sent = 0
        msg["owners_from"] = self.names_sent
        msg["owners"] = view.names[self.names_sent:]
        self.names_sent = len(view.names)
        if full:
            msg["pool"] = rle(view.codes)
            msg["adapters"] = view.adapters
            msg["occupancy"] = view.occupancy
        else:
            msg["pool_patches"] = patches(prev.codes, view.codes)
            msg["adapters"] = {k: v for k, v in view.adapters.items() if prev.adapters.get(k) != v}
            msg["adapters_removed"] = [k for k in prev.adapters if k not in view.adapters]
            last = prev.occupancy[-1][0] if prev.occupancy else 0.0
            msg["occupancy"] = [o for o in view.occupancy if o[0] > last]
        self.sent = view
        return msg

"""Unified page pool bookkeeping: plain integers only, no tensors.

One pool of `num_pages` pages holds both KV cache blocks and adapter weights. A page id names the same
slot in every layer's buffer. Each page has at most one owner: a request's KV (`("kv", request_id)`) or a
resident adapter (`("adapter", name)`). Free pages are on the free list. The scheduler decides who gets
pages and whom to evict or preempt; this class only keeps the books and checks them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

KV = "kv"
ADAPTER = "adapter"


class OutOfPages(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


@dataclass
class PagePool:
    """Free list, per-request KV page tables, per-adapter page tables and the adapters' LRU order."""

    num_pages: int
    free: list[int] = field(init=False)
    owner: list[tuple[str, object] | None] = field(init=False)
    kv_pages: dict[int, list[int]] = field(default_factory=dict, init=False)
    adapter_pages: dict[str, list[int]] = field(default_factory=dict, init=False)
    lru: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False)
    pins: Counter[str] = field(default_factory=Counter, init=False)
    evictions: int = field(default=0, init=False)
    evicted_log: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_pages - 1, -1, -1))
        self.owner = [None] * self.num_pages

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, count: int, who: tuple[str, object]) -> list[int]:
        if count > len(self.free):
            raise OutOfPages(f"{who[0]} {who[1]!r} needs {count} pages, {len(self.free)} free")
        pages = [self.free.pop() for _ in range(count)]
        for page in pages:
            self.owner[page] = who
        return pages

    def _give_back(self, pages: list[int]) -> None:
        for page in pages:
            self.owner[page] = None
        self.free.extend(reversed(pages))

    # KV cache -------------------------------------------------------------------------------------
    def grow_kv(self, request_id: int, count: int) -> list[int]:
        """Append `count` new pages to the request's KV page table and return them."""
        pages = self._take(count, (KV, request_id))
        self.kv_pages.setdefault(request_id, []).extend(pages)
        return pages

    def free_kv(self, request_id: int) -> int:
        """Release all KV pages of the request; returns how many were freed."""
        pages = self.kv_pages.pop(request_id, [])
        self._give_back(pages)
        return len(pages)

    # adapters -------------------------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        return name in self.adapter_pages

    def load_adapter(self, name: str, count: int) -> list[int]:
        """Give a (non-resident) adapter `count` pages; it becomes the most recently used."""
        assert name not in self.adapter_pages, f"adapter {name!r} is already resident"
        pages = self._take(count, (ADAPTER, name))
        self.adapter_pages[name] = pages
        self.lru[name] = None
        return pages

    def touch(self, name: str) -> None:
        """Mark a resident adapter as just used."""
        self.lru.move_to_end(name)

    def pin(self, name: str) -> None:
        """A running request uses this adapter: it may not be evicted until unpinned."""
        assert name in self.adapter_pages, f"cannot pin non-resident adapter {name!r}"
        self.pins[name] += 1

    def unpin(self, name: str) -> None:
        assert self.pins[name] > 0, f"adapter {name!r} is not pinned"
        self.pins[name] -= 1
        if not self.pins[name]:
            del self.pins[name]

    def idle_adapters(self) -> list[str]:
        """Resident adapters no running request uses, least recently used first."""
        return [name for name in self.lru if not self.pins[name]]

    def evict_adapter(self, name: str) -> int:
        """Release an idle adapter's pages; returns how many were freed."""
        assert not self.pins[name], f"adapter {name!r} is pinned by a running request"
        pages = self.adapter_pages.pop(name)
        del self.lru[name]
        self._give_back(pages)
        self.evictions += 1
        self.evicted_log.append(name)
        return len(pages)

    def drain_evicted(self) -> list[str]:
        """Adapters evicted since the last call (executors drop their row tables for them)."""
        names, self.evicted_log = self.evicted_log, []
        return names

    # checks and views -----------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the books balance: every page is free xor owned by exactly the table that lists it."""
        seen: dict[int, tuple[str, object] | None] = {}
        tables = [((KV, r), p) for r, p in self.kv_pages.items()]
        tables += [((ADAPTER, n), p) for n, p in self.adapter_pages.items()]
        for who, pages in tables:
            for page in pages:
                assert page not in seen, f"page {page} owned by {seen[page]} and {who}"
                assert self.owner[page] == who, f"page {page}: owner {self.owner[page]} != table {who}"
                seen[page] = who
        for page in self.free:
            assert page not in seen, f"free page {page} is owned by {seen.get(page)}"
            assert self.owner[page] is None, f"free page {page} has owner {self.owner[page]}"
            seen[page] = None
        assert len(seen) == self.num_pages, f"{self.num_pages - len(seen)} pages unaccounted for"
        assert set(self.lru) == set(self.adapter_pages), "LRU and adapter tables disagree"

    def usage(self) -> dict[str, int]:
        """Pages by kind: free, kv, adapter."""
        kv = sum(len(p) for p in self.kv_pages.values())
        adapter = sum(len(p) for p in self.adapter_pages.values())
        return {"free": self.num_free, "kv": kv, "adapter": adapter}

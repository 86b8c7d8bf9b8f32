"""HostArena: one shared-memory segment that holds the host cache's packed adapters, allocated in extents.

The serving layer keeps every packed adapter of the host cache here, written once by the prefetcher's
worker threads. Executor processes map the segment once at start-up and page-lock it once
(`cudaHostRegister`), so staging a step's adapter loads is a reference (segment, offset), never a copy, and
their host→GPU copies are DMAs from page-locked memory.

Allocation is first fit over a sorted list of free extents (offset, size), coalesced on release; every
extent starts at a multiple of `ALIGN` bytes. Bookkeeping is plain integers under a lock (the scheduler
reserves and releases on the event loop; worker threads only write into extents they were given).
"""

from __future__ import annotations

import bisect
import os
import threading
from multiprocessing import shared_memory

import torch

ALIGN = 4096  # page-aligned extents: the DMA engine and vector copies like aligned sources


def _round_up(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask). A segment larger than
    this is created sparse but its writes fault (SIGBUS) once the file system is full."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class HostArena:
    """`capacity` bytes of shared memory with an extent allocator.

    `allocate(nbytes)` returns an offset or None (no free extent is large enough: the caller evicts and
    retries); `release(offset)` frees it; `tensor(offset, dtype, shape)` views an extent. `attach(name)`
    opens the segment in another process (read side: only `tensor` and `address` are used there)."""

    def __init__(self, capacity: int, name: str | None = None, create: bool = True) -> None:
        if capacity < ALIGN and create:
            raise ValueError(f"host cache: capacity must be at least {ALIGN} bytes, got {capacity}")
        self.segment = shared_memory.SharedMemory(name=name, create=create, size=_round_up(capacity) if create else 0)
        self.capacity = self.segment.size if not create else _round_up(capacity)
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if create else []
        self._used: dict[int, int] = {}  # offset -> size
        self._lock = threading.Lock()
        self._owner = create

    @classmethod
    def attach(cls, name: str) -> HostArena:
        return cls(0, name=name, create=False)

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a free extent of at least `nbytes` (first fit), or None if none is large enough."""
        size = _round_up(nbytes)
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + size, free - size)
                    self._used[offset] = size
                    return offset
        return None

    def release(self, offset: int) -> None:
        """Free the extent at `offset` (KeyError if it is not allocated), merging it with free neighbours."""
        with self._lock:
            size = self._used.pop(offset)
            i = bisect.bisect_left(self._free, (offset, 0))
            if i < len(self._free) and offset + size == self._free[i][0]:
                size += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
                del self._free[i - 1]
                i -= 1
            self._free.insert(i, (offset, size))

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """A view of `shape` elements of `dtype` at `offset` (no copy; valid while the extent is held)."""
        count = 1
        for dim in shape:
            count *= dim
        return torch.frombuffer(self.segment.buf, dtype=dtype, count=count, offset=offset).view(*shape)

    def check(self) -> None:
        """Invariants: free and used extents tile [0, capacity) without overlap; free ones are coalesced."""
        with self._lock:
            spans = sorted([*self._free, *self._used.items()])
            cursor = 0
            for offset, size in spans:
                assert offset == cursor and size > 0, f"extent ({offset}, {size}) at cursor {cursor}"
                cursor += size
            assert cursor == self.capacity, f"extents cover {cursor} of {self.capacity} bytes"
            for (a, sa), (b, _) in zip(self._free, self._free[1:]):
                assert a + sa < b, "adjacent free extents were not merged"

    def close(self) -> None:
        """Unmap the segment (once no view of it is alive); the creating side also unlinks it."""
        try:
            self.segment.close()
        except BufferError:  # a tensor still views it: the mapping goes with the process
            pass
        if self._owner:
            self.segment.unlink()

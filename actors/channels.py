"""Channels between actors: one interface, two kinds.

* `LocalChannel`: an asyncio queue inside the event-loop process (messages pass as objects).
* `RingChannel`: across processes. Frames (msgpack, see schema.py) go through a single-producer,
  single-consumer ring in `multiprocessing.shared_memory`; after writing a frame the producer writes one
  byte to a pipe, and the consumer, waiting on that pipe's fd (`loop.add_reader` in the event loop, a
  blocking read in an executor process), takes one frame per byte it reads. A closed pipe (the peer
  process died) ends the channel.

An actor only sees `send(msg)` and `await recv()`; it does not know which kind it talks to.

The ring's index protocol (docs/serving.md, "Shared-memory rings"): `head` (bytes consumed) and `tail`
(bytes produced) are monotonic 64-bit counters, each in its own 8-byte-aligned word (on its own cache line)
with exactly one writer: the producer writes `tail`, the consumer `head`. Each is published with one
atomic 8-byte store with release order and read with one atomic 8-byte load with acquire order (GCC's
libatomic `__atomic_store_8`/`__atomic_load_8`, the C11 primitives), so a reader sees either the old or the
new value, never a mix of their bytes. Ordering, in C11 terms:

* producer: copy the frame into [tail, tail+n) → store-release tail+n. A consumer whose load-acquire of
  tail returns tail+n synchronizes with that store, so the frame's bytes are visible to it.
* consumer: copy the frame out of [head, head+n) → store-release head+n. A producer whose load-acquire
  of head returns head+n synchronizes with it, so its later writes into those bytes cannot reach them
  before the consumer's copy read them (no overwrite of an unread frame).
* so `0 <= tail - head <= capacity` holds in every read of the pair; `ShmRing` checks it anyway and
  raises `RingCorrupted` (never a negative free space) if it ever failed.

Without libatomic (a system without GCC's runtime) the words are read and written through a native
`memoryview.cast("Q")`: one aligned 8-byte `memcpy`, a single load/store instruction on x86-64 and
aarch64 (single-copy atomic there), ordered by the x86-64 TSO model; `ATOMICS` names the backend in use.
The wake byte is a system call after the tail store, so it also orders the frame before its wake-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import select
import struct
import time
from multiprocessing import shared_memory
from typing import Protocol

from lorafleet.actors.schema import decode, encode

_HEAD, _TAIL = 0, 64  # byte offsets of the two index words (separate cache lines)
_HEADER_BYTES = 128
_LEN = struct.Struct("<I")
_ACQUIRE, _RELEASE = 2, 3  # C11 memory_order_acquire / memory_order_release, as GCC numbers them


def _load_libatomic() -> tuple | None:
    """(load, store): libatomic's `__atomic_load_8(ptr, order)` and `__atomic_store_8(ptr, value, order)`."""
    for name in ("libatomic.so.1", ctypes.util.find_library("atomic")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            load, store = getattr(lib, "__atomic_load_8"), getattr(lib, "__atomic_store_8")
        except (OSError, AttributeError):
            continue
        load.argtypes, load.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_uint64
        store.argtypes, store.restype = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int], None
        return load, store
    return None


_LIBATOMIC = _load_libatomic()
ATOMICS = "libatomic" if _LIBATOMIC is not None else "native-8-byte"


class ChannelClosed(ConnectionError):
    """The peer end is gone (process exited or channel closed)."""


class RingFull(RuntimeError):
    """The ring has no room for a frame now (the consumer is not keeping up); nothing was written.
    `never_fits`: the frame is larger than the whole ring (waiting cannot help)."""

    def __init__(self, message: str, never_fits: bool = False) -> None:
        super().__init__(message)
        self.never_fits = never_fits


class RingCorrupted(AssertionError):
    """The index pair broke `0 <= tail - head <= capacity` (impossible with atomic indices; never ignored)."""


class Channel(Protocol):
    def send(self, msg: object) -> None: ...

    async def recv(self) -> object: ...


class LocalChannel:
    """In-process mailbox: an unbounded asyncio queue of message objects."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def send(self, msg: object) -> None:
        self._queue.put_nowait(msg)

    async def recv(self) -> object:
        return await self._queue.get()

    def poll(self) -> object | None:
        """The next message if one is waiting, else None (never blocks)."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def qsize(self) -> int:
        return self._queue.qsize()


class IndexWords:
    """The ring's two index words: atomic 8-byte load-acquire / store-release (see the module docstring)."""

    def __init__(self, shm: shared_memory.SharedMemory, backend: str = ATOMICS) -> None:
        self.backend = backend
        self._words = shm.buf[:_HEADER_BYTES].cast("Q")  # native, 8-byte aligned (the mapping is page-aligned)
        view = ctypes.c_char.from_buffer(shm.buf)
        self._address = ctypes.addressof(view)
        del view  # release the export: only the address is kept, valid while the segment stays mapped
        assert self._address % 64 == 0, "shared memory segments are page-aligned"

    def load(self, offset: int) -> int:
        if self.backend == "libatomic":
            return _LIBATOMIC[0](self._address + offset, _ACQUIRE)
        return self._words[offset // 8]

    def store(self, offset: int, value: int) -> None:
        if self.backend == "libatomic":
            _LIBATOMIC[1](self._address + offset, value, _RELEASE)
        else:
            self._words[offset // 8] = value

    def release(self) -> None:
        self._words.release()


class ShmRing:
    """SPSC byte ring of length-prefixed frames in a shared memory segment (index protocol: module docs).

    `write` raises `RingFull` when the frame does not fit now (nothing written; the caller may wait and
    retry, or drop that one message); `read` returns None when the ring is empty.
    """

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool, backend: str = ATOMICS) -> None:
        self.shm, self.owner = shm, owner
        self.capacity = shm.size - _HEADER_BYTES
        self.index = IndexWords(shm, backend)
        self._data = shm.buf[_HEADER_BYTES:]

    @classmethod
    def create(cls, capacity: int = 4 << 20, backend: str = ATOMICS) -> ShmRing:
        shm = shared_memory.SharedMemory(create=True, size=capacity + _HEADER_BYTES)
        shm.buf[:_HEADER_BYTES] = bytes(_HEADER_BYTES)
        return cls(shm, owner=True, backend=backend)

    @classmethod
    def attach(cls, name: str, backend: str = ATOMICS) -> ShmRing:
        return cls(shared_memory.SharedMemory(name=name), owner=False, backend=backend)

    @property
    def name(self) -> str:
        return self.shm.name

    def used(self) -> int:
        """Bytes written and not yet consumed, from one atomic read of each index."""
        head = self.index.load(_HEAD)
        tail = self.index.load(_TAIL)
        return self._checked(head, tail)

    def free(self) -> int:
        return self.capacity - self.used()

    def fits(self, frame_bytes: int) -> bool:
        """Whether a frame of this many bytes fits now (the producer's view; only grows until it writes)."""
        return _LEN.size + frame_bytes <= self.free()

    def fits_empty(self, frame_bytes: int) -> bool:
        return _LEN.size + frame_bytes <= self.capacity

    def _checked(self, head: int, tail: int) -> int:
        used = tail - head
        if not 0 <= used <= self.capacity:
            raise RingCorrupted(f"ring indices out of order: head {head}, tail {tail}, capacity {self.capacity}")
        return used

    def write(self, frame: bytes) -> None:
        """Producer only. Raises RingFull (nothing written) when the frame does not fit now."""
        head = self.index.load(_HEAD)  # acquire: the consumer is done with every byte before it
        tail = self.index.load(_TAIL)  # our own last store
        free = self.capacity - self._checked(head, tail)
        need = _LEN.size + len(frame)
        if need > free:
            raise RingFull(f"frame of {len(frame)} bytes does not fit ({free} of {self.capacity} bytes free)",
                           never_fits=need > self.capacity)
        self._copy_in(tail, _LEN.pack(len(frame)))
        self._copy_in(tail + _LEN.size, frame)
        self.index.store(_TAIL, tail + need)  # release: publishes the frame

    def read(self) -> bytes | None:
        """Consumer only: the oldest frame, or None when the ring is empty."""
        tail = self.index.load(_TAIL)  # acquire: every frame before it is written
        head = self.index.load(_HEAD)  # our own last store
        if self._checked(head, tail) == 0:
            return None
        (length,) = _LEN.unpack(self._copy_out(head, _LEN.size))
        if _LEN.size + length > tail - head:
            raise RingCorrupted(f"frame of {length} bytes announced, {tail - head - _LEN.size} written")
        frame = self._copy_out(head + _LEN.size, length)
        self.index.store(_HEAD, head + _LEN.size + length)  # release: the frame's bytes may be reused
        return frame

    def _copy_in(self, position: int, data: bytes) -> None:
        start = position % self.capacity
        first = min(len(data), self.capacity - start)
        self._data[start:start + first] = data[:first]
        self._data[: len(data) - first] = data[first:]

    def _copy_out(self, position: int, length: int) -> bytes:
        start = position % self.capacity
        first = min(length, self.capacity - start)
        return bytes(self._data[start:start + first]) + bytes(self._data[: length - first])

    def close(self) -> None:
        self._data.release()
        self.index.release()
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def _take(ring: ShmRing) -> bytes:
    """The next frame, which a wake byte has announced (the byte is written after the frame's tail store)."""
    frame = ring.read()
    assert frame is not None, "a wake byte arrived without its frame"
    return frame


class RingChannel:
    """The event-loop end of a cross-process channel: sends on `tx`, receives from `rx`.

    `tx_wake` is the write end of the pipe the peer waits on; `rx_wake` the read end this end waits on.
    A decoding error or the peer's death surfaces from `recv()` as an exception.
    """

    def __init__(self, tx: ShmRing, rx: ShmRing, tx_wake: int, rx_wake: int) -> None:
        self.tx, self.rx, self.tx_wake, self.rx_wake = tx, rx, tx_wake, rx_wake
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        self._credits = 0
        os.set_blocking(rx_wake, False)
        asyncio.get_running_loop().add_reader(rx_wake, self._on_readable)

    def send(self, msg: object) -> None:
        """Send one message; RingFull (nothing sent, the channel stays usable) when it does not fit now."""
        self.send_frame(encode(msg))

    def send_frame(self, frame: bytes) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        self.tx.write(frame)
        try:
            os.write(self.tx_wake, b"\0")
        except BrokenPipeError as exc:
            raise ChannelClosed("the peer process is gone") from exc

    async def recv(self) -> object:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _on_readable(self) -> None:
        try:
            data = os.read(self.rx_wake, 65536)
        except BlockingIOError:
            return
        self._credits += len(data)
        while self._credits:
            self._credits -= 1
            try:
                self._inbox.put_nowait(decode(_take(self.rx)))
            except ValueError as exc:
                self._inbox.put_nowait(exc)
        if not data:
            self._stop_reading()
            self._inbox.put_nowait(ChannelClosed("the peer process closed its end"))

    def _stop_reading(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self.rx_wake)

    def close(self) -> None:
        self._stop_reading()
        for fd in (self.tx_wake, self.rx_wake):
            os.close(fd)


class RingEndpoint:
    """The blocking end used inside an executor process (no event loop there).

    `send` waits while the ring is full (the event loop is behind), sleeping 1 ms doubling to 50 ms between
    tries, for at most `full_timeout` seconds; then it raises RingFull (the executor's failure path).
    """

    def __init__(self, tx: ShmRing, rx: ShmRing, tx_wake: int, rx_wake: int, full_timeout: float = 60.0) -> None:
        self.tx, self.rx, self.tx_wake, self.rx_wake = tx, rx, tx_wake, rx_wake
        self.full_timeout = full_timeout
        self._credits = 0

    def send(self, msg: object) -> None:
        frame = encode(msg)
        deadline, pause = time.monotonic() + self.full_timeout, 0.001
        while True:
            try:
                self.tx.write(frame)
                break
            except RingFull:
                if time.monotonic() >= deadline or not self.tx.fits_empty(len(frame)):
                    raise
                time.sleep(pause)
                pause = min(0.05, pause * 2)
        os.write(self.tx_wake, b"\0")

    def recv(self, timeout: float | None = None) -> object | None:
        """Block until a message arrives (None after `timeout` seconds without one; 0: only look);
        ChannelClosed when the peer's wake pipe closes."""
        while not self._credits:
            if not select.select([self.rx_wake], [], [], timeout)[0]:
                return None
            data = os.read(self.rx_wake, 65536)
            if not data:
                raise ChannelClosed("the event-loop process closed its end")
            self._credits += len(data)
        self._credits -= 1
        return decode(_take(self.rx))

    def close(self) -> None:
        self.tx.close()
        self.rx.close()

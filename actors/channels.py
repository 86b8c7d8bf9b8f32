"""Channels between actors: one interface, two kinds.

* `LocalChannel`: an asyncio queue inside the event-loop process (messages pass as objects).
* `RingChannel`: across processes. Frames (msgpack, see schema.py) go through a single-producer,
  single-consumer ring in `multiprocessing.shared_memory`; after writing a frame the producer writes one
  byte to a pipe, and the consumer, waiting on that pipe's fd (`loop.add_reader` in the event loop, a
  blocking read in an executor process), takes one frame per byte it reads. A closed pipe (the peer
  process died) ends the channel.

An actor only sees `send(msg)` and `await recv()`; it does not know which kind it talks to.
"""

from __future__ import annotations

import asyncio
import os
import select
import struct
from multiprocessing import shared_memory
from typing import Protocol

from lorafleet.actors.schema import decode, encode

_HEADER = struct.Struct("<QQ")  # head (bytes consumed), tail (bytes produced): monotonic counters
_LEN = struct.Struct("<I")


class ChannelClosed(ConnectionError):
    """The peer end is gone (process exited or channel closed)."""


class RingFull(RuntimeError):
    """The ring has no room for a frame (the consumer is not keeping up)."""


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


class ShmRing:
    """SPSC byte ring of length-prefixed frames in a shared memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm, self.owner = shm, owner
        self.capacity = shm.size - _HEADER.size
        self._data = shm.buf[_HEADER.size:]

    @classmethod
    def create(cls, capacity: int = 4 << 20) -> ShmRing:
        shm = shared_memory.SharedMemory(create=True, size=capacity + _HEADER.size)
        _HEADER.pack_into(shm.buf, 0, 0, 0)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def write(self, frame: bytes) -> None:
        head, tail = _HEADER.unpack_from(self.shm.buf, 0)
        need = _LEN.size + len(frame)
        if need > self.capacity - (tail - head):
            raise RingFull(f"frame of {len(frame)} bytes does not fit ({self.capacity - (tail - head)} free)")
        self._copy_in(tail, _LEN.pack(len(frame)))
        self._copy_in(tail + _LEN.size, frame)
        struct.pack_into("<Q", self.shm.buf, 8, tail + need)

    def read(self) -> bytes | None:
        head, tail = _HEADER.unpack_from(self.shm.buf, 0)
        if head == tail:
            return None
        (length,) = _LEN.unpack(self._copy_out(head, _LEN.size))
        frame = self._copy_out(head + _LEN.size, length)
        struct.pack_into("<Q", self.shm.buf, 0, head + _LEN.size + length)
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
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def _take(ring: ShmRing) -> bytes:
    """The next frame, which a wake byte has announced. Frames are consumed only as wake bytes arrive:
    a wake byte is written (a system call) after its frame, so the frame's bytes are visible to this
    process when its byte is, even on CPUs that reorder plain stores to shared memory."""
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
        if self._closed:
            raise ChannelClosed("channel is closed")
        self.tx.write(encode(msg))
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
    """The blocking end used inside an executor process (no event loop there)."""

    def __init__(self, tx: ShmRing, rx: ShmRing, tx_wake: int, rx_wake: int) -> None:
        self.tx, self.rx, self.tx_wake, self.rx_wake = tx, rx, tx_wake, rx_wake
        self._credits = 0

    def send(self, msg: object) -> None:
        self.tx.write(encode(msg))
        os.write(self.tx_wake, b"\0")

    def recv(self) -> object:
        """Block until a message arrives; ChannelClosed when the peer's wake pipe closes."""
        while not self._credits:
            select.select([self.rx_wake], [], [])
            data = os.read(self.rx_wake, 65536)
            if not data:
                raise ChannelClosed("the event-loop process closed its end")
            self._credits += len(data)
        self._credits -= 1
        return decode(_take(self.rx))

    def close(self) -> None:
        self.tx.close()
        self.rx.close()

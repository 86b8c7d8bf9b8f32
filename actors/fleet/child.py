"""A fleet replica's own `lorafleet serve` child process on loopback, and the replica's connections to it.

`ServerChild` starts the child (`--host 127.0.0.1 --port 0` plus the fleet's per-replica server arguments),
drains its output, learns its URL from the ready line and dies with its parent (PR_SET_PDEATHSIG), so a
killed Ray replica never leaves a server behind. `ChildSocket` multiplexes many generations over ONE
WebSocket to the child's `/v1/stream`, each known by a fleet-unique id. Nothing here imports Ray or the
engine.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

READY_MARK = "ready on "
REPLICA_FAILED = "replica_failed"


class ReplicaDown(Exception):
    """The replica's server cannot take or finish a request (process gone, connection refused, 503 from a
    dead executor). Before the first byte reached the client the ingress retries elsewhere."""

    def __init__(self, replica: str, reason: str) -> None:
        super().__init__(replica, reason)
        self.replica, self.reason = replica, reason

    def __str__(self) -> str:
        return f"replica {self.replica}: {self.reason}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def server_keys(server_args: list[str]) -> tuple[str | None, str | None]:
    """(api key, admin key) the child will demand: from --api-key/--admin-key or the environment."""
    keys = {"--api-key": os.environ.get("LORAFLEET_API_KEY"), "--admin-key": os.environ.get("LORAFLEET_ADMIN_KEY")}
    for i, arg in enumerate(server_args):
        name, eq, value = arg.partition("=")
        if name in keys:
            keys[name] = value if eq else (server_args[i + 1] if i + 1 < len(server_args) else None)
    return keys["--api-key"], keys["--admin-key"]


class ServerChild:
    """One `lorafleet serve` process. `start()` blocks until its ready line (RuntimeError with the output's tail
    if it exits or times out first)."""

    def __init__(self, server_args: list[str], env: dict[str, str] | None = None, tail: int = 200) -> None:
        self.server_args = list(server_args)
        self.env = env
        self.lines: collections.deque[str] = collections.deque(maxlen=tail)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._ready = threading.Event()

    def start(self, timeout: float = 600.0) -> str:
        cmd = [sys.executable, "-m", "lorafleet", "serve", *self.server_args, "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(self.env or {})}, preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump, daemon=True, name="lorafleet-child-output").start()
        if not self._ready.wait(timeout) or not self.url:
            self.stop(timeout=5.0)
            raise RuntimeError("lorafleet serve did not start:\n" + self.output())
        return self.url

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY_MARK + "http://" in line and not self.url:
                self.url = line.rsplit(READY_MARK, 1)[1].split()[0]
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return "not started" if self.proc is None else ("running" if code is None else f"exited with {code}")

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ChildSocket:
    """Many generations over one WebSocket to the child's /v1/stream. `generate(frame)` yields that frame's
    replies (its `id` must be unique); when the socket breaks, every open generation gets one error frame
    with code `replica_failed`. Closing the iterator early sends a `cancel` for it."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.session, self.url, self.headers = session, url, headers
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.queues: dict[str, asyncio.Queue[dict]] = {}
        self.reader: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        async with self.lock:
            if self.ws is None or self.ws.closed:
                self.ws = await self.session.ws_connect(self.url, headers=self.headers, heartbeat=None,
                                                        max_msg_size=0)
                self.reader = asyncio.create_task(self._read(self.ws), name="lorafleet-child-socket")
            return self.ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = "the server's socket closed"
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                queue = self.queues.get(frame.get("id"))
                if queue is not None:
                    queue.put_nowait(frame)
        except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
            reason = f"the server's socket failed: {exc}"
        for cid, queue in list(self.queues.items()):
            queue.put_nowait({"type": "error", "id": cid, "error": {"code": REPLICA_FAILED, "message": reason,
                                                                    "param": None}})

    async def generate(self, frame: dict[str, Any]) -> AsyncIterator[dict]:
        """Send `frame` and yield the child's frames for its id until done/error."""
        cid = frame["id"]
        queue: asyncio.Queue[dict] = asyncio.Queue()
        self.queues[cid] = queue
        finished = False
        try:
            ws = await self._connect()
            await ws.send_str(json.dumps(frame, separators=(",", ":")))
            while True:
                reply = await queue.get()
                finished = reply.get("type") == "error" or (reply.get("type") == "done"
                                                             and not reply.get("remaining"))  # n: one done per choice
                yield reply
                if finished:
                    return
        finally:
            self.queues.pop(cid, None)
            if not finished and self.ws is not None and not self.ws.closed:
                await _quiet(self.ws.send_str(json.dumps({"type": "cancel", "id": cid})))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def _quiet(coro) -> None:
    try:
        await coro
    except (aiohttp.ClientError, ConnectionError, RuntimeError):
        pass

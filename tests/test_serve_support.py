"""Helpers for the serving tests (no tests here): synthetic assets, a real `lorafleet serve` subprocess
on a free loopback port, a WebSocket client that runs many generations on one socket, and the offline
truth (the in-process `LLM`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp

from lorafleet.loadgen.launch import Launched, launch, stop

RANKS = (1, 2, 3, 4, 6, 8, 12, 16)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
START_TIMEOUT = 300.0


def write_assets(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(model dir, adapter root, {name: dir}) — a tiny Llama and 8 adapters of different ranks/targets."""
    from lorafleet.engine.synthetic import write_adapter, write_model

    model = write_model("tiny", root / "model")
    adapter_root = root / "adapters"
    adapters = {}
    for i, rank in enumerate(RANKS):
        name = f"a{i}-r{rank}"
        targets = ALL if i % 2 else ATTN
        adapters[name] = write_adapter(adapter_root / name, model, rank, targets=targets, seed=100 + i, std=0.2)
    return model, adapter_root, adapters


def workload(adapters: list[str], count: int = 32) -> list[tuple[str, str | None]]:
    """`count` (prompt, adapter) pairs: every adapter several times, some base-only."""
    names: list[str | None] = [*adapters, None]
    return [(f"req {i}: " + "lorafleet " * (i % 5) + chr(65 + i % 26), names[i % len(names)]) for i in range(count)]


def offline_truth(model: Path, adapters: dict[str, Path], work: list[tuple[str, str | None]],
                  max_tokens: int) -> list[dict]:
    from lorafleet.engine import LLM

    llm = LLM(str(model), adapters={k: str(v) for k, v in adapters.items()})
    results = llm.generate([p for p, _ in work], adapters=[a for _, a in work], max_tokens=max_tokens,
                           temperature=0.0)
    return [{"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason} for r in results]


class ServerProc(Launched):
    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/stream"


def start_server(args: list[str], env: dict[str, str] | None = None) -> ServerProc:
    """Start `python -m lorafleet serve --port 0 ...` and wait for its ready line."""
    cmd = [sys.executable, "-m", "lorafleet", "serve", "--host", "127.0.0.1", "--port", "0", "--torch-threads", "1",
           *args]
    started = launch(cmd, {**os.environ, **(env or {})}, timeout=START_TIMEOUT)
    return ServerProc(started.proc, started.url, started.lines)


def stop_server(server: ServerProc, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
    """Signal the server and wait for it; kills it (and fails loudly) if it does not exit."""
    code = stop(server.proc, sig, timeout)
    assert code is not None, "server did not exit after the signal:\n" + server.output()
    return code


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


# WebSocket client ------------------------------------------------------------------------------------
class WsClient:
    """Runs generations on one socket; collects every frame per id until its done/error."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, binary: bool = False) -> None:
        self.ws, self.binary = ws, binary
        self.frames: dict[str | None, list[dict]] = {}
        self.ended: dict[str, asyncio.Future] = {}
        self.errors_without_id: list[dict] = []

    async def send(self, frame: dict) -> None:
        if self.binary:
            import msgpack

            await self.ws.send_bytes(msgpack.packb(frame))
        else:
            await self.ws.send_str(json.dumps(frame))

    async def send_raw(self, text: str) -> None:
        await self.ws.send_str(text)

    def expect(self, cid: str) -> asyncio.Future:
        return self.ended.setdefault(cid, asyncio.get_running_loop().create_future())

    async def read_loop(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                import msgpack

                frame = msgpack.unpackb(msg.data)
            else:
                break
            cid = frame.get("id")
            self.frames.setdefault(cid, []).append(frame)
            if cid is None:
                self.errors_without_id.append(frame)
                fut = self.ended.get("__noid__")
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            elif frame["type"] in ("done", "error"):
                fut = self.expect(cid)
                if not fut.done():
                    fut.set_result(frame)

    def result(self, cid: str) -> dict:
        """token_ids / text / finish_reason assembled from the frames of `cid`."""
        frames = self.frames.get(cid, [])
        deltas = [f for f in frames if f["type"] == "delta"]
        end = frames[-1] if frames else {}
        return {"token_ids": [t for f in deltas for t in f["token_ids"]], "text": "".join(f["text"] for f in deltas),
                "finish_reason": end.get("finish_reason"), "types": [f["type"] for f in frames], "end": end}


async def get_json(session: aiohttp.ClientSession, url: str, headers: dict | None = None) -> tuple[int, dict]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def post_json(session: aiohttp.ClientSession, url: str, body: object,
                    headers: dict | None = None) -> tuple[int, dict, dict]:
    async with session.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def wait_state(session: aiohttp.ClientSession, url: str, predicate, headers: dict | None = None,
                     timeout: float = 30.0) -> dict:
    """Poll /v1/debug/state until `predicate(snapshot)` holds; returns that snapshot (fails on timeout)."""
    deadline = time.monotonic() + timeout
    snapshot = None
    while time.monotonic() < deadline:
        _, body = await get_json(session, url + "/v1/debug/state", headers)
        snapshot = body["snapshot"]
        if snapshot is not None and predicate(snapshot):
            return snapshot
        await asyncio.sleep(0.1)
    raise AssertionError(f"engine state never reached the expected condition; last: {snapshot}")

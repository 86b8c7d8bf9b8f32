"""Serving under trouble, over real sockets: overload answers 429, a killed executor turns in-flight
requests into errors and /health into 503 and the server exits non-zero, SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
from test_serve_support import WsClient, get_json, start_server, stop_server, wait_gone
from test_serve_support import write_assets as _write_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    model, adapter_root, adapters = _write_assets(tmp_path_factory.mktemp("reliability"))
    return model, adapters


def _adapter_args(adapters) -> list[str]:
    return [arg for name, path in list(adapters.items())[:2] for arg in ("--adapter", f"{name}={path}")]


async def test_overload_gets_429_with_retry_after(assets):
    model, adapters = assets
    server = start_server(["--model", str(model), *_adapter_args(adapters), "--max-queue", "1", "--max-num-seqs", "1"])
    try:
        body = {"prompt": "overload", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, dict, str | None]:
                async with session.post(server.url + "/v1/completions", json=body) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            answers = await asyncio.gather(*[one() for _ in range(6)])
    finally:
        assert stop_server(server) == 0, server.output()
    refused = [(body, retry) for status, body, retry in answers if status == 429]
    served = [body for status, body, _ in answers if status == 200]
    assert refused and served, answers
    assert len(served) + len(refused) == 6
    assert all(b["error"]["code"] == "queue_full" and b["error"]["type"] == "rate_limit_error" for b, _ in refused)
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused)
    assert all(b["usage"]["completion_tokens"] == 300 for b in served)


async def test_killed_executor_errors_503_and_exit_nonzero(assets):
    model, adapters = assets
    server = start_server(["--model", str(model), *_adapter_args(adapters), "--failure-linger", "60"])
    try:
        async with aiohttp.ClientSession() as session:
            status, health = await get_json(session, server.url + "/health")
            assert status == 200 and health["status"] == "ok"
            executor_pid = health["executors"][0]["pid"]
            async with session.ws_connect(server.ws_url) as ws:
                client = WsClient(ws)
                reader = asyncio.create_task(client.read_loop())
                for i in range(4):
                    await client.send({"type": "generate", "id": f"k{i}", "prompt": f"kill {i}", "max_tokens": 900,
                                       "ignore_eos": True})
                while not any(f["type"] == "delta" for f in client.frames.get("k0", [])):
                    await asyncio.sleep(0.02)
                os.kill(executor_pid, signal.SIGKILL)
                ends = await asyncio.wait_for(asyncio.gather(*[client.expect(f"k{i}") for i in range(4)]), 60)
                status, health = await get_json(session, server.url + "/health")
                async with session.post(server.url + "/v1/completions", json={"prompt": "after"}) as resp:
                    after = resp.status, (await resp.json())["error"]["code"]
                await ws.close()
                await reader
    finally:
        code = stop_server(server)
    assert [e["type"] for e in ends] == ["error"] * 4
    assert {e["error"]["code"] for e in ends} == {"executor_failed"}
    assert status == 503 and health["status"] == "unhealthy"
    assert after == (503, "executor_failed")
    assert code == 3, server.output()


async def test_sigterm_drains_in_flight_then_exits_zero(assets):
    model, adapters = assets
    server = start_server(["--model", str(model), *_adapter_args(adapters), "--drain-timeout", "120"])
    executor_pid = None
    try:
        async with aiohttp.ClientSession() as session:
            executor_pid = (await get_json(session, server.url + "/health"))[1]["executors"][0]["pid"]
            async with session.ws_connect(server.ws_url) as ws:
                client = WsClient(ws)
                reader = asyncio.create_task(client.read_loop())
                await client.send({"type": "generate", "id": "d0", "prompt": "drain", "max_tokens": 200,
                                   "ignore_eos": True})
                while not any(f["type"] == "delta" for f in client.frames.get("d0", [])):
                    await asyncio.sleep(0.02)
                server.proc.send_signal(signal.SIGTERM)
                end = await asyncio.wait_for(client.expect("d0"), 120)
                await reader
    finally:
        code = stop_server(server)
    assert end["type"] == "done" and end["finish_reason"] == "length"
    assert end["usage"]["completion_tokens"] == 200
    assert code == 0, server.output()
    assert executor_pid is not None and wait_gone(executor_pid)

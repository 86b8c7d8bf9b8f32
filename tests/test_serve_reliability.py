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


KEY = "k-123"
BEARER = {"Authorization": f"Bearer {KEY}"}


async def _post(session, url: str, body: dict, headers: dict | None = BEARER) -> tuple[int, dict, str | None]:
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def test_limits_api_key_overload_429_and_slo_early_abort(assets):
    model, adapters = assets
    server = start_server(["--model", str(model), *_adapter_args(adapters), "--max-queue", "1", "--max-num-seqs", "1",
                           "--api-key", KEY])
    long = {"prompt": "overload", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    try:
        async with aiohttp.ClientSession() as session:
            unauthorized = await _post(session, server.url, long, headers=None)
            answers = await asyncio.gather(*[_post(session, server.url, long) for _ in range(6)])
            slo_answers = await _slo_cases(session, server)
    finally:
        assert stop_server(server) == 0, server.output()
    assert unauthorized[0] == 401 and unauthorized[1]["error"]["code"] == "invalid_api_key"
    refused = [(body, retry) for status, body, retry in answers if status == 429]
    served = [body for status, body, _ in answers if status == 200]
    assert refused and served and len(served) + len(refused) == 6, answers
    assert all(b["error"]["code"] == "queue_full" and b["error"]["type"] == "rate_limit_error" for b, _ in refused)
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused)
    assert all(b["usage"]["completion_tokens"] == 300 for b in served)
    refused_now, dropped = slo_answers
    assert refused_now[0] == 429 and refused_now[1]["error"]["code"] == "slo_unattainable"
    assert refused_now[1]["error"]["param"] == "slo_ttft_ms" and refused_now[2] is not None
    assert dropped["type"] == "error" and dropped["error"]["code"] == "slo_unattainable"


async def _slo_cases(session, server) -> tuple[tuple, dict]:
    """While one long request holds the only sequence slot: a 0.001 ms SLO is refused at admission (any
    measured step is longer); a 300 ms SLO passes admission but waits behind it and is dropped."""
    async with session.ws_connect(server.ws_url, headers=BEARER) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        await client.send({"type": "generate", "id": "hog", "prompt": "hog", "max_tokens": 900, "ignore_eos": True})
        while sum(f["type"] == "delta" for f in client.frames.get("hog", [])) < 3:
            await asyncio.sleep(0.02)
        refused_now = await _post(session, server.url, {"prompt": "x", "max_tokens": 2, "slo_ttft_ms": 0.001})
        await client.send({"type": "generate", "id": "late", "prompt": "x", "max_tokens": 2, "slo_ttft_ms": 300})
        dropped = await asyncio.wait_for(client.expect("late"), 60)
        await client.send({"type": "cancel", "id": "hog"})
        await asyncio.wait_for(client.expect("hog"), 60)
        await ws.close()
        await reader
    return refused_now, dropped


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


async def test_executor_dying_while_idle_is_noticed_at_once(assets):
    model, adapters = assets
    server = start_server(["--model", str(model), "--failure-linger", "60"])
    try:
        async with aiohttp.ClientSession() as session:
            executor_pid = (await get_json(session, server.url + "/health"))[1]["executors"][0]["pid"]
            os.kill(executor_pid, signal.SIGKILL)
            deadline = asyncio.get_running_loop().time() + 60
            status, health = await get_json(session, server.url + "/health")
            while status == 200 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
                status, health = await get_json(session, server.url + "/health")
    finally:
        code = stop_server(server)
    assert status == 503 and "exited" in health["reason"], health
    assert health["executors"][0]["alive"] is False
    assert code == 3, server.output()


async def test_executor_restart_resumes_serving_with_adapters(assets):
    model, adapters = assets
    name = next(iter(adapters))
    server = start_server(["--model", str(model), *_adapter_args(adapters), "--executor-restarts", "1"])
    body = {"model": name, "prompt": "same answer twice", "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    try:
        async with aiohttp.ClientSession() as session:
            before = await _post(session, server.url, body, headers=None)
            first_pid = (await get_json(session, server.url + "/health"))[1]["executors"][0]["pid"]
            async with session.ws_connect(server.ws_url) as ws:
                client = WsClient(ws)
                reader = asyncio.create_task(client.read_loop())
                await client.send({"type": "generate", "id": "x", "model": name, "prompt": "long", "max_tokens": 900,
                                   "ignore_eos": True})
                while not any(f["type"] == "delta" for f in client.frames.get("x", [])):
                    await asyncio.sleep(0.02)
                os.kill(first_pid, signal.SIGKILL)
                failed = await asyncio.wait_for(client.expect("x"), 60)
                await ws.close()
                await reader
            health = await _wait_healthy(session, server.url)
            after = await _post(session, server.url, body, headers=None)
    finally:
        code = stop_server(server)
    assert failed["type"] == "error" and failed["error"]["code"] == "executor_failed"
    assert health["executors"][0]["pid"] != first_pid and health["executors"][0]["alive"]
    assert before[0] == after[0] == 200
    assert after[1]["choices"][0]["token_ids"] == before[1]["choices"][0]["token_ids"]
    assert code == 0, server.output()
    assert wait_gone(first_pid) and wait_gone(health["executors"][0]["pid"])


async def _wait_healthy(session, url: str, timeout: float = 300.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        status, health = await get_json(session, url + "/health")
        if status == 200:
            return health
        await asyncio.sleep(0.2)
    raise AssertionError(f"the server never became healthy again: {health}")

"""The server under a frozen executor and at shutdown, over real sockets: the step watchdog (SIGSTOP the
executor: /health 503 "executor stalled", SIGCONT: 200 again and the generation completes; a stall that
lasts kills the executor: executor_failed errors, exit 3) and the exit codes (a drain cut at the deadline
ends requests with server_shutting_down errors and exits 4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aiohttp
import pytest
from test_serve_support import WsClient, get_json, start_server, stop_server
from test_serve_support import write_assets as _write_assets

from lorafleet.actors.serve import EXIT_CODES, EXIT_DRAIN_CUT, EXIT_EXECUTOR_FAILED, parse_args
from lorafleet.actors.watchdog import FAILED, OK, STALLED, StepWatchdog


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _write_assets(tmp_path_factory.mktemp("robust"))[0]


def test_watchdog_states():
    dog = StepWatchdog(stall_s=2.0, kill_after_s=10.0)
    assert dog.state(None, 1e9) == OK  # no step outstanding: an idle executor is never stalled
    assert dog.state(100.0, 101.9) == OK
    assert dog.state(100.0, 102.0) == STALLED
    assert dog.state(100.0, 110.0) == FAILED
    assert StepWatchdog(2.0, 0.0).state(0.0, 1e6) == STALLED  # 0: never kill
    with pytest.raises(ValueError, match="--stall-timeout"):
        StepWatchdog(0.0)


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert EXIT_CODES.strip() in out
    for code in ("0  clean shutdown", "3  executor failure", "4  drain cut"):
        assert code in out


async def _health_until(session, url: str, status: int, timeout: float = 30.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got, health = await get_json(session, url + "/health")
        if got == status or asyncio.get_running_loop().time() > deadline:
            assert got == status, health
            return health
        await asyncio.sleep(0.05)


async def _first_delta(client: WsClient, cid: str) -> None:
    while not any(f["type"] == "delta" for f in client.frames.get(cid, [])):
        assert not any(f["type"] == "error" for f in client.frames.get(cid, [])), client.frames[cid]
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _streaming(server, cid: str, prompt: str, max_tokens: int):
    """A WebSocket generation `cid` that has streamed its first delta; yields (session, client, the executor's
    pid). On leaving, it waits for the server to close the socket (the tests end the server inside)."""
    async with aiohttp.ClientSession() as session:
        pid = (await get_json(session, server.url + "/health"))[1]["executors"][0]["pid"]
        async with session.ws_connect(server.ws_url) as ws:
            client = WsClient(ws)
            reader = asyncio.create_task(client.read_loop())
            await client.send({"type": "generate", "id": cid, "prompt": prompt, "max_tokens": max_tokens,
                               "ignore_eos": True})
            await _first_delta(client, cid)
            yield session, client, pid
            await reader


async def test_sigstop_executor_503_then_recovers_and_a_cut_drain_exits_4(model):
    server = start_server(["--model", str(model), "--stall-timeout", "1", "--stall-kill-after", "0",
                           "--drain-timeout", "1"])
    try:
        async with _streaming(server, "s", "stall", 300) as (session, client, pid):
            os.kill(pid, signal.SIGSTOP)
            try:
                stalled = await _health_until(session, server.url, 503)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = await _health_until(session, server.url, 200)
            survived = await asyncio.wait_for(client.expect("s"), 120)
            # the drain deadline: a long WS generation and a non-streamed completion are cut
            await client.send({"type": "generate", "id": "cut", "prompt": "long", "max_tokens": 900,
                               "ignore_eos": True})
            await _first_delta(client, "cut")
            http = asyncio.create_task(session.post(server.url + "/v1/completions", json={
                "prompt": "long too", "max_tokens": 900, "ignore_eos": True}))
            await asyncio.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            cut = await asyncio.wait_for(client.expect("cut"), 60)
            resp = await asyncio.wait_for(http, 60)
            http_cut = resp.status, await resp.json()
    finally:
        code = stop_server(server)
    assert stalled["status"] == "unhealthy" and "executor stalled" in stalled["reason"], stalled
    assert resumed["status"] == "ok"
    assert survived["type"] == "done" and survived["usage"]["completion_tokens"] == 300
    assert "executor stalled" in server.output() and "executor resumed" in server.output()
    assert cut["type"] == "error" and cut["error"]["code"] == "server_shutting_down", cut
    assert "drain" in cut["error"]["message"]
    assert http_cut[0] == 503 and http_cut[1]["error"]["code"] == "server_shutting_down", http_cut
    assert code == EXIT_DRAIN_CUT, server.output()


async def test_a_lasting_stall_kills_the_executor_and_exits_3(model):
    server = start_server(["--model", str(model), "--stall-timeout", "0.5", "--stall-kill-after", "2",
                           "--failure-linger", "0.5"])
    try:
        async with _streaming(server, "k", "stall", 900) as (_, client, pid):
            os.kill(pid, signal.SIGSTOP)
            failed = await asyncio.wait_for(client.expect("k"), 60)
        code = await asyncio.to_thread(server.proc.wait, 60)
    finally:
        stop_server(server)
    assert failed["type"] == "error" and failed["error"]["code"] == "executor_failed", failed
    assert "stalled" in failed["error"]["message"]
    assert code == EXIT_EXECUTOR_FAILED, server.output()


def _deltas(client: WsClient, cid: str) -> int:
    return sum(f["type"] == "delta" for f in client.frames.get(cid, []))


async def test_a_group_sigterm_drains_and_an_executor_dying_in_the_drain_exits_3(model):
    """A supervisor or a terminal signals the whole process group (systemd's default KillMode, Ctrl-C): the
    executor ignores SIGTERM/SIGINT and the server drains through it (the generation goes on). An executor
    that then dies during the drain ends the generation with executor_failed and the exit code says 3, not 0."""
    server = start_server(["--model", str(model), "--drain-timeout", "120"])
    try:
        async with _streaming(server, "g", "group", 900) as (_, client, pid):
            for sig in (signal.SIGINT, signal.SIGTERM):
                os.kill(pid, sig)
            server.proc.send_signal(signal.SIGTERM)
            seen = _deltas(client, "g")
            async with asyncio.timeout(60):  # the executor lives on: the generation keeps streaming
                while _deltas(client, "g") < seen + 20:
                    assert not any(f["type"] == "error" for f in client.frames["g"]), client.frames["g"]
                    await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            died = await asyncio.wait_for(client.expect("g"), 60)
        code = await asyncio.to_thread(server.proc.wait, 60)
    finally:
        stop_server(server)
    assert died["type"] == "error" and died["error"]["code"] == "executor_failed", died
    assert code == EXIT_EXECUTOR_FAILED, server.output()[-3000:]

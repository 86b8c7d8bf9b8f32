"""A live `lorafleet serve` (the demo model, its tokenizer dropping U+200B as some normalizers drop invisible
characters) against a careless or hostile client, over real sockets:

- bytes that are not valid HTTP (over-long request line or header, bad chunk size, Content-Length and
  Transfer-Encoding together, ...) get aiohttp's 400, and the server log says so in one INFO line, never
  "Error handling request" with a traceback (any client could fill the log with those);
- a prompt whose text tokenizes to no tokens is a 400 naming the prompt (its index in a list), on WS and HTTP;
- the dashboard's feed socket ignores what a client sends besides `{"type":"resync"}` (text nested too deeply
  to parse killed the handler), a resync flood costs one snapshot per tick, and an over-size frame closes only
  that socket.

Meanwhile a canary generation on another socket keeps its answer."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket

import aiohttp
import pytest
from test_serve_support import start_server, stop_server

ZWSP = "\u200b"
CANARY = {"model": "upper", "prompt": "canary line\n", "max_tokens": 16, "temperature": 0}
MALFORMED_HTTP = {
    "request line over the limit": b"GET /dashboard?api_key=" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over the limit": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 10_000 + b"\r\n\r\n",
    "header without a colon": b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "bad chunk size": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
    "non-numeric Content-Length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "Content-Length with chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n{}",
    "unknown HTTP version": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lorafleet.engine.demo import demo_adapter_dirs, demo_model_dir

    model = shutil.copytree(demo_model_dir(), tmp_path_factory.mktemp("hostile") / "model")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": ZWSP}, "content": ""}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).encode(ZWSP * 3) == []  # the tokenizer really drops it
    proc = start_server(["--model", str(model), "--adapter", f"upper={demo_adapter_dirs()['upper']}"])
    yield proc
    assert stop_server(proc) == 0, proc.output()[-5000:]


async def _canary(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_json({"type": "generate", "id": "canary", **CANARY})
        text = ""
        async for msg in ws:
            frame = json.loads(msg.data)
            text += frame.get("text", "") if frame["type"] == "delta" else ""
            if frame["type"] in ("done", "error"):
                assert frame["type"] == "done", frame
                return text
    raise AssertionError("the canary's socket closed")


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


async def test_malformed_http_is_a_400_and_one_log_line_without_a_traceback(server):
    before = await _canary(server.ws_url)
    port = int(server.url.rsplit(":", 1)[1])
    for name, data in MALFORMED_HTTP.items():
        status = _raw(port, data).split(b"\r\n", 1)[0]
        assert re.match(rb"HTTP/1\.[01] 400 ", status), (name, status)
    assert await _canary(server.ws_url) == before == "CANARY LINE\n"
    await asyncio.sleep(0.5)  # the log lines are flushed by the server's own loop
    output = server.output()
    assert "Traceback" not in output and "Error handling request" not in output, output[-3000:]
    assert output.count("malformed HTTP request refused") == len(MALFORMED_HTTP), output[-3000:]


async def test_a_prompt_that_tokenizes_to_nothing_is_400_naming_it(server):
    async with aiohttp.ClientSession() as session:
        cases = [(ZWSP * 3, "prompt"), (["ab\n", ZWSP], "prompt[1]")]
        for path, (prompt, param) in [("/v1/completions", case) for case in cases] + [("/tokenize", cases[0])]:
            body = {"prompt": prompt, "max_tokens": 2} if path != "/tokenize" else {"prompt": prompt}
            async with session.post(server.url + path, json=body) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and error["param"] == param, error
                assert "tokenizes to no tokens" in error["message"], error
        async with session.ws_connect(server.ws_url) as ws:
            for i, (prompt, param) in enumerate(cases):
                await ws.send_json({"type": "generate", "id": f"e{i}", "prompt": prompt, "max_tokens": 2})
                frame = await ws.receive_json(timeout=30)
                assert frame["type"] == "error" and frame["id"] == f"e{i}", frame
                assert frame["error"]["param"] == param and "no tokens" in frame["error"]["message"], frame
            await ws.send_json({"type": "generate", "id": "ok", **CANARY})  # the same socket goes on
            frames = [await ws.receive_json(timeout=30)]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(await ws.receive_json(timeout=30))
            assert frames[-1]["type"] == "done", frames[-1]
            assert "".join(f.get("text", "") for f in frames) == "CANARY LINE\n"


async def _frames(ws, seconds: float) -> list[dict]:
    frames: list[dict] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if msg.type != aiohttp.WSMsgType.TEXT:  # closed
            break
        frames.append(json.loads(msg.data))
    return frames


async def test_the_dashboard_feed_ignores_garbage_and_coalesces_a_resync_flood(server):
    async with aiohttp.ClientSession() as session:
        for query in ("?api_key=%ZZ", "?api_key=%00%ff&api_key=2", "?" + "x" * 4000):
            async with session.get(server.url + "/dashboard" + query) as resp:
                assert resp.status == 200, query
        async with session.ws_connect(server.url + "/ws/dashboard", max_msg_size=0) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            for junk in ("[" * 50_000, "not json", "null", '"resync"', '{"type": 5}', "x" * 60_000):
                await ws.send_str(junk)
            await ws.send_bytes(b"\x00\xff")
            for _ in range(2000):
                await ws.send_str('{"type":"resync"}')
            frames = await _frames(ws, 2.0)
            assert not ws.closed and len(frames) >= 4, frames[-1:]  # the feed goes on (>= 2 frames/s)
            snapshots = sum(f["type"] == "snapshot" for f in frames)
            assert 1 <= snapshots <= 3, [f["type"] for f in frames]  # one per tick while resyncs arrive, not 2000
            assert frames[-1]["type"] == "delta"
        async with session.ws_connect(server.url + "/ws/dashboard") as big:
            await big.receive_json(timeout=10)
            await big.send_str("x" * 100_000)  # over the feed's 64 KiB frame limit: only this socket closes
            await _frames(big, 5.0)
            assert big.closed and big.close_code == 1009, big.close_code
        async with session.ws_connect(server.url + "/ws/dashboard") as again:
            assert (await again.receive_json(timeout=10))["type"] == "snapshot"
    assert await _canary(server.ws_url) == "CANARY LINE\n"


async def test_a_first_token_deadline_missed_after_admission_names_slo_ttft_ms(server):
    """Refused at admission or dropped after `accepted`, the error names the field and shows the deadline as sent
    (a 0.5 ms deadline was shown as '0 ms' or '2 ms', and the dropped request's error named no field)."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.ws_url) as ws:
            await ws.send_json({"type": "generate", "id": "late", **CANARY, "slo_ttft_ms": 0.5})
            frames = [await ws.receive_json(timeout=30)]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(await ws.receive_json(timeout=30))
        error = frames[-1]["error"]
        assert error["code"] == "slo_unattainable" and error["param"] == "slo_ttft_ms", frames
        assert "past the 0.5 ms first-token deadline" in error["message"] or "over the 0.5 ms" in error["message"]
        async with session.post(server.url + "/v1/completions", json={**CANARY, "slo_ttft_ms": 0.5}) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 429 and error["param"] == "slo_ttft_ms" and "0.5 ms" in error["message"], error

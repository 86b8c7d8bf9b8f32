"""The loadgen's network clients against a scripted in-process server (errors, aborts, multiplexing)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from lorafleet.loadgen.clients import ClientConfig, list_models, run_workload, split_models
from lorafleet.loadgen.results import summarize
from lorafleet.loadgen.workload import RequestSpec


class Script:
    """A fake server whose behaviour per request is chosen by the request's model name."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.ws_frames: list[dict] = []
        self.sockets = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model, n = body["model"], body["max_tokens"]
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
        if model == "busy":
            return web.json_response(
                {"error": {"message": "queue full", "type": "x", "code": "queue_full"}}, status=429
            )
        if model == "bad":
            return web.Response(status=503, text="down")
        self.enter()
        try:
            return await self._stream(request, model, n)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, model: str, n: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: object) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if model == "abort":
            await send({"error": {"message": "cannot meet the SLO", "code": "early_abort"}})
            await resp.write(b"data: [DONE]\n\n")
            return resp
        for i in range(n):
            await asyncio.sleep(0.01)
            await send({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]})
            if model == "midfail" and i == 1:
                await send({"error": {"message": "executor died", "code": "executor_died"}})
                await resp.write(b"data: [DONE]\n\n")
                return resp
            if model == "trunc" and i == 0:
                return resp
        await send({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        await send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets += 1
        await ws.send_str("not json at all")  # the client must survive a malformed frame
        tasks = []
        async for msg in ws:
            frame = json.loads(msg.data)
            self.ws_frames.append(frame)
            if frame["type"] == "generate":
                tasks.append(asyncio.create_task(self._generate(ws, frame)))
        await asyncio.gather(*tasks, return_exceptions=True)
        return ws

    async def _generate(self, ws: web.WebSocketResponse, frame: dict) -> None:
        rid, model, n = frame["id"], frame["model"], frame["max_tokens"]
        if model == "reject":
            await ws.send_json({"type": "error", "id": rid, "error": {"code": "model_not_found", "message": "?"}})
            return
        await ws.send_json({"type": "accepted", "id": rid})
        if model == "hang":
            return
        if model == "abort":
            await ws.send_json({"type": "error", "id": rid, "error": {"code": "early_abort", "message": "slo"}})
            return
        sent = 0
        while sent < n:
            step = min(2, n - sent)  # two tokens per delta frame
            await ws.send_json({"type": "delta", "id": rid, "text": "ab", "token_ids": list(range(step))})
            sent += step
            if model == "midfail":
                await ws.send_json({"type": "error", "id": rid, "error": {"code": "executor_died", "message": "x"}})
                return
            await asyncio.sleep(0.01)
        await ws.send_json(
            {
                "type": "done",
                "id": rid,
                "finish_reason": "length",
                "usage": {"prompt_tokens": 4, "completion_tokens": n},
                "timing": {"ttft_ms": 1.0},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "base", "parent": None},
                    {"id": "ok", "parent": "base"},
                    {"id": "x", "parent": "base"},
                ],
            }
        )


@pytest.fixture
async def fake_server():
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/completions", script.completions)
    app.router.add_get("/v1/stream", script.stream)
    app.router.add_get("/v1/models", script.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield script, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _specs(models: list[str], max_tokens: int = 4) -> list[RequestSpec]:
    return [
        RequestSpec(index=i, arrival_s=0.01 * i, adapter=m, prompt=[1, 2, 3], input_len=3, max_tokens=max_tokens)
        for i, m in enumerate(models)
    ]


async def test_openai_stream_records_tokens_and_every_error_kind(fake_server) -> None:
    script, url = fake_server
    models = ["ok", "busy", "bad", "midfail", "trunc", "abort", "ok"]
    out = await run_workload(_specs(models), ClientConfig(url=url, protocol="openai"))
    rec = {m: r for m, r in zip(models, out.records, strict=True)}
    ok = out.records[0]
    assert ok.ok and ok.output_tokens == 4 and len(ok.token_times) == 4 and ok.finish_reason == "length"
    assert ok.send_s <= ok.token_times[0] <= ok.token_times[-1] <= ok.done_s and ok.prompt_tokens == 3
    assert (rec["busy"].error_code, rec["busy"].http_status, rec["busy"].mid_stream) == (
        "queue_full",
        429,
        False,
    )
    assert (rec["bad"].error_code, rec["bad"].http_status) == ("http_503", 503)
    assert (rec["midfail"].error_code, rec["midfail"].mid_stream, rec["midfail"].output_tokens) == (
        "executor_died",
        True,
        2,
    )
    assert (rec["trunc"].error_code, rec["trunc"].mid_stream) == ("stream_truncated", True)
    assert rec["abort"].error_code == "early_abort" and not rec["abort"].token_times
    metrics = summarize(out.records, out.duration_s, slo_ttft_s=60.0)
    assert metrics["completed"] == 2 and metrics["failed"] == 5
    assert metrics["errors_by_code"] == {
        "early_abort": 1,
        "executor_died": 1,
        "http_503": 1,
        "queue_full": 1,
        "stream_truncated": 1,
    }
    assert metrics["mid_stream_errors"] == 3 and metrics["early_aborts"] == 1
    assert metrics["output_tokens"] == 8 and metrics["slo_attainment"] == pytest.approx(2 / 7)


async def test_websocket_multiplexes_requests_over_sockets(fake_server) -> None:
    script, url = fake_server
    models = ["ok", "reject", "midfail", "abort", "ok", "ok"]
    specs = _specs(models, max_tokens=5)
    cfg = ClientConfig(url=url, protocol="ws", num_sockets=2, slo_ttft_ms=1500.0)
    out = await run_workload(specs, cfg)
    assert script.sockets == 2
    generates = [f for f in script.ws_frames if f["type"] == "generate"]
    assert sorted(f["id"] for f in generates) == [f"r{i}" for i in range(6)]
    assert all(f["ignore_eos"] is True and f["slo_ttft_ms"] == 1500.0 for f in generates)
    for record in (out.records[0], out.records[4], out.records[5]):
        assert record.ok and record.output_tokens == 5 and len(record.token_times) == 5
        assert record.server_timing["ttft_ms"] == 1.0
    assert (out.records[1].error_code, out.records[1].mid_stream) == ("model_not_found", False)
    assert (out.records[2].error_code, out.records[2].mid_stream) == ("executor_died", True)
    assert (out.records[3].error_code, out.records[3].mid_stream) == ("early_abort", True)
    assert len(out.protocol_errors) == 2 and "malformed" in out.protocol_errors[0]


async def test_ws_timeout_cancels_the_request(fake_server) -> None:
    script, url = fake_server
    out = await run_workload(_specs(["hang", "ok"]), ClientConfig(url=url, protocol="ws", request_timeout_s=0.5))
    assert out.records[0].error_code == "client_timeout" and out.records[1].ok
    assert {"type": "cancel", "id": "r0"} in script.ws_frames


async def test_max_concurrency_bounds_requests_in_flight(fake_server) -> None:
    script, url = fake_server
    specs = [
        RequestSpec(index=i, arrival_s=0.0, adapter="ok", prompt="hi", input_len=1, max_tokens=5) for i in range(8)
    ]
    out = await run_workload(specs, ClientConfig(url=url, protocol="openai", max_concurrency=2))
    assert all(r.ok for r in out.records)
    assert script.max_in_flight <= 2


async def test_models_discovery(fake_server) -> None:
    _, url = fake_server
    assert split_models(await list_models(url)) == ("base", ["ok", "x"])
    assert split_models([{"id": "b"}, {"id": "l1"}]) == ("b", ["l1"])


def test_connection_refused_is_recorded() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    out = asyncio.run(run_workload(_specs(["ok"]), ClientConfig(url=f"http://127.0.0.1:{port}", protocol="openai")))
    assert out.records[0].error_code == "connection_error"


@pytest.mark.parametrize("protocol", ["ws", "openai"])
async def test_drain_timeout_abandons_unfinished_requests(fake_server, protocol: str) -> None:
    script, url = fake_server
    # "ok" with 400 tokens streams for ~4 s on the fake server; the drain deadline is 0.3 s after arrival
    specs = [
        RequestSpec(index=0, arrival_s=0.0, adapter="ok", prompt=[1], input_len=1, max_tokens=2),
        RequestSpec(index=1, arrival_s=0.05, adapter="ok", prompt=[1], input_len=1, max_tokens=400),
    ]
    cfg = ClientConfig(url=url, protocol=protocol, drain_timeout_s=0.3)
    out = await run_workload(specs, cfg)
    assert out.records[0].ok
    slow = out.records[1]
    assert slow.error_code == "drain_timeout" and slow.mid_stream and 0 < slow.output_tokens < 400
    if protocol == "ws":  # the server read the cancel before the socket's close handshake finished
        assert {"type": "cancel", "id": "r1"} in script.ws_frames


async def test_drain_timeout_counts_requests_never_sent(fake_server) -> None:
    _, url = fake_server
    specs = [
        RequestSpec(index=i, arrival_s=0.0, adapter="ok", prompt=[1], input_len=1, max_tokens=300) for i in range(3)
    ]
    cfg = ClientConfig(url=url, protocol="openai", max_concurrency=1, drain_timeout_s=0.2)
    out = await run_workload(specs, cfg)
    assert [r.error_code for r in out.records] == ["drain_timeout"] * 3
    assert [r.send_s is None for r in out.records] == [False, True, True]
    assert summarize(out.records, out.duration_s, 1.0)["errors_by_code"] == {"drain_timeout": 3}

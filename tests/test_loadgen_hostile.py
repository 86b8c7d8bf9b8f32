"""`lorafleet loadgen` / `bench` given nonsense: arguments, trace files and servers that are dead, silent or
answer garbage. Every case must end with one clear line (naming the flag, the trace line and field, or what the
server did) and the documented exit status, never a traceback. The servers are real sockets on loopback: a
listener that accepts and never answers, and an aiohttp app whose /v1/models, WebSocket and SSE answers are
malformed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from lorafleet.loadgen import bench, peft_server
from lorafleet.loadgen.cli import main

TRACE_OK = {"arrival_s": 0.0, "prompt": [5, 6], "max_tokens": 2}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out, err[-3000:]
    return rc, err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--rate", "inf"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--duration", "inf"], "--duration"),
        (["--duration", "-1"], "--duration"),
        (["--alpha", "inf"], "--alpha"),
        (["--cv", "1e10"], "--cv"),  # Gamma gaps underflow to 0: the arrival loop never ended
        (["--cv", "1e-200"], "--cv"),  # 1/cv^2 overflows
        (["--seed", "-1"], "--seed"),
        (["--num-adapters", "-1"], "--num-adapters"),  # was names[:-1], silently
        (["--num-sockets", "0"], "--num-sockets"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--slo-ttft-ms", "-1"], "--slo-ttft-ms"),  # was sent, and every request refused by the server
        (["--temperature", "nan"], "--temperature"),
        (["--base-fraction", "2"], "--base-fraction"),
        (["--url", "notaurl"], "--url"),
        (["--url", "ftp://host"], "--url"),
        (["--url", "http://host:99999"], "--url"),
        (["--url", "http://host:8000/?x=1"], "--url"),
        (["--rate", "1000", "--duration", "100000"], "1,000,000"),  # would draw 1e8 requests into memory
    ],
)
def test_nonsense_arguments_exit_2_naming_the_flag(argv, names, capsys) -> None:
    rc, err = _run(["--dry-run", "--num-adapters", "2", *argv], capsys)
    assert rc == 2 and names in err and err.count("\n") == 1, err


def test_adapter_names_are_read_without_the_spaces_around_commas(tmp_path) -> None:
    trace = tmp_path / "t.jsonl"
    assert main(["--dry-run", "--adapters", " upper, reverse ,", "--duration", "20", "--rate", "2",
                 "--write-trace", str(trace)]) == 0
    header = json.loads(trace.read_text().splitlines()[0])
    assert header["config"]["adapters"] == ["upper", "reverse"], header


@pytest.mark.parametrize("flag", ["--out", "--plot", "--write-trace"])
def test_unwritable_outputs_are_refused_before_the_run(flag, tmp_path, capsys) -> None:
    # the url is a port nobody listens on: a refusal that came after trying to run would be exit 1
    port = _free_port()
    for path in (tmp_path / "missing" / "x.json", tmp_path):
        rc, err = _run(["--url", f"http://127.0.0.1:{port}", flag, str(path), "--no-progress"], capsys)
        assert rc == 2 and flag in err and str(path) in err, err


def test_bench_refuses_an_unwritable_out_before_starting_servers(tmp_path, capsys) -> None:
    rc = bench.main(["--backend", "lorafleet", "--model", "synthetic:tiny", "--out", str(tmp_path / "no" / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "Traceback" not in err, err


def test_bench_append_to_a_file_that_is_not_a_bench_result_exits_2(tmp_path, capsys) -> None:
    for content in (b"root:x:0:0\n", b"\xff\xfe", b"[1, 2]", b'{"schema": "other"}'):
        (tmp_path / "b.json").write_bytes(content)
        rc = bench.main(["--backend", "lorafleet", "--url", "http://127.0.0.1:1", "--append", "--out",
                         str(tmp_path / "b.json")])
        err = capsys.readouterr().err
        assert rc == 2 and "--append" in err and err.count("\n") == 1, (content, err)


@pytest.mark.parametrize("argv", [["--model", "synthetic:tiny"], ["--model", "nonexistent-dir"]])
def test_the_peft_baseline_refuses_a_model_that_is_not_a_directory_in_one_line(argv, tmp_path, capsys) -> None:
    """bench starts it as a subprocess and shows its last lines: a traceback from transformers was all it had."""
    (tmp_path / "adapter").mkdir()
    for extra in ([], ["--adapter", f"a={tmp_path / 'adapter'}"]):
        rc = peft_server.main([*argv, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "--model" in err and "config.json" in err and err.count("\n") == 1, err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert peft_server.main(["--model", str(model), "--adapter", f"a={tmp_path / 'adapter'}"]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "adapter_config.json" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"not json", "invalid JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({**TRACE_OK, "max_tokens": 1.5}).encode(), "'max_tokens'"),
        (json.dumps({**TRACE_OK, "max_tokens": True}).encode(), "'max_tokens'"),
        (json.dumps({**TRACE_OK, "max_tokens": "3"}).encode(), "'max_tokens'"),
        (json.dumps({**TRACE_OK, "max_tokens": 0}).encode(), "'max_tokens'"),
        (b'{"arrival_s": NaN, "prompt": [5], "max_tokens": 2}', "'arrival_s'"),
        (b'{"arrival_s": Infinity, "prompt": [5], "max_tokens": 2}', "'arrival_s'"),
        (json.dumps({**TRACE_OK, "arrival_s": -1}).encode(), "'arrival_s'"),
        (json.dumps({**TRACE_OK, "arrival_s": "soon"}).encode(), "'arrival_s'"),
        (json.dumps({**TRACE_OK, "index": "7"}).encode(), "'index'"),
        (json.dumps({**TRACE_OK, "index": 1.5}).encode(), "'index'"),
        (json.dumps({**TRACE_OK, "input_len": 0}).encode(), "'input_len'"),
        (json.dumps({**TRACE_OK, "prompt": ""}).encode(), "'prompt'"),
        (json.dumps({**TRACE_OK, "prompt": []}).encode(), "'prompt'"),
        (json.dumps({**TRACE_OK, "prompt": [1, -2]}).encode(), "'prompt'"),
        (json.dumps({**TRACE_OK, "prompt": [1, True]}).encode(), "'prompt'"),
        (json.dumps({**TRACE_OK, "adapter": 5}).encode(), "'adapter'"),
        (json.dumps({"arrival_s": 0, "prompt": [5]}).encode(), "'max_tokens'"),
        (json.dumps({"format": "other/9"}).encode(), "unknown format"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_a_bad_trace_exits_2_naming_the_line_and_field(line, expected, tmp_path, capsys) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(json.dumps(TRACE_OK).encode() + b"\n" + line + b"\n")
    rc, err = _run(["--dry-run", "--trace", str(trace)], capsys)
    assert rc == 2 and expected in err and err.count("\n") == 1, err
    if expected.startswith("'"):
        assert "trace line 2" in err, err


@pytest.mark.parametrize("what", ["missing", "folder", "empty"])
def test_an_unreadable_or_empty_trace_exits_2(what, tmp_path, capsys) -> None:
    trace = {"missing": tmp_path / "nope.jsonl", "folder": tmp_path, "empty": tmp_path / "e.jsonl"}[what]
    if what == "empty":
        trace.write_text("\n\n")
    port = _free_port()
    rc, err = _run(["--url", f"http://127.0.0.1:{port}", "--trace", str(trace), "--no-progress"], capsys)
    assert rc == 2 and str(trace) in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A listener that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


def test_a_dead_server_exits_1_with_one_line(capsys) -> None:
    rc, err = _run(["--url", f"http://127.0.0.1:{_free_port()}", "--duration", "2", "--no-progress"], capsys)
    assert rc == 1 and "could not list the server's models" in err and "Cannot connect" in err, err


def test_a_silent_server_exits_1_saying_it_did_not_answer(silent_server, capsys) -> None:
    argv = ["--url", f"http://127.0.0.1:{silent_server}", "--duration", "2", "--request-timeout", "1", "--no-progress"]
    rc, err = _run(argv, capsys)
    assert rc == 1 and "no answer within 1 s" in err, err


class GarbageServer:
    """An aiohttp server on its own thread whose answers are malformed in the way `mode` says."""

    def __init__(self, models: object, ws: str = "garbage", sse: list[bytes] | None = None) -> None:
        self.models, self.ws, self.sse = models, ws, sse or []
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> GarbageServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/stream", self._stream)
        app.router.add_post("/v1/completions", self._completions)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def _models(self, request: web.Request) -> web.StreamResponse:
        if isinstance(self.models, bytes):
            return web.Response(body=self.models, content_type="text/html")
        return web.json_response(self.models)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self.ws == "refuse":
            return web.Response(text="no websockets here")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame.get("type") != "generate":
                continue
            cid = frame["id"]
            for bad in ("not json", "[1]", "5", json.dumps({"type": "error", "id": "unknown", "error": "boom"}),
                        "[" * 50_000, json.dumps({"type": "accepted", "id": cid}),
                        json.dumps({"type": "delta", "id": cid, "text": 5, "token_ids": "x"})):
                await ws.send_str(bad)
            usage = {"completion_tokens": "many"} if cid == "r0" else {"completion_tokens": [1]}
            await ws.send_str(json.dumps({"type": "done", "id": cid, "finish_reason": "stop", "usage": usage}))
        return ws

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        body = await request.json()
        chunk = self.sse[int(body["prompt"][0]) % len(self.sse)]
        await resp.write(b"data: " + chunk + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


MODELS = {"data": [1, "x", None, {"id": 5}, {"no": "id"}, {"id": "base", "parent": None, "max_model_len": 64,
                                                             "vocab_size": 50}, {"id": "a", "parent": "base"}]}


@pytest.mark.parametrize(("models", "expected"), [
    (b"<html>not json</html>", "is not JSON"),
    ({"data": "everything"}, "no 'data' list"),
    ([1, 2], "no 'data' list"),
])
def test_a_server_with_a_malformed_model_list_exits_1_saying_so(models, expected, capsys) -> None:
    with GarbageServer(models) as server:
        rc, err = _run(["--url", f"http://127.0.0.1:{server.port}", "--duration", "2", "--no-progress"], capsys)
    assert rc == 1 and expected in err, err


def test_a_refused_websocket_handshake_exits_1_with_one_line(capsys) -> None:
    with GarbageServer(MODELS, ws="refuse") as server:
        argv = ["--url", f"http://127.0.0.1:{server.port}", "--rate", "5", "--duration", "2", "--no-progress"]
        rc, err = _run(argv, capsys)
    assert rc == 1 and "could not open the WebSocket" in err, err


def test_garbage_ws_frames_fail_their_requests_and_the_run_ends(tmp_path, capsys) -> None:
    """Model entries that are not objects are skipped; frames that are not JSON, not objects, too deep, or of a
    request but wrongly typed become protocol errors and `bad_frame` failures; the run ends and writes results."""
    out = tmp_path / "r.json"
    with GarbageServer(MODELS) as server:
        argv = ["--url", f"http://127.0.0.1:{server.port}", "--rate", "4", "--duration", "1", "--no-progress",
                "--request-timeout", "20", "--out", str(out)]
        rc, err = _run(argv, capsys)
    result = json.loads(out.read_text())
    assert rc == 1 and result["metrics"]["failed"] == result["metrics"]["num_requests"] > 0, err
    assert set(result["metrics"]["errors_by_code"]) == {"bad_frame"}, result["metrics"]
    assert any("malformed frame" in p for p in result["protocol_errors"]), result["protocol_errors"]
    assert result["config"]["base_model"] == "base" and result["config"]["num_adapters"] == 1


def test_garbage_sse_chunks_fail_their_requests_and_the_run_ends(tmp_path, capsys) -> None:
    sse = [b"5", b'{"choices": 5}', b'{"choices": [7]}', b'{"choices": [], "usage": {"completion_tokens": "x"}}',
           b"\xff\xfe not utf-8", b'"text"']
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i / 100, "prompt": [i], "max_tokens": 2}) + "\n"
                             for i in range(len(sse))))
    out = tmp_path / "r.json"
    with GarbageServer(MODELS, sse=sse) as server:
        argv = ["--url", f"http://127.0.0.1:{server.port}", "--protocol", "openai", "--trace", str(trace),
                "--no-progress", "--request-timeout", "20", "--out", str(out)]
        rc, err = _run(argv, capsys)
    metrics = json.loads(out.read_text())["metrics"]
    assert rc == 1 and metrics["failed"] == len(sse), (err, metrics)
    assert set(metrics["errors_by_code"]) == {"bad_sse_chunk"}, metrics


@pytest.fixture(scope="module")
def keyed_server():
    from test_serve_support import start_server, stop_server

    proc = start_server(["--api-key", "loadgen-key"])
    yield proc
    assert stop_server(proc) == 0, proc.output()[-3000:]


def test_a_server_with_an_api_key_is_measured_with_api_key(keyed_server, monkeypatch, tmp_path, capsys) -> None:
    """Without the key the model list is a clear 401 (exit 1); with --api-key (or $LORAFLEET_API_KEY) every
    request of both protocols completes."""
    base = ["--url", keyed_server.url, "--rate", "3", "--duration", "2", "--output-len", "2:4", "--no-progress"]
    rc, err = _run(base, capsys)
    assert rc == 1 and "HTTP 401 (give the server's key: --api-key" in err, err
    for protocol, key_from in (("ws", "flag"), ("openai", "env")):
        out = tmp_path / f"{protocol}.json"
        argv = [*base, "--protocol", protocol, "--out", str(out)]
        if key_from == "flag":
            argv += ["--api-key", "loadgen-key"]
        else:
            monkeypatch.setenv("LORAFLEET_API_KEY", "loadgen-key")
        rc, err = _run(argv, capsys)
        metrics = json.loads(out.read_text())["metrics"]
        assert rc == 0 and metrics["completed"] == metrics["num_requests"] > 0, (err, metrics)

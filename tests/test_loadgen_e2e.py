"""End to end: the loadgen CLI and `bench` against a REAL server on loopback (the HF PEFT baseline,
started as a subprocess with a tiny Llama and three PEFT adapters built here), checked against the
server's own /metrics counts and against single-request HF + PEFT greedy generation."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest_loadgen import build_tiny_model, free_port, server_subprocess

from lorafleet.loadgen import bench
from lorafleet.loadgen.cli import main as loadgen_main
from lorafleet.loadgen.workload import WorkloadConfig, generate, read_trace, write_trace

COMMON = ["--token-range", "4:60", "--no-progress", "--slo-ttft-ms", "60000"]


def scrape(url: str) -> dict[str, float]:
    """The server's counters from /metrics, keyed like 'peft_requests_finished_total{finish_reason=length}'."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    base, adapters = tiny
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "lorafleet.loadgen.peft_server",
        "--model",
        str(base),
        "--port",
        str(port),
        "--torch-threads",
        "1",
        "--max-batch-size",
        "8",
    ]
    with server_subprocess(cmd, adapters, port, log, stop_timeout=30) as url:
        yield url


def check_counts(doc: dict, trace: list, before: dict, after: dict) -> None:
    """The results file agrees with the trace (ignore_eos: exact lengths) and with the server's counters."""
    m = doc["metrics"]
    assert m["num_requests"] == len(trace) > 0
    assert m["completed"] == len(trace) and m["failed"] == 0 and m["errors_by_code"] == {}
    assert m["output_tokens"] == sum(s.max_tokens for s in trace)
    assert m["output_tokens"] == delta(before, after, "peft_generation_tokens_total")
    assert m["completed"] == delta(before, after, "peft_requests_finished_total{finish_reason=length}")
    assert m["num_requests"] == delta(before, after, "peft_requests_received_total")
    assert m["input_tokens"] == sum(s.input_len for s in trace)
    assert m["input_tokens"] == delta(before, after, "peft_prompt_tokens_total")
    assert m["ttft_s"]["count"] == len(trace) and m["slo_attainment"] == 1.0


def test_loadgen_ws_run_matches_server_counts(server, tmp_path) -> None:
    out, trace_path, plot = tmp_path / "r.json", tmp_path / "t.jsonl", tmp_path / "p.png"
    before = scrape(server)
    rc = loadgen_main(
        [
            "--url",
            server,
            "--protocol",
            "ws",
            "--num-sockets",
            "2",
            "--rate",
            "12",
            "--duration",
            "2",
            "--input-len",
            "2:8",
            "--output-len",
            "1:6",
            "--seed",
            "1",
            "--out",
            str(out),
            "--records",
            "--write-trace",
            str(trace_path),
            "--plot",
            str(plot),
            *COMMON,
        ]
    )
    after = scrape(server)
    assert rc == 0
    doc = json.loads(out.read_text())
    trace, header = read_trace(trace_path)
    check_counts(doc, trace, before, after)
    assert header["adapters"] == ["sql", "chat", "code"]  # discovered from /v1/models
    assert doc["config"]["base_model"] == "base" and doc["config"]["protocol"] == "ws"
    records = doc["records"]
    assert [r["output_tokens"] for r in records] == [s.max_tokens for s in trace]
    assert all(len(r["token_times"]) == r["output_tokens"] for r in records)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_loadgen_openai_trace_replay_with_base_requests(server, tmp_path) -> None:
    config = WorkloadConfig(
        adapters=("code", "sql"),
        rate=10.0,
        duration=2.0,
        input_len=(1, 6),
        output_len=(2, 5),
        base_fraction=0.3,
        seed=4,
        token_range=(4, 60),
    )
    trace = generate(config)
    assert any(s.adapter is None for s in trace)
    trace_path, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    write_trace(trace_path, trace, config)
    before = scrape(server)
    rc = loadgen_main(
        [
            "--url",
            server,
            "--protocol",
            "openai",
            "--trace",
            str(trace_path),
            "--max-concurrency",
            "3",
            "--out",
            str(out),
            *COMMON,
        ]
    )
    after = scrape(server)
    assert rc == 0
    doc = json.loads(out.read_text())
    check_counts(doc, trace, before, after)
    assert doc["config"]["trace"] == str(trace_path) and doc["config"]["max_concurrency"] == 3


def test_unknown_adapter_errors_are_counted_on_both_sides(server, tmp_path) -> None:
    trace = generate(
        WorkloadConfig(
            adapters=("sql", "nope"),
            alpha=0.0,
            rate=10.0,
            duration=1.5,
            input_len=(1, 3),
            output_len=(1, 2),
            seed=2,
            token_range=(4, 60),
        )
    )
    trace_path, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    write_trace(trace_path, trace)
    before = scrape(server)
    with_progress = [arg for arg in COMMON if arg != "--no-progress"]  # exercise the live display too
    assert loadgen_main(["--url", server, "--trace", str(trace_path), "--out", str(out), *with_progress]) == 0
    after = scrape(server)
    m = json.loads(out.read_text())["metrics"]
    bad = sum(s.adapter == "nope" for s in trace)
    assert bad > 0 and m["errors_by_code"] == {"model_not_found": bad} and m["completed"] == len(trace) - bad
    assert delta(before, after, "peft_request_errors_total{code=model_not_found}") == bad


async def _ws_generate(url: str, frames: list[dict]) -> dict[str, list[int]]:
    import aiohttp

    tokens: dict[str, list[int]] = {f["id"]: [] for f in frames}
    pending = set(tokens)
    async with aiohttp.ClientSession() as session, session.ws_connect(url.replace("http", "ws") + "/v1/stream") as ws:
        for frame in frames:
            await ws.send_json(frame)
        async for msg in ws:
            event = json.loads(msg.data)
            assert event["type"] in ("accepted", "delta", "done"), event
            if event["type"] == "delta":
                tokens[event["id"]] += event["token_ids"]
            elif event["type"] == "done":
                pending.discard(event["id"])
                if not pending:
                    break
    return tokens


def _reference(tiny, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    """Single-request greedy generation with HF + PEFT: no padding, no mixed batch."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapters = tiny
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapters[adapter])
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_mixed_adapter_batch_equals_single_request_generation(server, tiny) -> None:
    cases = [
        ("a", "sql", [5, 6, 7, 8, 9], 6),
        ("b", None, [10, 11], 4),
        ("c", "code", [12, 13, 14], 5),
        ("d", "chat", [20], 3),
    ]
    frames = [
        {
            "type": "generate",
            "id": rid,
            "model": adapter or "base",
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
        }
        for rid, adapter, prompt, n in cases
    ]
    got = asyncio.run(_ws_generate(server, frames))
    for rid, adapter, prompt, n in cases:
        assert got[rid] == _reference(tiny, adapter, prompt, n), rid


def test_bench_against_a_running_server_and_cli_errors(server, tmp_path) -> None:
    out = tmp_path / "b.json"
    rc = bench.main(
        [
            "--backend",
            "lorafleet,lorafleet-nolora",
            "--url",
            server,
            "--num-adapters",
            "2",
            "--rate",
            "8",
            "--duration",
            "1.5",
            "--input-len",
            "2:4",
            "--output-len",
            "1:3",
            "--out",
            str(out),
            *COMMON,
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["backend"], r["num_adapters"]) for r in rows] == [("lorafleet", 2), ("lorafleet-nolora", 2)]
    assert [r["tensor_parallel_size"] for r in rows] == [None, None], "this stand-in server reports no executors"
    assert rows[0]["num_requests"] == rows[1]["num_requests"] == rows[0]["completed"] == rows[1]["completed"]
    assert doc["runs"][1]["config"]["no_lora"] is True
    assert loadgen_main(["--url", server, "--input-len", "0:3"]) == 2
    assert loadgen_main(["--url", server, "--num-adapters", "9", "--duration", "1"]) == 2
    assert loadgen_main(["--url", f"http://127.0.0.1:{free_port()}", "--duration", "1", "--no-progress"]) == 1


def test_bench_starts_and_stops_the_peft_server(tiny, tmp_path, monkeypatch) -> None:
    base, _ = tiny
    port = free_port()
    monkeypatch.setattr(bench, "free_port", lambda: port)
    out = tmp_path / "bench.json"
    args = [
        "--backend",
        "peft",
        "--model",
        str(base),
        "--num-adapters",
        "1,3",
        "--rate",
        "8",
        "--duration",
        "1.5",
        "--input-len",
        "2:5",
        "--output-len",
        "1:4",
        "--out",
        str(out),
        "--log-dir",
        str(tmp_path),
        "--peft-arg=--torch-threads=1",
        f"--peft-arg=--adapter-dir={base.parent}",  # names come from the started server's /v1/models
        *COMMON,
    ]
    assert bench.main(args) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["num_adapters"] for r in rows] == [1, 3]
    assert [run["config"]["workload"]["adapters"] for run in doc["runs"]] == [["chat"], ["chat", "code", "sql"]]
    assert doc["runs"][0]["config"]["base_model"] == "base" and doc["failures"] == []
    required = {"backend", "num_adapters", "req_per_s", "first_token_latency_s", "slo_attainment", "duration_s", "gpu"}
    for row in rows:
        assert required <= row.keys() and row["backend"] == "peft" and row["tensor_parallel_size"] == 1
        assert row["completed"] == row["num_requests"] > 0 and row["req_per_s"] > 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the server is gone


async def test_one_generate_call_serves_a_mixed_batch(tiny) -> None:
    """Jobs queued before the worker starts form ONE batch (adapter_names mixed, prompts left-padded)."""
    from lorafleet.loadgen.peft_server import Metrics, Outcome, PeftBackend, ServerConfig, job_outputs, make_job

    base, adapters = tiny
    config = ServerConfig(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()))
    backend = PeftBackend(config, Metrics())
    cases = [("chat", [7, 8, 9, 10], 5), (None, [11], 3), ("sql", [30, 31], 4), ("code", [40, 41, 42], 2)]
    loop = asyncio.get_running_loop()
    jobs = [
        make_job(
            backend, {"model": a or "base", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}, loop
        )
        for a, p, n in cases
    ]
    for job in jobs:
        backend.submit(job)
    backend.start()
    try:
        for job, (adapter, prompt, n) in zip(jobs, cases, strict=True):
            outcome, got = Outcome(), []
            async for ids, _ in job_outputs(backend, job, outcome):
                got += ids
            assert outcome.finish_reason == "length" and got == _reference(tiny, adapter, prompt, n)
    finally:
        await backend.stop()
    assert backend.metrics.registry.get_sample_value("peft_batches_total") == 1


async def test_peft_server_ws_protocol_errors_and_cancel(server) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.replace("http", "ws") + "/v1/stream") as ws,
    ):
        await ws.send_str("{not json")
        assert (await ws.receive_json())["error"]["code"] == "bad_frame"
        await ws.send_json({"type": "dance", "id": "x"})
        assert (await ws.receive_json()) == {
            "type": "error",
            "id": "x",
            "error": {"code": "bad_frame", "message": "unknown frame type 'dance'; use generate or cancel"},
        }
        await ws.send_json({"type": "generate", "id": "y", "model": "sql", "prompt": [5], "max_tokens": 0})
        assert (await ws.receive_json())["error"]["code"] == "invalid_value"
        await ws.send_json(
            {
                "type": "generate",
                "id": "z",
                "model": "sql",
                "prompt": [5, 6],
                "max_tokens": 200,
                "ignore_eos": True,
                "temperature": 0,
            }
        )
        assert (await ws.receive_json()) == {"type": "accepted", "id": "z"}
        assert (await ws.receive_json())["type"] == "delta"
        await ws.send_json({"type": "cancel", "id": "z"})
        while (event := await ws.receive_json())["type"] == "delta":
            pass
        assert event["type"] == "done" and event["finish_reason"] == "cancelled"
        assert event["usage"]["completion_tokens"] < 200


async def test_synthetic_backend_and_adapter_dir(tiny) -> None:
    import torch

    from lorafleet.loadgen.peft_server import Metrics, Outcome, PeftBackend, job_outputs, make_job, parse_args

    base, adapters = tiny
    config = parse_args(
        [
            "--model",
            str(base),
            "--adapter-dir",
            str(base.parent),
            "--random-weights",
            "--synthetic-adapters",
            "3",
            "--synthetic-ranks",
            "2,4",
            "--torch-threads",
            "1",
        ]
    )
    assert config.adapter_names() == ["chat", "code", "sql", "synthetic-0", "synthetic-1", "synthetic-2"]
    assert config.synthetic() == [("synthetic-0", 2), ("synthetic-1", 4), ("synthetic-2", 2)]
    backend = PeftBackend(config, Metrics())
    modules = backend.model.named_modules()
    q_proj = next(m for n, m in modules if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert q_proj.lora_A["synthetic-1"].weight.shape[0] == 4 and q_proj.lora_A["synthetic-2"].weight.shape[0] == 2
    assert q_proj.lora_A["synthetic-1"].weight.dtype == torch.float32  # the model's dtype on CPU
    loop = asyncio.get_running_loop()
    job = make_job(
        backend, {"model": "synthetic-2", "prompt": [4, 5], "max_tokens": 3, "ignore_eos": True, "temperature": 0}, loop
    )
    backend.submit(job)
    backend.start()
    try:
        outcome = Outcome()
        got = [ids async for ids, _ in job_outputs(backend, job, outcome)]
    finally:
        await backend.stop()
    assert outcome.finish_reason == "length" and sum(len(ids) for ids in got) == 3


async def test_sse_client_disconnect_cancels_the_generation(server) -> None:
    import aiohttp

    key = "peft_requests_finished_total{finish_reason=cancelled}"
    before = scrape(server)
    body = {"model": "code", "prompt": [5, 6], "max_tokens": 240, "stream": True, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{server}/v1/completions", json=body)
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # drop the connection mid-stream
    deadline = time.monotonic() + 60
    # wait until the request is counted as cancelled AND the model has no batch running
    while (delta(before, after := scrape(server), key) < 1 or after["peft_requests_running"] > 0) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)  # polling the other process's counters
    assert delta(before, after, key) == 1
    assert delta(before, after, "peft_generation_tokens_total") < 240
    assert delta(before, after, "peft_computed_tokens_total") < 240  # the model stopped working on it


def test_bench_appends_rows_and_records_a_failing_backend(server, tmp_path) -> None:
    out = tmp_path / "b.json"
    common = [
        "--rate",
        "6",
        "--duration",
        "1",
        "--input-len",
        "2:3",
        "--output-len",
        "1:2",
        "--out",
        str(out),
        "--log-dir",
        str(tmp_path),
        *COMMON,
    ]
    assert bench.main(["--backend", "lorafleet", "--url", server, "--num-adapters", "1", *common]) == 0
    # a PEFT server that cannot load its model: the failure is recorded, earlier rows are kept
    rc = bench.main(
        [
            "--backend",
            "peft",
            "--model",
            str(tmp_path / "missing"),
            "--num-adapters",
            "1",
            "--append",
            "--startup-timeout",
            "120",
            *common,
        ]
    )
    assert rc == 1
    doc = json.loads(out.read_text())
    assert [r["backend"] for r in doc["rows"]] == ["lorafleet"]
    assert [f["backend"] for f in doc["failures"]] == ["peft"] and "exited" in doc["failures"][0]["error"]
    assert (
        bench.main(["--backend", "lorafleet-nolora", "--url", server, "--num-adapters", "1", "--append", *common]) == 0
    )
    assert [r["backend"] for r in json.loads(out.read_text())["rows"]] == ["lorafleet", "lorafleet-nolora"]

"""The loadgen against a real `lorafleet serve` subprocess on loopback (tiny model, CPU): the results
JSON's counts equal the server's own /metrics counters, over WebSocket and OpenAI SSE."""

from __future__ import annotations

import json
import sys

import pytest
from conftest_loadgen import build_tiny_model, free_port, server_subprocess

from lorafleet.loadgen.cli import main as loadgen_main
from lorafleet.loadgen.workload import read_trace


def counters(url: str) -> dict[str, float]:
    """Unlabelled sums of every counter family, keyed by name without its prefix (e.g. 'generation_tokens')."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            name = family.name.split(":")[-1]
            out[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


@pytest.fixture(scope="module")
def lorafleet_server(tmp_path_factory):
    base, adapters = build_tiny_model(tmp_path_factory.mktemp("tiny-lf"))
    port = free_port()
    log = tmp_path_factory.mktemp("log-lf") / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "lorafleet",
        "serve",
        "--model",
        str(base),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--torch-threads",
        "1",
    ]
    with server_subprocess(cmd, adapters, port, log, stop_timeout=60) as url:
        yield url


@pytest.mark.parametrize("protocol", ["ws", "openai"])
def test_loadgen_counts_match_lorafleet_metrics(lorafleet_server, tmp_path, protocol: str) -> None:
    out, trace_path = tmp_path / "r.json", tmp_path / "t.jsonl"
    before = counters(lorafleet_server)
    rc = loadgen_main(
        [
            "--url",
            lorafleet_server,
            "--protocol",
            protocol,
            "--rate",
            "10",
            "--duration",
            "2",
            "--input-len",
            "2:8",
            "--output-len",
            "1:6",
            "--token-range",
            "4:60",
            "--base-fraction",
            "0.25",
            "--seed",
            "7",
            "--no-progress",
            "--out",
            str(out),
            "--write-trace",
            str(trace_path),
            "--records",
            "--slo-ttft-ms",
            "60000",
        ]
    )
    after = counters(lorafleet_server)
    assert rc == 0
    doc = json.loads(out.read_text())
    trace, _ = read_trace(trace_path)
    m = doc["metrics"]
    assert m["num_requests"] == m["completed"] == len(trace) > 0 and m["errors_by_code"] == {}
    assert m["output_tokens"] == sum(s.max_tokens for s in trace)  # ignore_eos: exact lengths
    assert m["output_tokens"] == after["generation_tokens"] - before["generation_tokens"]
    assert m["completed"] == after["request_success"] - before["request_success"]
    assert m["input_tokens"] == after["prompt_tokens"] - before["prompt_tokens"]
    assert all(len(r["token_times"]) == r["output_tokens"] for r in doc["records"])
    assert doc["config"]["base_model"] is not None and doc["protocol_errors"] == []

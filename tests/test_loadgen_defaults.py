"""`lorafleet loadgen` with no workload flags against the default `lorafleet serve` (the embedded demo
model) over real sockets: its defaults come from the server (/v1/models max_model_len and vocab_size), so
a 10-second run completes every request on both protocols with the same SLO sent; a run where every
request fails says why per error code, and its plot says so instead of drawing empty axes; a healthy
run's TTFT axis spans the data, not the SLO; the plot names the configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorafleet.loadgen.cli import server_defaults
from lorafleet.loadgen.clients import RequestRecord
from lorafleet.loadgen.launch import launch, stop
from lorafleet.loadgen.results import build_figure

LORAFLEET = [sys.executable, "-m", "lorafleet"]


@pytest.fixture(scope="module")
def default_server():
    """`lorafleet serve --port 0`, nothing else: the server a new user starts."""
    started = launch([*LORAFLEET, "serve", "--port", "0"])
    yield started.url
    assert stop(started.proc, timeout=60) == 0, started.output(200)


def loadgen(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAFLEET, "loadgen", "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("protocol", ["ws", "http"])  # http: another name of openai
def test_default_run_against_the_default_server_has_no_errors(default_server, protocol, tmp_path):
    out, plot = tmp_path / "run.json", tmp_path / "run.png"
    proc = loadgen("--url", default_server, "--duration", "10", "--protocol", protocol, "--out", str(out),
                   "--plot", str(plot), "--records")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    metrics, config = document["metrics"], document["config"]
    assert metrics["num_requests"] > 0 and metrics["failed"] == 0, metrics["error_reasons"]
    assert metrics["completed"] == metrics["num_requests"]
    # the defaults the server implied: the demo's max_model_len 256 and vocabulary of 99 ids
    workload = config["workload"]
    assert workload["input_len"][1] + workload["output_len"][1] <= 256
    assert workload["token_range"][1] <= 99
    assert config["slo_ttft_ms"] == 6000.0 and config["slo_sent"] is True  # the same on both protocols
    assert plot.stat().st_size > 0


def test_a_workload_with_no_requests_is_an_error_not_an_empty_summary(default_server, tmp_path):
    """Rate 0.1 for 1 s (seeded: no arrival inside it) measures nothing: one line naming the cause, exit 2."""
    proc = loadgen("--url", default_server, "--duration", "1", "--rate", "0.1", "--seed", "0",
                   "--out", str(tmp_path / "none.json"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "no requests" in line and "--duration" in line, line
    assert not (tmp_path / "none.json").exists()


def test_a_failing_run_names_each_error_and_its_plot_says_so(default_server, tmp_path):
    out = tmp_path / "bad.json"
    proc = loadgen("--url", default_server, "--duration", "3", "--rate", "2", "--adapters", "no-such-adapter",
                   "--out", str(out), "--plot", str(tmp_path / "bad.png"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["completed"] == 0 and set(metrics["errors_by_code"]) == {"model_not_found"}
    reason = metrics["error_reasons"]["model_not_found"]
    assert "no-such-adapter" in reason
    summary = " ".join(proc.stdout.split())
    assert "error model_not_found" in summary and "no-such-adapter" in summary


def test_server_defaults_fit_the_context_and_the_vocabulary():
    assert server_defaults(None, None) == {"input_len": "8:512", "output_len": "8:512", "token_range": "10:499"}
    assert server_defaults(4096, 32000) == {"input_len": "8:512", "output_len": "8:512", "token_range": "10:499"}
    demo = server_defaults(256, 99)
    assert demo == {"input_len": "8:128", "output_len": "8:128", "token_range": "10:98"}
    tiny = server_defaults(9, 5)
    (a, b), (c, d) = ((int(x) for x in tiny[k].split(":")) for k in ("input_len", "output_len"))
    assert 1 <= a <= b and 1 <= c <= d and b + d <= 9 and tiny["token_range"] == "4:4"


def _done(index: int, ttft: float, e2e: float) -> RequestRecord:
    record = RequestRecord(index=index, adapter="a", model="a", scheduled_s=0.0, input_len=4, max_tokens=4,
                           send_s=0.0)
    record.add_tokens(1, ttft)
    record.add_tokens(3, e2e)
    record.finish("length", e2e)
    return record


def test_plot_axes_span_the_data_and_name_the_configuration():
    records = [_done(i, 0.025 + 0.001 * i, 0.2 + 0.01 * i) for i in range(80)]
    fig = build_figure([("rate 6", records)], 6.0, "lorafleet loadgen: http://x (ws)\nrate 6 req/s")
    ttft_ax = fig.axes[0]
    left, right = ttft_ax.get_xlim()
    assert ttft_ax.get_xlabel() == "ms" and left == 0
    assert max(r.ttft for r in records) * 1e3 <= right <= 1.1 * max(r.ttft for r in records) * 1e3
    assert "beyond this axis" in " ".join(t.get_text() for t in ttft_ax.texts)  # the 6 s SLO is noted, not drawn
    assert fig._suptitle.get_text().startswith("lorafleet loadgen: http://x (ws)")
    failed = RequestRecord(index=0, adapter="x", model="x", scheduled_s=0.0, input_len=4, max_tokens=4, send_s=0.0)
    failed.fail("model_not_found", "model: 'x' is neither the base model nor a loaded adapter", 0.1, 404)
    empty = build_figure([("rate 1", [failed])], 6.0, "t")
    text = " ".join(t.get_text() for ax in empty.axes for t in ax.texts)
    assert "no request completed" in text and "model_not_found x1" in text and "HTTP 404" in text
    assert not any(ax.lines for ax in empty.axes)

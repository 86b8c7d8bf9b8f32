"""A short soak over real sockets (bench/soak.py with short phases): the CPU demo server at ~3x its measured
capacity, with a phase of artificially slowed steps (the executor's test-only step-delay hook). Every request
ends exactly once, admitted requests get their first token within the first-token deadline, load beyond
capacity is shed (429/errors, never silence), and the server is healthy at the end and drains cleanly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("lorafleet_bench_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_short_soak_every_request_ends_once_within_the_deadline(tmp_path):
    soak = _soak_module()
    report = soak.main(["--phase-s", "6", "--calibrate-s", "3", "--deadline-ms", "1500", "--slow-step-s", "0.1",
                        "--out", str(tmp_path / "soak.json")])
    figures = report["all"]
    assert figures["sent"] > 50, figures
    assert figures["violations"] == {"no_terminal": 0, "several_terminals": 0, "ttft_over_deadline": 0}, figures
    assert figures["completed"] > 0
    assert sum(figures["shed"].values()) > 0, "3x capacity shed nothing: the overload was not real"
    assert not figures["errors"], figures["errors"]
    assert figures["ttft_server_ms"]["max"] <= 1500
    assert report["health_at_end"] == {"status": 200, "body": "ok"}
    assert report["server_exit_code"] == 0
    assert (tmp_path / "soak.json").is_file()

"""`lorafleet loadgen` argument handling that needs no server (dry runs, sweeps, exit codes)."""

from __future__ import annotations

import pytest

from lorafleet.loadgen.cli import main, parse_rates
from lorafleet.loadgen.workload import read_trace


def test_dry_run_writes_one_trace_per_swept_rate(tmp_path, capsys) -> None:
    path = tmp_path / "w.jsonl"
    rc = main(
        [
            "--dry-run",
            "--num-adapters",
            "3",
            "--duration",
            "50",
            "--sweep-rates",
            "1,4",
            "--input-len",
            "5:9",
            "--output-len",
            "2:3",
            "--write-trace",
            str(path),
        ]
    )
    assert rc == 0
    slow, slow_cfg = read_trace(tmp_path / "w.rate-1.jsonl")
    fast, fast_cfg = read_trace(tmp_path / "w.rate-4.jsonl")
    assert slow_cfg["rate"] == 1.0 and fast_cfg["rate"] == 4.0
    assert slow_cfg["adapters"] == ["adapter-0", "adapter-1", "adapter-2"]
    assert 25 < len(slow) < 80 and 150 < len(fast) < 250  # about rate x duration (Poisson, 4+ sigma)
    assert all(5 <= s.input_len <= 9 and 2 <= s.max_tokens <= 3 for s in slow + fast)
    assert "rate 4: " in capsys.readouterr().out


def test_no_adapters_means_base_model_requests(tmp_path) -> None:
    path = tmp_path / "b.jsonl"
    assert main(["--dry-run", "--num-adapters", "0", "--duration", "5", "--rate", "4", "--write-trace", str(path)]) == 0
    specs, _ = read_trace(path)
    assert specs and all(s.adapter is None for s in specs)


@pytest.mark.parametrize(
    "argv",
    [
        ["--dry-run", "--sweep-rates", "1,x"],
        ["--dry-run", "--sweep-rates", "0"],
        ["--dry-run", "--cv", "-1"],
        ["--dry-run", "--output-len", "9:2"],
        ["--dry-run", "--trace", "t.jsonl", "--sweep-rates", "1,2"],
        ["--protocol", "smoke-signals"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_parse_rates() -> None:
    assert parse_rates(None, 3.0) == [3.0]
    assert parse_rates("0.5, 2,8", 3.0) == [0.5, 2.0, 8.0]

"""Metrics of lorafleet.loadgen.results on hand-built records, checked against hand-computed values."""

from __future__ import annotations

import json

import pytest

from lorafleet.loadgen.clients import RequestRecord
from lorafleet.loadgen.results import environment, plot_runs, record_json, summarize, summary_table, timeline


def _record(
    index: int,
    send: float,
    tokens: list[float],
    done: float | None,
    error: str | None = None,
    prompt_tokens: int | None = 10,
) -> RequestRecord:
    record = RequestRecord(
        index=index,
        adapter="a",
        model="a",
        scheduled_s=send,
        input_len=10,
        max_tokens=8,
        send_s=send,
        prompt_tokens=prompt_tokens,
    )
    for t in tokens:
        record.add_tokens(1, t)
    if error is not None:
        record.fail(error, "boom", done or send)
    elif done is not None:
        record.finish("length", done)
    return record


def _records() -> list[RequestRecord]:
    return [
        _record(0, 0.0, [1.0, 1.5, 2.0], 2.0),  # ttft 1, tpot (2-1)/2 = 0.5, itl 0.5, 0.5, e2e 2
        _record(1, 1.0, [4.0, 4.2], 4.5, prompt_tokens=None),  # ttft 3, tpot 0.5, itl 0.2, e2e 3.5
        _record(2, 2.0, [2.5], 3.0),  # ttft 0.5, no tpot, e2e 1
        _record(3, 3.0, [3.5, 3.6], 5.0, error="executor_died"),
        _record(4, 4.0, [], 4.1, error="early_abort"),
    ]


def test_summary_matches_hand_computed_values() -> None:
    m = summarize(_records(), duration_s=5.0, slo_ttft_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (5, 3, 2)
    assert m["req_per_s"] == pytest.approx(3 / 5)
    assert m["input_tokens"] == 30 and m["output_tokens"] == 6
    assert m["input_tok_per_s"] == pytest.approx(6.0) and m["output_tok_per_s"] == pytest.approx(1.2)
    assert m["ttft_s"]["mean"] == pytest.approx(1.5) and m["ttft_s"]["p50"] == pytest.approx(1.0)
    assert m["ttft_s"]["count"] == 3
    assert m["tpot_s"]["count"] == 2 and m["tpot_s"]["mean"] == pytest.approx(0.5)
    assert m["itl_s"]["count"] == 3 and m["itl_s"]["mean"] == pytest.approx(1.2 / 3)
    assert m["e2e_s"]["mean"] == pytest.approx(6.5 / 3) and m["e2e_s"]["p99"] == pytest.approx(3.47)
    # requests 0 and 2 meet the 2 s SLO; failed requests count as misses
    assert m["slo_attainment"] == pytest.approx(2 / 5) and m["goodput_req_per_s"] == pytest.approx(2 / 5)
    assert m["errors_by_code"] == {"early_abort": 1, "executor_died": 1}
    assert m["early_aborts"] == 1
    json.dumps(m)  # JSON-ready


def test_early_abort_codes() -> None:
    records = [
        _record(i, 0.0, [], 0.1, error=code)
        for i, code in enumerate(["slo_unattainable", "early_abort", "queue_full", "http_429"])
    ]
    assert summarize(records, 1.0, 1.0)["early_aborts"] == 2


def test_empty_run_has_no_statistics() -> None:
    m = summarize([], duration_s=1.0, slo_ttft_s=None)
    assert m["ttft_s"]["mean"] is None and m["slo_attainment"] is None and m["req_per_s"] == 0


def test_timeline_bins() -> None:
    series = timeline(_records(), slo_ttft_s=2.0, bin_s=1.0)
    assert series["t"][:5] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # finished (ok) at 2.0, 4.5, 3.0 -> bins 2, 4, 3
    assert series["req_per_s"][:5] == [0, 0, 1, 1, 1]
    # token arrivals: 1.0,1.5 | 2.0,2.5 | 3.5,3.6 | 4.0,4.2
    assert series["tok_per_s"][:5] == [0, 2, 2, 2, 2]
    # sent at 0,1,2,3,4: requests 0 and 2 met the SLO
    assert series["attainment"][:5] == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_record_json_environment_table_and_plot(tmp_path) -> None:
    row = record_json(_records()[0])
    assert row["ttft_s"] == 1.0 and row["ok"] and row["token_times"] == [1.0, 1.5, 2.0]
    env = environment()
    assert {"host", "python", "cpu", "gpus"} <= env.keys()
    json.dumps(env)
    assert summary_table(summarize(_records(), 5.0, 2.0)).row_count > 5
    plot_runs([("run", _records())], 2.0, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

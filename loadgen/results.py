"""Metrics, results JSON, the summary table and plots of a loadgen run.

Definitions (also in docs/loadgen.md); times are seconds, on the client's clock:

- A request *completed* when it ended with no error (finish reason stop/length); everything else failed.
- ``duration_s``: from the start of the run to the end of the last request (the backlog drains).
- ``req_per_s`` = completed / duration_s; ``input_tok_per_s`` / ``output_tok_per_s``: prompt / output
  tokens of completed requests per second (prompt tokens as the server reported them, else the spec's).
- TTFT: first token arrival - send time. TPOT: (end - first token) / (output tokens - 1), requests with
  >= 2 tokens. ITL: gaps between consecutive token arrivals of a request (tokens that arrive in one
  frame have gap 0). E2E: end - send. Over completed requests; mean/p50/p90/p99.
- SLO attainment: requests that completed with TTFT <= the SLO, divided by ALL requests (failed and
  early-aborted requests count as misses). Goodput: those same requests per second of duration_s.
- ``send_lag_s``: send time - scheduled arrival time, over all sent requests: large values mean the
  client (or --max-concurrency) could not keep the schedule.
- errors_by_code counts failed requests by error code; ``mid_stream_errors`` those failing after the
  server accepted them; ``early_aborts`` those refused by the server's early-abort admission control:
  code ``slo_unattainable`` (lorafleet's) or any code containing "abort".
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lorafleet.loadgen.clients import RequestRecord

SCHEMA = "lorafleet.loadgen.results/1"


EARLY_ABORT_CODES = ("slo_unattainable",)


def is_early_abort(code: str | None) -> bool:
    """Whether an error code means the server refused the request because its TTFT SLO was out of reach."""
    return code is not None and (code in EARLY_ABORT_CODES or "abort" in code)


def stats(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 (None when empty)."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
    }


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first, for completed requests with >= 2 tokens."""
    if not record.ok or record.output_tokens < 2 or not record.token_times or record.done_s is None:
        return None
    return (record.done_s - record.token_times[0]) / (record.output_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    """Gaps between consecutive token arrivals of a completed request."""
    return list(np.diff(record.token_times)) if record.ok and len(record.token_times) > 1 else []


def meets_slo(record: RequestRecord, slo_ttft_s: float | None) -> bool:
    """Completed with a first token within the SLO (any first token when there is no SLO)."""
    ttft = record.ttft
    return record.ok and ttft is not None and (slo_ttft_s is None or ttft <= slo_ttft_s)


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_s: float | None) -> dict[str, object]:
    """The run's metrics as a JSON-ready dict (see the module docstring for definitions)."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    span = max(duration_s, 1e-9)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in done)
    out_tokens = sum(r.output_tokens for r in done)
    good = sum(meets_slo(r, slo_ttft_s) for r in records)
    codes = Counter(r.error_code or "unknown" for r in failed)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration_s,
        "req_per_s": len(done) / span,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "input_tok_per_s": in_tokens / span,
        "output_tok_per_s": out_tokens / span,
        "ttft_s": stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": stats([t for t in map(tpot, done) if t is not None]),
        "itl_s": stats([gap for r in done for gap in itls(r)]),
        "e2e_s": stats([r.e2e for r in done if r.e2e is not None]),
        "send_lag_s": stats([r.send_s - r.scheduled_s for r in records if r.send_s is not None]),
        "slo_ttft_s": slo_ttft_s,
        "slo_attainment": good / len(records) if records else None,
        "goodput_req_per_s": good / span,
        "errors_by_code": dict(sorted(codes.items())),
        "error_reasons": error_reasons(failed),
        "mid_stream_errors": sum(r.mid_stream for r in failed),
        "early_aborts": sum(is_early_abort(r.error_code) for r in failed),
    }


def error_reasons(failed: list[RequestRecord]) -> dict[str, str]:
    """One line per error code: the first failed request's message (and HTTP status) for that code."""
    reasons: dict[str, str] = {}
    for r in failed:
        code = r.error_code or "unknown"
        if code not in reasons:
            message = " ".join((r.error_message or "no message").split())
            status = f"HTTP {r.http_status}: " if r.http_status else ""
            reasons[code] = status + (message if len(message) <= 160 else message[:157] + "...")
    return dict(sorted(reasons.items()))


def record_json(record: RequestRecord) -> dict[str, object]:
    """One request's record for the results file (times relative to the run start)."""
    out = asdict(record)
    out["ok"], out["ttft_s"], out["e2e_s"] = record.ok, record.ttft, record.e2e
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    """GPU names from nvidia-smi (creates no CUDA context in this process), else from torch if importable."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass  # fall through to torch
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment() -> dict[str, object]:
    """Where the client ran: host, python, CPU and GPU names, lorafleet version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lorafleet_version = version("lorafleet")
    except PackageNotFoundError:
        lorafleet_version = None
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpu_names(),
        "lorafleet": lorafleet_version,
    }


def write_json(path: str | Path, document: dict[str, object]) -> None:
    """Write a results document as indented JSON."""
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def timeline(records: list[RequestRecord], slo_ttft_s: float | None, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Per time bin: finished req/s, output tok/s (by token arrival) and attainment of requests sent."""
    end = max([r.done_s or 0.0 for r in records] + [bin_s])
    edges = np.arange(0.0, end + bin_s, bin_s)
    finished = np.histogram([r.done_s for r in records if r.ok], bins=edges)[0] / bin_s
    tokens = np.histogram([t for r in records for t in r.token_times], bins=edges)[0] / bin_s
    sent = [r for r in records if r.send_s is not None]
    sent_hist = np.histogram([r.send_s for r in sent], bins=edges)[0]
    good_hist = np.histogram([r.send_s for r in sent if meets_slo(r, slo_ttft_s)], bins=edges)[0]
    attain = np.where(sent_hist > 0, good_hist / np.maximum(sent_hist, 1), np.nan)
    return {
        "t": list(edges[:-1]),
        "req_per_s": list(finished),
        "tok_per_s": list(tokens),
        "attainment": list(attain),
    }


def summary_table(metrics: dict[str, object], title: str = "loadgen results") -> object:
    """A rich Table of the headline metrics."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "mean", "p50", "p90", "p99"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label in (
        ("ttft_s", "TTFT (ms)"),
        ("tpot_s", "TPOT (ms)"),
        ("itl_s", "ITL (ms)"),
        ("e2e_s", "E2E (ms)"),
    ):
        row = metrics[key]
        assert isinstance(row, dict)
        table.add_row(label, *(_ms(row[q]) for q in ("mean", "p50", "p90", "p99")))
    slo = metrics["slo_ttft_s"]
    attain = metrics["slo_attainment"]
    lines = [
        ("requests", f"{metrics['completed']}/{metrics['num_requests']} ok, {metrics['failed']} failed"),
        ("duration", f"{metrics['duration_s']:.2f} s"),
        ("throughput", f"{metrics['req_per_s']:.3f} req/s"),
        ("tokens", f"in {metrics['input_tok_per_s']:.1f} tok/s, out {metrics['output_tok_per_s']:.1f} tok/s"),
        (
            "SLO attainment",
            "-"
            if attain is None
            else f"{100 * attain:.1f}%" + ("" if slo is None else f" (TTFT <= {1e3 * slo:.0f} ms)"),
        ),
        ("goodput", f"{metrics['goodput_req_per_s']:.3f} req/s"),
    ]
    reasons = metrics.get("error_reasons") or {}
    for code, count in metrics["errors_by_code"].items():  # type: ignore[union-attr]
        lines.append((f"error {code} x{count}", str(reasons.get(code, ""))))
    for label, text in lines:
        table.add_row(label, text, "", "", "")
    return table


def _ms(value: object) -> str:
    return "-" if value is None else f"{1e3 * float(value):.1f}"  # type: ignore[arg-type]


def plot_runs(runs: list[tuple[str, list[RequestRecord]]], slo_ttft_s: float | None, path: str | Path,
              title: str | None = None) -> None:
    """Latency CDFs (TTFT, E2E, TPOT), throughput over time and SLO attainment over time, one line per run,
    under `title` (the run's configuration). Each CDF's axis spans its own data (the SLO line is drawn only
    when it falls inside; otherwise a note says where it is). A run in which no request completed gets a
    figure that says so, with the error codes and their reasons, instead of empty axes."""
    import matplotlib.pyplot as plt

    fig = build_figure(runs, slo_ttft_s, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_figure(runs: list[tuple[str, list[RequestRecord]]], slo_ttft_s: float | None, title: str | None = None):
    """The matplotlib Figure plot_runs saves (see there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.ok for _, records in runs for r in records):
        return _empty_figure(plt, runs, title)
    return _figure(plt, runs, slo_ttft_s, title)


def _figure(plt, runs: list[tuple[str, list[RequestRecord]]], slo_ttft_s: float | None, title: str | None):
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    latencies = {"TTFT": [], "E2E latency": [], "TPOT": []}
    for label, records in runs:
        done = [r for r in records if r.ok]
        for name, values in (("TTFT", [r.ttft for r in done]), ("E2E latency", [r.e2e for r in done]),
                             ("TPOT", [tpot(r) for r in done])):
            latencies[name].append((label, [v for v in values if v is not None]))
        series = timeline(records, slo_ttft_s)
        axes[1][0].plot(series["t"], series["req_per_s"], label=label)
        axes[1][1].plot(series["t"], series["tok_per_s"], label=label)
        axes[1][2].plot(series["t"], series["attainment"], label=label)
    for ax, name in zip(axes[0], latencies):
        _cdfs(ax, latencies[name], name, slo_ttft_s if name == "TTFT" else None)
    axes[1][2].set_ylim(0.0, 1.05)
    for ax, panel, ylabel in (
        (axes[1][0], "finished requests", "req/s"),
        (axes[1][1], "output tokens", "tok/s"),
        (axes[1][2], "SLO attainment (by send time)", "fraction"),
    ):
        ax.set_title(panel)
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel(ylabel)
    for ax in (a for row in axes for a in row):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _empty_figure(plt, runs: list[tuple[str, list[RequestRecord]]], title: str | None):
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axis("off")
    lines = []
    for label, records in runs:
        failed = [r for r in records if not r.ok]
        lines.append(f"{label}: no request completed ({len(records)} sent, {len(failed)} failed)")
        codes = Counter(r.error_code or "unknown" for r in failed)
        for code, reason in error_reasons(failed).items():
            lines.append(f"    {code} x{codes[code]}: {reason[:110]}")
    if not any(records for _, records in runs):
        lines.append("the workload had no requests")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _unit(values: list[float]) -> tuple[float, str]:
    """(scale, unit) for seconds: milliseconds when the largest value is under 2 s."""
    return (1e3, "ms") if values and max(values) < 2.0 else (1.0, "s")


def _cdfs(ax, runs: list[tuple[str, list[float]]], name: str, slo_s: float | None) -> None:
    """One CDF per run on an axis spanning the data (0 to the largest value plus 5 %)."""
    everything = [v for _, values in runs for v in values]
    scale, unit = _unit(everything)
    ax.set_title(f"{name} CDF")
    ax.set_xlabel(unit)
    ax.set_ylabel("fraction of completed requests")
    ax.set_ylim(0.0, 1.02)
    for label, values in runs:
        if values:
            xs = np.sort(np.asarray(values)) * scale
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    if not everything:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return
    right = max(everything) * scale * 1.05 or 1.0
    ax.set_xlim(0.0, right)
    if slo_s is not None and slo_s * scale <= right:
        ax.axvline(slo_s * scale, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_s * 1e3:g} ms")
    elif slo_s is not None:
        ax.text(0.98, 0.04, f"SLO {slo_s * 1e3:g} ms is beyond this axis", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=8, color="grey")

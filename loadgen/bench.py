"""`lorafleet bench`: one workload against several backends in one run, side by side in one JSON.

Backends:

- ``peft``: the HF transformers + PEFT baseline (`lorafleet.loadgen.peft_server`) started as a subprocess
  on a free loopback port with ``--model`` and every ``--adapter``.
- ``lorafleet``: ``lorafleet serve --model ... --adapter name=DIR ... --port P`` as a subprocess (extra
  flags through ``--serve-arg``).
- ``lorafleet-nolora``: the same server (shared with ``lorafleet`` when both run), the same trace, but
  every request names the base model, so no adapter is used.

With ``--url`` no process is started: every listed backend is measured against that server. For each
backend and each ``--num-adapters`` value n, the workload draws from the first n adapters (in
``--adapter`` order, else in the server's /v1/models order). The output's ``rows`` hold one object per
(backend, n) with the headline numbers; ``runs`` hold the full loadgen results of each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lorafleet.args import Parser, http_url, non_negative_float, positive_float
from lorafleet.loadgen.cli import Target, add_workload_args, check_output_paths, resolve_target, run_one
from lorafleet.loadgen.results import environment, write_json
from lorafleet.loadgen.workload import read_trace

BACKENDS = ("lorafleet", "lorafleet-nolora", "peft")
SCHEMA = "lorafleet.bench/1"


def build_parser() -> argparse.ArgumentParser:
    """The `lorafleet bench` argument parser (workload options shared with loadgen)."""
    parser = Parser(prog="lorafleet bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="peft", help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--model", default=None, help="base model directory (or a name lorafleet serve knows)")
    parser.add_argument("--adapter", action="append", default=[], help="name=DIR (repeatable)")
    parser.add_argument("--url", type=http_url, default=None,
                        help="measure this running server instead of starting one")
    parser.add_argument("--peft-num-adapters", default=None, help="n values for peft only (default: the same)")
    parser.add_argument("--nolora-num-adapters", default=None,
                        help="n values for lorafleet-nolora only (default: the same; n only changes which "
                        "adapter names the trace holds, nolora ignores them)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for lorafleet serve")
    parser.add_argument("--peft-arg", action="append", default=[], help="extra argument for the PEFT server")
    parser.add_argument("--startup-timeout", type=positive_float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--log-dir", default=None, help="server logs go here (default: a temporary dir)")
    parser.add_argument("--out", default=None, help="results JSON path (rewritten after every row)")
    parser.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    parser.add_argument("--records", action="store_true", help="include per-request records in runs")
    parser.add_argument("--warmup-duration", type=non_negative_float, default=0.0, metavar="S",
                        help="first run the workload for S seconds with the largest adapter count and discard it "
                        "(kernel compilation, lazily captured CUDA graphs, cold adapter caches)")
    add_workload_args(parser, several_n=True)
    parser.set_defaults(no_lora=False, write_trace=None, sweep_rates=None, dry_run=False)
    return parser


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server subprocess with its log file; stop() ends it (SIGTERM, then SIGKILL after a grace period)."""

    name: str
    command: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server not healthy after {timeout_s} s: {self.log_tail()}")
            time.sleep(0.5)  # polling an external process's readiness

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def server_command(kind: str, args: argparse.Namespace, port: int) -> list[str]:
    """The command that starts the server for `kind` ("peft" or "lorafleet") on `port`."""
    if not args.model:
        raise ValueError("--model is needed to start a server (or give --url)")
    adapters = [item for spec in args.adapter for item in ("--adapter", spec)]
    if kind == "peft":
        head = [sys.executable, "-m", "lorafleet.loadgen.peft_server", "--model", args.model]
        return [*head, *adapters, "--host", "127.0.0.1", "--port", str(port), *args.peft_arg]
    head = [sys.executable, "-m", "lorafleet", "serve", "--model", args.model]
    return [*head, *adapters, "--host", "127.0.0.1", "--port", str(port), *args.serve_arg]


def parse_counts(text: str | None, name: str) -> list[int | None]:
    """Comma-separated adapter counts; [None] (= all known adapters) when not given."""
    if not text:
        return [None]
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from exc
    if not counts or any(n < 0 for n in counts):
        raise ValueError(f"{name}: expected non-negative counts, got {text!r}")
    return list(counts)


def parse_backends(text: str) -> list[str]:
    """The --backend list, validated against BACKENDS."""
    backends = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise ValueError(f"--backend: unknown {unknown or text!r}; choose from {', '.join(BACKENDS)}")
    return backends


def server_groups(backends: list[str]) -> list[tuple[str, list[str]]]:
    """Backends grouped by the server they need: lorafleet and lorafleet-nolora share one."""
    groups: dict[str, list[str]] = {}
    for backend in backends:
        groups.setdefault("peft" if backend == "peft" else "lorafleet", []).append(backend)
    return list(groups.items())


async def measure(args: argparse.Namespace, url: str, backend: str, n: int | None) -> tuple[dict, Target]:
    """One loadgen run of `backend` with the first n adapters; returns its results entry and target."""
    sub = argparse.Namespace(**vars(args))
    sub.url, sub.num_adapters, sub.no_lora = url, n, backend == "lorafleet-nolora"
    if not sub.adapters and args.adapter:
        sub.adapters = ",".join(spec.partition("=")[0] for spec in args.adapter)
    target = await resolve_target(sub, need_adapters=not args.trace and n != 0)
    label = f"{backend} n={len(target.adapters)}"
    entry, _ = await run_one(sub, url, target, args.rate, label)
    entry["backend"] = backend
    return entry, target


def make_row(backend: str, entry: dict, target: Target, args: argparse.Namespace, gpu: str) -> dict:
    """The headline numbers of one run (the columns of S-LoRA's table 3, and a few more)."""
    metrics = entry["metrics"]
    return {
        "backend": backend,
        "num_adapters": len(target.adapters),
        "req_per_s": metrics["req_per_s"],
        "first_token_latency_s": metrics["ttft_s"]["mean"],
        "slo_attainment": metrics["slo_attainment"],
        "duration_s": None if args.trace else args.duration,
        "gpu": gpu,
        "run_wall_s": metrics["duration_s"],
        "rate": None if args.trace else args.rate,
        "cv": None if args.trace else args.cv,
        "alpha": None if args.trace else args.alpha,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "slo_ttft_s": metrics["slo_ttft_s"],
        "num_requests": metrics["num_requests"],
        "completed": metrics["completed"],
        "failed": metrics["failed"],
        "output_tok_per_s": metrics["output_tok_per_s"],
        "ttft_p50_s": metrics["ttft_s"]["p50"],
        "ttft_p99_s": metrics["ttft_s"]["p99"],
        "e2e_mean_s": metrics["e2e_s"]["mean"],
        "goodput_req_per_s": metrics["goodput_req_per_s"],
        "errors_by_code": metrics["errors_by_code"],
        "protocol": args.protocol,
    }


def warm_up(args: argparse.Namespace, url: str, backend: str) -> dict:
    """One discarded run of `--warmup-duration` seconds at the largest adapter count; its headline figures."""
    counts = [n for n in _counts_for(backend, args) if n is not None]
    warm = argparse.Namespace(**{**vars(args), "duration": args.warmup_duration})
    entry, target = asyncio.run(measure(warm, url, backend, max(counts) if counts else None))
    metrics = entry["metrics"]
    return {"backend": backend, "num_adapters": len(target.adapters), "duration_s": args.warmup_duration,
            "req_per_s": metrics["req_per_s"], "completed": metrics["completed"]}


ROOFLINE_FIELDS = ("roofline_steps", "roofline_executor_seconds", "roofline_seconds", "roofline_weight_bytes",
                   "roofline_kv_bytes", "roofline_adapter_bytes", "roofline_prefill_flops")


def scrape_server_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """The lorafleet server's /metrics samples as {(name without the prefix, labels): value}, read with
    prometheus_client's parser; {} when the server has none (e.g. an older server)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())
    except (urllib.error.URLError, OSError):
        return {}


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text as {(sample name without its `prefix:` or `lorafleet_`, sorted labels): value}. The
    `model_name` label (one value per server, on every family, as vLLM labels them) is dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.split(":", 1)[-1].removeprefix("lorafleet_")
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(name, labels)] = sample.value
    return samples


def server_tensor_parallel_size(url: str) -> int | None:
    """The number of executor ranks a lorafleet server reports on /health (its tensor-parallel size); None
    for a server that does not report executors (the PEFT baseline: one process, one device)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            executors = json.loads(resp.read().decode()).get("executors")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return len(executors) if isinstance(executors, list) and executors else None


def metrics_seconds(entry: dict) -> float:
    return float(entry["metrics"].get("duration_s") or 0.0)


def server_figures(before: dict, after: dict, seconds: float) -> dict:
    """What the server measured during one run (differences of its counters): adapter bytes loaded per second,
    load stalls, and per batch-size class the executor time beside the step roofline (docs/benchmarks.md)."""
    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    figures = {"adapter_load_bytes_per_s": delta("adapter_load_bytes_total") / seconds if seconds else None,
               "adapter_load_stalls": delta("adapter_load_stalls_total")}
    classes = sorted({dict(labels)["seqs"] for name, labels in after if name == "roofline_steps_total"})
    roofline = {}
    for label in classes:
        labels = (("seqs", label),)
        sums = {name: delta(f"{name}_total", labels) for name in ROOFLINE_FIELDS}
        steps = sums["roofline_steps"]
        if steps <= 0:
            continue
        roofline[label] = {
            "steps": int(steps),
            "executor_ms": 1000 * sums["roofline_executor_seconds"] / steps,
            "roofline_ms": 1000 * sums["roofline_seconds"] / steps,
            "executor_over_roofline": sums["roofline_executor_seconds"] / max(sums["roofline_seconds"], 1e-12),
            "weight_gb": sums["roofline_weight_bytes"] / steps / 1e9,
            "kv_gb": sums["roofline_kv_bytes"] / steps / 1e9,
            "adapter_gb": sums["roofline_adapter_bytes"] / steps / 1e9,
            "prefill_tflop": sums["roofline_prefill_flops"] / steps / 1e12,
        }
    figures["roofline"] = roofline
    figures["device_copy_bandwidth_gb_s"] = after.get(("device_copy_bandwidth_bytes", ()), 0.0) / 1e9
    figures["device_matmul_tflops"] = after.get(("device_matmul_flops", ()), 0.0) / 1e12
    return figures


def run_group(kind: str, backends: list[str], args: argparse.Namespace, gpu: str, document: dict) -> None:
    """Start the group's server (unless --url), run each backend and adapter count, stop the server.

    Rows are appended to `document` (and the file rewritten) as they finish, so a failure later keeps
    what was measured; a failure is recorded in `document["failures"]` and re-raised.
    """
    server = None
    url = args.url
    if url is None:
        port = free_port()
        command = server_command(kind, args, port)
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="lorafleet-bench-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(kind, command, f"http://127.0.0.1:{port}", log_dir / f"{kind}.log")
    backend = kind
    try:
        if server is not None:
            server.start(args.startup_timeout)
            url = server.url
        if args.warmup_duration > 0 and kind == "lorafleet":
            document.setdefault("warmups", []).append(warm_up(args, url, backends[0]))
        tp = server_tensor_parallel_size(url) if kind == "lorafleet" else 1
        for backend in backends:
            for n in _counts_for(backend, args):
                before = scrape_server_metrics(url) if backend != "peft" else None
                entry, target = asyncio.run(measure(args, url, backend, n))
                row = make_row(backend, entry, target, args, gpu)
                row["tensor_parallel_size"] = tp
                if before is not None:
                    row.update(server_figures(before, scrape_server_metrics(url), metrics_seconds(entry)))
                document["rows"].append(row)
                document["runs"].append(entry)
                _save(args, document)
    except (ValueError, RuntimeError, OSError) as exc:
        document["failures"].append({"backend": backend, "error": str(exc)})
        _save(args, document)
        raise
    finally:
        if server is not None:
            server.stop()


def _counts_for(backend: str, args: argparse.Namespace) -> list[int | None]:
    if backend == "peft" and args.peft_num_adapters:
        return parse_counts(args.peft_num_adapters, "--peft-num-adapters")
    if backend == "lorafleet-nolora" and args.nolora_num_adapters:
        return parse_counts(args.nolora_num_adapters, "--nolora-num-adapters")
    return parse_counts(args.num_adapters, "--num-adapters")


def _save(args: argparse.Namespace, document: dict) -> None:
    if args.out:
        write_json(args.out, document)


def _new_document(args: argparse.Namespace, env: dict) -> dict:
    """A fresh results document, or the existing --out file's with --append."""
    if args.append and args.out and Path(args.out).exists():
        try:
            document = json.loads(Path(args.out).read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # not JSON, not UTF-8, unreadable
            raise ValueError(f"--append: {args.out} is not a {SCHEMA} file ({exc})") from None
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise ValueError(f"--append: {args.out} is not a {SCHEMA} file")
        document.setdefault("failures", [])
        return document
    return {"schema": SCHEMA, "environment": env, "rows": [], "runs": [], "failures": []}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lorafleet bench`; 0 when every row completed requests and nothing failed."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        backends = parse_backends(args.backend)
        check_output_paths(args, ("out",))
        if args.trace:
            read_trace(args.trace)
        for backend in backends:
            _counts_for(backend, args)
        env = environment()
        document = _new_document(args, env)
    except ValueError as exc:
        print(f"lorafleet bench: error: {exc}", file=sys.stderr)
        return 2
    gpu = (env["gpus"] or ["none"])[0]
    failed = False
    for kind, group in server_groups(backends):
        try:
            run_group(kind, group, args, gpu, document)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"lorafleet bench: {', '.join(group)}: {exc}", file=sys.stderr)
            failed = True
    _print_rows(document["rows"])
    return 0 if not failed and all(row["completed"] for row in document["rows"]) else 1


def _print_rows(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lorafleet bench")
    for column in ("backend", "n", "req/s", "mean TTFT (s)", "SLO attainment", "ok/total"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in rows:
        ttft = row["first_token_latency_s"]
        attain = row["slo_attainment"]
        table.add_row(
            row["backend"],
            str(row["num_adapters"]),
            f"{row['req_per_s']:.3f}",
            "-" if ttft is None else f"{ttft:.3f}",
            "-" if attain is None else f"{100 * attain:.1f}%",
            f"{row['completed']}/{row['num_requests']}",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())

"""`lorafleet loadgen`: replay S-LoRA's workload (or a JSONL trace) against a running server.

Exit status: 0 when the run finished and at least one request completed (or there were none),
1 when every request failed or the server could not be reached, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections import deque
from pathlib import Path

import aiohttp

from lorafleet.args import (
    Parser,
    fraction,
    http_url,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from lorafleet.loadgen.clients import (
    ClientConfig,
    Progress,
    RunOutput,
    list_models,
    run_workload,
    split_models,
)
from lorafleet.loadgen.results import (
    SCHEMA,
    environment,
    plot_runs,
    record_json,
    summarize,
    summary_table,
    write_json,
)
from lorafleet.loadgen.workload import (
    MAX_CV,
    MIN_CV,
    RequestSpec,
    WorkloadConfig,
    generate,
    parse_range,
    read_trace,
    write_trace,
)

DEFAULT_SLO_TTFT_MS = 6000.0
SLORA_LEN = (8, 512)  # S-LoRA's input and output length range
DEFAULT_TOKEN_RANGE = (10, 499)
MODELS_TIMEOUT_S = 30.0  # GET /v1/models waits at most this (or --request-timeout when shorter)


def add_workload_args(parser: argparse.ArgumentParser, several_n: bool = False) -> None:
    """Workload and client options shared by `loadgen` and `bench` (where --num-adapters is a list)."""
    w = parser.add_argument_group("workload (S-LoRA's model)")
    w.add_argument(
        "--num-adapters",
        type=str if several_n else non_negative_int,
        default=None,
        help="use the first N adapters (of --adapters or of the server's /v1/models)"
        + ("; comma-separated values give one row each" if several_n else ""),
    )
    w.add_argument("--adapters", default=None, help="comma-separated adapter names (default: from /v1/models)")
    w.add_argument("--base-model", default=None, help="the base model's name (default: from /v1/models)")
    w.add_argument("--alpha", type=non_negative_float, default=1.0, help="power-law popularity exponent (default 1)")
    w.add_argument("--rate", type=positive_float, default=1.0, help="mean arrival rate, requests/s (default 1)")
    w.add_argument("--cv", type=gap_cv, default=1.0, help="coefficient of variation of inter-arrival gaps "
                   f"(default 1: Poisson; 0: constant gaps; else {MIN_CV:g}..{MAX_CV:g})")
    w.add_argument("--input-len", default=None, help="prompt length range a:b in tokens, inclusive (default: "
                   "S-LoRA's 8:512, scaled down to fit the server's max_model_len with --output-len)")
    w.add_argument("--output-len", default=None, help="output length range a:b in tokens, inclusive (default: "
                   "S-LoRA's 8:512, scaled down like --input-len)")
    w.add_argument("--duration", type=positive_float, default=60.0, help="seconds of arrivals (default 60)")
    w.add_argument("--seed", type=non_negative_int, default=0)
    w.add_argument("--base-fraction", type=fraction, default=0.0, help="fraction of requests to the base model")
    w.add_argument("--prompt-kind", choices=("tokens", "text"), default="tokens")
    w.add_argument("--token-range", default=None, help="token ids of synthetic prompts, a:b inclusive (default: "
                   "10:499, cut to the server's vocabulary when /v1/models gives vocab_size)")
    w.add_argument("--trace", default=None, help="replay this JSONL trace instead of generating a workload")
    c = parser.add_argument_group("client")
    c.add_argument("--protocol", type=protocol_name, choices=("ws", "openai"), default="ws",
                   help="ws: the WebSocket stream /v1/stream; openai (or http): streamed POST /v1/completions "
                   "(default: ws)")
    c.add_argument("--num-sockets", type=positive_int, default=1, help="WebSocket connections to spread requests over")
    c.add_argument("--max-concurrency", type=positive_int, default=None, help="at most this many requests in flight")
    c.add_argument("--request-timeout", type=positive_float, default=600.0,
                   help="seconds before a request is abandoned")
    c.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=None,
        help="abandon requests still running this many seconds after the last arrival (default: wait)",
    )
    c.add_argument("--temperature", type=non_negative_float, default=0.0)
    c.add_argument("--slo-ttft-ms", type=positive_float, default=DEFAULT_SLO_TTFT_MS,
                   help=f"first-token SLO in ms, the same for both protocols: attainment is measured against it "
                   f"and it is sent with every request (default {DEFAULT_SLO_TTFT_MS:g})")
    c.add_argument("--no-server-slo", action="store_true",
                   help="measure attainment against --slo-ttft-ms but do not send it (no early abort by the server)")
    c.add_argument("--api-key", default=os.environ.get("LORAFLEET_API_KEY") or None,
                   help="sent as Authorization: Bearer KEY, for a server started with --api-key (default: "
                   "$LORAFLEET_API_KEY, else none)")
    c.add_argument("--no-progress", action="store_true", help="no live progress display")


def gap_cv(value: str) -> float:
    """--cv: 0 (constant gaps) or a number in [MIN_CV, MAX_CV] (workload.py says why)."""
    cv = non_negative_float(value)
    if cv != 0 and not MIN_CV <= cv <= MAX_CV:
        raise argparse.ArgumentTypeError(f"must be 0 (constant gaps) or in [{MIN_CV:g}, {MAX_CV:g}], got {value}")
    return cv


def protocol_name(value: str) -> str:
    """--protocol: `http` is another name of `openai` (the HTTP API)."""
    return "openai" if value == "http" else value


def build_parser() -> argparse.ArgumentParser:
    """The `lorafleet loadgen` argument parser."""
    parser = Parser(prog="lorafleet loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", type=http_url, default="http://127.0.0.1:8000", help="server base URL")
    add_workload_args(parser)
    parser.add_argument(
        "--no-lora",
        action="store_true",
        help="send every request to the base model (same trace, adapters ignored)",
    )
    parser.add_argument("--sweep-rates", default=None, help="comma-separated rates: one run per rate")
    parser.add_argument("--write-trace", default=None, help="write the generated workload as JSONL")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only generate (and --write-trace) the workload; no server needed",
    )
    parser.add_argument("--out", default=None, help="results JSON path")
    parser.add_argument("--records", action="store_true", help="include per-request records in --out")
    parser.add_argument("--plot", default=None, help="PNG with latency CDFs and throughput/attainment over time")
    return parser


@dataclasses.dataclass(frozen=True)
class Target:
    """The server's base model name, the adapter names the workload draws from, and what the server said
    about its base model in /v1/models (None when it did not say)."""

    base_model: str | None
    adapters: tuple[str, ...]
    max_model_len: int | None = None
    vocab_size: int | None = None


def server_defaults(max_model_len: int | None, vocab_size: int | None) -> dict[str, str]:
    """--input-len, --output-len and --token-range defaults for a server: S-LoRA's 8:512 lengths, both
    upper bounds scaled down (input half, output the rest) when the longest prompt plus the longest output
    would exceed `max_model_len`; token ids 10:499 cut to `vocab_size` - 1."""
    (in_lo, in_hi), (out_lo, out_hi) = SLORA_LEN, SLORA_LEN
    if max_model_len is not None and in_hi + out_hi > max_model_len:
        in_hi = max(1, max_model_len // 2)
        out_hi = max(1, max_model_len - in_hi)
        in_lo, out_lo = min(in_lo, in_hi), min(out_lo, out_hi)
    lo, hi = DEFAULT_TOKEN_RANGE
    if vocab_size is not None:
        hi = min(hi, vocab_size - 1)
        lo = min(lo, hi)
    return {"input_len": f"{in_lo}:{in_hi}", "output_len": f"{out_lo}:{out_hi}", "token_range": f"{lo}:{hi}"}


def apply_server_defaults(args: argparse.Namespace, target: Target) -> None:
    """Fill the length and token-id options the user left unset from what the server reported."""
    for key, value in server_defaults(target.max_model_len, target.vocab_size).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _base_facts(models: list[dict[str, object]], base: str | None) -> tuple[int | None, int | None]:
    """(max_model_len, vocab_size) of the base model's /v1/models entry, where given as integers."""
    entry = next((m for m in models if isinstance(m, dict) and m.get("id") == base), {})
    facts = [entry.get(key) for key in ("max_model_len", "vocab_size")]
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None for v in facts)


async def resolve_target(args: argparse.Namespace, need_adapters: bool) -> Target:
    """Adapter names from --adapters or the server's /v1/models, cut to --num-adapters."""
    names = [a.strip() for a in (args.adapters or "").split(",") if a.strip()]  # "a, b" means a and b
    base = args.base_model
    facts: tuple[int | None, int | None] = (None, None)
    if args.dry_run and not names:
        names = [f"adapter-{i}" for i in range(args.num_adapters or 0)]
    elif not args.dry_run:
        try:
            models = await list_models(args.url, timeout_s=min(MODELS_TIMEOUT_S, args.request_timeout),
                                       api_key=args.api_key)
        except (aiohttp.ClientError, OSError, RuntimeError, asyncio.TimeoutError, ValueError) as exc:
            if need_adapters and not names:
                raise RuntimeError(f"could not list the server's models: {exc}") from exc
            models = []
        found_base, found = split_models(models)
        base = base or found_base
        names = names or found
        facts = _base_facts(models, base)
    if args.num_adapters is not None:
        if args.num_adapters > len(names):
            raise ValueError(f"--num-adapters {args.num_adapters} but only {len(names)} adapters are known")
        names = names[: args.num_adapters]
    target = Target(base, tuple(names), *facts)
    apply_server_defaults(args, target)
    return target


def workload_config(args: argparse.Namespace, target: Target, rate: float) -> WorkloadConfig:
    """The WorkloadConfig the arguments describe, at `rate`."""
    lo, hi = parse_range(args.token_range, "--token-range")
    base_fraction = 1.0 if not target.adapters else args.base_fraction
    return WorkloadConfig(
        adapters=target.adapters,
        alpha=args.alpha,
        rate=rate,
        cv=args.cv,
        input_len=parse_range(args.input_len, "--input-len"),
        output_len=parse_range(args.output_len, "--output-len"),
        duration=args.duration,
        seed=args.seed,
        base_fraction=base_fraction,
        prompt_kind=args.prompt_kind,
        token_range=(lo, hi + 1),
    )


def client_config(args: argparse.Namespace, url: str, target: Target) -> ClientConfig:
    """The ClientConfig the arguments describe, for the server at `url`."""
    return ClientConfig(
        url=url.rstrip("/"),
        protocol=args.protocol,
        base_model=target.base_model,
        num_sockets=args.num_sockets,
        max_concurrency=args.max_concurrency,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        temperature=args.temperature,
        slo_ttft_ms=None if args.no_server_slo else args.slo_ttft_ms,
        api_key=args.api_key,
    )


async def run_with_progress(specs: list[RequestSpec], cfg: ClientConfig, show: bool, label: str) -> RunOutput:
    """Run the workload; while it runs, show sent/finished/failed and the recent req/s and tok/s."""
    progress = Progress()
    task = asyncio.create_task(run_workload(specs, cfg, progress))
    try:
        if show:
            await _show_progress(task, progress, label)
        return await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _show_progress(task: asyncio.Task[RunOutput], progress: Progress, label: str) -> None:
    """A live status line on a terminal; on a pipe or file, the same line every 10 s."""
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    loop = asyncio.get_running_loop()
    samples: deque[tuple[float, int, int]] = deque(maxlen=10)
    last_print = loop.time()
    with Live(console=console, refresh_per_second=4, transient=False, auto_refresh=console.is_terminal) as live:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            samples.append((loop.time(), progress.finished, progress.tokens_received()))
            line = _status_line(label, progress, samples)
            if console.is_terminal:
                live.update(line)
            elif loop.time() - last_print >= 10.0 or task.done():
                console.print(line)
                last_print = loop.time()


def _status_line(label: str, progress: Progress, samples: deque[tuple[float, int, int]]) -> str:
    """sent/finished/failed and the req/s and tok/s over the last samples (about 5 s)."""
    t0, f0, k0 = samples[0]
    t1, f1, k1 = samples[-1]
    span = max(t1 - t0, 1e-9)
    return (
        f"[bold]{label}[/bold] sent {progress.sent}/{progress.total}  finished {progress.finished}  "
        f"failed {progress.failed}  |  {(f1 - f0) / span:.2f} req/s  {(k1 - k0) / span:.1f} tok/s"
    )


def load_specs(args: argparse.Namespace, target: Target, rate: float) -> tuple[list[RequestSpec], dict[str, object]]:
    """The run's requests (generated or from --trace) and how they were made, for the results file."""
    if args.trace:
        specs, header = read_trace(args.trace)
        described: dict[str, object] = {"trace": str(args.trace), "trace_config": header}
    else:
        config = workload_config(args, target, rate)
        specs = generate(config)
        described = {"workload": config.to_json()}
        if args.write_trace:
            write_trace(_trace_path(args, rate), specs, config)
    if args.no_lora:
        specs = [dataclasses.replace(spec, adapter=None) for spec in specs]
    return specs, described


def _trace_path(args: argparse.Namespace, rate: float) -> Path:
    path = Path(args.write_trace)
    return path.with_name(f"{path.stem}.rate-{rate:g}{path.suffix}") if args.sweep_rates else path


async def run_one(
    args: argparse.Namespace, url: str, target: Target, rate: float, label: str
) -> tuple[dict[str, object], RunOutput]:
    """One workload run: returns the results entry (config + metrics [+ records]) and the raw output."""
    specs, described = load_specs(args, target, rate)
    if not specs:
        if args.trace:
            raise ValueError(f"--trace: {args.trace} holds no requests")
        raise ValueError(f"the workload has no requests (rate {rate:g} req/s over {args.duration:g} s); raise "
                         "--duration or --rate")
    cfg = client_config(args, url, target)
    out = await run_with_progress(specs, cfg, not args.no_progress, label)
    slo_s = None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3
    config = {
        "url": cfg.url,
        "protocol": cfg.protocol,
        "num_sockets": cfg.num_sockets,
        "max_concurrency": cfg.max_concurrency,
        "request_timeout_s": cfg.request_timeout_s,
        "drain_timeout_s": cfg.drain_timeout_s,
        "temperature": cfg.temperature,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_sent": cfg.slo_ttft_ms is not None,
        "no_lora": bool(args.no_lora),
        "base_model": target.base_model,
        "num_adapters": len(target.adapters),
        "started_unix": out.started_unix,
        **described,
    }
    entry: dict[str, object] = {
        "config": config,
        "metrics": summarize(out.records, out.duration_s, slo_s),
        "protocol_errors": out.protocol_errors,
    }
    if args.records:
        entry["records"] = [record_json(r) for r in out.records]
    return entry, out


def parse_rates(text: str | None, default: float) -> list[float]:
    """The --sweep-rates list, or [default] when not given."""
    if not text:
        return [default]
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--sweep-rates: expected comma-separated numbers, got {text!r}") from exc
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--sweep-rates: expected positive rates, got {text!r}")
    return rates


def check_output_paths(args: argparse.Namespace, flags: tuple[str, ...] = ("out", "plot", "write_trace")) -> None:
    """Refuse an output path that cannot be written before anything runs (not after a long run): its folder
    must exist and be writable, and the path must not be a folder. ValueError naming the flag."""
    for flag in flags:
        value = getattr(args, flag, None)
        if not value:
            continue
        path, name = Path(value), "--" + flag.replace("_", "-")
        folder = path.parent
        if path.is_dir():
            raise ValueError(f"{name}: {value} is a directory; give a file path")
        if not folder.is_dir():
            raise ValueError(f"{name}: cannot write {value}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"{name}: {value} is not writable")


async def amain(args: argparse.Namespace) -> int:
    """Resolve the target, run one workload per rate, print and write the results; the exit status."""
    rates = parse_rates(args.sweep_rates, args.rate)
    if args.trace and args.sweep_rates:
        raise ValueError("--sweep-rates needs a generated workload, not --trace")
    check_output_paths(args)
    if args.trace:
        read_trace(args.trace)  # a bad trace is a bad argument: refused before the server is asked anything
    wants_adapters = not args.trace and not args.no_lora and args.num_adapters != 0
    target = await resolve_target(args, need_adapters=wants_adapters)
    if args.dry_run:
        for rate in rates:
            specs, _ = load_specs(args, target, rate)
            print(f"rate {rate:g}: {len(specs)} requests over {len(set(s.adapter for s in specs))} models")
        return 0
    entries, plotted = [], []
    for rate in rates:
        label = f"rate {rate:g}" if not args.trace else Path(args.trace).name
        entry, out = await run_one(args, args.url, target, rate, label)
        entries.append(entry)
        plotted.append((label, out.records))
        _print_summary(entry, label)
    _write_outputs(args, entries, plotted)
    completed = sum(int(e["metrics"]["completed"]) for e in entries)  # type: ignore[index]
    total = sum(int(e["metrics"]["num_requests"]) for e in entries)  # type: ignore[index]
    return 0 if completed > 0 or total == 0 else 1


def _print_summary(entry: dict[str, object], label: str) -> None:
    from rich.console import Console

    Console().print(summary_table(entry["metrics"], title=f"loadgen: {label}"))  # type: ignore[arg-type]
    for problem in entry["protocol_errors"][:5]:  # type: ignore[index]
        print(f"loadgen: protocol error: {problem}", file=sys.stderr)


def _write_outputs(args: argparse.Namespace, entries: list[dict[str, object]], plotted: list[tuple[str, list]]) -> None:
    if args.out:
        document: dict[str, object] = {"schema": SCHEMA, "environment": environment()}
        document.update(entries[0] if len(entries) == 1 and not args.sweep_rates else {"runs": entries})
        write_json(args.out, document)
    if args.plot:
        slo_s = None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3
        plot_runs(plotted, slo_s, args.plot, plot_title(args, entries[0]["config"]))  # type: ignore[index]


def plot_title(args: argparse.Namespace, config: dict[str, object]) -> str:
    """The configuration a plot shows: server, protocol, workload shape, lengths and SLO."""
    where = f"{config['url']} ({config['protocol']}"
    where += f", {args.num_sockets} socket(s))" if config["protocol"] == "ws" else ")"
    if args.trace:
        shape = f"trace {Path(args.trace).name}"
    else:
        rates = args.sweep_rates or f"{args.rate:g}"
        shape = (f"rate {rates} req/s, cv {args.cv:g}, {args.duration:g} s; {config['num_adapters']} adapter(s), "
                 f"alpha {args.alpha:g}; input {args.input_len}, output {args.output_len} tokens")
    slo = "no SLO" if args.slo_ttft_ms is None else f"SLO TTFT {args.slo_ttft_ms:g} ms"
    return f"lorafleet loadgen: {where}\n{shape}; {slo}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lorafleet loadgen`."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return asyncio.run(amain(args))
    except ValueError as exc:
        print(f"lorafleet loadgen: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"lorafleet loadgen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

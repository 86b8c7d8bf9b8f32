"""`lorafleet serve`: build the planning engine, spawn the executor(s), run the actors and the web app.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT drains first), 2 for bad arguments or assets,
3 when an executor died (in-flight requests got errors and /health answered 503 meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

EXIT_EXECUTOR_FAILED = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lorafleet serve", description="Serve a base model and its LoRA adapters.")
    p.add_argument("--model", default=None, help="HF model directory or synthetic:NAME (default: the demo model)")
    p.add_argument("--served-model-name", default=None, help="name of the base model in the API")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve a PEFT adapter")
    p.add_argument("--adapter-root", default=None, help="every PEFT dir below it is served by its relative path, "
                   "indexed at start and validated on first use; runtime loads are restricted to it")
    p.add_argument("--synthetic-adapters", type=int, default=0, metavar="N",
                   help="also serve N random adapters synthetic-0..N-1, made in memory (for benchmarks)")
    p.add_argument("--synthetic-ranks", default="8,16,32,64", help="their ranks, cycled (default 8,16,32,64)")
    p.add_argument("--synthetic-targets", default="q_proj,k_proj,v_proj,o_proj", help="their target modules")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--num-pages", type=int, default=512, help="pool pages per device; 0 = size from free GPU memory")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="with --num-pages 0")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="executor processes (one per GPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="do not replay steps from CUDA graphs")
    p.add_argument("--no-piecewise-graphs", action="store_true",
                   help="run steps with prefill tokens eagerly (decode steps still replay their graphs)")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-adapters-per-batch", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--host-cache-mb", type=int, default=4096, help="host LRU cache of packed adapters (MiB)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="default first-token SLO (early abort)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight work")
    p.add_argument("--failure-linger", type=float, default=2.0,
                   help="seconds to keep answering (503) after an executor died, before exiting 3")
    p.add_argument("--executor-restarts", type=int, default=0,
                   help="restart a dead executor up to N times (0: exit 3 after --failure-linger)")
    p.add_argument("--api-key", default=os.environ.get("LORAFLEET_API_KEY"))
    p.add_argument("--admin-key", default=os.environ.get("LORAFLEET_ADMIN_KEY"))
    p.add_argument("--log-steps", type=float, default=0.0, metavar="S",
                   help="every S seconds print steps/s, batch size and where a step's time went (0 = off)")
    p.add_argument("--metric-prefix", type=metric_prefix, default="lorafleet:",
                   help="prefix of every /metrics name; 'vllm:' serves vLLM's names (Kubernetes inference gateway, "
                   "vLLM dashboards; docs/scale-out.md)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads per executor (0 = default)")
    p.add_argument("--max-adapter-load-bytes-per-step", type=int, default=256 << 20, metavar="BYTES",
                   help="adapter bytes (one GPU's pool) a step may load; requests whose adapter does not fit wait "
                   "a step while others run (0 = no bound; a step's first load always fits)")
    p.add_argument("--prefetch-adapters", type=int, default=8,
                   help="adapters of waiting requests loaded ahead into free pool pages per step")
    p.add_argument("--prefetch-workers", type=int, default=2,
                   help="threads packing adapters into the host cache at once")
    p.add_argument("--cluster-window", type=int, default=0,
                   help="waiting requests admission looks through for ones whose adapter is already in the batch "
                   "(0 = the fairness window, 32)")
    p.add_argument("--max-batch-adapter-fraction", type=float, default=0.0,
                   help="bound the distinct adapters' bytes a step reads to this fraction of the weight bytes "
                   "(0 = no bound; see docs/benchmarks.md, roofline)")
    p.add_argument("--prefill-attention", choices=("triton", "flex"), default="triton",
                   help="prefill attention kernel: ours (Triton) or PyTorch flex_attention over the pages")
    p.add_argument("--roofline-bandwidth-gbps", type=float, default=0.0,
                   help="device memory bandwidth for the step roofline (GB/s; 0 = measured at start-up)")
    p.add_argument("--roofline-tflops", type=float, default=0.0,
                   help="matmul peak for the step roofline (TFLOP/s; 0 = measured at start-up)")
    return p.parse_args(argv)


def metric_prefix(value: str) -> str:
    """argparse type of --metric-prefix: a Prometheus metric-name start ([a-zA-Z_:][a-zA-Z0-9_:]*)."""
    import re

    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Prometheus name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)")
    return value


@dataclass
class Assets:
    """The model directory, the base model's API name, the adapters to register (and validate) at start,
    and the adapter root, whose adapters are indexed at start and read on first use (docs/adapters.md)."""

    model_ref: str
    model_dir: Path
    base_name: str
    adapters: dict[str, str]
    adapter_root: Path | None = None


def default_assets() -> tuple[str, dict[str, str], str]:
    """(model ref, adapters, base name) with no --model: the demo model if shipped, else synthetic tiny."""
    from lorafleet.engine import demo

    model_dir = demo.demo_model_dir()
    if (model_dir / "config.json").is_file():
        adapters = {n: str(d) for n, d in demo.demo_adapter_dirs().items() if (d / "adapter_config.json").is_file()}
        return str(model_dir), adapters, demo.BASE_MODEL_NAME
    from lorafleet.engine.build import cache_dir, resolve_model
    from lorafleet.engine.synthetic import write_adapter

    model_dir = resolve_model("synthetic:tiny")
    adapters = {}
    for name, rank, seed in (("tiny-r4", 4, 1), ("tiny-r8", 8, 2), ("tiny-r16", 16, 3)):
        out = cache_dir() / "synthetic" / "tiny-adapters" / name
        if not (out / "adapter_config.json").is_file():
            _write_once(out, lambda tmp, r=rank, s=seed: write_adapter(tmp, model_dir, r, seed=s))
        adapters[name] = str(out)
    return str(model_dir), adapters, "synthetic-tiny"


def _write_once(out: Path, write) -> None:
    """Write into a private temporary dir, then rename into place (another process may win the race)."""
    import shutil

    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    write(tmp)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "adapter_config.json").is_file():
            raise
        shutil.rmtree(tmp)


def synthetic_adapters(args: argparse.Namespace) -> dict[str, str]:
    """--synthetic-adapters N: synthetic-i (rank cycling through --synthetic-ranks, seed i), the names and
    ranks the PEFT baseline server gives its own random adapters."""
    from lorafleet.engine.synthetic import synthetic_adapter_path

    try:
        ranks = [int(r) for r in args.synthetic_ranks.split(",") if r.strip()]
    except ValueError as exc:
        raise ValueError(f"--synthetic-ranks: expected comma-separated integers, got {args.synthetic_ranks!r}") from exc
    if args.synthetic_adapters < 0 or not ranks or min(ranks) < 1:
        raise ValueError("--synthetic-adapters must be >= 0 and --synthetic-ranks positive integers")
    targets = tuple(t.strip() for t in args.synthetic_targets.split(",") if t.strip())
    return {f"synthetic-{i}": synthetic_adapter_path(ranks[i % len(ranks)], i, targets)
            for i in range(args.synthetic_adapters)}


def resolve_assets(args: argparse.Namespace) -> Assets:
    from lorafleet.engine.build import resolve_model

    if args.model is None:
        ref, adapters, base = default_assets()
    else:
        ref, adapters = args.model, {}
        base = args.model.replace("synthetic:", "synthetic-") if args.model.startswith("synthetic:") \
            else Path(args.model).resolve().name
    root = None
    if args.adapter_root is not None:
        root = Path(args.adapter_root)
        if not root.is_dir():
            raise ValueError(f"--adapter-root: {root} is not a directory")
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter: expected NAME=DIR, got {spec!r}")
        adapters[name] = path
    adapters.update(synthetic_adapters(args))
    served = args.served_model_name or base
    if served in adapters:
        raise ValueError(f"--adapter: the name {served!r} is the base model's served name; an adapter needs "
                         "another name")
    return Assets(ref, resolve_model(ref), served, adapters, root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from lorafleet.actors.server import engine_config
    from lorafleet.engine.config import ConfigError

    try:
        assets = resolve_assets(args)
        config = engine_config(args)
    except (ValueError, ConfigError) as exc:
        print(f"lorafleet serve: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(args, assets, config))


async def run(args: argparse.Namespace, assets: Assets, config) -> int:
    """Spawn the executors first (they load the model while this process builds its planning engine),
    start the actors and the web app, serve until a signal or a failure, then stop everything. The host
    cache's shared segment is made first: the executors map and page-lock it once while they start."""
    from lorafleet.engine.host_arena import HostArena, shared_memory_free

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    capacity = args.host_cache_mb << 20
    free = shared_memory_free()
    if free is not None and capacity > 0.9 * free:
        capacity = int(0.9 * free)
        print(f"lorafleet serve: --host-cache-mb {args.host_cache_mb} exceeds the free shared memory "
              f"({free >> 20} MiB); the host cache gets {capacity >> 20} MiB", file=sys.stderr, flush=True)
    try:
        arena = HostArena(capacity)
    except (OSError, ValueError) as exc:
        print(f"lorafleet serve: --host-cache-mb: cannot make a {args.host_cache_mb} MiB shared host cache: {exc}",
              file=sys.stderr)
        return 2
    try:
        return await _run(args, assets, config, arena, stop, started)
    finally:
        arena.close()


async def _run(args: argparse.Namespace, assets: Assets, config, arena, stop: asyncio.Event, started: float) -> int:
    from lorafleet.actors.executor import ExecutorDied, ExecutorGroup
    from lorafleet.actors.server import Server

    executors = ExecutorGroup.spawn(str(assets.model_dir), config, args.torch_threads, arena.name)
    if config.num_pages == 0:  # the executors size the pool from their free memory: wait for that number
        try:
            await executors.wait_ready()
        except ExecutorDied as exc:
            print(f"lorafleet serve: startup failed: {exc}", file=sys.stderr)
            return 1
        config = dataclasses.replace(config, num_pages=executors.num_pages)
    try:
        server = Server.build(args, assets, config, executors, arena)
    except ValueError as exc:
        print(f"lorafleet serve: {exc}", file=sys.stderr)
        await executors.stop(timeout=0.0)
        return 2
    try:
        await server.start()
    except Exception as exc:  # startup failed: report, clean up, exit non-zero
        print(f"lorafleet serve: startup failed: {exc}", file=sys.stderr)
        traceback.print_exc()
        await server.stop()
        return 1
    server.print_urls(time.monotonic() - started)
    try:
        return await server.serve_until(stop)
    finally:
        await server.stop()

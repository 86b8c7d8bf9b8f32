"""`lorafleet serve`: build the planning engine, spawn the executor(s), run the actors and the web app.

Exit codes (EXIT_CODES, also at the end of `--help` and in docs/serving.md): 0 clean shutdown (SIGTERM/SIGINT
drained every request), 1 internal failure (an actor crashed), 2 bad arguments or assets or any other failed
start-up (one line on stderr), 3 executor failure (died, or stalled past --stall-kill-after, with no restart
left), 4 drain cut at --drain-timeout (requests still running then got a `server_shutting_down` error).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.args import Parser, non_negative_float, non_negative_int, port, positive_float, positive_int

DEFAULT_SLO_TTFT_MS = 30_000.0
EXIT_OK, EXIT_INTERNAL, EXIT_STARTUP_FAILED, EXIT_EXECUTOR_FAILED, EXIT_DRAIN_CUT = 0, 1, 2, 3, 4
EXIT_CODES = f"""Exit status (for supervisors):
  {EXIT_OK}  clean shutdown: SIGTERM/SIGINT drained every in-flight request
  {EXIT_INTERNAL}  internal failure: an actor crashed
  {EXIT_STARTUP_FAILED}  bad arguments, model or adapter, or another failed start-up (one line on stderr)
  {EXIT_EXECUTOR_FAILED}  executor failure: an executor died (or stalled past --stall-kill-after) and no
     --executor-restarts were left; in-flight requests got executor_failed errors
  {EXIT_DRAIN_CUT}  drain cut: requests still running at --drain-timeout got server_shutting_down errors"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (flags without a value or default say what "none" means
    in their help instead); the description and epilog keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


_DESCRIPTION = """Serve a base model and its LoRA adapters: OpenAI-compatible HTTP under /v1, the WebSocket stream
/v1/stream, the operator dashboard /dashboard, Prometheus /metrics and /health."""

_EPILOG = """vLLM spellings: --lora-modules, --max-loras, --max-num-batched-tokens, --block-size, --enforce-eager,
--enable-lora, --disable-log-requests and the dtype names half/float mean what they mean in `vllm serve`
(docs/serving.md lists the mapping and the flags that differ).

""" + EXIT_CODES

DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16", "bfloat16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lorafleet serve", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=_HelpFormatter)
    _model_args(p.add_argument_group("model and adapters"))
    _network_args(p.add_argument_group("network and access"))
    _engine_args(p.add_argument_group("engine"))
    _lifecycle_args(p.add_argument_group("lifecycle and logs"))
    return p


def _model_args(g) -> None:
    g.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="HF model directory or synthetic:NAME (same as --model); none: the embedded demo model")
    g.add_argument("--model", default=None, help="HF model directory or synthetic:NAME; none: the demo model")
    g.add_argument("--served-model-name", default=None, help="the base model's name in the API "
                   "(none: the model directory's name)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve a PEFT adapter "
                   "(repeatable)")
    g.add_argument("--lora-modules", dest="adapter", action="extend", nargs="+", metavar="NAME=DIR",
                   help="vLLM's spelling of --adapter: NAME=DIR pairs or JSON objects with name and path")
    g.add_argument("--adapter-root", default=None, help="every PEFT dir below it is served by its relative path, "
                   "indexed at start and validated on first use; runtime loads are restricted to it")
    g.add_argument("--synthetic-adapters", type=non_negative_int, default=0, metavar="N",
                   help="also serve N random adapters synthetic-0..N-1, made in memory (for benchmarks)")
    g.add_argument("--synthetic-ranks", default="8,16,32,64", help="the synthetic adapters' ranks, cycled")
    g.add_argument("--synthetic-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="the synthetic adapters' target modules")
    g.add_argument("--enable-lora", action="store_true", help="accepted for vLLM command lines; LoRA is always on")


def _network_args(g) -> None:
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=port, default=8000, help="TCP port (0 picks a free one); checked before the "
                   "model loads")
    g.add_argument("--api-key", default=None, help="key every /v1 request must carry (Authorization: Bearer KEY); "
                   "none: $LORAFLEET_API_KEY, else no key needed")
    g.add_argument("--admin-key", default=None, help="key of the admin routes /v1/load_lora_adapter and "
                   "/v1/unload_lora_adapter (none: $LORAFLEET_ADMIN_KEY); without one those routes answer 403")
    g.add_argument("--dashboard-key", default=None, help="key of /dashboard and /ws/dashboard (none: "
                   "$LORAFLEET_DASHBOARD_KEY, else the API key); open the page once as /dashboard?api_key=KEY, a "
                   "cookie keeps it")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="also serve browser WebSockets and POSTs from this origin, e.g. https://ops.example.com "
                   "(repeatable; '*': any); none: the server's own origin and localhost only")
    g.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body or WebSocket frame")
    g.add_argument("--header-timeout", type=positive_float, default=15.0, metavar="S",
                   help="close a connection whose request headers are not complete S seconds after it opened or "
                   "after its previous request (slow clients; also the keep-alive idle limit)")
    g.add_argument("--body-timeout", type=positive_float, default=30.0, metavar="S",
                   help="a request body not received within S seconds gets 408")
    g.add_argument("--ws-max-generations", type=positive_int, default=256, metavar="N",
                   help="generations in flight on one WebSocket; more get a too_many_generations error")
    g.add_argument("--ws-frame-rate", type=positive_float, default=500.0, metavar="R",
                   help="client frames per second one WebSocket may send (bursts of 2R; an invalid frame counts "
                   "10); a socket over it is closed with 1008")
    g.add_argument("--ws-max-send-buffer-mb", type=positive_float, default=64.0, metavar="MB",
                   help="frames one WebSocket may have waiting to be sent (its client reads slower than its "
                   "generations produce); over it the connection is dropped and its generations cancelled")
    g.add_argument("--sse-max-send-buffer-mb", type=positive_float, default=64.0, metavar="MB",
                   help="events one OpenAI SSE stream may have waiting to be sent (its client reads slower than "
                   "its generations produce); over it the connection is dropped and its generations cancelled")
    g.add_argument("--max-send-buffer-total-mb", type=positive_float, default=1024.0, metavar="MB",
                   help="bytes all WebSockets and SSE streams together may have waiting to be sent (many slow "
                   "readers, each under its own bound); over it the connections holding the most are dropped and "
                   "their generations cancelled")
    g.add_argument("--max-queue", type=non_negative_int, default=1024, help="waiting requests before new ones get 429")
    g.add_argument("--slo-ttft-ms", type=non_negative_float, default=DEFAULT_SLO_TTFT_MS, metavar="MS",
                   help="first-token deadline of requests that carry no slo_ttft_ms: refused at admission (429 + "
                   "Retry-After) when it cannot be met, ended with an error once it has passed; 0: none")


def _engine_args(g) -> None:
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights, activations and pool "
                   "dtype (half = float16, float = float32, as in vLLM)")
    g.add_argument("--num-pages", type=non_negative_int, default=512,
                   help="pool pages per device (KV cache and adapter "
                   "weights share them); 0 = size from free GPU memory")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory the "
                   "executor may use, with --num-pages 0")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="executor processes (one per GPU)")
    g.add_argument("--no-cuda-graphs", "--enforce-eager", action="store_true",
                   help="run every step eagerly, never from CUDA graphs (vLLM: --enforce-eager)")
    g.add_argument("--no-piecewise-graphs", action="store_true",
                   help="run steps with prefill tokens eagerly (decode steps still replay their graphs)")
    g.add_argument("--block-tokens", "--block-size", type=positive_int, default=16,
                   help="tokens per KV page (vLLM: --block-size); rounded to the pool's page geometry")
    g.add_argument("--max-batch-tokens", "--max-num-batched-tokens", type=positive_int, default=512,
                   help="tokens per engine step, prefill and decode together (vLLM: --max-num-batched-tokens)")
    g.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences per engine step")
    g.add_argument("--max-adapters-per-batch", "--max-loras", type=positive_int, default=16,
                   help="distinct adapters per engine step (vLLM: --max-loras)")
    g.add_argument("--max-lora-rank", type=positive_int, default=64, help="largest adapter rank accepted")
    g.add_argument("--max-model-len", type=positive_int, default=None, help="longest prompt + completion in tokens "
                   "(none: the model's max_position_embeddings)")
    g.add_argument("--host-cache-mb", type=non_negative_int, default=4096,
                   help="host LRU cache of packed adapters (MiB)")
    g.add_argument("--torch-threads", type=non_negative_int, default=0,
                   help="torch threads per executor process; 0: chosen "
                   "from the cores this process may use (stated in the start-up banner)")
    g.add_argument("--max-adapter-load-bytes-per-step", type=non_negative_int, default=256 << 20, metavar="BYTES",
                   help="adapter bytes (one GPU's pool) a step may load; requests whose adapter does not fit wait "
                   "a step while others run (0 = no bound; a step's first load always fits)")
    g.add_argument("--prefetch-adapters", type=non_negative_int, default=8,
                   help="adapters of waiting requests loaded ahead into free pool pages per step")
    g.add_argument("--prefetch-workers", type=positive_int, default=2,
                   help="threads packing adapters into the host cache at once")
    g.add_argument("--cluster-window", type=non_negative_int, default=0,
                   help="waiting requests admission looks through for ones whose adapter is already in the batch "
                   "(0 = the fairness window, 32)")
    g.add_argument("--max-batch-adapter-fraction", type=non_negative_float, default=0.0,
                   help="bound the distinct adapters' bytes a step reads to this fraction of the weight bytes "
                   "(0 = no bound; see docs/benchmarks.md, roofline)")
    g.add_argument("--prefill-attention", choices=("triton", "flex", "flash"), default="triton",
                   help="prefill attention kernel: ours (Triton), PyTorch flex_attention over the pages, or "
                   "PyTorch varlen_attn (FlashAttention-2; CUDA, float16/bfloat16)")
    g.add_argument("--decode-attention", choices=("triton", "flash"), default="triton",
                   help="decode attention kernel: ours (Triton) or PyTorch varlen_attn reading the KV pages in place "
                   "(FlashAttention-2; CUDA, float16/bfloat16; pages it refuses, e.g. under 256 tokens, stay on ours)")
    g.add_argument("--roofline-bandwidth-gbps", type=non_negative_float, default=0.0,
                   help="device memory bandwidth for the step roofline (GB/s; 0 = measured at start-up)")
    g.add_argument("--roofline-tflops", type=non_negative_float, default=0.0,
                   help="matmul peak for the step roofline (TFLOP/s; 0 = measured at start-up)")


def _lifecycle_args(g) -> None:
    g.add_argument("--drain-timeout", type=non_negative_float, default=30.0,
                   help="seconds SIGTERM waits for in-flight work; what still runs then gets a server_shutting_down "
                   "error and the exit status is 4")
    g.add_argument("--stall-timeout", type=positive_float, default=30.0, metavar="S",
                   help="no step result for S seconds while a step runs: /health answers 503 'executor stalled'")
    g.add_argument("--stall-kill-after", type=non_negative_float, default=120.0, metavar="S",
                   help="a stall lasting S seconds kills the executor: the executor-failure path (restart or exit "
                   "3); 0: never")
    g.add_argument("--failure-linger", type=non_negative_float, default=2.0,
                   help="seconds to keep answering (503) after an executor died, before exiting 3")
    g.add_argument("--executor-restarts", type=non_negative_int, default=0,
                   help="restart a dead executor up to N times (0: exit 3 after --failure-linger)")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or as one JSON object per line")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="debug also prints start-up tracebacks")
    g.add_argument("--disable-log-requests", action="store_true", help="no access line per request (as in vLLM)")
    g.add_argument("--log-steps", type=non_negative_float, default=0.0, metavar="S",
                   help="every S seconds log steps/s, batch size and where a step's time went (0 = off)")
    g.add_argument("--metric-prefix", type=metric_prefix, default="lorafleet:",
                   help="prefix of every /metrics name; 'vllm:' serves vLLM's names (Kubernetes inference gateway, "
                   "vLLM dashboards; docs/scale-out.md)")


def metric_prefix(value: str) -> str:
    """argparse type of --metric-prefix: a Prometheus metric-name start ([a-zA-Z_:][a-zA-Z0-9_:]*)."""
    import re

    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Prometheus name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_pos is not None and args.model is not None and args.model_pos != args.model:
        parser.error(f"the model is given twice: {args.model_pos!r} and --model {args.model!r}")
    args.model = args.model if args.model is not None else args.model_pos
    args.dtype = DTYPES[args.dtype]
    for name in ("prefill_attention", "decode_attention"):
        if getattr(args, name) == "flash" and (not args.device.startswith("cuda") or args.dtype == "float32"):
            parser.error(f"--{name.replace('_', '-')} flash needs --device cuda and --dtype float16 or bfloat16 "
                         f"(FlashAttention-2), got --device {args.device} --dtype {args.dtype}")
    for flag in ("api_key", "admin_key", "dashboard_key"):
        value = getattr(args, flag)
        if value is not None and not value.strip():  # `--api-key "$UNSET"` would leave the server open
            parser.error(f"--{flag.replace('_', '-')} is empty: an empty key would leave its routes open; give a key, "
                         "or leave the flag out for none")
    args.api_key = args.api_key if args.api_key is not None else os.environ.get("LORAFLEET_API_KEY") or None
    args.admin_key = args.admin_key if args.admin_key is not None else os.environ.get("LORAFLEET_ADMIN_KEY") or None
    args.dashboard_key = (args.dashboard_key if args.dashboard_key is not None
                          else os.environ.get("LORAFLEET_DASHBOARD_KEY") or None)
    return args


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


def adapter_spec(spec: str) -> tuple[str, str]:
    """(name, dir) of an --adapter / --lora-modules value: NAME=DIR, or vLLM's JSON form
    {"name": ..., "path": ...} (its optional base_model_name must be the served base model; not checked here).
    ValueError names the flag and the expected forms."""
    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"--lora-modules: {spec!r} is not valid JSON: {exc}") from exc
        name, path = obj.get("name"), obj.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules: a JSON module needs string 'name' and 'path', got {spec!r}")
        return name, path
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter/--lora-modules: expected NAME=DIR or a JSON object, got {spec!r}")
    return name, path


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
    given: dict[str, str] = {}
    for spec in args.adapter:
        name, path = adapter_spec(spec)
        if name in given:
            raise ValueError(f"--adapter/--lora-modules: the name {name!r} is given twice ({given[name]} and "
                             f"{path}); each adapter needs its own name")
        given[name] = path
    adapters.update(given)  # an explicit adapter may replace a demo adapter of the same name
    synthetic = synthetic_adapters(args)
    for name in synthetic.keys() & given.keys():
        raise ValueError(f"--adapter: the name {name!r} is also one of --synthetic-adapters' names")
    adapters.update(synthetic)
    served = args.served_model_name or base
    if served in adapters:
        flag = "--served-model-name" if args.served_model_name else "the base model's name"
        raise ValueError(f"{flag} {served!r} is also an adapter's name; the base model and each adapter need "
                         "their own names")
    return Assets(ref, resolve_model(ref), served, adapters, root)


def check_limits(args: argparse.Namespace) -> None:
    """ValueError naming the first overload/connection/watchdog flag out of range."""
    from lorafleet.actors.watchdog import StepWatchdog

    StepWatchdog(args.stall_timeout, args.stall_kill_after)
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--ws-frame-rate", args.ws_frame_rate), ("--ws-max-generations", args.ws_max_generations),
                        ("--ws-max-send-buffer-mb", args.ws_max_send_buffer_mb),
                        ("--sse-max-send-buffer-mb", args.sse_max_send_buffer_mb),
                        ("--max-send-buffer-total-mb", args.max_send_buffer_total_mb)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.slo_ttft_ms < 0:
        raise ValueError(f"--slo-ttft-ms must be >= 0 (0: no default deadline), got {args.slo_ttft_ms:g}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from lorafleet.actors.logs import setup_logging
    from lorafleet.actors.startup import PortInUse, bind_listener, thread_policy

    setup_logging(args.log_format, args.log_level, access=not args.disable_log_requests)
    os.environ["LORAFLEET_LOG_LEVEL"] = args.log_level  # the executor processes inherit it
    try:
        sock = bind_listener(args.host, args.port)  # before anything loads: a busy port fails in a second
    except PortInUse as exc:
        return startup_failed(args, exc)
    try:
        args.thread_policy = thread_policy(args.torch_threads, args.tensor_parallel_size)
        args.torch_threads = args.thread_policy.executor_threads
        _limit_threads(args.thread_policy.frontend_threads)
        from lorafleet.actors.server import engine_config
        from lorafleet.engine.config import ConfigError, ModelConfig

        try:
            check_limits(args)
            assets = resolve_assets(args)
            ModelConfig.from_dir(assets.model_dir)  # a bad config.json fails here, in one line, before loading
            config = engine_config(args)
        except (ValueError, ConfigError, OSError) as exc:
            return startup_failed(args, exc)
        except Exception as exc:  # any other start-up failure: still one line (traceback with --log-level debug)
            return startup_failed(args, exc)
        return asyncio.run(run(args, assets, config, sock))
    finally:
        sock.close()


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def startup_failed(args: argparse.Namespace, exc: BaseException) -> int:
    """Report a failed start-up in one line on stderr (the traceback too with --log-level debug); 2."""
    from lorafleet.actors.logs import event, server_log

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)):  # an unexpected kind: name it
        reason = f"{type(exc).__name__}: {reason}"
    event(server_log, f"start-up failed: {reason}", logging.ERROR)
    if args.log_level == "debug":
        server_log.debug("start-up traceback", exc_info=exc)
    return EXIT_STARTUP_FAILED


async def run(args: argparse.Namespace, assets: Assets, config, sock) -> int:
    """Spawn the executors first (they load the model while this process builds its planning engine),
    start the actors and the web app on the already bound `sock`, serve until a signal or a failure,
    then stop everything. The host cache's shared segment is made first: the executors map and page-lock
    it once while they start. A start-up failure stops what started and returns 2."""
    from lorafleet.actors.logs import event, server_log
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
        event(server_log, f"--host-cache-mb {args.host_cache_mb} exceeds the free shared memory ({free >> 20} MiB); "
              f"the host cache gets {capacity >> 20} MiB", logging.WARNING)
    try:
        arena = HostArena(capacity)
    except (OSError, ValueError) as exc:
        return startup_failed(args, ValueError(f"--host-cache-mb: cannot make a {args.host_cache_mb} MiB shared "
                                               f"host cache: {exc}"))
    try:
        return await _run(args, assets, config, arena, stop, started, sock)
    finally:
        arena.close()


async def _run(args: argparse.Namespace, assets: Assets, config, arena, stop: asyncio.Event, started: float,
               sock) -> int:
    from lorafleet.actors.executor import ExecutorDied, ExecutorGroup
    from lorafleet.actors.scheduler import release_heap, settle_heap
    from lorafleet.actors.server import Server

    try:
        executors = ExecutorGroup.spawn(str(assets.model_dir), config, args.torch_threads, arena.name)
    except Exception as exc:  # nothing started yet: one line, exit 2
        return startup_failed(args, exc)
    if config.num_pages == 0:  # the executors size the pool from their free memory: wait for that number
        try:
            await executors.wait_ready()  # stops the group itself when it fails
        except ExecutorDied as exc:
            return startup_failed(args, exc)
        config = dataclasses.replace(config, num_pages=executors.num_pages)
    try:
        server = Server.build(args, assets, config, executors, arena)
    except ValueError as exc:
        await executors.stop(timeout=0.0)
        return startup_failed(args, exc)
    try:
        await server.start(sock)
    except Exception as exc:  # start-up failed: report in one line, clean up, exit 2
        await server.stop()
        return startup_failed(args, exc)
    settle_heap()  # everything of start-up is built: keep the collector off it while serving
    server.print_urls(time.monotonic() - started)
    try:
        return await server.serve_until(stop)
    finally:
        await server.stop()
        release_heap()

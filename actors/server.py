"""The server's assembly and lifecycle: planning engine, executors, actors, web app; drain and stop.

Every actor task is created here, and cancelled and awaited in `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from argparse import Namespace
from pathlib import Path

from aiohttp import web

from lorafleet.actors.admission import AdmissionActor, AdmissionPolicy
from lorafleet.actors.app import build_app
from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.executor import ExecutorDied, ExecutorGroup
from lorafleet.actors.frontend import ConnectionLimits, Frontend, Router
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.logs import AccessLog, adapter_log, event, server_log
from lorafleet.actors.openai_api import natural_key
from lorafleet.actors.prefetcher import AdapterLoader, PrefetcherActor
from lorafleet.actors.protocol import ParseContext, prompt_char_bound
from lorafleet.actors.scheduler import SchedulerActor
from lorafleet.actors.schema import Drain, ExecutorDown, ExecutorUp
from lorafleet.actors.serve import EXIT_DRAIN_CUT, EXIT_EXECUTOR_FAILED, EXIT_INTERNAL, EXIT_OK, Assets
from lorafleet.actors.watchdog import StepWatchdog, watch_steps
from lorafleet.engine.adapter_index import AdapterIndex, scan_adapter_root
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.adapters import AdapterError
from lorafleet.engine.config import ConfigError, EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.engine import Engine
from lorafleet.engine.host_arena import HostArena
from lorafleet.engine.plan import StepPlan
from lorafleet.engine.roofline import DevicePeak, StepCostModel
from lorafleet.engine.tokenizer import load_tokenizer, text_decoder

SHOWN_ADAPTERS = 20  # adapter names in the start-up banner
LINGERING_S = 1.0  # seconds a connection answered before its body was read keeps reading it, then closes


class RemoteOnly:
    """The planning engine's executor slot: steps run in executor processes, never in this process."""

    def execute(self, plan: StepPlan) -> list[int]:
        raise RuntimeError("the serving engine runs steps through plan_step/complete_step and the executors")


def engine_config(args: Namespace) -> EngineConfig:
    return EngineConfig(
        num_pages=args.num_pages, block_tokens=args.block_tokens, max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs, max_adapters_per_batch=args.max_adapters_per_batch,
        max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        cuda_graphs=not args.no_cuda_graphs, piecewise_graphs=not args.no_piecewise_graphs,
        max_adapter_load_bytes_per_step=args.max_adapter_load_bytes_per_step,
        prefetch_adapters=args.prefetch_adapters, prefill_attention=args.prefill_attention,
        decode_attention=args.decode_attention,
        cluster_window=args.cluster_window, max_batch_adapter_fraction=args.max_batch_adapter_fraction,
    )


def build_planning_engine(assets: Assets, config: EngineConfig, host_cache_bytes: int, arena: HostArena | None = None):
    """(engine without a model, tokenizer, page_elements); registers the start-up adapters. With `arena` the
    host cache lives in that shared segment (the executors map it), and is as large as it is."""
    cfg = ModelConfig.from_dir(assets.model_dir)
    tp = config.tensor_parallel_size
    block_tokens, page_elements = page_geometry(cfg, config.block_tokens, tp)
    if arena is not None:
        host_cache_bytes = arena.capacity
    store = AdapterStore(cfg, page_elements, config.torch_dtype, config.max_lora_rank, host_cache_bytes, shards=tp,
                         arena=arena)
    tokenizer = load_tokenizer(assets.model_dir)
    decode = text_decoder(tokenizer)
    engine = Engine(cfg, config, store, RemoteOnly(), decode, block_tokens)
    for name, path in assets.adapters.items():
        try:
            engine.add_adapter(name, path)
        except AdapterError as exc:
            raise ValueError(f"adapter {name!r} ({path}): {exc}") from exc
    return engine, tokenizer, page_elements


def index_adapter_root(assets: Assets, engine: Engine) -> AdapterIndex | None:
    """Index the adapters under --adapter-root (names only: they are read and validated on first use);
    a directory named like the base model or a start-up adapter is left out, with a warning."""
    if assets.adapter_root is None:
        return None
    reserved = {assets.base_name, *engine.store.infos}
    unsafe: list[str] = []
    found = scan_adapter_root(assets.adapter_root, unsafe)
    if unsafe:
        event(adapter_log, f"adapter-root directories {unsafe} are not served: a file in them links outside "
              "--adapter-root", logging.WARNING)
    index = AdapterIndex(assets.adapter_root, {name: path for name, path in found.items() if name not in reserved})
    shadowed = sorted(set(found) & reserved)
    if shadowed:
        event(adapter_log, f"adapter-root directories {shadowed} are not served under the adapter root: "
              "their names are taken by the base model or a --adapter", logging.WARNING)
    return index


def warn_unrunnable_adapters(engine: Engine) -> None:
    """A WARNING for each start-up adapter whose pages fill the whole pool (its requests are refused, naming
    it): start-up goes on, as the demo's largest adapters do not fit a small --num-pages."""
    for info in engine.store.infos.values():
        try:
            engine.store.check_fits(info)
        except AdapterError as exc:
            event(adapter_log, f"{exc}; its requests are refused", logging.WARNING, adapter=info.name)


class Server:
    def __init__(self, args: Namespace, assets: Assets, config: EngineConfig, engine: Engine, tokenizer,
                 page_elements: int) -> None:
        self.args, self.assets, self.config, self.engine = args, assets, config, engine
        self.hub = ServeHub(info={"model": assets.base_name, "model_path": str(assets.model_dir),
                                  "started": time.time(), "config": dict(config.__dict__),
                                  "slo_ttft_ms": args.slo_ttft_ms or None, "max_queue": args.max_queue,
                                  "block_size": engine.block_tokens, "metric_prefix": args.metric_prefix})
        warn_unrunnable_adapters(engine)
        self.index = index_adapter_root(assets, engine)
        indexed = self.index.listed() if self.index is not None else {}
        self.hub.adapters = {**indexed, **{name: info.path for name, info in engine.store.infos.items()}}
        self.ctx = ParseContext(assets.base_name, set(self.hub.adapters), engine.max_model_len,
                                engine.model.vocab_size, tokenizer, args.slo_ttft_ms or None, assets.adapter_root,
                                prompt_char_bound(tokenizer, engine.max_model_len))
        self.loader = AdapterLoader(engine.model, page_elements, config.torch_dtype, config.max_lora_rank,
                                    config.tensor_parallel_size,
                                    str(assets.adapter_root) if assets.adapter_root is not None else None)
        self.executors: ExecutorGroup | None = None
        self.tasks: list[asyncio.Task] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    @classmethod
    def build(cls, args: Namespace, assets: Assets, config: EngineConfig, executors: ExecutorGroup,
              arena: HostArena | None = None) -> Server:
        """The server around already spawned executors (which map `arena`, the host cache's shared segment);
        ValueError for a bad model/adapter/option."""
        try:
            engine, tokenizer, page_elements = build_planning_engine(assets, config, args.host_cache_mb << 20, arena)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        server = cls(args, assets, config, engine, tokenizer, page_elements)
        server.executors = executors
        return server

    async def start(self, sock: socket.socket) -> None:
        """Wait for the executors, start the actors and serve the web app on `sock` (bound, not listening).
        Raises ExecutorDied (the group already stopped itself) or OSError."""
        args = self.args
        try:
            await self.executors.wait_ready()
        except ExecutorDied:
            self.executors = None  # wait_ready stopped the group; stop() must not close its channels again
            raise
        if not args.disable_log_requests:
            self.hub.add_listener(AccessLog())
        self.hub.executors = self.executors.info()
        admission_box, scheduler_box, router_box, prefetch_box = (LocalChannel() for _ in range(4))
        self.router = Router(router_box)
        self.scheduler_box = scheduler_box
        self.executors.watch(lambda rank, reason: scheduler_box.send(ExecutorDown(rank, reason)))
        self.scheduler = SchedulerActor(self.engine, self.executors, scheduler_box, router_box, admission_box,
                                        prefetch_box, self.hub, args.log_steps, self._roofline(),
                                        self.index)
        self.admission_box = admission_box
        policy = AdmissionPolicy(args.max_queue, self.config.max_batch_tokens)
        actors = {
            "router": self.router.run(),
            "scheduler": self.scheduler.run(),
            "admission": AdmissionActor(policy, admission_box, scheduler_box, router_box, self.hub).run(),
            "prefetcher": PrefetcherActor(self.loader, prefetch_box, scheduler_box, self.hub,
                                          args.prefetch_workers).run(),
            "watchdog": watch_steps(StepWatchdog(args.stall_timeout, args.stall_kill_after),
                                    lambda: self.scheduler.waiting_since, self.hub, self._kill_executors),
        }
        self.tasks = [asyncio.create_task(coro, name=name) for name, coro in actors.items()]
        self.scheduler._publish()
        frontend = Frontend(self.ctx, admission_box, scheduler_box, self.router, self.hub, args.api_key,
                            args.admin_key, _root(args), args.max_body_bytes, dashboard_key=args.dashboard_key,
                            allowed_origins=frozenset(o.rstrip("/") for o in args.allowed_origin),
                            limits=connection_limits(args))
        # keepalive_timeout also closes a connection that has not completed its request headers by then;
        # lingering_time: after answering a request whose body was not read (408, 413, 415...) aiohttp keeps
        # reading the body this long before closing (10 s by default, which let a slow-body client hold a
        # connection 10 s past --body-timeout); 1 s still lets a client's in-flight bytes arrive before the close
        self.runner = web.AppRunner(build_app(frontend), handler_cancellation=True, shutdown_timeout=5.0,
                                    access_log=None, keepalive_timeout=args.header_timeout,
                                    lingering_time=LINGERING_S)
        await self.runner.setup()
        site = web.SockSite(self.runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        host = args.host if args.host not in ("", "0.0.0.0", "::") else host
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def _roofline(self) -> tuple[StepCostModel, DevicePeak]:
        """The step cost model and the device figures: --roofline-* flags, else rank 0's measurement."""
        measured = self.executors.peak or DevicePeak(0.0, 0.0)
        bandwidth = self.args.roofline_bandwidth_gbps * 1e9 or measured.bandwidth
        flops = self.args.roofline_tflops * 1e12 or measured.matmul_flops
        self.hub.device_peak = (bandwidth, flops)
        model = StepCostModel(self.engine.model, self.config.torch_dtype.itemsize, self.config.tensor_parallel_size)
        return model, DevicePeak(bandwidth, flops)

    def _kill_executors(self, reason: str) -> None:
        if self.executors is not None:
            self.executors.kill(reason)

    def print_urls(self, seconds: float) -> None:
        """The start-up banner: model, adapters, device, dtype, pool, threads, then the URLs and `ready on`."""
        listed = sorted(self.hub.adapters, key=natural_key)
        names = ", ".join(listed[:SHOWN_ADAPTERS]) or "(none)"
        if len(listed) > SHOWN_ADAPTERS:
            names += f", … ({len(listed) - SHOWN_ADAPTERS} more: GET /v1/models lists them all)"
        config, policy = self.config, getattr(self.args, "thread_policy", None)
        event(server_log, f"serving {self.assets.base_name} with {len(self.hub.adapters)} adapter(s): {names}",
              model=self.assets.base_name, adapters=len(self.hub.adapters))
        event(server_log, f"device {config.device} x{config.tensor_parallel_size}, {config.dtype}, pool "
              f"{config.num_pages} pages of {self.engine.block_tokens} tokens, max_model_len "
              f"{self.engine.max_model_len}", device=config.device, tensor_parallel_size=config.tensor_parallel_size,
              dtype=config.dtype, pool_pages=config.num_pages, page_tokens=self.engine.block_tokens,
              max_model_len=self.engine.max_model_len)
        graphs = "on" if config.cuda_graphs and config.device.startswith("cuda") else "off"
        event(server_log, f"per step: max_num_seqs {config.max_num_seqs}, max_num_batched_tokens "
              f"{config.max_batch_tokens}, max_loras {config.max_adapters_per_batch}; max_lora_rank "
              f"{config.max_lora_rank}; CUDA graphs {graphs}", max_num_seqs=config.max_num_seqs,
              max_num_batched_tokens=config.max_batch_tokens, max_loras=config.max_adapters_per_batch,
              max_lora_rank=config.max_lora_rank, cuda_graphs=graphs == "on")
        if policy is not None:
            event(server_log, f"threads: {policy.describe()}", executor_threads=policy.executor_threads,
                  server_threads=policy.frontend_threads, cores=policy.cores)
        admin = "open (admin key set)" if self.args.admin_key else "closed (no --admin-key)"
        ws = self.url.replace("http", "ws", 1)
        for label, url in (("OpenAI API", f"{self.url}/v1  (completions, chat/completions, models)"),
                           ("WebSocket", f"{ws}/v1/stream"), ("dashboard", f"{self.url}/dashboard"),
                           ("metrics", f"{self.url}/metrics"), ("health", f"{self.url}/health"),
                           ("admin", f"{self.url}/v1/load_lora_adapter, unload_lora_adapter: {admin}")):
            event(server_log, f"  {label:<10}  {url}")
        event(server_log, f"ready on {self.url} in {seconds:.1f}s", url=self.url, startup_s=round(seconds, 1))

    async def serve_until(self, stop: asyncio.Event) -> int:
        """Run until SIGTERM/SIGINT (drain: 0, or 4 if cut at the deadline), an executor death (restart, or
        3) or an actor crash (1)."""
        restarts = 0
        while True:
            done = await self._wait_event(stop)
            if self.scheduler.failed.is_set() and not stop.is_set() and restarts < self.args.executor_restarts:
                restarts += 1
                if await self.restart_executors():
                    continue
            return await self._finish(done, stop)

    async def _wait_event(self, stop: asyncio.Event) -> set[asyncio.Task]:
        stop_wait = asyncio.create_task(stop.wait(), name="stop-signal")
        dead_wait = asyncio.create_task(self.scheduler.failed.wait(), name="executor-failure")
        try:
            done, _ = await asyncio.wait([stop_wait, dead_wait, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop_wait, dead_wait):
                task.cancel()
            await asyncio.gather(stop_wait, dead_wait, return_exceptions=True)
        return done

    async def restart_executors(self) -> bool:
        """Replace a dead executor group; False if the new one does not start either."""
        event(server_log, f"{self.hub.health_reason}; restarting the executor", logging.WARNING)
        await self.executors.stop(timeout=0.0)
        self.executors = ExecutorGroup.spawn(str(self.assets.model_dir), self.config, self.args.torch_threads,
                                             self.executors.stager.arena)
        try:
            await self.executors.wait_ready()
        except ExecutorDied as exc:
            self.hub.health_reason = f"executor restart failed: {exc}"
            return False
        self.executors.watch(lambda rank, reason: self.scheduler_box.send(ExecutorDown(rank, reason)))
        self.scheduler.recovered.clear()
        self.scheduler_box.send(ExecutorUp(self.executors))
        await self.scheduler.recovered.wait()
        event(server_log, "executor restarted")
        return True

    async def _finish(self, done: set[asyncio.Task], stop: asyncio.Event) -> int:
        crashed = [t for t in self.tasks if t in done]
        if crashed:
            for task in crashed:
                server_log.error("actor %s stopped: %r", task.get_name(), task.exception(),
                                 exc_info=task.exception())
            return EXIT_INTERNAL
        if self.scheduler.failed.is_set():
            event(server_log, f"{self.hub.health_reason}; exiting in {self.args.failure_linger:.0f}s", logging.ERROR)
            try:
                await asyncio.wait_for(stop.wait(), self.args.failure_linger)
            except TimeoutError:
                pass  # the linger elapsed: exit now
            return EXIT_EXECUTOR_FAILED
        return await self.drain()

    async def drain(self) -> int:
        """Stop admitting, let in-flight requests finish within --drain-timeout; the rest end with a
        `server_shutting_down` error (not a quiet `cancelled`) and the exit code says the drain was cut."""
        event(server_log, "draining")
        self.hub.draining = True
        self.admission_box.send(Drain())
        try:
            await asyncio.wait_for(self.scheduler.wait_idle(), self.args.drain_timeout)
        except TimeoutError:
            cut = len(self.scheduler.live)
            event(server_log, f"drain deadline ({self.args.drain_timeout:g} s) reached: {cut} request(s) cut with "
                  f"server_shutting_down; exit {EXIT_DRAIN_CUT}", logging.WARNING)
            self.admission_box.send(Drain(cancel_all=True))
            try:
                await asyncio.wait_for(self.scheduler.wait_idle(), 5.0)
            except TimeoutError:
                pass  # a frozen executor: the requests already got their errors; stop() kills it
            return EXIT_DRAIN_CUT
        if self.scheduler.failed.is_set():  # an executor died during the drain: its requests got errors
            event(server_log, f"{self.hub.health_reason} during the drain; exit {EXIT_EXECUTOR_FAILED}",
                  logging.ERROR)
            return EXIT_EXECUTOR_FAILED
        return EXIT_OK

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        if self.executors is not None:
            await self.executors.stop()
            self.executors = None


def connection_limits(args: Namespace) -> ConnectionLimits:
    return ConnectionLimits(ws_generations=args.ws_max_generations, ws_frame_rate=args.ws_frame_rate,
                            ws_frame_burst=2 * args.ws_frame_rate, body_timeout=args.body_timeout,
                            ws_send_buffer=int(args.ws_max_send_buffer_mb * (1 << 20)),
                            sse_send_buffer=int(args.sse_max_send_buffer_mb * (1 << 20)),
                            send_buffer_total=int(args.max_send_buffer_total_mb * (1 << 20)))


def _root(args: Namespace) -> Path | None:
    return Path(args.adapter_root) if args.adapter_root else None

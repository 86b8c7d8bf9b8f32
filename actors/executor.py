"""Executor processes: one spawned OS process per device rank runs the ModelRunner over its pool.

The event-loop process never touches the model or the device. It sends `RunStep` messages (a StepPlan
plus where the adapters to load are staged) over a shared-memory ring and awaits `StepResult`s. Adapter
pages (bulk tensors) are copied by the `Stager` into a shared memory segment; the executor's
`fetch_adapter` reads them from there, never from a msgpack frame.

Ranks: every rank receives every plan; rank 0 samples and returns the token ids (and broadcasts them over
the device to the other ranks, which fill the next plan's pending tokens with them there). The scheduler
may send step n+1 while step n runs: a rank launches it as soon as it arrives (before finishing step n, see
`StepPipeline`), so its host work overlaps step n's device work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from lorafleet.actors.channels import ChannelClosed, RingChannel, RingEndpoint, RingFull, ShmRing
from lorafleet.actors.schema import ExecutorFailed, ExecutorReady, RunStep, Shutdown, StagedAdapter, StepResult, encode
from lorafleet.engine.adapter_store import AdapterInfo, PackedAdapter
from lorafleet.engine.config import EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.layout import AdapterLayout, ModuleRows
from lorafleet.engine.plan import StepPlan
from lorafleet.engine.roofline import DevicePeak, measure_peak

_ALIGN = 64
MAX_STEP_FAILURES = 3  # consecutive failed steps after which an executor counts as broken
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExecutorDied(RuntimeError):
    """An executor process exited or failed; `rank` names it."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"executor rank {rank}: {message}")
        self.rank = rank


@dataclass(frozen=True)
class ExecutorSpec:
    """Everything a spawned executor needs to build its model shard and pool (picklable)."""

    rank: int
    world_size: int
    model_dir: str
    engine_config: dict
    plan_ring: str
    result_ring: str
    torch_threads: int = 0
    init_file: str = ""
    arena: str = ""  # the host cache's shared segment (HostArena), mapped and page-locked once at start-up


# the main process side: staging adapter pages -------------------------------------------------------
class Stager:
    """Shared memory segments, reused step after step, holding the packed pages of a step's loads.

    Two segments take turns: the scheduler stages step n+1 while step n (which may read the other segment)
    runs, and it stages step n+2 only after step n's result came back. A segment grows (a new one) when a
    step needs more room; the old one is unlinked once a result shows its last reader is done.

    An adapter that already sits in the host arena (`arena_offset`, the server's host cache) is not copied:
    its StagedAdapter names the arena segment and offset.
    """

    def __init__(self, initial_bytes: int = 1 << 20, arena: str = "") -> None:
        self.segments = [shared_memory.SharedMemory(create=True, size=initial_bytes) for _ in range(2)]
        self.turn = 0
        self.arena = arena
        self._retired: list[shared_memory.SharedMemory] = []

    def stage(self, packed: list[PackedAdapter]) -> list[StagedAdapter]:
        """Where the executors find each adapter's pages: its arena extent, or a copy in a step segment."""
        in_arena = [p for p in packed if p.arena_offset is not None and self.arena]
        copied = [p for p in packed if p.arena_offset is None or not self.arena]
        return [_staged(p, self.arena, p.arena_offset) for p in in_arena] + self._copy(copied)

    def _copy(self, packed: list[PackedAdapter]) -> list[StagedAdapter]:
        if not packed:
            return []
        sizes = [p.pages.numel() * p.pages.element_size() for p in packed]
        need = sum(-(-s // _ALIGN) * _ALIGN for s in sizes)
        turn, self.turn = self.turn, 1 - self.turn
        segment = self.segments[turn]
        if need > segment.size:
            self._retired.append(segment)
            segment = self.segments[turn] = shared_memory.SharedMemory(create=True, size=max(need, 2 * segment.size))
        staged, offset = [], 0
        for item, size in zip(packed, sizes):
            pages = item.pages.contiguous()
            target = torch.frombuffer(segment.buf, dtype=pages.dtype, count=pages.numel(), offset=offset)
            target.copy_(pages.reshape(-1))
            del target
            staged.append(_staged(item, segment.name, offset))
            offset += -(-size // _ALIGN) * _ALIGN
        return staged

    def release_retired(self) -> None:
        """Unlink segments replaced by a larger one (call after a step result: their last reader is done)."""
        for segment in self._retired:
            segment.close()
            segment.unlink()
        self._retired.clear()

    def close(self) -> None:
        self.release_retired()
        for segment in self.segments:
            segment.close()
            segment.unlink()


def _staged(item: PackedAdapter, segment: str, offset: int) -> StagedAdapter:
    info = item.info
    dtype = str(item.pages.dtype).removeprefix("torch.")
    modules = {m: [list(rows.a_rows), list(rows.b_rows)] for m, rows in info.layout.modules.items()}
    return StagedAdapter(info.name, segment, offset, list(item.pages.shape), dtype, info.scale, info.rank,
                         dict(info.ranks), modules, info.layout.num_pages, item.shards)


# the executor process side ----------------------------------------------------------------------------
class StagedReader:
    """Executor side of the staging area: builds PackedAdapters that view the shared memory (no copy). With
    `pin` (a CUDA executor) each segment is page-locked once when first seen, so the runner's copy of staged
    pages into the pool is a DMA at full bandwidth instead of a staged pageable copy."""

    def __init__(self, page_elements: int, pin: bool = False) -> None:
        self.page_elements, self.pin = page_elements, pin
        self.segments: dict[str, shared_memory.SharedMemory] = {}  # the stager's two, most recent last
        self.pinned: dict[str, int] = {}  # segment name -> registered address
        self.current: dict[str, StagedAdapter] = {}
        self.arena: dict[str, shared_memory.SharedMemory] = {}  # the host cache's segment, kept for good

    def attach_arena(self, name: str) -> None:
        """Map (and with `pin`, page-lock) the host arena once; staged adapters naming it are read in place."""
        segment = self.arena[name] = shared_memory.SharedMemory(name=name)
        self._pin(name, segment)
        if self.pin and name not in self.pinned:
            print(f"lorafleet: could not page-lock the {segment.size >> 20} MiB host cache: adapter copies from it "
                  "are pageable (slower, synchronous)", file=sys.stderr, flush=True)

    def set_step(self, staged: list[StagedAdapter]) -> None:
        self.current = {s.name: s for s in staged}
        for name in dict.fromkeys(s.segment for s in staged if s.segment not in self.arena):
            if name not in self.segments:
                self._attach(name)
            self.segments[name] = self.segments.pop(name)
        while len(self.segments) > 2:  # a segment the stager replaced by a larger one
            self._detach(next(iter(self.segments)))

    def _attach(self, name: str) -> None:
        self._pin(name, self.segments.setdefault(name, shared_memory.SharedMemory(name=name)))

    def _pin(self, name: str, segment: shared_memory.SharedMemory) -> None:
        if self.pin:
            address = _buffer_address(segment)
            if int(torch.cuda.cudart().cudaHostRegister(address, segment.size, 0)) == 0:  # else: stays pageable
                self.pinned[name] = address

    def _detach(self, name: str) -> None:
        """Close a segment no step reads any more (the steps that read it have completed)."""
        address = self.pinned.pop(name, None)
        if address is not None:
            torch.cuda.cudart().cudaHostUnregister(address)
        self.segments.pop(name).close()

    def fetch(self, name: str) -> PackedAdapter:
        """The staged adapter's pages as a view of the segment: valid until the stager reuses the segment,
        two stagings later, after this step completed."""
        staged = self.current.get(name)
        if staged is None:
            raise KeyError(f"adapter {name!r} is loaded by the plan but was not staged")
        count = 1
        for dim in staged.shape:
            count *= dim
        buffer = (self.arena.get(staged.segment) or self.segments[staged.segment]).buf
        pages = torch.frombuffer(buffer, dtype=_DTYPES[staged.dtype], count=count, offset=staged.offset)
        modules = {m: ModuleRows(tuple(a), tuple(b)) for m, (a, b) in staged.modules.items()}
        layout = AdapterLayout(self.page_elements, modules, staged.num_pages)
        info = AdapterInfo(name, "", staged.rank, staged.scale, dict(staged.ranks), layout)
        return PackedAdapter(info, pages.view(*staged.shape), staged.shards)

    def close(self) -> None:
        for name in list(self.segments):
            self._detach(name)
        for name, segment in self.arena.items():
            address = self.pinned.pop(name, None)
            if address is not None:
                torch.cuda.cudart().cudaHostUnregister(address)
            segment.close()
        self.arena.clear()


def _buffer_address(segment: shared_memory.SharedMemory) -> int:
    view = ctypes.c_char.from_buffer(segment.buf)
    address = ctypes.addressof(view)
    del view  # release the buffer export (the segment could not be closed while it exists)
    return address


def _build_runner(spec: ExecutorSpec, reader_box: list[StagedReader], peak_box: list[DevicePeak]):
    """The rank's model shard and pool, built as the offline engine builds its runner; the device's copy
    bandwidth and matmul peak are measured first (on an empty device) for the step roofline, by rank 0 only:
    the server uses rank 0's figures (the other ranks report zeros)."""
    from lorafleet.engine.build import build_runner, join_parallel_group
    from lorafleet.engine.weights import Shard

    config = join_parallel_group(EngineConfig(**spec.engine_config), spec.rank, spec.world_size, spec.init_file)
    peak_box.append(measure_peak(torch.device(config.device), config.torch_dtype) if spec.rank == 0
                    else DevicePeak(0.0, 0.0))
    _, page_elements = page_geometry(ModelConfig.from_dir(spec.model_dir), config.block_tokens, spec.world_size)
    reader = StagedReader(page_elements, pin=config.device.startswith("cuda"))
    if spec.arena:
        reader.attach_arena(spec.arena)
    reader_box.append(reader)
    return build_runner(Path(spec.model_dir), config, Shard(spec.rank, spec.world_size), reader.fetch)


def executor_main(spec: ExecutorSpec, plan_wake: Connection, result_wake: Connection) -> None:
    """Entry point of a spawned executor process. SIGINT/SIGTERM are ignored: a terminal's Ctrl-C or a
    supervisor signals the whole process group, and the server, which drains first, ends the executor
    (Shutdown, then SIGKILL); a dead server closes the channels, which ends the executor too."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    endpoint = RingEndpoint(ShmRing.attach(spec.result_ring), ShmRing.attach(spec.plan_ring),
                            result_wake.fileno(), plan_wake.fileno())
    readers: list[StagedReader] = []
    peaks: list[DevicePeak] = []
    ready = False
    try:
        runner, config = _build_runner(spec, readers, peaks)
        endpoint.send(ExecutorReady(spec.rank, os.getpid(), config.device, config.num_pages, peaks[0].bandwidth,
                                    peaks[0].matmul_flops, torch.get_num_threads()))
        ready = True
        code = _serve(spec, runner, readers[0], endpoint)
    except ChannelClosed:
        code = 0
    except Exception as exc:  # report any failure to the scheduler, then exit non-zero
        if ready or os.environ.get("LORAFLEET_LOG_LEVEL") == "debug":
            traceback.print_exc()  # the log has the traceback; clients and /health get one line
        # a start-up failure is reported in the server's one line (the traceback with --log-level debug)
        endpoint.send(ExecutorFailed(spec.rank, f"{type(exc).__name__}: {one_line(str(exc))}"))
        code = 1
    for reader in readers:
        reader.close()
    endpoint.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (seconds with torch loaded); nothing is left to flush


POLL_S = 0.0005  # while a launched step is held: how often its completion is checked between plan-ring waits


def _serve(spec: ExecutorSpec, runner, reader: StagedReader, endpoint: RingEndpoint) -> int:
    """Run steps until Shutdown, overlapping the host work of step n+1 with the device work of step n
    (`StepPipeline`): with a step held, wait for the next plan or for that step's device work, whichever
    comes first (a plan already there wins: launching it first keeps the device busy). A step that raises
    fails its own requests; MAX_STEP_FAILURES in a row mean the executor itself is broken (it raises)."""
    pipeline = StepPipeline(spec.rank, runner, endpoint.send)
    slow = StepDelayForTests.from_env()
    while True:
        msg = endpoint.recv(None if pipeline.held is None else 0)
        while msg is None and not pipeline.ready():
            msg = endpoint.recv(POLL_S)
        if msg is None:
            pipeline.flush()
            continue
        if isinstance(msg, Shutdown):
            pipeline.flush()
            return 0
        if not isinstance(msg, RunStep):
            raise TypeError(f"executor got unexpected message {type(msg).__name__}")
        plan = StepPlan.from_wire(msg.plan)
        reader.set_step(msg.staged)  # the held step's adapters were read when it launched
        if slow is not None:  # a slowed step, not a slowed predecessor: the held step's result goes out first
            pipeline.flush()
            slow.sleep()
        pipeline.launch(plan)


@dataclass
class _Held:
    plan: StepPlan
    launched: object  # the runner's LaunchedStep
    started: float  # perf_counter when its launch began
    overlapped: bool  # launched while an earlier step was held


class StepPipeline:
    """An executor's steps, at most one launched and not finished (held) at a time: `launch(plan n+1)`
    queues step n+1 on the device, then finishes the held step n and sends its result, so step n+1's host
    work (inputs, LoRA tables, metadata) ran while the device computed step n. Results go out in step order.
    A launch or finish that raises fails that step alone (a StepResult with `error`, the runner forgets its
    requests); a held step is finished and sent before a later step's failure. `send(result)` is the
    result channel's. Under tensor parallelism every rank launches the same steps in the same order, so the
    collectives (all queued by `launch`) stay ordered; `finish` has none."""

    def __init__(self, rank: int, runner, send: Callable[[StepResult], None]) -> None:
        self.rank, self.runner, self.send = rank, runner, send
        self.held: _Held | None = None
        self.failures = 0
        self._free_at = 0.0  # when the previous step finished

    def ready(self) -> bool:
        """True when no step is held or the held step's device work is done."""
        return self.held is None or self.held.launched.ready()

    def launch(self, plan: StepPlan) -> None:
        """Launch `plan`, then finish the held step (if any) and send its result; the new step is held."""
        started = time.perf_counter()
        try:
            launched = self.runner.launch(plan)
        except Exception as exc:
            self.flush()
            self._failed(plan, exc, started)
            return
        held, self.held = self.held, _Held(plan, launched, started, self.held is not None)
        if held is not None:
            self._finish(held)

    def flush(self) -> None:
        """Finish the held step (if any) and send its result."""
        held, self.held = self.held, None
        if held is not None:
            self._finish(held)

    def _finish(self, held: _Held) -> None:
        try:
            output = self.runner.finish(held.launched).to_wire()  # returns once its adapter copies are done:
            # their host extents may be reused as soon as the result is out
        except Exception as exc:
            self._failed(held.plan, exc, held.started)
            return
        self._send(StepResult(held.plan.step, self.rank, [int(t) for t in output["sampled"]],
                              self._occupied(held.started), output["logprobs"], output["prompt_logprobs"],
                              overlapped=held.overlapped))

    def _failed(self, plan: StepPlan, exc: Exception, started: float) -> None:
        """The traceback goes to this process's log (with the step number), the failed requests' runner state
        is forgotten and the result carries one line in `error`."""
        print(f"lorafleet executor rank {self.rank}: step {plan.step} failed; its requests fail, the executor "
              "goes on", file=sys.stderr, flush=True)
        traceback.print_exc()
        self.runner.forget(plan)
        self._send(StepResult(plan.step, self.rank, [], self._occupied(started),
                              error=f"{type(exc).__name__}: {one_line(str(exc))}"))

    def _occupied(self, started: float) -> float:
        """The step's `executor_s`: from its launch, or the previous step's finish if later (the executor was
        busy with that one until then), to now (its finish). Sums to the executor's busy time; the roofline
        line of `--log-steps` and the roofline metrics read it as the step's cost."""
        now = time.perf_counter()
        seconds, self._free_at = now - max(started, self._free_at), now
        return seconds

    def _send(self, result: StepResult) -> None:
        self.failures = self.failures + 1 if result.error is not None else 0
        if self.failures >= MAX_STEP_FAILURES:
            raise RuntimeError(f"{self.failures} steps in a row failed, the last with {result.error}")
        self.send(result)


STEP_DELAY_ENV = "LORAFLEET_TEST_STEP_DELAY_FILE"


@dataclass
class StepDelayForTests:
    """TEST-ONLY hook (soak and overload tests, bench/soak.py): with the environment variable
    LORAFLEET_TEST_STEP_DELAY_FILE naming a file, every step first sleeps the seconds written in that file
    (re-read each step, so a test slows steps down and speeds them up while the server runs; a missing or
    empty file means no delay). Never set in production: it only makes steps slower."""

    path: Path

    @classmethod
    def from_env(cls) -> StepDelayForTests | None:
        path = os.environ.get(STEP_DELAY_ENV)
        return cls(Path(path)) if path else None

    def sleep(self) -> None:
        try:
            seconds = float(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            seconds = 0.0
        if seconds > 0:
            time.sleep(seconds)


def run_step(rank: int, runner, plan: StepPlan) -> StepResult:
    """Execute one plan synchronously (launch, then finish) through a `StepPipeline`: its result, or if it
    raised, a result whose `error` is one line (the traceback in this process's log, the failed requests'
    runner state forgotten)."""
    results: list[StepResult] = []
    pipeline = StepPipeline(rank, runner, results.append)
    pipeline.launch(plan)
    pipeline.flush()
    return results[0]


def one_line(text: str, limit: int = 200) -> str:
    """The first line of an exception message, cut to `limit` characters (no traceback, no multi-line dump)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "…"


# the main process side: handles on running executors ---------------------------------------------------
@dataclass
class _Rank:
    rank: int
    process: multiprocessing.process.BaseProcess
    channel: RingChannel
    rings: tuple[ShmRing, ShmRing]
    pid: int = 0
    device: str = ""
    torch_threads: int = 0
    exited: bool = False


class ExecutorGroup:
    """The executor processes of one engine (one per rank): every rank runs every step, in order."""

    def __init__(self, ranks: list[_Rank], stager: Stager) -> None:
        self.ranks, self.stager = ranks, stager
        self.dead: str | None = None
        self.num_pages = 0
        self.peak: DevicePeak | None = None  # rank 0's measured device figures
        self.stopping = False
        self.kill_reason = ""
        self._watched: list[int] = []

    def watch(self, on_death: Callable[[int, str], None]) -> None:
        """Call `on_death(rank, reason)` as soon as a rank's process exits unasked, even between steps."""
        loop = asyncio.get_running_loop()
        for r in self.ranks:
            loop.add_reader(r.process.sentinel, self._exited, r, on_death)
            self._watched.append(r.process.sentinel)

    def _exited(self, rank: _Rank, on_death: Callable[[int, str], None]) -> None:
        asyncio.get_running_loop().remove_reader(rank.process.sentinel)
        self._watched.remove(rank.process.sentinel)
        rank.exited = True
        if not self.stopping:
            rank.process.join(0)  # may be too early to reap: the exit code is reported when known
            code = rank.process.exitcode
            on_death(rank.rank, self._death(f"process {rank.pid} exited" + (f" with code {code}" if code is not None
                                                                               else "")))

    def _death(self, what: str) -> str:
        """How a rank ended, led by why it was killed when the watchdog killed it."""
        return f"{self.kill_reason}; killed, {what}" if self.kill_reason else what

    @classmethod
    def spawn(cls, model_dir: str, engine_config: EngineConfig, torch_threads: int = 0,
              arena: str = "") -> ExecutorGroup:
        """Spawn one rank per tensor-parallel shard (they load the model meanwhile); call `wait_ready()`
        before the first step. `arena`: the host cache's shared segment, which every rank maps once."""
        size = engine_config.tensor_parallel_size
        init_file = ""
        if size > 1:  # the ranks rendezvous through a fresh file (torch.distributed's file:// init)
            handle, init_file = tempfile.mkstemp(prefix="lorafleet-tp-")
            os.close(handle)
            os.unlink(init_file)
        ring = plan_ring_bytes(ModelConfig.from_dir(model_dir), engine_config)
        ranks = [_spawn(rank, size, model_dir, engine_config, torch_threads, init_file, ring, arena)
                 for rank in range(size)]
        return cls(ranks, Stager(arena=arena))

    async def wait_ready(self, start_timeout: float = 600.0) -> None:
        """Wait until every rank reports ready (once); on failure stop them all and raise ExecutorDied.
        `num_pages` is then the pool size every rank has (the smallest, when they sized it themselves)."""
        if self.num_pages:
            return
        group = self
        # every rank at once: the first failure (say rank 1 of 2 has no GPU) is reported as soon as it comes,
        # while the other ranks may still wait for it in the process-group rendezvous
        waits = [asyncio.ensure_future(self._ready(r)) for r in self.ranks]
        try:
            for done in asyncio.as_completed(waits, timeout=start_timeout):
                r, msg = await done
                r.pid, r.device, r.torch_threads = msg.pid, msg.device, msg.torch_threads
                if r.rank == 0:
                    self.peak = DevicePeak(msg.bandwidth, msg.matmul_flops)
                self.num_pages = min(self.num_pages or msg.num_pages, msg.num_pages)
        except (ChannelClosed, TimeoutError, asyncio.TimeoutError) as exc:
            await group.stop()
            raise ExecutorDied(0, f"did not start: {exc}") from exc
        except ExecutorDied:
            await group.stop()
            raise
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    @staticmethod
    async def _ready(r: _Rank) -> tuple[_Rank, ExecutorReady]:
        msg = await r.channel.recv()
        if not isinstance(msg, ExecutorReady):
            raise ExecutorDied(r.rank, getattr(msg, "message", f"unexpected {type(msg).__name__}"))
        return r, msg

    def info(self) -> list[dict]:
        return [{"rank": r.rank, "pid": r.pid, "device": r.device, "torch_threads": r.torch_threads,
                 "alive": not r.exited and r.process.is_alive()} for r in self.ranks]

    def send(self, plan: StepPlan, packed: list[PackedAdapter]) -> None:
        """Send one step to every rank; at most one more may be sent before its result is received (the
        ranks queue it behind the step they run). All ranks or none: RingFull (nothing sent) when a rank's
        plan ring has no room for it now. Raises ExecutorDied on any failure."""
        if self.dead is not None:
            raise ExecutorDied(0, self.dead)
        try:
            frame = encode(RunStep(plan.to_wire(), self.stager.stage(packed)))
            short = [r for r in self.ranks if not r.channel.tx.fits(len(frame))]
            if short:
                never = not short[0].channel.tx.fits_empty(len(frame))
                raise RingFull(f"a step of {len(frame)} bytes does not fit the plan ring of rank(s) "
                               f"{[r.rank for r in short]} now", never_fits=never)
            for r in self.ranks:
                r.channel.send_frame(frame)
        except (ChannelClosed, OSError) as exc:
            self.dead = self._death(f"process exited ({exc})")
            raise ExecutorDied(0, self.dead) from exc

    async def receive(self) -> StepResult:
        """The oldest sent step's result: rank 0's, once every rank reported. Raises ExecutorDied."""
        if self.dead is not None:
            raise ExecutorDied(0, self.dead)
        try:
            results = [await r.channel.recv() for r in self.ranks]
        except (ChannelClosed, OSError) as exc:
            self.dead = self._death(f"process exited ({exc})")
            raise ExecutorDied(0, self.dead) from exc
        self.stager.release_retired()
        for result in results:
            if not isinstance(result, StepResult):
                self.dead = getattr(result, "message", f"unexpected {type(result).__name__}")
                raise ExecutorDied(getattr(result, "rank", 0), self.dead)
        return next((r for r in results if r.error is not None), results[0])  # a step failed on any rank fails

    def kill(self, reason: str) -> None:
        """Kill every rank now (a stalled executor); the process watch reports the deaths with `reason`."""
        self.kill_reason = self.kill_reason or reason
        for r in self.ranks:
            if r.process.is_alive():
                r.process.kill()

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask every rank to exit, wait (without blocking the loop), then kill stragglers."""
        self.stopping = True
        for fd in self._watched:
            asyncio.get_running_loop().remove_reader(fd)
        self._watched.clear()
        for r in self.ranks:
            try:
                r.channel.send(Shutdown())
            except (ChannelClosed, OSError, RingFull):
                pass  # gone, or not reading: the kill below ends it
        deadline = time.monotonic() + timeout
        for r in self.ranks:
            if not await _exited(r.process, max(0.0, deadline - time.monotonic())):
                r.process.kill()
            await asyncio.to_thread(r.process.join, 5.0)
            r.channel.close()
            for ring in r.rings:
                ring.close()
        self.stager.close()


async def _exited(process: multiprocessing.process.BaseProcess, timeout: float) -> bool:
    """Wait (on the process sentinel fd, not by polling) up to `timeout` s for `process` to exit."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(process.sentinel, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(process.sentinel)
    return True


@contextlib.contextmanager
def _plain_main_module():
    """Spawned children re-run the parent's __main__ (module or file). The executor needs none of it, and
    it may harm: `python -m lorafleet` runs the CLI on import (the child would start a server), and a
    program read from stdin has no file to re-run. Present an empty __main__ while spawning."""
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


def plan_bytes_bound(cfg: ModelConfig, config: EngineConfig) -> int:
    """A generous estimate of one RunStep's msgpack size at the config's limits (integers at most 5 bytes,
    adapter names under ~200 characters): block tables of `max_num_seqs` sequences at the longest context, a
    full token budget of token ids, and a full batch of adapter loads plus prefetches, each with its page
    table and A/Bᵀ row tables at max rank (its slot, load, staging and eviction entries in the slack)."""
    max_len = min(config.max_model_len or cfg.context_limit, cfg.context_limit)
    block_tokens, page_elements = page_geometry(cfg, config.block_tokens, config.tensor_parallel_size)
    blocks = -(-max_len // block_tokens)
    dims = cfg.module_dims()
    adapter_pages = -(-config.max_lora_rank * sum(i + o for i, o in dims.values()) // page_elements) + len(dims)
    adapter_ints = 2 * config.max_lora_rank * len(dims) + adapter_pages
    loads = config.max_adapters_per_batch + config.prefetch_adapters
    seq_bytes = 5 * blocks + 160  # block table, start, slot, sampling options, framing
    return (config.max_num_seqs * seq_bytes + 5 * config.max_batch_tokens + loads * (5 * adapter_ints + 1024)
            + (1 << 16))


def plan_ring_bytes(cfg: ModelConfig, config: EngineConfig) -> int:
    """The plan ring holds two steps (one queued behind the running one), and at least 4 MiB."""
    return max(4 << 20, 2 * plan_bytes_bound(cfg, config))


def _spawn(rank: int, world_size: int, model_dir: str, engine_config: EngineConfig, torch_threads: int,
           init_file: str, plan_ring_capacity: int, arena: str = "") -> _Rank:
    ctx = multiprocessing.get_context("spawn")
    plan_ring, result_ring = ShmRing.create(plan_ring_capacity), ShmRing.create()
    plan_r, plan_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    config = dataclasses.asdict(engine_config)
    spec = ExecutorSpec(rank, world_size, model_dir, config, plan_ring.name, result_ring.name, torch_threads,
                        init_file, arena)
    process = ctx.Process(target=executor_main, args=(spec, plan_r, result_w), name=f"lorafleet-executor-{rank}",
                          daemon=True)
    with _plain_main_module():
        process.start()
    plan_r.close()
    result_w.close()
    tx_fd, rx_fd = os.dup(plan_w.fileno()), os.dup(result_r.fileno())
    plan_w.close()
    result_r.close()
    channel = RingChannel(plan_ring, result_ring, tx_fd, rx_fd)
    return _Rank(rank, process, channel, (plan_ring, result_ring))

"""Tensor-parallel execution for the offline engine: one spawned process per rank, driven in lockstep.

The main process keeps the scheduler and the host adapter cache; each rank process holds its shard of
the base weights (split by the weight loader), its shard of the pool (its KV heads, its part of every
resident adapter) and joins a torch.distributed group (gloo on CPU, NCCL on GPUs). Every rank receives
every StepPlan over a pipe; packed adapter shards travel as shared-memory tensors (torch's pickler for
multiprocessing shares the storage instead of copying it). Rank 0 samples.
A rank that dies fails the step with ExecutorDied; the others are stopped (no hang in a collective).
The serving layer drives its own executor processes over shared-memory rings (actors/executor.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import tempfile
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers shared-memory pickling of tensors for pipes)

from lorafleet.engine.adapter_store import PackedAdapter
from lorafleet.engine.config import EngineConfig
from lorafleet.engine.plan import StepOutput, StepPlan


class ExecutorDied(RuntimeError):
    """A rank process exited or failed; the step's requests cannot complete."""


@dataclass(frozen=True)
class RankSpec:
    rank: int
    size: int
    model_dir: str
    config: dict
    init_file: str


def _rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of one rank process."""
    import torch.distributed as dist

    from lorafleet.engine.build import build_runner, join_parallel_group
    from lorafleet.engine.weights import Shard

    torch.set_num_threads(1)
    config = join_parallel_group(EngineConfig(**spec.config), spec.rank, spec.size, spec.init_file)
    try:
        staged: dict[str, PackedAdapter] = {}
        runner, _ = build_runner(Path(spec.model_dir), config, Shard(spec.rank, spec.size), staged.__getitem__)
        conn.send(("ready", spec.rank))
        _serve(runner, staged, conn)
    except Exception:  # report, then exit: the main process turns this into ExecutorDied
        conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _serve(runner, staged: dict[str, PackedAdapter], conn: Connection) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        if message == "stats":
            graphs = len(runner.graphs.graphs) if runner.graphs is not None else 0
            conn.send(("stats", {"resident": sorted(runner.resident), "pool_shape": list(runner.pool.shape),
                                 "piecewise_steps": runner.piecewise_steps, "decode_graphs": graphs,
                                 "decode_graph_steps": runner.decode_graph_steps}))
            continue
        if message == "logits":
            conn.send(("logits", {rid: row.float().cpu() for rid, row in runner.last_logits.items()}))
            continue
        plan_wire, adapters = message
        staged.clear()
        staged.update(adapters)
        conn.send(("ok", runner.execute(StepPlan.from_wire(plan_wire))))


class ProcessGroupExecutor:
    """`execute(plan)` over `size` rank processes; the adapters a plan loads come from `fetch`."""

    def __init__(self, model_dir: str, config: EngineConfig, fetch, start_timeout: float = 600.0) -> None:
        self.fetch, self.size = fetch, config.tensor_parallel_size
        handle, init_file = tempfile.mkstemp(prefix="lorafleet-tp-")
        os.close(handle)
        os.unlink(init_file)
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for rank in range(self.size):
            ours, theirs = ctx.Pipe()
            spec = RankSpec(rank, self.size, model_dir, dataclasses.asdict(config), init_file)
            proc = ctx.Process(target=_rank_main, args=(spec, theirs), daemon=True, name=f"lorafleet-rank{rank}")
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self._collect("ready", start_timeout)

    def execute(self, plan: StepPlan) -> StepOutput:
        adapters = {load.name: self.fetch(load.name) for load in plan.loads}
        for packed in adapters.values():
            packed.pages.share_memory_()
        try:
            for conn in self.conns:
                conn.send((plan.to_wire(), adapters))
        except (BrokenPipeError, OSError) as exc:
            self._fail(f"a rank process is gone: {exc}")
        return self._collect("ok", None)[0]

    def rank_stats(self) -> list[dict]:
        """Each rank's view of its pool (resident adapters, pool tensor shape), its counts of piecewise and
        whole decode-graph steps, and its number of captured decode graphs."""
        for conn in self.conns:
            conn.send("stats")
        return self._collect("stats", 60.0)

    @property
    def last_logits(self) -> dict[int, torch.Tensor]:
        """Rank 0's logits of the last step's sampled rows, by request id (fp32, on the host; for tests)."""
        for conn in self.conns:
            conn.send("logits")
        return self._collect("logits", 60.0)[0]

    def _collect(self, kind: str, timeout: float | None) -> list:
        """One reply per rank, in rank order; any failure stops every rank and raises ExecutorDied."""
        replies: dict[int, object] = {}
        while len(replies) < self.size:
            pending = [c for i, c in enumerate(self.conns) if i not in replies]
            ready = wait(pending + [p.sentinel for p in self.procs], timeout)
            if not ready:
                self._fail(f"no {kind!r} reply within {timeout} s")
            for rank, conn in enumerate(self.conns):
                if rank in replies or conn not in ready:
                    continue
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"rank {rank} exited")
                if status != kind:
                    self._fail(self._failure(rank, payload))
                replies[rank] = payload
            dead = [i for i, p in enumerate(self.procs) if not p.is_alive() and i not in replies]
            if dead and not any(c.poll() for i, c in enumerate(self.conns) if i in dead):
                self._fail(f"rank {dead[0]} exited with code {self.procs[dead[0]].exitcode}")
        return [replies[i] for i in range(self.size)]

    def _failure(self, rank: int, payload: object) -> str:
        """The message for rank `rank` reporting an error: a rank process that has exited is the cause (the
        survivors' collectives fail because their peer is gone, e.g. gloo's "connection closed by peer"),
        so it is named first."""
        dead = [i for i, p in enumerate(self.procs) if i != rank and not p.is_alive()]
        if dead:
            return (f"rank {dead[0]} exited with code {self.procs[dead[0]].exitcode} (rank {rank} failed "
                    f"after it:\n{payload})")
        return f"rank {rank} failed:\n{payload}"

    def _fail(self, message: str) -> None:
        self.close()
        raise ExecutorDied(message)

    def close(self) -> None:
        """Stop every rank process (politely, then by force)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                continue  # that rank is already gone; it is reaped below
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns = []
        self.procs = []

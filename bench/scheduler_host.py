"""Host-side cost per step of the serving scheduler actor at a full batch, without a GPU.

The scheduler actor (actors/scheduler.py) runs over the planning engine of bench/engine_host.py (Llama-2-7B
shapes, synthetic adapters, no weights) and an executor stand-in that returns random tokens at once, so the
wall time per step is the actor's own host work (`step_host_ms`; `step_cpu_ms` is this process's CPU time
per step, the same work less what other processes on a shared machine take from it): mailbox, deadline
checks, planning, the plan's wire frame (encoded as the executor group encodes it), the result frame's
decoding, completing the step, the client deltas, stats, the roofline and snapshots. A finished request is
replaced by a new one (optionally with a first-token deadline, --slo-ttft-ms); --waiting keeps that many
requests queued beyond the batch. Writes milliseconds per step, and the `host` figure the step log
(--log-steps) shows for the same steps (`step_log_host_ms`).

As in the server, where the prefetcher packs adapters into the host arena off the event loop, every adapter
is in the host cache before the measured steps (as a stand-in of no bytes: the executor stand-in reads no
weights), so no packing runs in the loop; --pack-in-loop packs them in the loop on first use instead (the
store without an arena).

    python bench/scheduler_host.py --out bench/results/scheduler-host-cpu.json [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from engine_host import planning_args, planning_engine  # noqa: E402

from lorafleet.actors.channels import LocalChannel  # noqa: E402
from lorafleet.actors.hub import ServeHub  # noqa: E402
from lorafleet.actors.scheduler import SchedulerActor, release_heap, settle_heap  # noqa: E402
from lorafleet.actors.schema import RunStep, StepDeltas, StepResult, Submit, decode, encode  # noqa: E402
from lorafleet.engine.adapter_store import PackedAdapter  # noqa: E402
from lorafleet.engine.roofline import DevicePeak, StepCostModel  # noqa: E402
from lorafleet.engine.synthetic import write_model  # noqa: E402

H200_PEAK = DevicePeak(4.3e12, 7.9e14)  # the roofline's figures (the values only scale its output)
_tokens = random.Random(2)
TOKENS = [_tokens.randrange(3, 32000) for _ in range(1 << 16)]  # random ids, drawn once: the stand-ins' time
# drawing them would count as the actor's


class InstantExecutors:
    """ExecutorGroup stand-in: a sent plan's result (random tokens) is ready at once; the plan is encoded
    into the frame the executor group writes to its ranks' rings, and the result comes back as the frame
    the scheduler's end of the ring decodes (both as in actors/executor.py, without the rings)."""

    def __init__(self) -> None:
        self.results, self.steps, self.seqs, self.at = [], 0, 0, 0

    def send(self, plan, packed) -> None:
        encode(RunStep(plan.to_wire(), []))
        self.steps, self.seqs = self.steps + 1, self.seqs + len(plan.seqs)
        count = sum(s.sample for s in plan.seqs)
        self.at = (self.at + count) % (len(TOKENS) - count)
        self.results.append(encode(StepResult(plan.step, 0, TOKENS[self.at:self.at + count], 0.0)))

    async def receive(self) -> StepResult:
        await asyncio.sleep(0)
        return decode(self.results.pop(0))


def stand_in_cache(engine) -> None:
    """Every registered adapter in the host cache as a packed stand-in of no bytes (the server's prefetcher
    packs adapters off the loop; the executor stand-in reads none)."""
    store = engine.store
    for name, info in store.infos.items():
        store.cache[name] = PackedAdapter(info, torch.empty(0, dtype=store.dtype))


async def measure(args: argparse.Namespace, engine) -> dict:
    rng = random.Random(0)
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    group = InstantExecutors()
    roofline = (StepCostModel(engine.model, engine.store.dtype.itemsize), H200_PEAK)
    actor = SchedulerActor(engine, group, inbox, router, admission, prefetch, ServeHub(), log_steps_s=1e9,
                           roofline=roofline)
    key = 0

    def submit() -> None:
        nonlocal key
        adapter = f"synthetic-{min(int(rng.paretovariate(1.0)) - 1, args.adapters - 1)}"
        at = rng.randrange(len(TOKENS) - 512)
        prompt = TOKENS[at:at + rng.randint(8, 512)]
        inbox.send(Submit(f"r{key}", prompt, {"max_tokens": rng.randint(8, 512), "ignore_eos": True}, adapter,
                          args.slo_ttft_ms, time.monotonic(), key + 1))
        key += 1

    async def drain() -> None:  # the router's and admission's ends: a finished request is replaced
        while True:
            msg = await router.recv()
            for item in msg.items if isinstance(msg, StepDeltas) else []:
                if item.finished:
                    submit()
            while admission.poll() is not None:
                pass

    for _ in range(args.seqs + (args.waiting if args.waiting is not None else args.seqs // 4)):
        submit()
    tasks = [asyncio.create_task(actor.run()), asyncio.create_task(drain())]
    while group.steps < args.warmup_steps:
        await asyncio.sleep(0.01)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    first, first_seqs, started, cpu = group.steps, group.seqs, time.perf_counter(), time.process_time()
    log_steps, log_host_ms = actor.step_log.steps, actor.step_log.host_ms
    while time.perf_counter() - started < args.seconds:
        await asyncio.sleep(0.05)
    steps, elapsed, cpu = group.steps - first, time.perf_counter() - started, time.process_time() - cpu
    if profiler:
        profiler.disable()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if profiler:
        pstats.Stats(profiler).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(45)
    return {"steps": steps, "step_host_ms": elapsed * 1000 / steps, "step_cpu_ms": cpu * 1000 / steps,
            "mean_seqs": (group.seqs - first_seqs) / steps,
            "step_log_host_ms": (actor.step_log.host_ms - log_host_ms) / (actor.step_log.steps - log_steps)}


def main() -> None:
    parser = planning_args(__doc__, seconds=10.0, warmup_steps=40)
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="each request's first-token deadline")
    parser.add_argument("--waiting", type=int, default=None,
                        help="requests kept waiting beyond the batch (default a quarter of --seqs)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured steps")
    parser.add_argument("--default-gc", action="store_true",
                        help="leave the garbage collector as Python sets it (the server settles the heap at start)")
    parser.add_argument("--pack-in-loop", action="store_true",
                        help="pack each adapter in the loop on first use (no host arena) instead of a stand-in cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = planning_engine(str(write_model("llama-2-7b", tmp)), args)
        if not args.pack_in_loop:
            stand_in_cache(engine)
        if not args.default_gc:
            settle_heap()  # as the server does once it has started
        result = asyncio.run(measure(args, engine))
        release_heap()
    print(json.dumps(result, indent=1))
    if args.out:
        doc = {"schema": "lorafleet.scheduler-host/1",
               "command": "python bench/scheduler_host.py " + " ".join(sys.argv[1:]), "config": vars(args),
               "result": result}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

"""Host-side cost per step of the serving scheduler actor at a full batch, without a GPU.

The scheduler actor (actors/scheduler.py) runs over the planning engine of bench/engine_host.py (Llama-2-7B
shapes, synthetic adapters, no weights) and an executor stand-in that returns random tokens at once, so the
wall time per step is the actor's own host work (`step_host_ms`): mailbox, deadline checks, planning, the
plan's wire form, completing the step, the client deltas, stats and snapshots. A finished request is
replaced by a new one (optionally with a first-token deadline, --slo-ttft-ms). Writes milliseconds per step, and the
`host` figure the step log (--log-steps) shows for the same steps (`step_log_host_ms`).

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

import msgpack

sys.path.insert(0, os.path.dirname(__file__))

from engine_host import planning_args, planning_engine  # noqa: E402

from lorafleet.actors.channels import LocalChannel  # noqa: E402
from lorafleet.actors.hub import ServeHub  # noqa: E402
from lorafleet.actors.scheduler import SchedulerActor  # noqa: E402
from lorafleet.actors.schema import StepDeltas, StepResult, Submit  # noqa: E402
from lorafleet.engine.synthetic import write_model  # noqa: E402


class InstantExecutors:
    """ExecutorGroup stand-in: a sent plan's result (random tokens) is ready at once; the plan travels
    through its wire form as it would to the executors."""

    def __init__(self) -> None:
        self.rng, self.results, self.steps, self.seqs = random.Random(2), [], 0, 0

    def send(self, plan, packed) -> None:
        msgpack.packb(plan.to_wire())
        self.steps, self.seqs = self.steps + 1, self.seqs + len(plan.seqs)
        sampled = [self.rng.randrange(3, 32000) for s in plan.seqs if s.sample]
        self.results.append(StepResult(plan.step, 0, sampled, 0.0))

    async def receive(self) -> StepResult:
        await asyncio.sleep(0)
        return self.results.pop(0)


async def measure(args: argparse.Namespace, engine) -> dict:
    rng = random.Random(0)
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    group = InstantExecutors()
    actor = SchedulerActor(engine, group, inbox, router, admission, prefetch, ServeHub(), log_steps_s=1e9)
    key = 0

    def submit() -> None:
        nonlocal key
        adapter = f"synthetic-{min(int(rng.paretovariate(1.0)) - 1, args.adapters - 1)}"
        prompt = [rng.randrange(3, 32000) for _ in range(rng.randint(8, 512))]
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

    for _ in range(args.seqs + args.seqs // 4):
        submit()
    tasks = [asyncio.create_task(actor.run()), asyncio.create_task(drain())]
    while group.steps < args.warmup_steps:
        await asyncio.sleep(0.01)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    first, first_seqs, started = group.steps, group.seqs, time.perf_counter()
    log_steps, log_host_ms = actor.step_log.steps, actor.step_log.host_ms
    while time.perf_counter() - started < args.seconds:
        await asyncio.sleep(0.05)
    steps, elapsed = group.steps - first, time.perf_counter() - started
    if profiler:
        profiler.disable()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return {"steps": steps, "step_host_ms": elapsed * 1000 / steps,
            "mean_seqs": (group.seqs - first_seqs) / steps,
            "step_log_host_ms": (actor.step_log.host_ms - log_host_ms) / (actor.step_log.steps - log_steps)}


def main() -> None:
    parser = planning_args(__doc__, seconds=10.0, warmup_steps=40)
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="each request's first-token deadline")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = planning_engine(str(write_model("llama-2-7b", tmp)), args)
        result = asyncio.run(measure(args, engine))
    print(json.dumps(result, indent=1))
    if args.out:
        doc = {"schema": "lorafleet.scheduler-host/1",
               "command": "python bench/scheduler_host.py " + " ".join(sys.argv[1:]), "config": vars(args),
               "result": result}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

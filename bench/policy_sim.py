"""Scheduling-policy simulation on the CPU: the real planning engine (scheduler, pool books, adapter sizes)
driven by S-LoRA's workload in simulated time, each step lasting what the roofline model says
(engine/roofline.py) times a factor measured on the GPU. It compares admission policies (the distinct
adapters' bytes bound and the clustering window) before spending GPU time on them; it is a model, not a
measurement: its req/s are only compared with each other.

    python bench/policy_sim.py --shape llama-3-8b --targets all --num-adapters 1000 --fractions 0,0.5,0.25

Time model per step: (bytes / bandwidth + prefill FLOPs / peak) · overhead + fixed_ms, with the H200 figures
of the issue (4.3 TB/s, 790 TFLOP/s), overhead 1.7 (executor ≈ 1.7× roofline in the issue's no-LoRA step)
and 3 ms between steps. Early abort: a waiting request older than the SLO leaves the queue.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque

import torch

from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.config import TARGET_MODULES, EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.engine import Engine
from lorafleet.engine.plan import StepOutput
from lorafleet.engine.request import SamplingParams
from lorafleet.engine.roofline import DevicePeak, StepCostModel
from lorafleet.engine.synthetic import SHAPES, synthetic_adapter_path
from lorafleet.loadgen.workload import WorkloadConfig, generate


class _NoExecutor:
    def execute(self, plan):
        raise RuntimeError("the simulation completes steps itself")


def build(shape: str, targets: tuple[str, ...], n: int, fraction: float, window: int, pool_gb: float):
    model = ModelConfig.from_dict(SHAPES[shape])
    block_tokens, page_elements = page_geometry(model, 16)
    page_bytes = model.num_layers * page_elements * 2
    config = EngineConfig(num_pages=int(pool_gb * 1e9 // page_bytes), block_tokens=block_tokens,
                          max_batch_tokens=4096, max_num_seqs=256, max_adapters_per_batch=256, max_lora_rank=64,
                          dtype="bfloat16", prefetch_adapters=16, max_model_len=2048,
                          max_batch_adapter_fraction=fraction, cluster_window=window)
    store = AdapterStore(model, page_elements, torch.bfloat16, 64, 1 << 40)
    engine = Engine(model, config, store, _NoExecutor(), block_tokens=block_tokens)
    ranks = (8, 16, 32, 64)
    for i in range(n):
        engine.add_adapter(f"a{i}", synthetic_adapter_path(ranks[i % 4], i, targets))
    return engine


def simulate(engine: Engine, n: int, rate: float, duration: float, slo_s: float, peak: DevicePeak,
             overhead: float, fixed_s: float) -> dict:
    specs = deque(generate(WorkloadConfig(tuple(f"a{i}" for i in range(n)), rate=rate, duration=duration)))
    cost_model = StepCostModel(engine.model, 2)
    now, completed, dropped, steps, seqs, distinct, lora_bytes = 0.0, 0, 0, 0, 0, 0, 0
    arrival: dict[str, float] = {}
    while specs or engine.has_unfinished():
        while specs and specs[0].arrival_s <= now:
            spec = specs.popleft()
            arrival[str(spec.index)] = spec.arrival_s
            params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(str(spec.index), [7] * spec.input_len, params, spec.adapter)
        for request in list(engine.scheduler.waiting):
            if request.scheduled_time is None and now - arrival[request.external_id] > slo_s:
                engine.abort(request.external_id)
                dropped += 1
        planned = engine.plan_step()
        if planned is None:
            now = specs[0].arrival_s if specs else now + fixed_s
            continue
        schedule, plan = planned
        for chunk in schedule.chunks:
            chunk.request.scheduled_time = chunk.request.scheduled_time or now
        infos = engine.store.infos
        cost = cost_model.cost(plan, {name: infos[name].ranks for name in plan.slots})
        now += cost.seconds(peak) * overhead + fixed_s
        outputs = engine.complete_step(schedule, StepOutput([1] * sum(c.sample for c in schedule.chunks)))
        completed += sum(1 for out in outputs if out.finished and now <= duration + 20)
        steps, seqs, distinct, lora_bytes = (steps + 1, seqs + len(plan.seqs), distinct + len(plan.slots),
                                             lora_bytes + cost.adapter_bytes)
        if now > duration + 20:  # the bench's drain
            break
    return {"req_per_s": completed / duration, "completed": completed, "dropped": dropped, "steps": steps,
            "mean_seqs": seqs / max(steps, 1), "mean_distinct_adapters": distinct / max(steps, 1),
            "mean_lora_gb_per_step": lora_bytes / max(steps, 1) / 1e9, "sim_end_s": now}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--targets", default="qkvo", choices=("qkvo", "all"))
    p.add_argument("--num-adapters", type=int, default=1000)
    p.add_argument("--fractions", default="0,0.5")
    p.add_argument("--windows", default="0,512")
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--pool-gb", type=float, default=100.0)
    p.add_argument("--overhead", type=float, default=1.7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    targets = TARGET_MODULES[:4] if args.targets == "qkvo" else TARGET_MODULES
    peak = DevicePeak(4.3e12, 7.9e14)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        for window in (int(w) for w in args.windows.split(",")):
            engine = build(args.shape, targets, args.num_adapters, fraction, window, args.pool_gb)
            row = {"shape": args.shape, "targets": args.targets, "n": args.num_adapters, "fraction": fraction,
                   "cluster_window": window, **simulate(engine, args.num_adapters, args.rate, args.duration, 6.0,
                                                        peak, args.overhead, 0.003)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    nolora = build(args.shape, targets, 1, 0.0, 0, args.pool_gb)
    nolora.store.infos.clear()
    base = simulate(replace_adapters_with_base(nolora), 1, args.rate, args.duration, 6.0, peak, args.overhead, 0.003)
    print(json.dumps({"no_lora": base}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "no_lora": base, "args": vars(args)}, f, indent=1)
    return 0


def replace_adapters_with_base(engine: Engine) -> Engine:
    """The same engine serving every request on the base model (the trace's adapter names are ignored)."""
    add = engine.add_request

    def base_only(request_id, prompt_ids, params, adapter=None):
        add(request_id, prompt_ids, params, None)

    engine.add_request = base_only
    return engine


if __name__ == "__main__":
    sys.exit(main())

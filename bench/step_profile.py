"""Where one step's time goes: the offline engine holds a steady batch (S-LoRA lengths, power-law adapters)
and runs decode-only steps, then mixed steps (the decodes plus one new prompt's prefill per step), under
torch.profiler. Per phase it reports the wall time per step, the GPU busy time (union of kernel intervals),
the kernel time by category (GEMM, attention, LoRA, norms, collectives, other) and the step roofline
(engine/roofline.py) beside them.

    python bench/step_profile.py --model synthetic:llama-2-7b --num-adapters 0 --out OUT.json
    python bench/step_profile.py --model synthetic:llama-3-8b --num-adapters 100 \
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --out OUT.json

`--device cpu --dtype float32 --model synthetic:tiny` runs it on a CPU (a smoke run of the script).

`--overlap` runs the profiled steps as the serving executor does (`ModelRunner.launch` of step n+1 before
`finish` of step n, the next plan made while a step is in flight): `wall_ms` is then the time per step of
the pipeline (first launch to last finish over the steps), which includes this process's planning and
completion (in a server they run in the scheduler's process).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lorafleet.engine import LLM
from lorafleet.engine.request import SamplingParams
from lorafleet.engine.roofline import StepCostModel, measure_peak
from lorafleet.engine.synthetic import synthetic_adapter_path

CATEGORIES = (  # first match wins (kernel names lower-cased)
    ("collective", ("nccl",)),
    ("lora", ("shrink", "expand", "lora")),
    ("attention_decode", ("_decode_kernel", "_merge_splits", "decode")),
    ("attention_prefill", ("_prefill_kernel", "flash", "prefill", "fmha", "attention")),
    ("kv_write", ("write_kv",)),
    ("norm_rotary", ("norm", "rotary")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas", "matmul")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1000


def kernel_table(prof) -> tuple[dict, list, float]:
    per_cat: dict[str, float] = defaultdict(float)
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, stop = event.time_range.start, event.time_range.end
        intervals.append((start, stop))
        per_cat[category(event.name)] += (stop - start) / 1000
        per_name[event.name][0] += (stop - start) / 1000
        per_name[event.name][1] += 1
    top = sorted(([n, ms, c] for n, (ms, c) in per_name.items()), key=lambda r: -r[1])[:20]
    return per_cat, top, busy_ms(intervals)


def step_once(engine) -> tuple[object, float]:
    planned = engine.plan_step()
    schedule, plan = planned
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    output = engine.executor.execute(plan)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    engine.complete_step(schedule, output)
    return plan, seconds


def steps_overlapped(engine, steps: int, add_each_step) -> tuple[list, float, dict]:
    """`steps` steps pipelined (launch n+1, then finish and complete n); their plans, the total seconds and
    the host time by part (ms per step): `launch` (the executor's host work, overlapping the device),
    `finish` (waiting for a step's results and reading them) and `engine` (planning and completing steps,
    which a server does in its scheduler process)."""
    runner, plans, held = engine.executor, [], None
    parts = dict.fromkeys(("launch_ms", "finish_ms", "engine_ms"), 0.0)

    def timed(part, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        parts[part] += (time.perf_counter() - started) * 1000 / steps
        return out

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        add_each_step()
        schedule, plan = timed("engine_ms", engine.plan_step)
        launched = timed("launch_ms", runner.launch, plan)
        if held is not None:
            timed("engine_ms", engine.complete_step, held[0], timed("finish_ms", runner.finish, held[1]))
        held = (schedule, launched)
        plans.append(plan)
    timed("engine_ms", engine.complete_step, held[0], timed("finish_ms", runner.finish, held[1]))
    return plans, time.perf_counter() - started, parts


def timed_steps(engine, steps: int, add_each_step, overlap: bool) -> tuple[list, list, dict]:
    """`steps` steps, pipelined or one at a time: their plans, wall seconds per step and host parts."""
    if overlap:
        plans, seconds, parts = steps_overlapped(engine, steps, add_each_step)
        return plans, [seconds / steps] * steps, parts
    plans, walls = [], []
    for _ in range(steps):
        add_each_step()
        plan, seconds = step_once(engine)
        plans.append(plan)
        walls.append(seconds)
    return plans, walls, {}


def host_profile(engine, steps: int, add_each_step, overlap: bool, top: int = 25) -> list:
    """cProfile of `steps` more steps: the host functions by own time (ms per step)."""
    profiler = cProfile.Profile()
    profiler.enable()
    timed_steps(engine, steps, add_each_step, overlap)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((f"{path.rsplit('/', 1)[-1]}:{line}({name})", tottime, cumtime, calls)
                   for (path, line, name), (_, calls, tottime, cumtime, _) in stats.items()), key=lambda r: -r[1])
    return [{"function": f, "own_ms_per_step": t * 1000 / steps, "cum_ms_per_step": c * 1000 / steps,
             "calls_per_step": n / steps} for f, t, c, n in rows[:top]]


def run_phase(llm, name: str, steps: int, add_each_step, cost_model, peak, ranks, overlap: bool = False,
              cprofile: bool = False) -> dict:
    """The phase's steps run three times: timed (wall, host parts), under torch.profiler (kernel table; the
    profiler's own host cost would inflate the times), and with --cprofile under cProfile (host functions)."""
    engine = llm.engine
    plans, walls, parts = timed_steps(engine, steps, add_each_step, overlap)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        profiled, _, _ = timed_steps(engine, steps, add_each_step, overlap)
    per_cat, top, busy = kernel_table(prof)
    hosts = host_profile(engine, steps, add_each_step, overlap) if cprofile else None
    costs = [cost_model.cost(p, {n: ranks[n] for n in p.slots if n in ranks}) for p in plans]
    roofline = sum(c.seconds(peak) for c in costs) / steps * 1000
    wall = sum(walls) / steps * 1000
    return {
        "phase": name, "steps": steps,
        "seqs_per_step": sum(len(p.seqs) for p in plans) / steps,
        "tokens_per_step": sum(p.num_tokens for p in plans) / steps,
        "distinct_adapters_per_step": sum(len(p.slots) for p in plans) / steps,
        "wall_ms": wall, "gpu_busy_ms": busy / len(profiled), "roofline_ms": roofline,
        "wall_over_roofline": wall / roofline,
        "kv_gb_per_step": sum(c.kv_bytes for c in costs) / steps / 1e9,
        "adapter_gb_per_step": sum(c.adapter_bytes for c in costs) / steps / 1e9,
        "category_ms_per_step": {k: v / steps for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms_per_step": ms / steps, "calls_per_step": c / steps} for n, ms, c in top],
        **({"host_ms_per_step": parts} if overlap else {}),
        **({"host_functions": hosts} if hosts else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-2-7b")
    ap.add_argument("--num-adapters", type=int, default=0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--seqs", type=int, default=240, help="sequences decoding in the steady batch")
    ap.add_argument("--input-len", default="8:512")
    ap.add_argument("--prefill-len", type=int, default=256, help="prompt tokens added per mixed step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-pages", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (kernel tables then stay empty: the "
                    "ranks run in their own processes; wall times per step still compare)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="also the host functions by own time (cProfile)")
    ap.add_argument("--overlap", action="store_true", help="pipeline the profiled steps as the serving executor "
                    "does (launch step n+1, then finish step n); tp=1 only")
    ap.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra EngineConfig field (int/float/bool/str by its default's type)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.overlap and args.tp != 1:
        ap.error("--overlap needs --tp 1 (the offline tensor-parallel engine runs steps synchronously)")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = tuple(args.targets.split(","))
    adapters = {f"a{i}": synthetic_adapter_path(ranks[i % len(ranks)], i, targets) for i in range(args.num_adapters)}
    extra = {}
    for item in args.engine_option:
        key, value = item.split("=", 1)
        extra[key] = {"true": True, "false": False}.get(value.lower(), value)
        for cast in (int, float):
            try:
                extra[key] = cast(value)
                break
            except ValueError:
                pass
    total_seqs = args.seqs + 3 * args.steps + 2  # mixed steps add one each, in up to 3 passes
    llm = LLM(args.model, adapters=adapters, device=args.device, tp=args.tp, dtype=args.dtype,
              num_pages=args.num_pages, max_num_seqs=total_seqs, max_batch_tokens=4096,
              max_adapters_per_batch=max(1, min(256, args.num_adapters)),
              cuda_graphs=not args.no_cuda_graphs, prefetch_adapters=16, **extra)
    engine = llm.engine
    vocab = engine.model.vocab_size
    names = list(adapters)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    low, high = (int(x) for x in args.input_len.split(":"))
    counter = [0]

    def add(length: int) -> None:
        adapter = rng.choices(names, weights)[0] if names else None
        params = SamplingParams(max_tokens=engine.max_model_len - length, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{counter[0]}", [rng.randrange(3, vocab) for _ in range(length)], params, adapter)
        counter[0] += 1

    for _ in range(args.seqs):
        add(rng.randint(low, high))
    started = time.perf_counter()
    while engine.scheduler.waiting or any(p.num_computed < len(p.prompt_ids) for p in _running(engine)):
        step_once(engine)  # admit and prefill everything (also warms kernels and captures graphs)
    for _ in range(3):
        step_once(engine)
    warm_s = time.perf_counter() - started
    dtype = getattr(torch, args.dtype)
    peak = measure_peak(torch.device(args.device), dtype)  # under tp: measured here, beside the rank processes
    cost_model = StepCostModel(engine.model, dtype.itemsize, args.tp)
    ranks_of = {n: engine.store.infos[n].ranks for n in names if n in engine.store.infos}
    add(args.prefill_len)  # warm the mixed path's graphs/kernels once
    step_once(engine)
    step_once(engine)
    phases = [run_phase(llm, "decode", args.steps, lambda: None, cost_model, peak, ranks_of, args.overlap,
                        args.cprofile),
              run_phase(llm, "mixed", args.steps, lambda: add(args.prefill_len), cost_model, peak, ranks_of,
                        args.overlap, args.cprofile)]
    result = {"model": args.model, "tensor_parallel_size": args.tp, "num_adapters": args.num_adapters,
              "overlap": args.overlap,
              "targets": list(targets), "device": args.device,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "dtype": args.dtype,
              "peak_bandwidth_gb_s": peak.bandwidth / 1e9, "peak_matmul_tflops": peak.matmul_flops / 1e12,
              "warmup_s": warm_s, "command": "python bench/step_profile.py " + " ".join(_argv()), "phases": phases}
    llm.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for p in phases:
        cats = ", ".join(f"{k} {v:.1f}" for k, v in p["category_ms_per_step"].items())
        print(f"{args.model} tp={args.tp} n={args.num_adapters} {p['phase']}: seqs {p['seqs_per_step']:.0f} tokens "
              f"{p['tokens_per_step']:.0f} wall {p['wall_ms']:.1f} ms gpu {p['gpu_busy_ms']:.1f} roofline "
              f"{p['roofline_ms']:.1f} ({p['wall_over_roofline']:.2f}x) | {cats}"
              + "".join(f" | {k} {v:.1f}" for k, v in p.get("host_ms_per_step", {}).items()))


def _running(engine):
    return list(engine.scheduler.running)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()

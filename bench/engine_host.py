"""Host-side cost of one engine step at serving batch sizes, without a GPU.

The planning engine (scheduler, page books, detokenizer) runs a Llama-2-7B-shaped configuration with synthetic
adapters and a full batch of running requests; each step is planned, its StepPlan encoded and decoded as it
travels to the executors, tokens are "sampled" at random and the step completed. Separately, the runner's
metadata for a decode step (LoRA row tables, positions, the CUDA-graph static-buffer fill, here into host
buffers) is built for the same batch. Writes milliseconds per step of each part.

    python bench/engine_host.py --out bench/results/engine-host-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from types import SimpleNamespace

import msgpack
import torch

from lorafleet.actors.server import RemoteOnly
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.config import TARGET_MODULES, EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.cuda_graphs import DecodeGraphs, StaticBatch, StepInputs
from lorafleet.engine.engine import Engine
from lorafleet.engine.plan import StepOutput, StepPlan
from lorafleet.engine.request import SamplingParams
from lorafleet.engine.runner import ModelRunner, ResidentAdapter, RowTables
from lorafleet.engine.synthetic import synthetic_adapter_path, write_model
from lorafleet.engine.tokenizer import load_tokenizer, text_decoder

RANKS = (8, 16, 32, 64)


def planning_engine(model_dir: str, args: argparse.Namespace) -> Engine:
    cfg = ModelConfig.from_dir(model_dir)
    config = EngineConfig(num_pages=args.num_pages, max_num_seqs=args.seqs, max_batch_tokens=args.batch_tokens,
                          max_adapters_per_batch=args.seqs, dtype="bfloat16")
    block_tokens, page_elements = page_geometry(cfg, 16)
    store = AdapterStore(cfg, page_elements, torch.bfloat16, 64, 1 << 40)
    engine = Engine(cfg, config, store, RemoteOnly(), text_decoder(load_tokenizer(model_dir)), block_tokens)
    targets = TARGET_MODULES if args.targets == "all" else tuple(args.targets.split(","))
    for i in range(args.adapters):
        engine.add_adapter(f"synthetic-{i}", synthetic_adapter_path(RANKS[i % len(RANKS)], i, targets))
    return engine


def measure_engine(engine: Engine, args: argparse.Namespace) -> dict:
    rng = random.Random(0)

    def add(key: int) -> None:
        adapter = f"synthetic-{min(int(rng.paretovariate(1.0)) - 1, args.adapters - 1)}"
        prompt = [rng.randrange(3, 32000) for _ in range(rng.randint(8, 512))]
        engine.add_request(f"r{key}", prompt, SamplingParams(max_tokens=rng.randint(8, 512), ignore_eos=True), adapter)

    for key in range(2 * args.seqs):
        add(key)
    for _ in range(args.warmup_steps):  # fill the batch: prefill chunks first
        schedule, plan = engine.plan_step()
        engine.complete_step(schedule, StepOutput([rng.randrange(3, 32000) for s in plan.seqs if s.sample]))
    totals = {"plan_ms": 0.0, "wire_ms": 0.0, "complete_ms": 0.0}
    seqs = steps = 0
    next_key = 2 * args.seqs
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        schedule, plan = engine.plan_step()
        t1 = time.perf_counter()
        StepPlan.from_wire(msgpack.unpackb(msgpack.packb(plan.to_wire())))
        t2 = time.perf_counter()
        outputs = engine.complete_step(schedule, StepOutput([rng.randrange(3, 32000) for s in plan.seqs if s.sample]))
        t3 = time.perf_counter()
        for key, value in (("plan_ms", t1 - t0), ("wire_ms", t2 - t1), ("complete_ms", t3 - t2)):
            totals[key] += value * 1000
        steps, seqs = steps + 1, seqs + len(plan.seqs)
        for out in outputs:
            if out.finished:
                add(next_key)
                next_key += 1
    return {"steps": steps, "mean_seqs": seqs / steps, **{k: v / steps for k, v in totals.items()}}


def measure_runner_metadata(args: argparse.Namespace, tp: int = 1, repeats: int = 30) -> dict:
    """LoRA tables + positions + static-buffer fill of one decode step (host buffers stand in for the GPU's), as
    rank 0 of `tp` builds them (a shard has the adapter's rank in A and Bᵀ rows at any size, so the tables are
    tp=1's: only the ModelRunner's shard differs)."""
    rng = random.Random(1)
    runner = ModelRunner.__new__(ModelRunner)
    runner.shard, runner.block_tokens, runner.max_rank = SimpleNamespace(size=tp, rank=0), 16, 64
    runner.resident, runner.row_tables = {}, RowTables()
    for i in range(min(args.adapters, args.seqs)):
        rank = RANKS[i % len(RANKS)]
        rows = {}
        for m in args.modules.split(","):
            rows[m] = ([rng.randrange(10**8) for _ in range(rank)], [rng.randrange(10**8) for _ in range(rank)])
        runner.resident[f"s{i}"] = ResidentAdapter(2.0, rank, rows)
        runner.row_tables.add(f"s{i}", rows)
    slots = list(runner.resident)
    plan_seqs = []
    for _ in range(args.seqs):
        context = rng.randint(16, 1024)
        table = [rng.randrange(args.num_pages) for _ in range(-(-context // 16))]
        plan_seqs.append(SimpleNamespace(token_ids=[5], start=context - 1, block_table=table,
                                         slot=rng.randrange(len(slots)), sample=True))
    plan = SimpleNamespace(seqs=plan_seqs, slots=slots)
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.block_tokens, graphs.scratch_page, graphs.max_slots, graphs.max_rank = 16, args.num_pages, args.seqs, 64
    graphs.static = StaticBatch(args.seqs, 4096 // 16, args.seqs, 64, torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(repeats):
        token_slots, scales, tables = runner._lora_tables(plan)
        positions, kv_slots = runner._positions(plan)
        inputs = StepInputs([s.token_ids[0] for s in plan.seqs], positions, kv_slots,
                              [s.block_table for s in plan.seqs], token_slots, scales, tables)
        graphs._fill(inputs, args.seqs)
    return {"decode_metadata_ms": (time.perf_counter() - started) * 1000 / repeats}


def planning_args(doc: str, seconds: float, warmup_steps: int) -> argparse.ArgumentParser:
    """The options of `planning_engine` (batch, adapters, pool) and of the measuring loop, with these defaults."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--num-pages", type=int, default=13000)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="the synthetic adapters' target modules (comma-separated, or 'all' for the seven)")
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps)
    return parser


def main() -> None:
    parser = planning_args(__doc__, seconds=15.0, warmup_steps=20)
    parser.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj",
                        help="LoRA target modules of the runner-metadata part")
    parser.add_argument("--runner-only", action="store_true", help="only the runner's metadata part")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_model("llama-2-7b", tmp))
        result = {} if args.runner_only else {"engine": measure_engine(planning_engine(model_dir, args), args)}
        result["runner"] = measure_runner_metadata(args)
        result["runner_tp2_rank0"] = measure_runner_metadata(args, tp=2)
    doc = {"schema": "lorafleet.engine-host/1", "command": "python bench/engine_host.py " + " ".join(sys.argv[1:]),
           "config": vars(args),
           "environment": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                           "torch": torch.__version__},
           "result": result}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

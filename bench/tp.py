"""Tensor-parallel throughput: tp=1 vs tp=2 on a Llama-2-13B-shaped synthetic model with an S-LoRA style
workload (adapters of ranks {8,16,32,64}, power-law popularity, uniform lengths), run through the offline
engine, plus the latency of the base all-reduce a layer issues twice (the LoRA adds no collective since the
adapters are cut along the base split, docs/tensor-parallel.md).

    python bench/tp.py --out bench/results/tp-h200x2.json [--model synthetic:llama-2-13b] [--requests 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lorafleet.engine import LLM
from lorafleet.engine.build import resolve_model
from lorafleet.engine.synthetic import write_adapter


def workload(num_requests: int, adapters: list[str], seed: int, in_range, out_range, vocab: int):
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(adapters))]  # power law, alpha = 1
    prompts, which, lengths = [], [], []
    for _ in range(num_requests):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(*in_range))])
        which.append(rng.choices(adapters, weights)[0])
        lengths.append(rng.randint(*out_range))
    return prompts, which, lengths


def run_engine(model: str, adapters: dict, tp: int, prompts, which, max_tokens: int, options: dict) -> dict:
    with LLM(model, adapters=adapters, tp=tp, **options) as llm:
        llm.generate(prompts[:4], adapters=which[:4], max_tokens=4, ignore_eos=True)  # warm up kernels
        started = time.perf_counter()
        outs = llm.generate(prompts, adapters=which, max_tokens=max_tokens, ignore_eos=True)
        seconds = time.perf_counter() - started
        steps, pages = llm.engine.steps, llm.engine.config.num_pages
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the pool back before the next run's processes need the memory
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tp": tp, "requests": len(prompts), "seconds": seconds, "output_tokens": tokens,
            "output_tok_per_s": tokens / seconds, "req_per_s": len(prompts) / seconds, "steps": steps,
            "lora": any(which), "num_pages": pages}


def _collective_worker(rank: int, init: str, result: dict, shapes: list) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=2)
    times = {}
    for label, shape, dtype, kind in shapes:
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        outs = [torch.empty_like(x) for _ in range(2)]
        if kind == "all_reduce":
            op = lambda x=x: dist.all_reduce(x)  # noqa: E731
        else:
            op = lambda x=x, outs=outs: dist.all_gather(outs, x)  # noqa: E731
        for _ in range(20):
            op()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            op()
        torch.cuda.synchronize()
        times[label] = (time.perf_counter() - start) / 200 * 1e6
    if rank == 0:
        result.update(times)
    dist.destroy_process_group()


def collective_latencies(hidden: int, tokens: int) -> dict:
    shapes = [
        ("base_all_reduce_us", (tokens, hidden), torch.bfloat16, "all_reduce"),
    ]  # LoRA adds no collective under tensor parallelism (docs/tensor-parallel.md; bench/tp_collectives.py)
    init = tempfile.mktemp(prefix="lorafleet-bench-tp-")
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_collective_worker, args=(init, result, shapes), nprocs=2)
        return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-13b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/tp-h200x2.json")
    parser.add_argument("--device", default="cuda", help="cpu runs a smoke test (gloo, no collective timings)")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    root = Path(tempfile.mkdtemp(prefix="lorafleet-tp-adapters-"))
    ranks = [8, 16, 32, 64]
    adapters = {f"a{i}": str(write_adapter(root / f"a{i}", model_dir, rank=ranks[i % 4], seed=i, std=0.01,
                                           dtype=torch.bfloat16)) for i in range(args.num_adapters)}
    config = json.loads((model_dir / "config.json").read_text())
    prompts, which, _ = workload(args.requests, list(adapters), 0, (8, 512), (8, 512), config["vocab_size"])
    options = dict(num_pages=0, max_num_seqs=128, max_batch_tokens=2048, max_adapters_per_batch=16,
                   device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cpu":
        prompts, which = [p[:16] for p in prompts], which
    rows = []
    for tp in (1, 2):
        rows.append(run_engine(str(model_dir), adapters, tp, prompts, which, args.max_tokens, options))
        rows.append(run_engine(str(model_dir), {}, tp, prompts, [None] * len(prompts), args.max_tokens, options))
    gpu = torch.cuda.is_available()
    result = {
        "command": "python bench/tp.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "gpu": torch.cuda.get_device_name(0) if gpu else "none", "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "model": args.model, "rows": rows,
        "collectives_at_128_tokens": collective_latencies(config["hidden_size"], 128) if gpu else {},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

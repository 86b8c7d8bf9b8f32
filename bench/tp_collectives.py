"""Time of the collectives one decoder layer issues under tensor parallelism, through the engine's own code
(`ParallelGroup.all_reduce`, `model.collect_intermediate`), eager and replayed from a CUDA graph (as the engine
runs them), for a decode step of T tokens: the base all-reduces (o, down) against the LoRA collectives — now
(one all-gather of the q/k/v intermediates, one all-reduce for o, model dtype) and before (one fp32 all-gather per
column-parallel module, one fp32 all-reduce per row-parallel one). Both rows include the per-token column pick
after each collective that the engine ran then and runs now (before: indexed per module and layer; now: the
per-token index built once per step, `LoraBatch.token_cols`, so not timed here). Issue #13's target: LoRA ≤ 25 %
of base.

    python bench/tp_collectives.py --out bench/results/tp-collectives-h200x2.json   # 2 GPUs (NCCL)
    python bench/tp_collectives.py --device cpu                                      # gloo smoke run, eager only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lorafleet.engine.model import ParallelGroup, collect_intermediate
from lorafleet.engine.weights import Shard


def layer_ops(group: ParallelGroup, tokens: int, hidden: int, rank: int, slots: int, device: str) -> dict:
    """label -> a function issuing that part of one layer's collectives (adapters on q, k, v, o, rank `rank`)."""
    size, dtype = group.shard.size, group.dtype
    gen = torch.Generator().manual_seed(0)
    token_slots = torch.randint(0, slots, (tokens,), generator=gen, dtype=torch.int32).to(device)
    local = rank // size
    cols_gather = torch.tensor([(c // local) * local + c % local for c in range(rank)], device=device)
    cols_gather = cols_gather.expand(3, slots, rank).contiguous()
    cols_reduce = (group.shard.rank * local + torch.arange(local, device=device)).expand(slots, local).contiguous()
    base = [torch.randn(tokens, hidden, dtype=dtype, device=device) for _ in range(2)]
    qkv = torch.randn(3, tokens, local, device=device)
    o = torch.randn(tokens, rank, device=device)
    old_gathers = [torch.randn(tokens, local, device=device) for _ in range(3)]
    qkv_index = cols_gather[:, token_slots.long(), :]  # LoraBatch.token_cols: once per step, not per layer
    o_index = cols_reduce[token_slots.long(), :]

    def old_pick(v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # the engine before: per module and layer
        return torch.gather(v, 1, cols[token_slots.clamp(min=0).long()])

    def old_gather(v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(size * tokens, local, device=device)
        torch.distributed.all_gather_into_tensor(out, v, group=group.process_group)
        return out

    return {
        "base_all_reduces": lambda: [group.all_reduce(x) for x in base],
        "lora_now": lambda: (collect_intermediate(qkv, True, group, qkv_index),
                             collect_intermediate(o, False, group, o_index)),
        "lora_before": lambda: ([old_pick(old_gather(v).view(size, tokens, local).movedim(0, 1).reshape(tokens, -1),
                                          cols_gather[0]) for v in old_gathers],
                                old_pick(group.all_reduce(o.clone()), cols_reduce)),
    }


def _time(op, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        op()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        op()
    sync()
    return (time.perf_counter() - started) / repeats * 1e6


def _graphed(op, repeats: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            op()
    return _time(graph.replay, repeats, "cuda") / 10


def _worker(rank: int, init: str, device_kind: str, tokens_list: list[int], result: dict) -> None:
    import torch.distributed as dist

    cuda = device_kind == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    device = f"cuda:{rank}" if cuda else "cpu"
    group = ParallelGroup(Shard(rank, 2), None, torch.bfloat16 if cuda else torch.float32)
    rows = []
    for tokens in tokens_list:
        ops = layer_ops(group, tokens, 5120, 64, 16, device)
        row = {"tokens": tokens}
        for label, op in ops.items():
            row[f"{label}_eager_us"] = _time(op, 50, device)
            if cuda:
                row[f"{label}_graph_us"] = _graphed(op, 20)
        for mode in ("eager", "graph") if cuda else ("eager",):
            base = row[f"base_all_reduces_{mode}_us"]
            row[f"lora_now_over_base_{mode}"] = row[f"lora_now_{mode}_us"] / base
            row[f"lora_before_over_base_{mode}"] = row[f"lora_before_{mode}_us"] / base
        rows.append(row)
    if rank == 0:
        result["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tokens", default="32,128,256", help="decode batch sizes (tokens per step)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    init = os.path.join(tempfile.mkdtemp(prefix="lorafleet-tp-coll-"), "init")
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(init, args.device, [int(t) for t in args.tokens.split(",")], result), nprocs=2)
        rows = list(result["rows"])
    doc = {"command": "python bench/tp_collectives.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
           "shape": "Llama-2-13B layer (hidden 5120), adapters of rank 64 on q/k/v/o, 16 adapter slots, tp=2",
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "none", "torch": torch.__version__,
           "rows": rows}
    print(json.dumps(doc, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

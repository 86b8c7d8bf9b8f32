"""Collectives of one decoder layer under tensor parallelism (tp=2), counted and timed through the engine's own
layer code (`model.Attention`: shared_input_linears for q/k/v, o_proj with its all-reduce; `model.MLP`), eager
and replayed from a CUDA graph (as the engine runs them), for decode steps of T tokens.

Per T it reports:
- every torch.distributed call the layer's linear part makes, with and without LoRA (adapters of rank 64 on
  q/k/v/o, 16 slots, S-LoRA's S4 targets): count and bytes sent per rank. The LoRA collectives per layer are the
  difference — 0 since adapters are cut along the base layer's split (docs/tensor-parallel.md);
- the time of the base all-reduces (o, down; `ParallelGroup.all_reduce` of [T, hidden] twice), the figure
  issue #13's "LoRA collectives ≤ 25 % of the base all-reduce time" is measured against;
- the layer's linear part with and without LoRA (all it costs now is shrink/expand kernels, no collective);
- for reference, the collectives the removed S-LoRA split issued per layer for the same adapters (one
  all-gather of the q/k/v intermediates [3, T, 32] and one all-reduce of o's [T, 64], model dtype), as bare
  torch.distributed calls: what the new split saves.

    python bench/tp_collectives.py --out bench/results/tp-collectives-h200x2.json   # 2 GPUs (NCCL), bf16
    python bench/tp_collectives.py --device cpu --shape tiny --tokens 32             # gloo smoke run, eager only
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

from lorafleet.engine.adapters import shard_widths
from lorafleet.engine.config import ModelConfig, page_geometry
from lorafleet.engine.layout import AdapterLayout
from lorafleet.engine.model import MLP, Attention, LoraBatch, ModuleLora, ParallelGroup, shared_input_linears
from lorafleet.engine.synthetic import SHAPES
from lorafleet.engine.weights import Shard

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # S-LoRA's S4 setting
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_to_all_single", "reduce")


class Recorder:
    """Counts torch.distributed collectives (and bytes each rank sends) while `active`; the calls still run."""

    def __init__(self) -> None:
        self.active, self.count, self.bytes = False, 0, 0
        for name in COLLECTIVES:
            setattr(torch.distributed, name, self._wrap(name, getattr(torch.distributed, name)))

    def _wrap(self, name: str, fn):
        def call(*args, **kwargs):
            if self.active:
                tensor = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                sent = args[1] if name in ("all_gather_into_tensor", "reduce_scatter_tensor") else tensor
                self.count += 1
                self.bytes += sent.numel() * sent.element_size()
            return fn(*args, **kwargs)
        return call

    def measure(self, op) -> dict:
        self.active, self.count, self.bytes = True, 0, 0
        op()
        self.active = False
        return {"count": self.count, "bytes_sent_per_rank": self.bytes}


def _layer(cfg: ModelConfig, group: ParallelGroup, dtype: torch.dtype, device: str) -> tuple[Attention, MLP]:
    """One layer's attention projections and MLP with random weights (this rank's shard)."""
    with torch.device("meta"):
        attention, mlp = Attention(cfg, group), MLP(cfg, group)
    parts = []
    for module in (attention, mlp):
        module = module.to(dtype).to_empty(device=torch.device(device))
        for param in module.parameters():
            param.data.normal_(0, 0.02)
        parts.append(module)
    return parts[0], parts[1]


def _lora(cfg: ModelConfig, tp: int, tokens: int, rank: int, slots: int, dtype: torch.dtype,
          device: str) -> tuple[LoraBatch, torch.Tensor]:
    """A batch whose tokens use `slots` adapters of rank `rank` on TARGETS, packed as the engine packs a rank's
    shard (the whole A and 1/tp of Bᵀ for q/k/v, 1/tp of A and the whole Bᵀ for o), and the pool holding them."""
    dims = cfg.module_dims()
    _, page_elements = page_geometry(cfg, 16, tp)
    matrices = {m: (rank, shard_widths(m, *dims[m], tp)[0], rank, shard_widths(m, *dims[m], tp)[1])
                for m in TARGETS}
    layout = AdapterLayout.from_matrices(matrices, page_elements)
    pool = (torch.randn(slots * layout.num_pages * page_elements, device=device) * 0.02).to(dtype)
    modules = {}
    for m, rows in layout.modules.items():
        tables = [[layout.physical(v, list(range(s * layout.num_pages, (s + 1) * layout.num_pages))) for v in side]
                  for side in (rows.a_rows, rows.b_rows) for s in range(slots)]
        a = torch.tensor(tables[:slots], device=device)
        b = torch.tensor(tables[slots:], device=device)
        modules[m] = ModuleLora(a, b, torch.full((slots,), rank, dtype=torch.int32, device=device))
    gen = torch.Generator().manual_seed(0)
    token_slots = torch.randint(0, slots, (tokens,), generator=gen, dtype=torch.int32).to(device)
    return LoraBatch(token_slots, torch.ones(slots, device=device), modules), pool


def layer_ops(cfg: ModelConfig, group: ParallelGroup, tokens: int, rank: int, slots: int, dtype: torch.dtype,
              device: str) -> dict:
    """label -> a function issuing that part of one layer's work."""
    attention, mlp = _layer(cfg, group, dtype, device)
    lora, pool = _lora(cfg, group.shard.size, tokens, rank, slots, dtype, device)
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device)
    attn_out = torch.randn(tokens, attention.num_heads * attention.head_dim, dtype=dtype, device=device)
    base = [torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device) for _ in range(2)]
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    local = rank // group.shard.size
    gathered = torch.empty(group.shard.size * 3, tokens, local, dtype=dtype, device=device)
    qkv_part, o_part = torch.randn(3, tokens, local, dtype=dtype, device=device), torch.randn(tokens, rank,
                                                                                            dtype=dtype, device=device)

    def linears(batch: LoraBatch | None) -> None:
        shared_input_linears(projections, x, batch, pool)
        h = attention.output(attn_out, batch, pool)
        mlp(h, batch, pool)

    def removed_split() -> None:  # the S-LoRA split's fused collectives, as the engine issued them before
        torch.distributed.all_gather_into_tensor(gathered, qkv_part, group=group.process_group)
        torch.distributed.all_reduce(o_part, group=group.process_group)

    return {
        "base_all_reduces": lambda: [group.all_reduce(t) for t in base],
        "layer_linears_lora": lambda: linears(lora),
        "layer_linears_base": lambda: linears(None),
        "removed_split_lora_collectives": removed_split,
    }


def _time(op, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
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


def _row(cfg: ModelConfig, group: ParallelGroup, recorder: Recorder, tokens: int, dtype: torch.dtype,
         device: str, repeats: int) -> dict:
    ops = layer_ops(cfg, group, tokens, 64, 16, dtype, device)
    cuda = device.startswith("cuda")
    with_lora, without = recorder.measure(ops["layer_linears_lora"]), recorder.measure(ops["layer_linears_base"])
    row = {"tokens": tokens, "collectives_with_lora": with_lora, "collectives_without_lora": without,
           "lora_collectives_per_layer": with_lora["count"] - without["count"],
           "lora_collective_bytes_per_layer": with_lora["bytes_sent_per_rank"] - without["bytes_sent_per_rank"]}
    for label, op in ops.items():
        row[f"{label}_eager_us"] = _time(op, repeats, device)
        if cuda:
            row[f"{label}_graph_us"] = _graphed(op, max(2, repeats // 2))
    for mode in ("eager", "graph") if cuda else ("eager",):
        base = row[f"base_all_reduces_{mode}_us"]
        row[f"lora_collectives_over_base_{mode}"] = 0.0 if row["lora_collectives_per_layer"] == 0 else None
        row[f"removed_split_over_base_{mode}"] = row[f"removed_split_lora_collectives_{mode}_us"] / base
        layer = row[f"layer_linears_base_{mode}_us"]
        row[f"layer_lora_over_base_{mode}"] = row[f"layer_linears_lora_{mode}_us"] / layer
    return row


def _worker(rank: int, init: str, args: argparse.Namespace, result: dict) -> None:
    import torch.distributed as dist

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    device = f"cuda:{rank}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig.from_dict(SHAPES[args.shape])
    recorder = Recorder()
    with torch.inference_mode():
        rows = [_row(cfg, ParallelGroup(Shard(rank, 2)), recorder, int(t), dtype, device, args.repeats)
                for t in args.tokens.split(",")]
    if rank == 0:
        result["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="llama-2-13b", choices=sorted(SHAPES), help="synthetic model shape")
    parser.add_argument("--tokens", default="32,128,256", help="decode batch sizes (tokens per step)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    init = os.path.join(tempfile.mkdtemp(prefix="lorafleet-tp-coll-"), "init")
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(init, args, result), nprocs=2)
        rows = list(result["rows"])
    doc = {"command": "python bench/tp_collectives.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
           "shape": f"{args.shape} layer, adapters of rank 64 on q/k/v/o, 16 adapter slots, tp=2, "
                    f"{'bf16' if args.device == 'cuda' else 'fp32'}",
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "none", "torch": torch.__version__,
           "rows": rows}
    print(json.dumps(doc, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

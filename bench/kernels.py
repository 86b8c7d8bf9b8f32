"""Kernel benchmarks on one GPU, every comparison measured side by side in one run.

    python bench/kernels.py --out bench/results/kernels-h200.json --markdown kernels.md
    TRITON_INTERPRET=1 python bench/kernels.py --smoke      # tiny shapes on the CPU: checks the script only

Sections: device copy bandwidth (the roofline), LoRA shrink+expand (ours vs the same kernel with ranks
padded to the max vs gather+bmm, and ours with the modules that share an input fused: one shrink and one
expand launch for q/k/v and for gate/up), paged decode/prefill attention vs torch SDPA on contiguous K/V
(prefill also through flex_attention and varlen_attn; `varlen_probe`: which page sizes varlen_attn reads in place),
RMSNorm and rotary (Triton vs torch eager vs torch.compile), and one whole decode step of a Llama-2-7B-shaped
model with and without a CUDA graph against the time to read its bytes. Times are medians of triton's do_bench (L2 is
flushed before every repetition), in microseconds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.kernels import norm_ref, segments, triton_ops

RANK_CHOICES = (8, 16, 32, 64)
MAX_RANK = 64
SHAPES = {  # hidden, intermediate, heads, kv_heads, head_dim, LoRA targets
    "llama-2-7b": (4096, 11008, 32, 32, 128, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "llama-3-8b": (4096, 14336, 32, 8, 128, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")),
}
SMOKE_SHAPES = {
    "llama-2-7b": (64, 96, 4, 4, 16, ("q_proj", "o_proj")),
    "llama-3-8b": (64, 96, 4, 1, 16, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
}
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # modules that read the same input


# ------------------------------------------------------------------------------------------- timing
@dataclass
class Clock:
    """do_bench medians (or one wall-clock run in smoke mode on the CPU), optionally over a CUDA graph."""

    cuda: bool

    def eager(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3

    def graph(self, fn: Callable[[], object]) -> float:
        """Time the replay of a CUDA graph of fn (launch overhead excluded)."""
        if not self.cuda:
            return self.eager(fn)
        graph = capture(fn)
        return self.eager(graph.replay)


def capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def copy_bandwidth(clock: Clock, device: str, smoke: bool) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    n = (1 << 20) if smoke else (1 << 30)
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    us = clock.eager(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / us / 1e3


# --------------------------------------------------------------------------------------------- LoRA
def module_dims(shape: tuple) -> dict[str, tuple[int, int]]:
    h, inter, heads, kv_heads, head_dim, _ = shape
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass
class LoraSetup:
    """One layer's worth of LoRA work, replicated over `layers` pool buffers: row tables, inputs, outputs."""

    pools: list[torch.Tensor]
    rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> a_rows, b_rows, ranks
    xs: dict[str, torch.Tensor]
    outs: dict[str, torch.Tensor]
    scales: torch.Tensor
    token_slots: torch.Tensor


def _pack(ranks: list[int], dims: dict[str, tuple[int, int]], page_elements: int):
    """Rows of every adapter and module packed one after another, no row straddling a page."""
    cursor, tables = 0, {}
    for module, (d_in, d_out) in dims.items():
        a_rows = torch.zeros(len(ranks), MAX_RANK, dtype=torch.long)
        b_rows = torch.zeros(len(ranks), MAX_RANK, dtype=torch.long)
        for s, rank in enumerate(ranks):
            for table, width in ((a_rows, d_in), (b_rows, d_out)):
                for i in range(rank):
                    if cursor % page_elements + width > page_elements:
                        cursor += page_elements - cursor % page_elements
                    table[s, i] = cursor
                    cursor += width
        tables[module] = (a_rows, b_rows, torch.tensor(ranks, dtype=torch.int32))
    return tables, cursor


def lora_setup(shape, ranks, token_slots, layers, device, dtype=torch.bfloat16) -> LoraSetup:
    dims = {m: d for m, d in module_dims(shape).items() if m in shape[5]}
    tables, size = _pack(ranks, dims, page_elements=4 * max(max(d) for d in dims.values()))
    pools = [torch.randn(size, device=device, dtype=dtype) * 0.05 for _ in range(layers)]
    rows = {m: tuple(t.to(device) for t in tab) for m, tab in tables.items()}
    num_tokens = len(token_slots)
    xs = {m: torch.randn(num_tokens, d_in, device=device, dtype=dtype) for m, (d_in, _) in dims.items()}
    for group in FUSED_GROUPS:  # the targeted modules of a group read one input, as in the model
        present = [m for m in group if m in xs]
        xs.update({m: xs[present[0]] for m in present})
    outs = {m: torch.randn(num_tokens, d_out, device=device, dtype=dtype) for m, (_, d_out) in dims.items()}
    return LoraSetup(pools, rows, xs, outs, torch.rand(len(ranks), device=device) + 0.5,
                     torch.tensor(token_slots, dtype=torch.int32, device=device))


def run_lora(setup: LoraSetup) -> None:
    for pool in setup.pools:
        for module, (a_rows, b_rows, ranks) in setup.rows.items():
            v = triton_ops.lora_shrink(setup.xs[module], pool, a_rows, ranks, setup.token_slots)
            triton_ops.lora_expand(v, pool, b_rows, ranks, setup.scales, setup.token_slots, setup.outs[module])


def fused_groups(setup: LoraSetup) -> list[tuple[str, ...]]:
    """The targeted modules of each fused group (the model fuses whichever modules of a group are targeted)."""
    present = [tuple(m for m in group if m in setup.rows) for group in FUSED_GROUPS]
    return [group for group in present if group]


def stack_group(setup: LoraSetup, group: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, S, R] row tables and [M, S] ranks of a group (the model's LoraBatch.group does this once per step)."""
    return tuple(torch.stack([setup.rows[m][i] for m in group]) for i in range(3))


def fused_lora(setup: LoraSetup) -> Callable[[], None]:
    """One layer's LoRA with q/k/v and gate/up fused (one shrink + one expand launch per group), the other
    modules per module; the stacked tables are built once here, outside the timed work (once per step)."""
    groups = [(group, *stack_group(setup, group)) for group in fused_groups(setup)]
    single = [m for m in setup.rows if not any(m in g for g, *_ in groups)]

    def run() -> None:
        for pool in setup.pools:
            for group, a_rows, b_rows, ranks in groups:
                v = triton_ops.lora_shrink_multi(setup.xs[group[0]], pool, a_rows, ranks, setup.token_slots)
                triton_ops.lora_expand_multi(v, pool, b_rows, ranks, setup.scales, setup.token_slots,
                                             [setup.outs[m] for m in group])
            for module in single:
                a_rows, b_rows, ranks = setup.rows[module]
                v = triton_ops.lora_shrink(setup.xs[module], pool, a_rows, ranks, setup.token_slots)
                triton_ops.lora_expand(v, pool, b_rows, ranks, setup.scales, setup.token_slots, setup.outs[module])

    return run


def gather_bmm(setup: LoraSetup, ranks: list[int]) -> Callable[[], None]:
    """Baseline: adapters as dense [S, max_rank, dim] stacks (zero past each rank); per token, gather its
    adapter's A and B and run torch.bmm (what a framework without custom kernels does)."""
    dense = []
    for pool in setup.pools:
        layer = {}
        for module, (a_rows, b_rows, _) in setup.rows.items():
            d_in, d_out = setup.xs[module].shape[1], setup.outs[module].shape[1]
            a = torch.zeros(len(ranks), MAX_RANK, d_in, device=pool.device, dtype=pool.dtype)
            b = torch.zeros(len(ranks), MAX_RANK, d_out, device=pool.device, dtype=pool.dtype)
            for s, r in enumerate(ranks):
                a[s, :r] = pool[a_rows[s, :r, None] + torch.arange(d_in, device=pool.device)]
                b[s, :r] = pool[b_rows[s, :r, None] + torch.arange(d_out, device=pool.device)]
            layer[module] = (a, b)
        dense.append(layer)
    index = setup.token_slots.long()
    token_scales = setup.scales[index][:, None].to(torch.bfloat16)

    def run() -> None:
        for layer in dense:
            for module, (a, b) in layer.items():
                v = torch.bmm(a[index], setup.xs[module][:, :, None])  # [T, R, 1]
                delta = torch.bmm(v.transpose(1, 2), b[index])[:, 0]
                setup.outs[module].add_(delta * token_scales)

    return run


def lora_bytes(shape, ranks: list[int], num_tokens: int) -> tuple[int, int]:
    """(adapter bytes, all bytes) one layer must move: each adapter row once, x once, out read + written."""
    dims = {m: d for m, d in module_dims(shape).items() if m in shape[5]}
    adapter = sum(2 * r * (d_in + d_out) for r in ranks for d_in, d_out in dims.values())
    io = sum(num_tokens * (2 * d_in + 4 * d_out + 8 * MAX_RANK) for d_in, d_out in dims.values())
    return adapter, adapter + io


def bench_lora(clock: Clock, device: str, shapes: dict, batches, adapter_counts, copy_gbps: float) -> list[dict]:
    rows = []
    for model, shape in shapes.items():
        for batch in batches:
            for count in adapter_counts:
                if count > batch:
                    continue
                rng = random.Random(batch * 100 + count)
                ranks = [rng.choice(RANK_CHOICES) for _ in range(count)]
                slots = [i % count for i in range(batch)]
                rng.shuffle(slots)
                adapter_b, total_b = lora_bytes(shape, ranks, batch)
                layers = max(1, min(8, math.ceil(64e6 / total_b)))
                ours = lora_setup(shape, ranks, slots, layers, device)
                padded = lora_setup(shape, [MAX_RANK] * count, slots, layers, device)
                row = dict(model=model, batch=batch, adapters=count, ranks=ranks, layers_timed=layers,
                           adapter_bytes=adapter_b, total_bytes=total_b)
                row["ours_graph_us"] = clock.graph(lambda s=ours: run_lora(s)) / layers
                row["ours_eager_us"] = clock.eager(lambda s=ours: run_lora(s)) / layers
                row["fused_graph_us"] = clock.graph(fused_lora(ours)) / layers
                row["fused_eager_us"] = clock.eager(fused_lora(ours)) / layers
                row["fused_tables_graph_us"] = clock.graph(lambda s=ours: [stack_group(s, g) for g in fused_groups(s)])
                row["padded_graph_us"] = clock.graph(lambda s=padded: run_lora(s)) / layers
                row["gather_bmm_graph_us"] = clock.graph(gather_bmm(ours, ranks)) / layers
                row["achieved_GBps"] = total_b / row["ours_graph_us"] / 1e3
                row["fraction_of_copy_bw"] = row["achieved_GBps"] / copy_gbps
                row["speedup_vs_padded"] = row["padded_graph_us"] / row["ours_graph_us"]
                row["speedup_vs_gather_bmm"] = row["gather_bmm_graph_us"] / row["ours_graph_us"]
                row["speedup_fused_vs_ours"] = row["ours_graph_us"] / row["fused_graph_us"]
                row["adapter_bytes_dominate"] = adapter_b >= 0.5 * total_b
                rows.append(row)
                print(f"lora {model} B={batch} A={count}: {row['ours_graph_us']:.1f} us "
                      f"({row['fraction_of_copy_bw']:.0%} of copy bw), x{row['speedup_vs_padded']:.2f} vs padded, "
                      f"x{row['speedup_vs_gather_bmm']:.1f} vs gather+bmm; fused {row['fused_graph_us']:.1f} us "
                      f"(x{row['speedup_fused_vs_ours']:.2f})", flush=True)
                del ours, padded
    return rows


def bench_tile_metadata(clock: Clock, device: str) -> dict:
    """The once-per-step cost of grouping tokens by slot (cached across layers and modules)."""
    slots = torch.randint(-1, 16, (256,), dtype=torch.int32, device=device)
    return {"batch": 256, "slots": 16, "eager_us": clock.eager(lambda: segments.slot_tiles(slots, 16, 16))}


# ------------------------------------------------------------------------------------------- tuning
SHRINK_CONFIGS = [dict(shrink_k_chunk=c, shrink_block_k=k, shrink_warps=w, shrink_stages=st)
                  for c, k, w, st in [(512, 128, 4, 2), (512, 256, 4, 3), (1024, 256, 4, 3), (256, 128, 4, 2),
                                      (256, 256, 4, 2), (1024, 128, 4, 4), (2048, 256, 8, 3), (512, 512, 8, 2)]]
EXPAND_CONFIGS = [dict(expand_block_n=n, expand_warps=w, expand_stages=st)
                  for n, w, st in [(128, 4, 2), (64, 4, 2), (128, 4, 3), (256, 4, 3), (256, 8, 3), (64, 2, 3),
                                   (512, 8, 2), (128, 2, 2)]]
PREFILL_CONFIGS = [dict(prefill_block_m=m, prefill_block_n=n, prefill_warps=w, prefill_stages=st, prefill_pack_gqa=p)
                   for m, n, w, st, p in [(64, 64, 4, 2, False), (64, 64, 4, 2, True), (128, 64, 8, 3, True),
                                          (128, 64, 4, 2, True), (128, 128, 8, 2, True), (64, 64, 4, 3, True),
                                          (128, 64, 8, 3, False), (64, 32, 4, 2, True)]]
DECODE_CONFIGS = [dict(decode_block_n=n, decode_min_blocks_per_split=b, decode_warps=w, decode_stages=st)
                  for n, b, w, st in [(64, 2, 4, 2), (64, 4, 4, 2), (32, 2, 4, 2), (64, 1, 4, 3), (128, 2, 4, 2),
                                      (128, 1, 8, 2), (32, 4, 2, 3)]]


def _pick(module, configs: list[dict], cases: list[Callable[[], float]], label: str) -> dict:
    """Time every config on every case; keep the config with the smallest sum of time / best time."""
    import dataclasses as dc

    default = module.TUNE
    table = []
    for config in configs:
        module.TUNE = dc.replace(default, **config)
        try:
            table.append([case() for case in cases])
        except Exception as exc:  # a config that does not compile (shared memory) is reported and skipped
            print(f"tune {label} {config}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            table.append([math.inf] * len(cases))
    best = [min(col) for col in zip(*table)]
    scores = [sum(t / b for t, b in zip(row, best)) for row in table]
    choice = min(range(len(configs)), key=scores.__getitem__)
    module.TUNE = dc.replace(default, **configs[choice])
    for config, row, score in zip(configs, table, scores):
        print(f"tune {label} {config}: " + " ".join(f"{t:.1f}" for t in row) + f" score {score:.2f}", flush=True)
    return {"configs": configs, "times_us": table, "chosen": configs[choice]}


def run_shrink(setup: LoraSetup) -> None:
    for pool in setup.pools:
        for module, (a_rows, _, ranks) in setup.rows.items():
            triton_ops.lora_shrink(setup.xs[module], pool, a_rows, ranks, setup.token_slots)


def expand_only(setup: LoraSetup) -> Callable[[], None]:
    vs = {m: triton_ops.lora_shrink(setup.xs[m], setup.pools[0], a, r, setup.token_slots)
          for m, (a, _, r) in setup.rows.items()}

    def run() -> None:
        for pool in setup.pools:
            for module, (_, b_rows, ranks) in setup.rows.items():
                triton_ops.lora_expand(vs[module], pool, b_rows, ranks, setup.scales, setup.token_slots,
                                       setup.outs[module])

    return run


def tune(clock: Clock, device: str, parts: set[str]) -> dict:
    """Sweep the launch parameters on representative shapes and keep the best for the rest of the run."""
    result = tune_lora(clock, device) if "lora" in parts else {}
    return {**result, **(tune_attention(clock, device, parts))}


def tune_lora(clock: Clock, device: str) -> dict:
    from lorafleet.kernels import lora_triton

    shape = SHAPES["llama-3-8b"]
    setups = []
    for batch, count in ((256, 64), (64, 8), (16, 1), (2048, 4)):
        rng = random.Random(batch + count)
        slots = [i % count for i in range(batch)] if batch <= 256 else sorted(i % count for i in range(batch))
        setups.append(lora_setup(shape, [rng.choice(RANK_CHOICES) for _ in range(count)], slots, 1, device))
    result = {"lora_cases": ["llama-3-8b B=256 A=64", "B=64 A=8", "B=16 A=1", "prefill T=2048 A=4"]}
    result["shrink"] = _pick(lora_triton, SHRINK_CONFIGS, [lambda s=s: clock.graph(lambda: run_shrink(s))
                                                            for s in setups], "shrink")
    result["expand"] = _pick(lora_triton, EXPAND_CONFIGS, [lambda s=s: clock.graph(expand_only(s)) for s in setups],
                             "expand")
    return result


def tune_attention(clock: Clock, device: str, parts: set[str]) -> dict:
    from lorafleet.kernels import attention_triton

    result, prefill, decode = {}, [], []
    for batch, new in ((1, 2048), (1, 8192), (32, 256)):
        kv, tables, _, _ = paged_kv(batch, new, 8, 128, 16, device)
        lens = torch.full((batch,), new, dtype=torch.int32, device=device)
        starts = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
        q = torch.randn(batch * new, 32, 128, device=device, dtype=torch.bfloat16)
        args = (q, kv, tables, lens, starts, 128**-0.5)
        prefill.append(lambda a=args: clock.graph(lambda: triton_ops.paged_prefill_attention(*a)))
    if "prefill" in parts:
        result["prefill"] = _pick(attention_triton, PREFILL_CONFIGS, prefill, "prefill")
    del prefill
    if "decode" not in parts:
        return result
    for batch, context in ((1, 128), (1, 2048), (16, 512), (64, 2048), (256, 512)):
        kv, tables, _, _ = paged_kv(batch, context, 8, 128, 16, device)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
        args = (q, kv, tables, lens, 128**-0.5)
        decode.append(lambda a=args: clock.graph(lambda: triton_ops.paged_decode_attention(*a)))
    result["decode"] = _pick(attention_triton, DECODE_CONFIGS, decode, "decode")
    return result


# ---------------------------------------------------------------------------------------- attention
def paged_kv(batch: int, context: int, kv_heads: int, head_dim: int, block_tokens: int, device: str):
    """K/V of `batch` sequences of `context` tokens in shuffled pages, plus the contiguous copies."""
    blocks = -(-context // block_tokens)
    num_pages = batch * blocks + 7
    keys = torch.randn(batch, context, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    perm = torch.randperm(num_pages, device=device)[: batch * blocks].view(batch, blocks)
    kv = torch.empty(num_pages, 2, block_tokens, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    pad = blocks * block_tokens - context
    kv[perm, 0] = F.pad(keys, (0, 0, 0, 0, 0, pad)).view(batch, blocks, block_tokens, kv_heads, head_dim)
    kv[perm, 1] = F.pad(values, (0, 0, 0, 0, 0, pad)).view(batch, blocks, block_tokens, kv_heads, head_dim)
    return kv, perm.to(torch.int32), keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()


def sdpa(q, k, v, causal: bool):
    """torch SDPA on contiguous [B, H, n, D] inputs with GQA (kv heads broadcast, not copied)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_decode_attention(clock: Clock, device: str, heads, kv_heads, head_dim, cases, copy_gbps) -> list[dict]:
    rows = []
    for batch, context in cases:
        kv, tables, keys, values = paged_kv(batch, context, kv_heads, head_dim, 16, device)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
        scale = head_dim**-0.5
        ours = clock.graph(lambda a=(q, kv, tables, lens, scale): triton_ops.paged_decode_attention(*a))
        base = clock.graph(lambda a=(q[:, :, None, :], keys, values): sdpa(*a, causal=False))
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        row = dict(heads=heads, kv_heads=kv_heads, batch=batch, context=context, ours_us=ours, sdpa_contiguous_us=base,
                   ratio_to_sdpa=ours / base, kv_GBps=kv_bytes / ours / 1e3, fraction_of_copy_bw=kv_bytes / ours / 1e3
                   / copy_gbps)
        row.update(_varlen_decode(clock, (q, kv, tables, lens, scale), base))
        rows.append(row)
        varlen = f"{row['varlen_us']:.1f} us" if "varlen_us" in row else row["varlen_error"][:80]
        print(f"decode attn H={heads}/{kv_heads} B={batch} ctx={context}: {ours:.1f} us vs SDPA {base:.1f} us "
              f"({row['ratio_to_sdpa']:.2f}x); varlen {varlen}", flush=True)
        del kv, keys, values
    return rows


def bench_prefill_attention(clock: Clock, device: str, heads, kv_heads, head_dim, cases) -> list[dict]:
    """Fresh prefills of `batch` sequences of `new` tokens: our Triton kernel over pages and flex_attention over
    the same pages (kernels/attention_flex.py; its once-per-step plan timed apart) against SDPA on contiguous K/V."""
    rows = []
    for batch, new in cases:
        kv, tables, keys, values = paged_kv(batch, new, kv_heads, head_dim, 16, device)
        lens = torch.full((batch,), new, dtype=torch.int32, device=device)
        starts = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
        q = torch.randn(batch * new, heads, head_dim, device=device, dtype=torch.bfloat16)
        scale = head_dim**-0.5
        ours = clock.graph(lambda a=(q, kv, tables, lens, starts, scale): triton_ops.paged_prefill_attention(*a))
        q4 = q.view(batch, new, heads, head_dim).transpose(1, 2).contiguous()
        base = clock.graph(lambda a=(q4, keys, values): sdpa(*a, causal=True))
        flops = 4 * batch * heads * head_dim * new * new / 2
        row = dict(heads=heads, kv_heads=kv_heads, batch=batch, new_tokens=new, ours_us=ours, sdpa_contiguous_us=base,
                   ratio_to_sdpa=ours / base, ours_TFLOPs=flops / ours / 1e6)
        row.update(_flex_prefill(clock, (q, kv, tables, lens, starts, scale), base))
        row.update(_varlen_prefill(clock, (q, kv, tables, lens, starts, scale), base))
        rows.append(row)
        flex = {key: row.get(key, float("nan")) for key in ("flex_us", "flex_ratio_to_sdpa", "flex_plan_us")}
        print(f"prefill attn H={heads}/{kv_heads} B={batch} n={new}: {ours:.1f} us vs SDPA {base:.1f} us "
              f"({row['ratio_to_sdpa']:.2f}x); flex {flex['flex_us']:.1f} us ({flex['flex_ratio_to_sdpa']:.2f}x, "
              f"plan {flex['flex_plan_us']:.0f} us{', ' + row['flex_error'] if 'flex_error' in row else ''}); "
              f"varlen {_varlen_summary(row)}", flush=True)
        del kv, keys, values
    return rows


def _flex_prefill(clock: Clock, args: tuple, sdpa_us: float) -> dict:
    """flex_attention over the pages: the per-layer call (plan cached, as every layer after the first reuses
    it) and the plan (gather indices + block mask, once per step). An error is recorded, not raised."""
    q, kv, tables, lens, starts, scale = args
    try:
        from lorafleet.kernels import attention_flex

        attention_flex.paged_prefill_attention_flex(*args)  # compile and warm the plan cache
        flex = clock.eager(lambda: attention_flex.paged_prefill_attention_flex(*args))
        plan = clock.eager(lambda: attention_flex.flex_plan(kv.shape[2], tables, lens, starts, q.shape[0]))
    except Exception as exc:  # noqa: BLE001 - a library path that may not compile here: report it
        return {"flex_error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"flex_us": flex, "flex_ratio_to_sdpa": flex / sdpa_us, "flex_plan_us": plan}


def _varlen_prefill(clock: Clock, args: tuple, sdpa_us: float) -> dict:
    """varlen_attn (FlashAttention-2) over the pages in each mode (kernels/attention_varlen.py): the per-layer
    call with its plan cached, as a CUDA graph replay and eager (as the engine runs it, between piecewise
    graphs), and the gather plan (once per step). A mode the library refuses is recorded with its error."""
    from lorafleet.kernels import attention_varlen

    q, kv, tables, lens, starts, _ = args
    row: dict = {}
    for mode in attention_varlen.MODES:
        attention_varlen.FORCED_MODE[0] = mode
        try:
            attention_varlen.paged_prefill_attention_varlen(*args)  # warm the plan cache
            row[f"varlen_{mode}_us"] = clock.graph(lambda: attention_varlen.paged_prefill_attention_varlen(*args))
            row[f"varlen_{mode}_eager_us"] = clock.eager(lambda: attention_varlen.paged_prefill_attention_varlen(*args))
        except Exception as exc:  # noqa: BLE001 - a library path that may refuse this input: report it
            row[f"varlen_{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            attention_varlen.FORCED_MODE[0] = None
    timed = {mode: row[f"varlen_{mode}_us"] for mode in attention_varlen.MODES if f"varlen_{mode}_us" in row}
    if timed:
        best = min(timed, key=timed.get)
        row.update(varlen_mode=best, varlen_us=timed[best], varlen_ratio_to_sdpa=timed[best] / sdpa_us,
                   varlen_eager_ratio_to_sdpa=row[f"varlen_{best}_eager_us"] / sdpa_us)
    if "varlen_gather_us" in row:
        row["varlen_plan_us"] = clock.eager(lambda: attention_varlen.varlen_plan(kv.shape[2], tables, lens, starts,
                                                                                 gather=True))
    return row


def _varlen_decode(clock: Clock, args: tuple, sdpa_us: float) -> dict:
    """varlen_attn reading the pages in place for a decode batch (kernels/attention_varlen.py), graph replay;
    the library's refusal of the page size is recorded."""
    from lorafleet.kernels import attention_varlen

    try:
        attention_varlen.paged_decode_attention_varlen(*args)
        us = clock.graph(lambda: attention_varlen.paged_decode_attention_varlen(*args))
    except Exception as exc:  # noqa: BLE001 - a library path that may refuse this input: report it
        return {"varlen_error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"varlen_us": us, "varlen_ratio_to_sdpa": us / sdpa_us}


def _varlen_summary(row: dict) -> str:
    if "varlen_us" not in row:
        return row.get("varlen_gather_error", "-")
    return (f"{row['varlen_us']:.1f} us ({row['varlen_ratio_to_sdpa']:.2f}x, {row['varlen_mode']}; eager "
            f"{row['varlen_eager_ratio_to_sdpa']:.2f}x, plan {row.get('varlen_plan_us', float('nan')):.0f} us)")


def bench_varlen_probe(clock: Clock, device: str, heads, kv_heads, head_dim, block_sizes, smoke: bool) -> list[dict]:
    """Which page sizes varlen_attn accepts in block_table mode (FlashAttention-2 reads the pool pages itself):
    per block size, prefill chunks after cached prefixes and a decode batch, each against the reference; the
    peak memory the call adds beside the pool's bytes (a library that copied the strided pool would show it);
    and both modes timed on one fresh prefill, beside SDPA on contiguous K/V."""
    from lorafleet.kernels import attention_varlen
    from lorafleet.kernels.attention_ref import paged_prefill_attention_ref

    batch, context, new = (2, 40, 8) if smoke else (8, 1024, 256)
    rows = []
    for block_tokens in block_sizes:
        kv, tables, keys, values = paged_kv(batch, context, kv_heads, head_dim, block_tokens, device)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        row: dict = dict(block_tokens=block_tokens, heads=heads, kv_heads=kv_heads, batch=batch, context=context,
                         pool_bytes=kv.numel() * kv.element_size())
        for name, chunk in (("prefill", new), ("decode", 1)):
            starts = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk
            q = torch.randn(batch * chunk, heads, head_dim, device=device, dtype=torch.bfloat16)
            args = (q, kv, tables, lens, starts, head_dim**-0.5)
            attention_varlen.FORCED_MODE[0] = "block_table"
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() if device == "cuda" else 0
                out = attention_varlen.paged_prefill_attention_varlen(*args)
                if device == "cuda":
                    row[f"{name}_extra_peak_bytes"] = torch.cuda.max_memory_allocated() - before
                ref = paged_prefill_attention_ref(*args)
                row[f"{name}_accepted"] = True
                row[f"{name}_relative_error"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            except Exception as exc:  # noqa: BLE001 - the point of the probe: record what the library refuses
                row[f"{name}_accepted"] = False
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                attention_varlen.FORCED_MODE[0] = None
        row.update(_fresh_prefill(clock, device, heads, kv_heads, head_dim, block_tokens, smoke))
        row.update(_fresh_decode(clock, device, heads, kv_heads, head_dim, block_tokens, smoke))
        rows.append(row)
        print(f"varlen probe block_tokens={block_tokens}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={str(v)[:100]}" for k, v in row.items()
            if k not in ("heads", "kv_heads", "batch", "context", "block_tokens")), flush=True)
        del kv, keys, values
    return rows


def _fresh_prefill(clock: Clock, device: str, heads, kv_heads, head_dim, block_tokens, smoke: bool) -> dict:
    """Both varlen modes on one fresh prefill (8 x 1024 tokens) at this page size, with SDPA beside them."""
    batch, new = (1, 40) if smoke else (8, 1024)
    kv, tables, keys, values = paged_kv(batch, new, kv_heads, head_dim, block_tokens, device)
    lens = torch.full((batch,), new, dtype=torch.int32, device=device)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
    q = torch.randn(batch * new, heads, head_dim, device=device, dtype=torch.bfloat16)
    q4 = q.view(batch, new, heads, head_dim).transpose(1, 2).contiguous()
    base = clock.graph(lambda a=(q4, keys, values): sdpa(*a, causal=True))
    row = {f"fresh_{k}": v for k, v in _varlen_prefill(clock, (q, kv, tables, lens, starts, head_dim**-0.5),
                                                         base).items()}
    return {"fresh_batch": batch, "fresh_new_tokens": new, "fresh_sdpa_contiguous_us": base, **row}


def _fresh_decode(clock: Clock, device: str, heads, kv_heads, head_dim, block_tokens, smoke: bool) -> dict:
    """A decode batch (64 sequences of 2048 tokens) at this page size: our kernel and varlen_attn in place."""
    batch, context = (2, 40) if smoke else (64, 2048)
    kv, tables, keys, values = paged_kv(batch, context, kv_heads, head_dim, block_tokens, device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
    args = (q, kv, tables, lens, head_dim**-0.5)
    base = clock.graph(lambda a=(q[:, :, None, :], keys, values): sdpa(*a, causal=False))
    row = {"decode_batch": batch, "decode_context": context, "decode_sdpa_contiguous_us": base,
           "decode_ours_us": clock.graph(lambda: triton_ops.paged_decode_attention(*args))}
    row.update({f"decode_{k}": v for k, v in _varlen_decode(clock, args, base).items()})
    return row


def bench_lora_mlp(clock: Clock, device: str, shape: tuple, cases, copy_gbps: float) -> list[dict]:
    """Llama-3-8B MLP LoRA (gate/up fused: one shrink + one expand; down alone) on prefill-like batches whose
    tokens come in segments of one adapter: time, the bytes that must move (each adapter's rows once, x and
    out) and how many times the kernels' token tiles make each adapter's rows be read."""
    from lorafleet.kernels import lora_triton

    mlp = (*shape[:5], ("gate_proj", "up_proj", "down_proj"))
    rows = []
    for tokens, count in cases:
        rng = random.Random(tokens + count)
        ranks = [rng.choice(RANK_CHOICES) for _ in range(count)]
        slots = [i * count // tokens for i in range(tokens)]  # contiguous segments, as prefill chunks are
        adapter_b, total_b = lora_bytes(mlp, ranks, tokens)
        layers = max(1, min(8, math.ceil(64e6 / total_b)))
        setup = lora_setup(mlp, ranks, slots, layers, device)
        fused = clock.graph(fused_lora(setup)) / layers
        per_module = clock.graph(lambda s=setup: run_lora(s)) / layers
        block_m = 64 if tokens >= 64 * count else 16
        reads = sum(math.ceil(slots.count(i) / block_m) for i in range(count)) / count
        rows.append(dict(model="llama-3-8b-mlp", tokens=tokens, adapters=count, ranks=ranks, fused_graph_us=fused,
                         per_module_graph_us=per_module, adapter_bytes=adapter_b, total_bytes=total_b,
                         achieved_GBps=total_b / fused / 1e3, fraction_of_copy_bw=total_b / fused / 1e3 / copy_gbps,
                         adapter_row_reads_per_step=reads, block_m=block_m,
                         tune=dataclasses.asdict(lora_triton.TUNE)))
        print(f"lora mlp T={tokens} A={count}: fused {fused:.1f} us ({rows[-1]['fraction_of_copy_bw']:.0%} of copy "
              f"bw), per module {per_module:.1f} us, rows read {reads:.1f}x", flush=True)
        del setup
    return rows


# --------------------------------------------------------------------------------------- norms, rope
def bench_norms(clock: Clock, device: str, tokens_list, hidden: int, compile_torch: bool) -> list[dict]:
    rows = []
    compiled = {}
    if compile_torch:
        compiled = {name: torch.compile(getattr(norm_ref, name + "_ref")) for name in ("rms_norm", "add_rms_norm",
                                                                                         "rotary")}
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        res, w = torch.randn_like(x), torch.randn(hidden, device=device, dtype=torch.bfloat16)
        freqs = torch.outer(torch.arange(8192.0, device=device), torch.rand(64, device=device))
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        q = torch.randn(tokens, 32, 128, device=device, dtype=torch.bfloat16)
        k = torch.randn(tokens, 8, 128, device=device, dtype=torch.bfloat16)
        pos = torch.randint(0, 8192, (tokens,), device=device)
        ops = {"rms_norm": (x, w, 1e-5), "add_rms_norm": (x, res, w, 1e-5), "rotary": (q, k, pos, cos_sin)}
        for name, args in ops.items():
            row = dict(op=name, tokens=tokens,
                       triton_us=clock.graph(lambda n=name, a=args: getattr(triton_ops, n)(*a)),
                       torch_eager_us=clock.graph(lambda n=name, a=args: getattr(norm_ref, n + "_ref")(*a)))
            if name in compiled:
                try:
                    row["torch_compile_us"] = clock.graph(lambda n=name, a=args: compiled[n](*a))
                except Exception as exc:  # report, don't hide: the table says why the column is missing
                    row["torch_compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(f"{name} T={tokens}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_us")),
                  flush=True)
    return rows


# -------------------------------------------------------------------------------------- decode step
def bench_decode_step(clock: Clock, device: str, smoke: bool, copy_gbps: float) -> dict:
    """One decode step (forward + logits) of a Llama-2-7B-shaped model over the unified pool at batch 64,
    16 distinct adapters (q/k/v/o, ranks from {8..64}), context 512; eager vs CUDA graph vs read roofline."""
    from lorafleet.engine.config import ModelConfig, page_geometry
    from lorafleet.engine.model import AttentionBatch, CausalLM, LoraBatch, ModuleLora, rope_table
    from lorafleet.engine.synthetic import SHAPES as MODEL_SHAPES

    raw = dict(MODEL_SHAPES["tiny" if smoke else "llama-2-7b"])
    cfg = ModelConfig.from_dict(raw)
    batch, count, context = (4, 2, 40) if smoke else (64, 16, 512)
    dtype = torch.bfloat16 if not smoke else torch.float32
    block_tokens, page_elements = page_geometry(cfg, 16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(cfg)
    torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    model.cos_sin = rope_table(cfg, cfg.max_position_embeddings, torch.device(device))
    blocks = -(-context // block_tokens)
    rng = random.Random(0)
    ranks = [rng.choice(RANK_CHOICES) for _ in range(count)]
    dims = {m: d for m, d in cfg.module_dims().items() if m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    tables, adapter_elements = _pack(ranks, dims, page_elements)
    kv_pages = batch * blocks
    num_pages = kv_pages + -(-adapter_elements // page_elements) + 1
    pool = torch.randn(cfg.num_layers, num_pages, page_elements, device=device, dtype=dtype) * 0.05
    offset = kv_pages * page_elements  # adapter rows live after the KV pages
    modules = {m: module_lora(ModuleLora, (a + offset).to(device), (b + offset).to(device), r.to(device))
               for m, (a, b, r) in tables.items()}
    page_of = torch.randperm(kv_pages).view(batch, blocks)
    positions = torch.full((batch,), context - 1, dtype=torch.long)
    slots = page_of[:, -1] * block_tokens + (context - 1) % block_tokens
    attn = AttentionBatch(positions.to(device), slots.to(device), page_of.to(torch.int32).to(device),
                          torch.full((batch,), context, dtype=torch.int32, device=device),
                          torch.arange(batch + 1, dtype=torch.int32, device=device), True)
    token_slots = torch.tensor([i % count for i in range(batch)], dtype=torch.int32, device=device)
    lora = LoraBatch(token_slots, torch.rand(count, device=device) + 0.5, modules)
    input_ids = torch.randint(0, cfg.vocab_size, (batch,), device=device)

    @torch.inference_mode()
    def step():
        return model.logits(model(input_ids, attn, lora, pool, block_tokens))

    eager = clock.eager(step)
    graphed = clock.graph(step)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    adapter_bytes = cfg.num_layers * sum(r * (a + b) for r in ranks for a, b in dims.values()) * pool.element_size()
    kv_bytes = cfg.num_layers * batch * context * 2 * cfg.kv_width * pool.element_size()
    roofline = (weight_bytes + adapter_bytes + kv_bytes) / copy_gbps / 1e3
    row = dict(model="llama-2-7b" if not smoke else "tiny", batch=batch, adapters=count, ranks=ranks, context=context,
               eager_us=eager, cuda_graph_us=graphed, weight_bytes=weight_bytes, adapter_bytes=adapter_bytes,
               kv_bytes=kv_bytes, read_roofline_us=roofline, graph_over_roofline=graphed / roofline,
               eager_over_roofline=eager / roofline)
    print(f"decode step: eager {eager:.0f} us, graph {graphed:.0f} us, roofline {roofline:.0f} us "
          f"(graph {row['graph_over_roofline']:.2f}x)", flush=True)
    return row


def module_lora(cls, a_rows, b_rows, ranks):
    """The engine's ModuleLora for one module at tensor-parallel size 1 (expand rows = shrink rows)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = {"expand_ranks": ranks} if "expand_ranks" in fields else {}
    return cls(a_rows=a_rows, b_rows=b_rows, ranks=ranks, **extra)


# ----------------------------------------------------------------------------------------- reporting
def targets(result: dict) -> dict:
    lora = [r for r in result["lora"] if r["adapter_bytes_dominate"]]
    mixed = [r for r in result["lora"] if len(set(r["ranks"])) > 1]
    every = result["lora"]
    out = {
        "lora_min_fraction_of_copy_bw_where_adapter_bytes_dominate (>= 0.60)":
            min((r["fraction_of_copy_bw"] for r in lora), default=None),
        "lora_min_speedup_vs_padded_at_mixed_ranks (>= 1.5)": min((r["speedup_vs_padded"] for r in mixed),
                                                                   default=None),
        "lora_min_speedup_vs_gather_bmm (>= 3)": min((r["speedup_vs_gather_bmm"] for r in every), default=None),
        "decode_attention_max_ratio_to_sdpa (<= 1.3)": max((r["ratio_to_sdpa"] for r in result["decode_attention"]),
                                                          default=None),
        "prefill_attention_max_ratio_to_sdpa (<= 1.3)": max((r["ratio_to_sdpa"] for r in result["prefill_attention"]),
                                                           default=None),
        "prefill_attention_flex_max_ratio_to_sdpa (<= 1.3)": max(
            (r["flex_ratio_to_sdpa"] for r in result["prefill_attention"] if "flex_ratio_to_sdpa" in r), default=None),
        "prefill_attention_varlen_max_ratio_to_sdpa (<= 1.3)": max(
            (r["varlen_ratio_to_sdpa"] for r in result["prefill_attention"] if "varlen_ratio_to_sdpa" in r),
            default=None),
    }
    if result.get("decode_step"):
        out["decode_step_graph_over_roofline (<= 1.5)"] = result["decode_step"]["graph_over_roofline"]
    return out


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['device']}; torch {result['torch']}, triton {result['triton']}. "
             f"Copy bandwidth measured in the same run: {result['copy_GBps']:.0f} GB/s (read + write).", "",
             "LoRA shrink+expand, one layer, all targets of the model, bf16, CUDA-graph replay (µs):", "",
             "| model | batch | adapters | ours | % copy bw | padded to 64 | gather+bmm | vs padded | vs gather+bmm |"
             " ours eager | fused | fused vs ours | fused eager |", "|---" * 13 + "|"]
    for r in result["lora"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['adapters']} | {r['ours_graph_us']:.1f} | "
                     f"{100 * r['fraction_of_copy_bw']:.0f}%{'' if r['adapter_bytes_dominate'] else '*'} | "
                     f"{r['padded_graph_us']:.1f} | {r['gather_bmm_graph_us']:.1f} | {r['speedup_vs_padded']:.2f}x | "
                     f"{r['speedup_vs_gather_bmm']:.1f}x | {r['ours_eager_us']:.1f} | "
                     + (f"{r['fused_graph_us']:.1f} | {r['speedup_fused_vs_ours']:.2f}x | {r['fused_eager_us']:.1f} |"
                        if "fused_graph_us" in r else "- | - | - |"))
    lines += ["", "(* = adapter bytes are under half of the bytes moved. fused: q/k/v and gate/up each one shrink and "
              "one expand launch, the per-step stacking of their row tables not included.)", "",
              "Paged decode attention vs SDPA on contiguous K/V (µs); varlen = varlen_attn reading the 16-token "
              "pages in place, where the library takes them:", "",
              "| heads/kv | batch | context | ours | SDPA | ratio | % copy bw | varlen |", "|---" * 8 + "|"]
    for r in result["decode_attention"]:
        varlen = f"{r['varlen_us']:.1f}" if "varlen_us" in r else r.get("varlen_error", "-")[:60]
        lines.append(f"| {r['heads']}/{r['kv_heads']} | {r['batch']} | {r['context']} | {r['ours_us']:.1f} | "
                     f"{r['sdpa_contiguous_us']:.1f} | {r['ratio_to_sdpa']:.2f} | "
                     f"{100 * r['fraction_of_copy_bw']:.0f}% | {varlen} |")
    lines += ["", "Paged prefill attention (causal) vs SDPA on contiguous K/V (µs); flex = flex_attention over the "
              "same pages (per layer; its plan, once per step, apart); varlen = varlen_attn (FlashAttention-2) in "
              "its faster accepted mode, graph replay (eager ratio beside it; its plan apart):", "",
              "| heads/kv | batch | new tokens | ours | SDPA | ratio | ours TFLOP/s | flex | flex ratio | flex plan |"
              " varlen | mode | varlen ratio | eager ratio | varlen plan |", "|---" * 15 + "|"]
    for r in result["prefill_attention"]:
        flex = (f"{r['flex_us']:.1f} | {r['flex_ratio_to_sdpa']:.2f} | {r['flex_plan_us']:.0f} |" if "flex_us" in r
                else f"{r.get('flex_error', '-')} | - | - |")
        varlen = (f" {r['varlen_us']:.1f} | {r['varlen_mode']} | {r['varlen_ratio_to_sdpa']:.2f} | "
                  f"{r['varlen_eager_ratio_to_sdpa']:.2f} | {r.get('varlen_plan_us', float('nan')):.0f} |"
                  if "varlen_us" in r else f" {r.get('varlen_gather_error', '-')[:80]} | - | - | - | - |")
        lines.append(f"| {r['heads']}/{r['kv_heads']} | {r['batch']} | {r['new_tokens']} | {r['ours_us']:.1f} | "
                     f"{r['sdpa_contiguous_us']:.1f} | {r['ratio_to_sdpa']:.2f} | {r['ours_TFLOPs']:.0f} | " + flex
                     + varlen)
    if result.get("varlen_probe"):
        lines += ["", "varlen_attn block_table mode (FlashAttention-2 reading the pool pages) by page size; fresh "
                  "8 x 1024 prefill, graph replay (µs):", "",
                  "| block tokens | prefill accepted | decode accepted | rel. error | extra peak MB | block_table | "
                  "gather | SDPA | decode ours | decode in place | decode SDPA | refused with |", "|---" * 12 + "|"]
        for r in result["varlen_probe"]:
            lines.append(f"| {r['block_tokens']} | {r['prefill_accepted']} | {r['decode_accepted']} | "
                         f"{r.get('prefill_relative_error', float('nan')):.1e} | "
                         f"{r.get('prefill_extra_peak_bytes', 0) / 1e6:.0f} | "
                         f"{r.get('fresh_varlen_block_table_us', float('nan')):.1f} | "
                         f"{r.get('fresh_varlen_gather_us', float('nan')):.1f} | {r['fresh_sdpa_contiguous_us']:.1f} | "
                         f"{r['decode_ours_us']:.1f} | {r.get('decode_varlen_us', float('nan')):.1f} | "
                         f"{r['decode_sdpa_contiguous_us']:.1f} | "
                         f"{r.get('prefill_error', r.get('decode_error', '-'))[:80]} |")
    if result.get("lora_mlp"):
        lines += ["", "Llama-3-8B MLP LoRA (gate/up fused + down), tokens in per-adapter segments, graph replay (µs):",
                  "", "| tokens | adapters | fused | per module | % copy bw | rows read per step |",
                  "|---|---|---|---|---|---|"]
        for r in result["lora_mlp"]:
            lines.append(f"| {r['tokens']} | {r['adapters']} | {r['fused_graph_us']:.1f} | "
                         f"{r['per_module_graph_us']:.1f} | {100 * r['fraction_of_copy_bw']:.0f}% | "
                         f"{r['adapter_row_reads_per_step']:.1f} |")
    lines += ["", "RMSNorm / rotary, hidden 4096, 32/8 heads (µs):", "",
              "| op | tokens | Triton | torch eager | torch.compile |", "|---|---|---|---|---|"]
    for r in result["norms"]:
        comp = f"{r['torch_compile_us']:.1f}" if "torch_compile_us" in r else r.get("torch_compile_error", "-")
        lines.append(f"| {r['op']} | {r['tokens']} | {r['triton_us']:.1f} | {r['torch_eager_us']:.1f} | {comp} |")
    step = result.get("decode_step")
    if step:
        lines += ["", f"Decode step, {step['model']}, batch {step['batch']}, {step['adapters']} adapters, context "
                  f"{step['context']}: eager {step['eager_us']:.0f} µs, CUDA graph {step['cuda_graph_us']:.0f} µs, "
                  f"read roofline {step['read_roofline_us']:.0f} µs (graph = {step['graph_over_roofline']:.2f}x)."]
    lines += ["", "Targets:", ""]
    for name, value in result["targets"].items():
        lines.append(f"- {name}: {'n/a' if value is None else f'{value:.2f}'}")
    return "\n".join(lines) + "\n"


def _save_partial(out: str, result: dict) -> None:
    """Write what is measured so far (a run cut short by a time limit keeps its finished sections)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**result, "partial": True}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/kernels-h200.json")
    parser.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU interpreter works)")
    parser.add_argument("--sections", default="tune,lora,lora_mlp,decode,varlen_probe,prefill,norms,step")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    clock = Clock(cuda)
    sections = set(args.sections.split(","))
    import triton

    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
                    "triton": triton.__version__, "smoke": args.smoke}
    result["copy_GBps"] = copy_bandwidth(clock, device, args.smoke)
    print(f"copy bandwidth {result['copy_GBps']:.0f} GB/s", flush=True)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    segments.REBUILD_IN_CAPTURE = False  # kernel timings exclude the once-per-step tile metadata
    tune_parts = {"lora", "prefill", "decode"} if "tune" in sections else \
        {p.removeprefix("tune_") for p in sections if p.startswith("tune_")}
    if tune_parts and cuda:
        result["tuning"] = tune(clock, device, tune_parts)
    small = args.smoke
    result["lora"] = bench_lora(clock, device, shapes, (1, 16) if small else (1, 16, 64, 256),
                                (1, 8) if small else (1, 8, 64), result["copy_GBps"]) if "lora" in sections else []
    result["tile_metadata"] = bench_tile_metadata(clock, device)
    heads = (4, 1, 16) if small else (32, 8, 128)
    decode_cases = [(1, 40), (4, 100)] if small else [(1, 128), (1, 2048), (1, 8192), (16, 512), (16, 2048),
                                                     (16, 8192), (64, 512), (64, 2048), (64, 8192), (256, 128),
                                                     (256, 512), (256, 2048)]
    result["decode_attention"] = bench_decode_attention(clock, device, *heads, decode_cases, result["copy_GBps"]) \
        if "decode" in sections else []
    if "decode" in sections and not small:
        result["decode_attention"] += bench_decode_attention(clock, device, 32, 32, 128, [(1, 4096), (64, 512),
                                                                                          (64, 2048)],
                                                             result["copy_GBps"])
    result["varlen_probe"] = bench_varlen_probe(clock, device, *heads, (16, 32, 64, 128, 256), small) \
        if "varlen_probe" in sections else []
    _save_partial(args.out, result)
    prefill_cases = [(1, 40)] if small else [(1, 512), (1, 2048), (1, 8192), (8, 1024), (32, 256)]
    result["prefill_attention"] = bench_prefill_attention(clock, device, *heads, prefill_cases) \
        if "prefill" in sections else []
    _save_partial(args.out, result)
    mlp_cases = [(16, 4)] if small else [(64, 64), (256, 8), (1024, 8), (2048, 16), (4096, 16)]
    result["lora_mlp"] = bench_lora_mlp(clock, device, shapes["llama-3-8b"], mlp_cases, result["copy_GBps"]) \
        if "lora_mlp" in sections else []
    _save_partial(args.out, result)
    result["norms"] = bench_norms(clock, device, (4,) if small else (64, 4096), 64 if small else 4096,
                                  cuda and not args.no_compile) if "norms" in sections else []
    segments.REBUILD_IN_CAPTURE = True  # the decode step's graph rebuilds its metadata, as the engine's would
    result["decode_step"] = bench_decode_step(clock, device, small, result["copy_GBps"]) if "step" in sections \
        else None
    result["targets"] = targets(result)
    text = markdown(result)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

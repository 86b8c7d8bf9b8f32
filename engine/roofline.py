"""The roofline of one step: the bytes it must read and the prefill FLOPs it must do, and the time those
take at the device's copy bandwidth and matmul peak (what a perfect step would take).

    bytes  = weights (every linear layer, norms, the LM head; embedding rows of the step's tokens)
           + KV cache (every sequence's context, K and V, all layers)
           + adapters (each distinct adapter of the batch: its A and Bᵀ rows of every targeted module, once)
    flops  = prefill: 2·params per token of the chunks longer than one token, plus their causal attention
             (4·heads·head_dim per query-key pair); decode tokens count only for their bytes
    time   = bytes / bandwidth + flops / peak

Per tensor-parallel rank: weights, KV heads and FLOPs are divided by the rank count; adapters are what the rank
holds of them (`adapters.shard_widths`: the whole A and 1/tp of Bᵀ for column-parallel modules, 1/tp of A and
the whole Bᵀ for row-parallel ones, docs/tensor-parallel.md), more than 1/tp. The issue behind this
(step time against reading weights + KV at the copy bandwidth plus the prefill FLOPs at the matmul peak)
is the lower bound the executor time is compared with in `--log-steps` and in the bench results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lorafleet.engine.adapters import shard_widths
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.plan import StepPlan


@dataclass(frozen=True)
class DevicePeak:
    """Measured (or given) device figures: copy bandwidth in bytes/s (read + write counted) and matmul
    throughput in FLOP/s."""

    bandwidth: float
    matmul_flops: float


@dataclass(frozen=True)
class StepCost:
    """What one step must move and compute (one rank)."""

    weight_bytes: int
    kv_bytes: int
    adapter_bytes: int
    prefill_flops: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.adapter_bytes

    def seconds(self, peak: DevicePeak) -> float:
        """The roofline time: bytes at the copy bandwidth plus prefill FLOPs at the matmul peak."""
        return self.bytes / peak.bandwidth + self.prefill_flops / peak.matmul_flops


@dataclass(frozen=True)
class StepCostModel:
    """Computes StepCost for plans of one model (dtype `elem_bytes` bytes per element, `tp` ranks)."""

    model: ModelConfig
    elem_bytes: int
    tp: int = 1

    def linear_params(self) -> int:
        """Weights of one decoder layer's linear modules (q, k, v, o, gate, up, down)."""
        return sum(i * o for i, o in self.model.module_dims().values())

    def weight_bytes(self, num_tokens: int) -> int:
        m = self.model
        layer = self.linear_params() + 2 * m.hidden_size
        params = m.num_layers * layer + m.vocab_size * m.hidden_size + m.hidden_size
        return (params // self.tp + num_tokens * m.hidden_size) * self.elem_bytes

    def cost(self, plan: StepPlan, adapter_ranks: dict[str, dict[str, int]]) -> StepCost:
        """`adapter_ranks[name][module]`: the rank of each adapter of the plan's slots on each module."""
        m = self.model
        kv_token = 2 * m.kv_width * m.num_layers * self.elem_bytes // self.tp
        dims = m.module_dims()
        elements = sum(r * sum(shard_widths(module, *dims[module], self.tp)) for name in plan.slots
                       for module, r in adapter_ranks.get(name, {}).items())
        adapter_bytes = elements * m.num_layers * self.elem_bytes
        flops = 0.0
        per_token = 2 * m.num_layers * self.linear_params()
        attention = 4 * m.num_heads * m.head_dim * m.num_layers
        contexts = 0  # tokens of context over the step's sequences (one pass over them, not two)
        for s in plan.seqs:
            q = len(s.token_ids)
            context = s.start + q
            contexts += context
            if q > 1:
                flops += q * per_token + attention * (q * context - q * (q - 1) / 2)
                flops += 2 * m.vocab_size * m.hidden_size * s.sample
        kv_bytes = contexts * kv_token
        return StepCost(self.weight_bytes(plan.num_tokens), kv_bytes, adapter_bytes, flops / self.tp)


def measure_peak(device: torch.device, dtype: torch.dtype, copy_mib: int = 1024, matmul_n: int = 8192,
                 repeats: int = 5) -> DevicePeak:
    """Copy bandwidth (a `copy_mib` MiB device-to-device copy: read + write) and matmul throughput (an
    n×n×n product in `dtype`) measured on `device`, best of `repeats` after a warm-up."""
    if device.type != "cuda":  # small sizes: a CPU figure only keeps the log line meaningful
        copy_mib, matmul_n, dtype = min(copy_mib, 64), min(matmul_n, 512), torch.float32
    peak = _measure(device, dtype, copy_mib, matmul_n, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pool is sized from free memory next: give the buffers back
    return peak


def _measure(device: torch.device, dtype: torch.dtype, copy_mib: int, matmul_n: int, repeats: int) -> DevicePeak:
    elements = (copy_mib << 20) // dtype.itemsize
    src = torch.empty(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), device, repeats)
    a = torch.randn(matmul_n, matmul_n, dtype=dtype, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=dtype, device=device)
    matmul_s = _best(lambda: torch.mm(a, b), device, repeats)
    return DevicePeak(2 * elements * dtype.itemsize / copy_s, 2 * matmul_n ** 3 / matmul_s)


def _best(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best

"""CUDA graphs for decode steps: one graph per bucketed batch size, replayed with the step's metadata
copied into static buffers.

Every decode step of the same bucket launches the same kernels with the same grids (the Triton kernels'
grids depend only on host-side shapes; their tile tables are built on the device), so a step becomes
one graph replay. Tables are padded to fixed widths — block tables to the longest context, adapter row
tables to `max_adapters_per_batch × max_lora_rank` — but the kernels still do rank-r work for a rank-r
slot: the padding is metadata only. Padding rows of a bucket are base-only tokens whose KV goes to a
scratch page no request owns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lorafleet.engine.config import TARGET_MODULES
from lorafleet.engine.model import AttentionBatch, CausalLM, LoraBatch, ModuleLora

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512)


def pad_rows(rows: list[list[int]], width: int, fill: int, dtype: type = np.int32) -> torch.Tensor:
    """[len(rows), width] on the host: each row's values, then `fill` (one numpy scatter, not a nested-list
    conversion, which costs milliseconds for a few hundred block tables)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=total)
    out = np.full((len(rows), width), fill, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    out[np.repeat(np.arange(len(rows)), lengths), np.arange(total) - np.repeat(starts, lengths)] = values
    return torch.from_numpy(out)


@dataclass
class DecodeInputs:
    """One decode step's metadata as host lists (the runner builds it from the StepPlan)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    token_slots: list[int]
    scales: list[float]
    modules: dict[str, tuple]  # module -> (a_rows, b_rows, ranks, expand_ranks, cols) as built by the runner:
    # row tables and column maps as host int64 tensors [slots, width], row counts as lists


class StaticBatch:
    """Device buffers sized for the largest bucket; a bucket uses their leading rows."""

    def __init__(self, rows: int, max_blocks: int, max_slots: int, max_rank: int, device: torch.device,
                 parallel: bool) -> None:
        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions, self.slots = zeros(rows, dtype=torch.long), zeros(rows, dtype=torch.long), \
            zeros(rows, dtype=torch.long)
        self.block_tables, self.context_lens = zeros(rows, max_blocks), zeros(rows)
        self.query_starts = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.token_slots, self.scales = zeros(rows), zeros(max_slots, dtype=torch.float32)
        self.modules = {
            m: ModuleLora(zeros(max_slots, max_rank, dtype=torch.long), zeros(max_slots, max_rank, dtype=torch.long),
                          zeros(max_slots), zeros(max_slots),
                          zeros(max_slots, max_rank, dtype=torch.long) if parallel else None)
            for m in TARGET_MODULES
        }

    def views(self, rows: int, modules: frozenset[str]) -> tuple[torch.Tensor, AttentionBatch, LoraBatch | None]:
        attn = AttentionBatch(self.positions[:rows], self.slots[:rows], self.block_tables[:rows],
                              self.context_lens[:rows], self.query_starts[: rows + 1], is_decode=True)
        lora = None
        if modules:
            lora = LoraBatch(self.token_slots[:rows], self.scales, {m: self.modules[m] for m in modules})
        return self.input_ids[:rows], attn, lora


class DecodeGraphs:
    """Captures and replays decode-step graphs of `model` over `pool`."""

    def __init__(self, model: CausalLM, pool: torch.Tensor, block_tokens: int, scratch_page: int,
                 max_batch: int, max_blocks: int, max_slots: int, max_rank: int) -> None:
        self.model, self.pool, self.block_tokens, self.scratch_page = model, pool, block_tokens, scratch_page
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        self.max_slots, self.max_rank = max_slots, max_rank
        self.static = StaticBatch(self.buckets[-1], max_blocks, max_slots, max_rank, pool.device,
                                  parallel=model.group.shard.size > 1)
        self.graphs: dict[tuple[int, frozenset[str]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle()

    def fits(self, batch: int, num_slots: int, widest_rank: int, blocks: int) -> bool:
        return (batch <= self.buckets[-1] and num_slots <= self.max_slots and widest_rank <= self.max_rank
                and blocks <= self.static.block_tables.shape[1])

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Hidden states [batch, hidden] of the step, by replaying the bucket's graph."""
        batch = len(inputs.input_ids)
        bucket = next(b for b in self.buckets if b >= batch)
        self._fill(inputs, bucket)
        key = (bucket, frozenset(inputs.modules))  # one graph per bucket and set of targeted modules
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:batch]

    def _capture(self, rows: int, modules: frozenset[str]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        input_ids, attn, lora = self.static.views(rows, modules)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(input_ids, attn, lora, self.pool, self.block_tokens)  # compiles and warms up kernels
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            hidden = self.model(input_ids, attn, lora, self.pool, self.block_tokens)
        return graph, hidden

    def _fill(self, inputs: DecodeInputs, rows: int) -> None:
        """Copy the step into the static buffers; rows past the batch become base-only scratch tokens."""
        s, batch, bt = self.static, len(inputs.input_ids), self.block_tokens
        pad = rows - batch
        width = max(len(t) for t in inputs.block_tables)  # columns past it are never read this step
        tables = pad_rows(inputs.block_tables + [[]] * pad, width, self.scratch_page)
        host = {
            "input_ids": inputs.input_ids + [0] * pad,
            "positions": inputs.positions + [0] * pad,
            "slots": inputs.slots + [self.scratch_page * bt] * pad,
            "context_lens": [p + 1 for p in inputs.positions] + [1] * pad,
            "token_slots": inputs.token_slots + [-1] * pad,
        }
        for name, values in host.items():
            buffer = getattr(s, name)
            buffer[:rows].copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
        s.block_tables[:rows, :width].copy_(tables, non_blocking=True)
        self._fill_lora(inputs)

    def _fill_lora(self, inputs: DecodeInputs) -> None:
        s, slots = self.static, len(inputs.scales)
        scales = inputs.scales + [0.0] * (self.max_slots - slots)
        s.scales.copy_(torch.tensor(scales, dtype=torch.float32), non_blocking=True)
        for module, static in s.modules.items():
            a_rows, b_rows, ranks, expand_ranks, cols = inputs.modules.get(module, ([], [], [], [], None))
            static.ranks.zero_()
            static.expand_ranks.zero_()
            if not ranks:
                continue
            n = len(ranks)
            static.a_rows[:n, : a_rows.shape[1]].copy_(a_rows, non_blocking=True)
            static.b_rows[:n, : b_rows.shape[1]].copy_(b_rows, non_blocking=True)
            static.ranks[:n].copy_(torch.tensor(ranks, dtype=torch.int32), non_blocking=True)
            static.expand_ranks[:n].copy_(torch.tensor(expand_ranks, dtype=torch.int32), non_blocking=True)
            if cols is not None:
                static.cols[:n, : cols.shape[1]].copy_(cols, non_blocking=True)

"""CUDA graphs: decode steps as one graph per bucketed batch size (`DecodeGraphs`), other steps piecewise per
bucketed token count around an eager attention (`PiecewiseGraphs`), replayed with the step's metadata
copied into static buffers.

Every decode step of the same bucket launches the same kernels with the same grids (the Triton kernels'
grids depend only on host-side shapes; their tile tables are built on the device), so a step becomes
one graph replay. Tables are padded to fixed widths — block tables to the longest context, adapter row
tables to `max_adapters_per_batch × max_lora_rank` — but the kernels still do rank-r work for a rank-r
slot: the padding is metadata only. Padding rows of a bucket are base-only tokens whose KV goes to a
scratch page no request owns.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lorafleet import kernels
from lorafleet.engine.config import TARGET_MODULES
from lorafleet.engine.model import AttentionBatch, CausalLM, LoraBatch, ModuleLora
from lorafleet.engine.transfer import copy_into

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
class StepInputs:
    """One graphed step's metadata as host lists (the runner builds it from the StepPlan; the piecewise graphs
    ignore `block_tables`, their attention runs eagerly on the step's own metadata)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    token_slots: list[int]
    scales: list[float]
    modules: dict[str, tuple]  # module -> (a_rows, b_rows, ranks) as built by the runner: row tables as host
    # int64 tensors [slots, width], ranks as a list
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (token positions, ids) on the device, written
    # over `input_ids` there: the previous step's sampled ids, which the host does not know yet


class StaticBatch:
    """Device buffers sized for the largest bucket; a bucket uses their leading rows. The LoRA row tables are
    `max_rank` wide at every tensor-parallel size (a rank's shard keeps all rank rows of A and Bᵀ)."""

    def __init__(self, rows: int, max_blocks: int, max_slots: int, max_rank: int, device: torch.device) -> None:
        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions, self.slots = zeros(rows, dtype=torch.long), zeros(rows, dtype=torch.long), \
            zeros(rows, dtype=torch.long)
        self.block_tables, self.context_lens = zeros(rows, max_blocks), zeros(rows)
        self.query_starts = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.token_slots, self.scales = zeros(rows), zeros(max_slots, dtype=torch.float32)
        self.modules = {m: ModuleLora(zeros(max_slots, max_rank, dtype=torch.long),
                                      zeros(max_slots, max_rank, dtype=torch.long), zeros(max_slots))
                        for m in TARGET_MODULES}

    def views(self, rows: int, modules: frozenset[str]) -> tuple[torch.Tensor, AttentionBatch, LoraBatch | None]:
        attn = AttentionBatch(self.positions[:rows], self.slots[:rows], self.block_tables[:rows],
                              self.context_lens[:rows], self.query_starts[: rows + 1], is_decode=True)
        lora = None
        if modules:
            lora = LoraBatch(self.token_slots[:rows], self.scales, {m: self.modules[m] for m in modules})
        return self.input_ids[:rows], attn, lora


class DecodeGraphs:
    """Captures and replays decode-step graphs of `model` over `pool`. `capture=False` runs the same static
    buffers and bucket padding eagerly (CPU tests of the plumbing, e.g. under tensor parallelism with gloo)."""

    def __init__(self, model: CausalLM, pool: torch.Tensor, block_tokens: int, scratch_page: int,
                 max_batch: int, max_blocks: int, max_slots: int, max_rank: int, mempool=None,
                 capture: bool = True) -> None:
        self.model, self.pool, self.block_tokens, self.scratch_page = model, pool, block_tokens, scratch_page
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        self.max_slots, self.max_rank = max_slots, max_rank
        self.static = StaticBatch(self.buckets[-1], max_blocks, max_slots, max_rank, pool.device)
        self.graphs: dict[tuple[int, frozenset[str]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture = capture
        self.mempool = mempool if mempool is not None or not capture else torch.cuda.graph_pool_handle()

    def fits(self, batch: int, num_slots: int, widest_rank: int, blocks: int) -> bool:
        return (batch <= self.buckets[-1] and num_slots <= self.max_slots and widest_rank <= self.max_rank
                and blocks <= self.static.block_tables.shape[1])

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [batch, hidden] of the step, by replaying the bucket's graph."""
        batch = len(inputs.input_ids)
        bucket = next(b for b in self.buckets if b >= batch)
        self._fill(inputs, bucket)
        if not self.capture:  # fresh views: the metadata caches must not carry one step's tables into the next
            input_ids, attn, lora = self.static.views(bucket, frozenset(inputs.modules))
            return self.model(input_ids, attn, lora, self.pool, self.block_tokens)[:batch]
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

    def _fill(self, inputs: StepInputs, rows: int) -> None:
        """Copy the step into the static buffers; rows past the batch become base-only scratch tokens."""
        s, batch = self.static, len(inputs.input_ids)
        pad = rows - batch
        width = max(len(t) for t in inputs.block_tables)  # columns past it are never read this step
        tables = pad_rows(inputs.block_tables + [[]] * pad, width, self.scratch_page)
        context_lens = [p + 1 for p in inputs.positions] + [1] * pad
        copy_into(s.context_lens[:rows], context_lens)
        copy_into(s.block_tables[:rows, :width], tables)
        fill_tokens(s, inputs, rows, self.scratch_page * self.block_tokens)
        fill_lora(s, inputs, self.max_slots)


def fill_tokens(s: StaticBatch, inputs: StepInputs, rows: int, scratch_slot: int) -> None:
    """Per-token buffers; rows past the step's tokens are base-only tokens writing KV into the scratch page."""
    pad = rows - len(inputs.input_ids)
    host = {
        "input_ids": inputs.input_ids + [0] * pad,
        "positions": inputs.positions + [0] * pad,
        "slots": inputs.slots + [scratch_slot] * pad,
        "token_slots": inputs.token_slots + [-1] * pad,
    }
    for name, values in host.items():
        copy_into(getattr(s, name)[:rows], values)
    if inputs.pending is not None:
        s.input_ids.index_copy_(0, *inputs.pending)


def fill_lora(s: StaticBatch, inputs: StepInputs, max_slots: int) -> None:
    slots = len(inputs.scales)
    scales = inputs.scales + [0.0] * (max_slots - slots)
    copy_into(s.scales, scales)
    for module, static in s.modules.items():
        a_rows, b_rows, ranks = inputs.modules.get(module, ([], [], []))
        static.ranks.zero_()
        if not ranks:
            continue
        n = len(ranks)
        copy_into(static.a_rows[:n, : a_rows.shape[1]], a_rows)
        copy_into(static.b_rows[:n, : b_rows.shape[1]], b_rows)
        copy_into(static.ranks[:n], ranks)


TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


class PiecewiseGraphs:
    """Steps with prefill tokens (or any step the decode graphs do not cover), replayed piecewise: per
    bucketed token count, one graph per stretch between two attentions — embedding + layer 0 up to its KV
    write, then layer i's o_proj/norm/MLP + layer i+1 up to its KV write, …, then the final norm — and the
    paged attention itself run eagerly between them, since its work depends on each sequence's query and
    context lengths rather than on the token count. Everything but attention is launch-bound at these sizes
    (norms, GEMMs, LoRA shrink/expand, rotary, KV write), so a step costs ~num_layers + 1 graph launches and
    num_layers attention launches instead of several hundred kernel launches.

    The graphs pass activations through static buffers (q, attention output, residual, final hidden), so all
    buckets share them. `capture=False` runs the same segments without graphs (CPU tests of the plumbing)."""

    def __init__(self, model: CausalLM, pool: torch.Tensor, block_tokens: int, scratch_page: int, max_tokens: int,
                 max_slots: int, max_rank: int, mempool=None, capture: bool = True) -> None:
        self.model, self.pool, self.block_tokens = model, pool, block_tokens
        self.scratch_slot = scratch_page * block_tokens
        self.buckets = [b for b in TOKEN_BUCKETS if b < max_tokens] + [max_tokens]
        self.max_slots, self.max_rank, self.mempool, self.capture = max_slots, max_rank, mempool, capture
        rows, device = self.buckets[-1], pool.device
        self.static = StaticBatch(rows, 1, max_slots, max_rank, device)
        attention = model.model.layers[0].self_attn
        width, hidden = attention.num_heads * attention.head_dim, model.config.hidden_size
        self.q, self.attn_out = (torch.zeros(rows, width, dtype=pool.dtype, device=device) for _ in range(2))
        self.residual, self.hidden = (torch.zeros(rows, hidden, dtype=pool.dtype, device=device) for _ in range(2))
        self.segments: dict[tuple[int, frozenset[str]], list] = {}

    def fits(self, tokens: int, num_slots: int, widest_rank: int) -> bool:
        return tokens <= self.buckets[-1] and num_slots <= self.max_slots and widest_rank <= self.max_rank

    def run(self, inputs: StepInputs, attn: AttentionBatch) -> torch.Tensor:
        """Hidden states [tokens, hidden] of the step; `attn` is the step's own (unpadded) attention metadata."""
        tokens = len(inputs.input_ids)
        rows = next(b for b in self.buckets if b >= tokens)
        fill_tokens(self.static, inputs, rows, self.scratch_slot)
        fill_lora(self.static, inputs, self.max_slots)
        layers = self.model.model.layers
        for index, segment in enumerate(self._pieces(rows, frozenset(inputs.modules))):
            segment()
            if index < len(layers):
                attention = layers[index].self_attn
                q = self.q[:tokens].view(tokens, attention.num_heads, attention.head_dim)
                self.attn_out[:tokens].copy_(attention.attend(q, attn, self.pool[index], self.block_tokens))
        return self.hidden[:tokens]

    def _views(self, rows: int, modules: frozenset[str]) -> tuple[AttentionBatch, LoraBatch | None]:
        """Fresh views per capture (the kernels' metadata caches and LoraBatch's tables key on the objects)."""
        s = self.static
        attn = AttentionBatch(s.positions[:rows], s.slots[:rows], s.block_tables[:rows], s.context_lens[:rows],
                              s.query_starts[: rows + 1], is_decode=False)  # project() reads positions, slots
        lora = LoraBatch(s.token_slots[:rows], s.scales, {m: s.modules[m] for m in modules}) if modules else None
        return attn, lora

    def _pieces(self, rows: int, modules: frozenset[str]) -> list:
        """The bucket's segments: graph replays (captured on first use), or without capture the segments
        themselves over fresh views (the metadata caches must not carry one step's tables into the next)."""
        count = len(self.model.model.layers) + 1
        if not self.capture:
            attn, lora = self._views(rows, modules)
            return [functools.partial(self._segment, index, rows, attn, lora) for index in range(count)]
        if (rows, modules) not in self.segments:
            self.segments[rows, modules] = self._capture(rows, modules, count)
        return self.segments[rows, modules]

    def _capture(self, rows: int, modules: frozenset[str], count: int) -> list:
        attn, lora = self._views(rows, modules)
        stream = torch.cuda.Stream()  # warm-up (compiles the kernels); its KV writes are redone by the replay
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for index in range(count):
                self._segment(index, rows, attn, lora)
        torch.cuda.current_stream().wait_stream(stream)
        attn, lora = self._views(rows, modules)
        graphs = []
        for index in range(count):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self._segment(index, rows, attn, lora)
            graphs.append(graph.replay)
        return graphs

    def _segment(self, index: int, rows: int, attn: AttentionBatch, lora: LoraBatch | None) -> None:
        """Layer index-1 after its attention, then layer index up to its attention (index 0: the embedding;
        index num_layers: the final norm into `hidden`)."""
        model, layers = self.model, self.model.model.layers
        if index == 0:
            x, residual = model.model.embed_tokens(self.static.input_ids[:rows]), None
        else:
            x, residual = layers[index - 1].attention_output(self.attn_out[:rows], self.residual[:rows], lora,
                                                             self.pool[index - 1])
        if index == len(layers):
            norm = model.model.norm
            self.hidden[:rows].copy_(kernels.add_rms_norm(x, residual, norm.weight, norm.eps)[0])
            return
        q, residual = layers[index].attention_input(x, residual, attn, lora, self.pool[index], model.cos_sin,
                                                    self.block_tokens)
        self.q[:rows].copy_(q.reshape(rows, -1))
        self.residual[:rows].copy_(residual)

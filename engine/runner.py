"""ModelRunner: the one place that turns a StepPlan into tensors, runs the model and samples.

It owns the pool tensor `[layers, num_pages, page_elements]` and the device; it keeps, for each adapter
resident in the pool, its physical row tables (built once when the adapter is loaded into pages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lorafleet.engine.adapter_store import PackedAdapter
from lorafleet.engine.adapters import COLUMN_PARALLEL, padded_rank
from lorafleet.engine.config import TARGET_MODULES
from lorafleet.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs, StepInputs, pad_rows
from lorafleet.engine.model import AttentionBatch, CausalLM, LoraBatch, ModuleLora
from lorafleet.engine.plan import SeqPlan, StepOutput, StepPlan
from lorafleet.engine.request import PENDING_TOKEN
from lorafleet.engine.sampling import Sampled, SampleSpec, TokenLogprobs, sample, token_logprobs


@dataclass(frozen=True)
class ResidentAdapter:
    """Physical row offsets (in a layer's flat pool buffer) of one adapter's A and Bᵀ rows per module
    (this rank's shard), and its full rank."""

    scale: float
    rank: int
    rows: dict[str, tuple[list[int], list[int]]]
    cols: dict[tuple[str, int], list[int]] = field(default_factory=dict, compare=False)  # _cols, memoised


class RowTables:
    """Every resident adapter's A and Bᵀ row offsets per module, one matrix row per adapter ([capacity, width]
    int64, zero past each adapter's count), kept as adapters load and leave: a step's tables for a module are
    one gather of its slots' matrix rows instead of a conversion of Python lists per slot (milliseconds per step
    at 200+ adapters and seven modules). Single-rank runners use it; tensor-parallel ones build lists."""

    def __init__(self, width: int = 64) -> None:
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        self.capacity, self.width = 0, width
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module -> (A rows, Bᵀ rows)
        self.counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, name: str, rows: dict[str, tuple[list[int], list[int]]]) -> None:
        self.remove(name)
        longest = max((len(r) for pair in rows.values() for r in pair), default=0)
        if longest > self.width or not self.free:
            self._resize(max(8, 2 * self.capacity) if not self.free else self.capacity, max(self.width, longest))
        i = self.index[name] = self.free.pop()
        for module in TARGET_MODULES:
            a, b = rows.get(module, ([], []))
            for table, count, values in ((self.rows[module][0], self.counts[module][0], a),
                                         (self.rows[module][1], self.counts[module][1], b)):
                table[i] = 0
                table[i, : len(values)] = values
                count[i] = len(values)

    def remove(self, name: str) -> None:
        i = self.index.pop(name, None)
        if i is not None:
            self.free.append(i)

    def tables(self, names: list[str], module: str) -> tuple:
        """(A table, Bᵀ table) [len(names), max(1, longest)] int64 tensors and their counts, for these slots."""
        slots = np.fromiter((self.index[name] for name in names), dtype=np.int64, count=len(names))
        a_counts, b_counts = self.counts[module][0][slots], self.counts[module][1][slots]
        a_rows, b_rows = self.rows[module]
        a = a_rows[slots, : max(1, int(a_counts.max(initial=0)))]
        b = b_rows[slots, : max(1, int(b_counts.max(initial=0)))]
        return torch.from_numpy(a), torch.from_numpy(b), a_counts.tolist(), b_counts.tolist()

    def _resize(self, capacity: int, width: int) -> None:
        for module in TARGET_MODULES:
            old_rows = self.rows.get(module)
            old_counts = self.counts.get(module)
            new_rows = tuple(np.zeros((capacity, width), dtype=np.int64) for _ in range(2))
            new_counts = tuple(np.zeros(capacity, dtype=np.int64) for _ in range(2))
            if old_rows is not None:
                for new, old in zip(new_rows, old_rows):
                    new[: old.shape[0], : old.shape[1]] = old
                for new, old in zip(new_counts, old_counts):
                    new[: old.shape[0]] = old
            self.rows[module], self.counts[module] = new_rows, new_counts
        self.free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity, self.width = capacity, width


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_pages: int,
        page_elements: int,
        block_tokens: int,
        fetch_adapter: Callable[[str], PackedAdapter],
        sample_on_this_rank: bool = True,
    ) -> None:
        param = model.model.norm.weight
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.shard = model.group.shard
        self.block_tokens = block_tokens
        self.fetch_adapter = fetch_adapter
        self.sample_on_this_rank = sample_on_this_rank
        shape = (model.config.num_layers, num_pages + 1, page_elements)  # + a scratch page no plan names
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.resident: dict[str, ResidentAdapter] = {}
        self.row_tables = RowTables()
        self.graphs: DecodeGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None
        self.piecewise_steps = 0  # steps replayed piecewise (for tests and logs)
        self.decode_graph_steps = 0  # steps replayed from a whole-step decode graph (for tests and logs)
        self.max_rank = 0
        self.last_logits: dict[int, torch.Tensor] = {}
        self.last_sampled: dict[int, int] = {}  # request id -> token sampled in the last step
        self.histories: dict[int, list[int]] = {}  # penalized request id -> its token ids by position
        self.prompt_tails: dict[int, torch.Tensor] = {}  # request id -> logprobs of its next prompt token
        # adapter loads run on a side stream (CUDA): the step waits only for the adapters it uses
        self.load_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._load_events: list[torch.cuda.Event] = []

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step; returns the sampled token (and logprobs where asked) of every seq with `sample`, in
        plan order, and the prompt logprobs of chunks that asked (rank 0 only under tensor parallelism)."""
        for name in plan.evicted:
            self.resident.pop(name, None)
            self.row_tables.remove(name)
        self._load_adapters(plan)
        for request_id in plan.released:
            self.histories.pop(request_id, None)
            self.prompt_tails.pop(request_id, None)
        asked = [s.request_id for s in plan.seqs if s.sample]
        plan = _decode_first(self._resolve_pending(plan))
        if self.sample_on_this_rank:
            self._record_histories(plan)
        hidden = self._forward(plan)
        sampled = [s for s in plan.seqs if s.sample]
        if self.sample_on_this_rank and sampled:
            result = self._sample(plan, hidden, sampled)
            tokens, logprobs = result.token_ids, {s.request_id: lp for s, lp in zip(sampled, result.logprobs)}
        else:
            tokens, logprobs = [], {}
        if self.shard.size > 1 and sampled:
            tokens = self._share_tokens(tokens, len(sampled))
        self.last_sampled = {s.request_id: t for s, t in zip(sampled, tokens)}
        self.finish_loads()
        if not self.sample_on_this_rank:
            return StepOutput([])
        prompt = self._prompt_logprobs(plan, hidden) if any(s.prompt_logprobs >= 0 for s in plan.seqs) else {}
        return StepOutput([self.last_sampled[i] for i in asked], [logprobs.get(i) for i in asked], prompt)

    def forget(self, plan: StepPlan) -> None:
        """After `execute(plan)` raised: the scheduler fails the plan's requests. Their state here goes, and
        a plan already queued that continues one of them reads token 0 for its pending token (its result
        is dropped); the plan's adapter loads may be incomplete, so those adapters are no longer resident
        (the scheduler evicts them from its books too, so a later plan loads them again)."""
        for seq in plan.seqs:
            self.histories.pop(seq.request_id, None)
            self.prompt_tails.pop(seq.request_id, None)
        self.last_sampled = {s.request_id: 0 for s in plan.seqs if s.sample}
        for load in plan.loads:
            self.resident.pop(load.name, None)
            self.row_tables.remove(load.name)

    def _record_histories(self, plan: StepPlan) -> None:
        """Penalties need each sequence's tokens: keep them by position from the chunks that pass (a chunk at
        position 0 starts over, so a preempted request's recompute rebuilds them)."""
        for s in plan.seqs:
            if s.penalized:
                history = self.histories.setdefault(s.request_id, [])
                assert len(history) >= s.start, f"request {s.request_id}: a chunk skipped positions"
                del history[s.start:]
                history.extend(s.token_ids)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor, sampled: list[SeqPlan]) -> Sampled:
        ends = np.cumsum([len(s.token_ids) for s in plan.seqs]) - 1
        rows = [int(ends[i]) for i, s in enumerate(plan.seqs) if s.sample]
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
        self.last_logits = {s.request_id: logits[i] for i, s in enumerate(sampled)}  # for tests and scoring
        return sample(logits, [self._spec(s) for s in sampled])

    def _spec(self, seq: SeqPlan) -> SampleSpec:
        history = self.histories.get(seq.request_id, []) if seq.penalized else []
        assert not seq.penalized or len(history) == seq.prompt_len + seq.sample_index, "penalty history out of step"
        return SampleSpec(
            seq.temperature, seq.top_p, seq.top_k, seq.seed, seq.sample_index, seq.min_p, seq.presence_penalty,
            seq.frequency_penalty, seq.repetition_penalty, tuple((int(t), float(b)) for t, b in seq.logit_bias),
            tuple(seq.banned_ids), seq.logprobs, history[:seq.prompt_len], history[seq.prompt_len:])

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> dict[int, tuple[int, list[TokenLogprobs]]]:
        """Logprobs of the prompt tokens in chunks that ask: the row at position p predicts the token at p + 1;
        a chunk's last row predicts the next chunk's first token (kept in `prompt_tails` until then)."""
        offsets = np.cumsum([0] + [len(s.token_ids) for s in plan.seqs]).tolist()
        out = {}
        for i, s in enumerate(plan.seqs):
            if s.prompt_logprobs < 0 or s.start >= s.prompt_len:
                continue
            end = min(s.start + len(s.token_ids), s.prompt_len)
            logprobs = torch.log_softmax(self.model.logits(hidden[offsets[i]:offsets[i] + end - s.start]).float(), -1)
            tail = self.prompt_tails.pop(s.request_id, None)
            if s.start > 0:
                assert tail is not None, f"request {s.request_id}: prompt logprobs of an earlier chunk missing"
                predicted, targets, first = torch.cat([tail[None], logprobs[:-1]]), s.token_ids[:end - s.start], s.start
            else:
                predicted, targets, first = logprobs[:-1], s.token_ids[1:end], 1
            if end < s.prompt_len:
                self.prompt_tails[s.request_id] = logprobs[-1]
            entries = token_logprobs(predicted, targets, [s.prompt_logprobs] * len(targets)) if targets else []
            out[s.request_id] = (first, entries)
        return out

    def _resolve_pending(self, plan: StepPlan) -> StepPlan:
        """A plan made while the previous step ran names a continuing sequence's next input as
        PENDING_TOKEN: the token this rank sampled (or received) for it in that previous step."""
        if not any(s.token_ids[0] == PENDING_TOKEN for s in plan.seqs):
            return plan
        last = self.last_sampled
        seqs = [replace(s, token_ids=[last[s.request_id]] + s.token_ids[1:]) if s.token_ids[0] == PENDING_TOKEN
                else s for s in plan.seqs]
        return replace(plan, seqs=seqs)

    def _share_tokens(self, tokens: list[int], count: int) -> list[int]:
        """Tensor parallelism: rank 0 samples and broadcasts, so every rank can resolve the next plan's
        pending tokens."""
        buffer = torch.tensor(tokens if tokens else [0] * count, dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(buffer, src=0, group=self.model.group.process_group)
        return buffer.tolist()

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """Hidden states of every token of the step: a CUDA-graph replay for decode steps that fit one, a
        piecewise replay (graphs around eager attention) for other steps that fit, eager execution otherwise."""
        graphs, pieces = self.graphs, self.pieces
        # under tensor parallelism with graphs, the tables use the graphs' static shrink width (an eager step
        # runs as well with it), so they are built once per step
        token_slots, scales, tables = self._lora_tables(plan, static=graphs is not None or pieces is not None)
        widest = max((t[0].shape[1] for t in tables.values()), default=0)
        decode = graphs is not None and plan.is_decode and graphs.fits(
            len(plan.seqs), len(scales), widest, max(len(s.block_table) for s in plan.seqs))
        piecewise = not decode and pieces is not None and pieces.fits(plan.num_tokens, len(scales), widest)
        if decode or piecewise:
            positions, slots = self._positions(plan)
            input_ids = [t for s in plan.seqs for t in s.token_ids]
            inputs = StepInputs(input_ids, positions, slots, [s.block_table for s in plan.seqs],
                                  token_slots or [-1] * len(input_ids), scales, tables)
            if decode:
                self.decode_graph_steps += 1
                return graphs.run(inputs)
            self.piecewise_steps += 1
            return pieces.run(inputs, self._attention_batch(plan, positions, slots))
        input_ids = torch.tensor([t for s in plan.seqs for t in s.token_ids], device=self.device)
        lora = None
        if scales:
            tensor = self._tensor
            device = lambda t: t.to(self.device) if t is not None else None  # noqa: E731
            modules = {m: ModuleLora(device(a), device(b), tensor(r, torch.int32), tensor(e, torch.int32), device(c))
                       for m, (a, b, r, e, c) in tables.items()}
            lora = LoraBatch(tensor(token_slots, torch.int32), tensor(scales, torch.float32), modules)
        return self.model(input_ids, self._attention_batch(plan), lora, self.pool, self.block_tokens)

    def enable_cuda_graphs(self, max_batch: int, max_blocks: int, max_slots: int, max_rank: int,
                           max_tokens: int = 0, capture: bool = True) -> None:
        """Replay decode steps from CUDA graphs and, with `max_tokens`, other steps of up to that many tokens
        piecewise (CUDA only, except `capture=False`: the same static buffers and buckets without graphs, for
        tests). Under tensor parallelism every rank captures the same buckets at the same step, NCCL
        collectives included."""
        scratch = self.pool.shape[1] - 1  # the pool's last page
        max_rank = self.max_rank = padded_rank(max_rank, self.shard.size)  # adapters are stored padded
        if capture and self.device.type != "cuda":
            return
        mempool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs = DecodeGraphs(self.model, self.pool, self.block_tokens, scratch, max_batch, max_blocks,
                                   max_slots, max_rank, mempool, capture)
        if max_tokens:
            self.pieces = PiecewiseGraphs(self.model, self.pool, self.block_tokens, scratch, max_tokens, max_slots,
                                          max_rank, mempool, capture)

    def _load_adapters(self, plan: StepPlan) -> None:
        """Copy the plan's adapter loads into their pool pages. On CUDA the copies go on the side stream
        (after the work already queued: a page freed by an earlier step is written after that step), the
        adapters this step uses first; the step's stream waits for those, while the copies of adapters loaded
        ahead for waiting requests (prefetch) overlap the step. `finish_loads` waits for all of them."""
        used = set(plan.slots)
        loads = sorted(plan.loads, key=lambda load: load.name not in used)
        stream = self.load_stream
        if stream is None or not loads:
            for load in loads:
                self._load_adapter(load.name, load.pages)
            return
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        needed = None
        with torch.cuda.stream(stream):
            for load in loads:
                self._load_adapter(load.name, load.pages)
                event = torch.cuda.Event()
                event.record(stream)
                self._load_events.append(event)
                if load.name in used:
                    needed = event
        if needed is not None:
            current.wait_event(needed)

    def finish_loads(self) -> None:
        """Wait until every adapter copy issued so far is done (their host source may then be reused)."""
        for event in self._load_events:
            event.synchronize()
        self._load_events.clear()

    def _load_adapter(self, name: str, pages: list[int]) -> None:
        packed = self.fetch_adapter(name)
        shard_pages = packed.for_rank(self.shard.rank)
        assert shard_pages.shape[1] == len(pages), f"adapter {name}: page table length mismatch"
        index = torch.tensor(pages, device=self.device)
        self.pool[:, index] = shard_pages.to(self.device, self.dtype, non_blocking=True)
        layout = packed.info.layout
        rows = {
            module: ([layout.physical(v, pages) for v in r.a_rows], [layout.physical(v, pages) for v in r.b_rows])
            for module, r in layout.modules.items()
        }
        self.resident[name] = ResidentAdapter(packed.info.scale, packed.info.rank, rows)
        self.row_tables.add(name, rows)

    def _positions(self, plan: StepPlan) -> tuple[list[int], list[int]]:
        """Each token's position and KV slot (page * block_tokens + row)."""
        bt = self.block_tokens
        positions, slots = [], []
        for s in plan.seqs:
            for pos in range(s.start, s.start + len(s.token_ids)):
                positions.append(pos)
                slots.append(s.block_table[pos // bt] * bt + pos % bt)
        return positions, slots

    def _attention_batch(self, plan: StepPlan, positions: list[int] | None = None,
                         slots: list[int] | None = None) -> AttentionBatch:
        """The step's attention metadata. A step whose single-token sequences come first (`_decode_first`)
        and that also has longer chunks carries two parts: the decode kernel attends for the former, the
        prefill kernel for the latter."""
        if positions is None:
            positions, slots = self._positions(plan)
        batch = self._attention_part(plan.seqs, plan.is_decode)
        batch.positions, batch.slots = self._tensor(positions, torch.long), self._tensor(slots, torch.long)
        split = next((i for i, s in enumerate(plan.seqs) if len(s.token_ids) > 1), len(plan.seqs))
        if 0 < split and not plan.is_decode and all(len(s.token_ids) > 1 for s in plan.seqs[split:]):
            batch.parts = (self._attention_part(plan.seqs[:split], True),
                           self._attention_part(plan.seqs[split:], False))
        return batch

    def _attention_part(self, seqs: list[SeqPlan], is_decode: bool) -> AttentionBatch:
        """Block tables, context lengths and query starts of `seqs` (positions and slots are the caller's)."""
        tables = pad_rows([s.block_table for s in seqs], max(len(s.block_table) for s in seqs), 0)
        starts = np.cumsum([0] + [len(s.token_ids) for s in seqs]).tolist()
        return AttentionBatch(None, None, tables.to(self.device),
                              self._tensor([s.start + len(s.token_ids) for s in seqs], torch.int32),
                              self._tensor(starts, torch.int32), is_decode)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _lora_tables(self, plan: StepPlan, static: bool = False) -> tuple[list[int], list[float], dict]:
        """Host-side LoRA metadata: per-token slots, per-slot scales, and per targeted module the padded
        row tables, row counts (shrink, expand) and, under tensor parallelism, the column maps. `static`: the
        tables feed the graphs' static buffers, whose shrink width is fixed (`max_rank / tp`)."""
        if not plan.slots:
            return [], [], {}
        adapters = [self.resident[name] for name in plan.slots]
        token_slots = [s.slot for s in plan.seqs for _ in s.token_ids]
        modules = {m for a in adapters for m in a.rows}
        width = 0
        if self.shard.size > 1:  # every column-parallel module shrinks into one width: the all-gather's blocks
            width = self.max_rank // self.shard.size if static else max(
                (len(a.rows[m][0]) for a in adapters for m in a.rows if m in COLUMN_PARALLEL), default=1)
        if self.shard.size == 1:
            tables = {m: (*self.row_tables.tables(plan.slots, m), None) for m in modules}
        else:
            tables = {m: self._module_tables(adapters, m, width) for m in modules}
        return token_slots, [a.scale for a in adapters], tables

    def _module_tables(self, adapters: list[ResidentAdapter], module: str, width: int) -> tuple:
        a_tables = [list(a.rows[module][0]) if module in a.rows else [] for a in adapters]
        b_tables = [list(a.rows[module][1]) if module in a.rows else [] for a in adapters]
        cols = None
        if self.shard.size > 1:
            cols = _padded([self._cols(a, module, width) for a in adapters])
        a_width = width if self.shard.size > 1 and module in COLUMN_PARALLEL else 0
        return (_padded(a_tables, a_width), _padded(b_tables), [len(t) for t in a_tables],
                [len(t) for t in b_tables], cols)

    def _cols(self, adapter: ResidentAdapter, module: str, width: int) -> list[int]:
        """Columns of the collected intermediate that feed this rank's Bᵀ rows, for one slot. Column-parallel:
        the all-gather puts rank k's shrink output (`width` columns, its `local` A rows first) at columns
        k·width.., and this rank's Bᵀ rows are all r' rank columns. Row-parallel: the all-reduced
        intermediate has all r' columns, and this rank's Bᵀ rows are its `local` rank columns."""
        if module not in adapter.rows:
            return []
        key = (module, width if module in COLUMN_PARALLEL else 0)
        if key not in adapter.cols:  # the same for every step the adapter stays resident (a static width)
            a_rows, b_rows = adapter.rows[module]
            if module in COLUMN_PARALLEL:
                local = len(a_rows)
                adapter.cols[key] = [(c // local) * width + c % local for c in range(local * self.shard.size)]
            else:
                local = len(b_rows)
                adapter.cols[key] = [self.shard.rank * local + j for j in range(local)]
        return adapter.cols[key]


def _decode_first(plan: StepPlan) -> StepPlan:
    """The plan with its single-token sequences first (stable): a mixed step then attends in two parts."""
    seqs = plan.seqs
    if plan.is_decode or all(len(s.token_ids) > 1 for s in seqs):
        return plan
    return replace(plan, seqs=sorted(seqs, key=lambda s: len(s.token_ids) > 1))


def _padded(tables: list[list[int]], width: int = 0) -> torch.Tensor:
    """[len(tables), width] int64 (at least each table's length), zero-filled."""
    return pad_rows(tables, max(1, width, max(len(t) for t in tables)), 0, np.int64)

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
from lorafleet.engine.config import TARGET_MODULES
from lorafleet.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs, StepInputs, pad_rows
from lorafleet.engine.model import AttentionBatch, CausalLM, LoraBatch, ModuleLora
from lorafleet.engine.plan import SeqPlan, StepOutput, StepPlan
from lorafleet.engine.request import PENDING_TOKEN
from lorafleet.engine.sampling import SampleSpec, TokenLogprobs, assemble_logprobs, draw, logprob_tensors
from lorafleet.engine.transfer import to_device, to_host


@dataclass(frozen=True)
class ResidentAdapter:
    """Physical row offsets (in a layer's flat pool buffer) of one adapter's A and Bᵀ rows per module
    (this rank's shard: as many rows as the module's rank at any tensor-parallel size), and its rank."""

    scale: float
    rank: int
    rows: dict[str, tuple[list[int], list[int]]]


@dataclass
class LastSampled:
    """A launched step's sampled ids: `tokens` int64 [rows] on the device (every rank; rank 0 samples and
    broadcasts them under tensor parallelism), `rows` request id -> row, `host` their page-locked host copy,
    readable once `ready` fired (None: already readable)."""

    tokens: torch.Tensor
    rows: dict[int, int]
    host: torch.Tensor
    ready: torch.cuda.Event | None = None

    def on_host(self) -> dict[int, int]:
        """request id -> sampled id (waits for the step's device work)."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.tolist()
        return {request_id: values[row] for request_id, row in self.rows.items()}


@dataclass
class LaunchedStep:
    """A step queued on the device by `ModelRunner.launch`, for `ModelRunner.finish`: the plan as run
    (single-token sequences first), the request ids that sample in the caller's order, the adapter copies'
    events, the sampled ids, (top-N per sampled row, host copies of `logprob_tensors`) where a row asked,
    the prompt-logprob chunks (`_prompt_logprobs`), and `done`, recorded after all of it (CUDA only)."""

    plan: StepPlan
    asked: list[int]
    loads: list[torch.cuda.Event]
    sampled: LastSampled | None = None
    logprobs: tuple[list[int], tuple[torch.Tensor, ...]] | None = None
    prompt: list[tuple] = field(default_factory=list)
    done: torch.cuda.Event | None = None

    def ready(self) -> bool:
        """True once the device has run the step (always on the CPU, where launching ran it)."""
        return self.done is None or self.done.query()


class RowTables:
    """Every resident adapter's A and Bᵀ row offsets per module, one matrix row per adapter ([capacity, width]
    int64, zero past each adapter's count), kept as adapters load and leave: a step's tables for a module are
    one gather of its slots' matrix rows instead of a conversion of Python lists per slot (milliseconds per step
    at 200+ adapters and seven modules). Every tensor-parallel rank uses it the same way: its shard of an
    adapter has the module's rank in A rows and in Bᵀ rows, like the whole adapter."""

    def __init__(self, width: int = 64) -> None:
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        self.capacity, self.width = 0, width
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module -> (A rows, Bᵀ rows)
        self.counts: dict[str, np.ndarray] = {}  # module -> rank per adapter (0: not targeted)

    def add(self, name: str, rows: dict[str, tuple[list[int], list[int]]]) -> None:
        self.remove(name)
        longest = max((len(r) for pair in rows.values() for r in pair), default=0)
        if longest > self.width or not self.free:
            self._resize(max(8, 2 * self.capacity) if not self.free else self.capacity, max(self.width, longest))
        i = self.index[name] = self.free.pop()
        for module in TARGET_MODULES:
            a, b = rows.get(module, ([], []))
            assert len(a) == len(b), f"adapter {name}: {module} has {len(a)} A rows and {len(b)} Bᵀ rows"
            for table, values in zip(self.rows[module], (a, b)):
                table[i] = 0
                table[i, : len(values)] = values
            self.counts[module][i] = len(a)

    def remove(self, name: str) -> None:
        i = self.index.pop(name, None)
        if i is not None:
            self.free.append(i)

    def tables(self, names: list[str], module: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(A table, Bᵀ table) [len(names), max(1, widest rank)] int64 tensors and the ranks, for these slots."""
        slots = np.fromiter((self.index[name] for name in names), dtype=np.int64, count=len(names))
        counts = self.counts[module][slots]
        width = max(1, int(counts.max(initial=0)))
        a_rows, b_rows = self.rows[module]
        return torch.from_numpy(a_rows[slots, :width]), torch.from_numpy(b_rows[slots, :width]), counts.tolist()

    def _resize(self, capacity: int, width: int) -> None:
        for module in TARGET_MODULES:
            old_rows = self.rows.get(module)
            new_rows = tuple(np.zeros((capacity, width), dtype=np.int64) for _ in range(2))
            new_counts = np.zeros(capacity, dtype=np.int64)
            if old_rows is not None:
                for new, old in zip(new_rows, old_rows):
                    new[: old.shape[0], : old.shape[1]] = old
                new_counts[: self.capacity] = self.counts[module]
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
        self._last_logits: tuple[list[int], torch.Tensor | None] = ([], None)  # for `last_logits`
        self.last: LastSampled | None = None  # the last launched step's sampled ids (pending tokens read them)
        self._newest: StepPlan | None = None  # the plan last passed to `launch`
        self.pending_on_device = self.pending_on_host = 0  # steps whose pending tokens were filled there (tests)
        self.histories: dict[int, list[int]] = {}  # penalized request id -> its token ids by position
        self.prompt_tails: dict[int, torch.Tensor] = {}  # request id -> logprobs of its next prompt token
        self.forgotten: set[int] = set()  # requests of a failed step, until a plan releases them (`forget`)
        self.unloaded: set[str] = set()  # adapters a failed step was loading, until a plan loads them (`forget`)
        # adapter loads run on a side stream (CUDA): the step waits only for the adapters it uses
        self.load_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.unwaited: dict[str, torch.cuda.Event] = {}  # adapter -> its copy's event, until the compute stream
        # waited for it (a prefetched adapter: the step that loaded it did not use it)

    @property
    def last_logits(self) -> dict[int, torch.Tensor]:
        """request id -> the logits [vocab] (fp32, on the device) its last sample was drawn from, for the
        sequences the last launched step sampled (tests and scoring; built on each access)."""
        ids, logits = self._last_logits
        return {request_id: logits[i] for i, request_id in enumerate(ids)}

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step; returns the sampled token (and logprobs where asked) of every seq with `sample`, in
        plan order, and the prompt logprobs of chunks that asked (rank 0 only under tensor parallelism).
        The same as `finish(launch(plan))`."""
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue one step on the device: adapter loads, input tensors, the forward pass, sampling, and the
        copies of what `finish` returns into page-locked host memory. No host sync on the step's own results
        (on CUDA it returns while the device still runs earlier steps), so the next step's host work overlaps
        this one's device work. A pending input token is filled on the device from the last launched step's
        sampled ids, except for a penalized sequence on the sampling rank, whose history needs the id on the
        host: then this waits for that step's ids first (correct, not overlapped)."""
        self._newest = plan
        self._retire(plan)
        loads = self._load_adapters(plan)
        plan = self._without_unloaded(plan)
        asked = [s.request_id for s in plan.seqs if s.sample]
        plan, pending = self._pending(_decode_first(plan))
        if self.sample_on_this_rank:
            self._record_histories(plan)
        hidden = self._forward(plan, pending)
        step = LaunchedStep(plan, asked, loads)
        sampled = [s for s in plan.seqs if s.sample]
        if sampled:
            self._launch_sampling(step, hidden, sampled)
        if self.sample_on_this_rank and any(s.prompt_logprobs >= 0 for s in plan.seqs):
            step.prompt = self._prompt_logprobs(plan, hidden)
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
            if step.sampled is not None:
                step.sampled.ready = step.done
        return step

    def finish(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step (its device work and its adapter copies: their host source may be reused
        once this returns) and return its StepOutput, as `execute` does. Steps may be finished after later
        steps were launched, in launch order."""
        if step.done is not None:
            step.done.synchronize()
        for event in step.loads:
            event.synchronize()
        if not self.sample_on_this_rank:
            return StepOutput([])
        tokens = step.sampled.on_host() if step.sampled is not None else {}
        logprobs: dict[int, TokenLogprobs | None] = {}
        if step.logprobs is not None:
            wanted, tensors = step.logprobs
            ids = list(step.sampled.rows)
            values = assemble_logprobs([tokens[i] for i in ids], *(t.tolist() for t in tensors), wanted)
            logprobs = dict(zip(ids, values))
        prompt = {rid: (first, assemble_logprobs(targets, *(t.tolist() for t in tensors), [n] * len(targets))
                        if targets else []) for rid, first, targets, n, tensors in step.prompt}
        return StepOutput([tokens[i] for i in step.asked], [logprobs.get(i) for i in step.asked], prompt)

    def _retire(self, plan: StepPlan) -> None:
        """Forget what the plan says left: evicted adapters, released requests' penalty and prompt state."""
        for name in plan.evicted:
            self.resident.pop(name, None)
            self.row_tables.remove(name)
            event = self.unwaited.pop(name, None)
            if event is not None:  # prefetched, never used: its pages may take this step's KV after the copy
                torch.cuda.current_stream(self.device).wait_event(event)
        for request_id in plan.released:
            self.histories.pop(request_id, None)
            self.prompt_tails.pop(request_id, None)
            self.forgotten.discard(request_id)

    def _launch_sampling(self, step: LaunchedStep, hidden: torch.Tensor, sampled: list[SeqPlan]) -> None:
        """Sample (the sampling rank) and, under tensor parallelism, broadcast the ids over the device: every
        rank keeps them on the device for the next plan's pending tokens."""
        tokens = None
        if self.sample_on_this_rank:
            tokens, raw = self._sample(step.plan, hidden, sampled)
            wanted = [s.logprobs for s in sampled]
            if max(wanted) >= 0:
                step.logprobs = (wanted, tuple(to_host(t) for t in logprob_tensors(raw, tokens, max(wanted))))
        if self.shard.size > 1:
            tokens = self._share_tokens(tokens, len(sampled))
        rows = {s.request_id: i for i, s in enumerate(sampled)}
        step.sampled = self.last = LastSampled(tokens, rows, to_host(tokens))

    def forget(self, plan: StepPlan) -> None:
        """After `launch(plan)` or `finish` of it raised: the scheduler fails the plan's requests. Their state
        here goes, and if no later step was launched, a plan already queued that continues one of them reads
        token 0 for its pending token (its result is dropped); the plan's adapter loads may be incomplete, so
        those adapters are no longer resident (the scheduler evicts them from its books too, so a later plan
        loads them again). Such a queued plan's chunks of them run on stand-ins for the state dropped here
        (penalty history, prompt-logprob tail: zeros) until a plan releases them, so the other requests of
        that plan do not fail with them."""
        for seq in plan.seqs:
            self.histories.pop(seq.request_id, None)
            self.prompt_tails.pop(seq.request_id, None)
            self.forgotten.add(seq.request_id)
        if plan is self._newest:
            rows = {s.request_id: i for i, s in enumerate(s for s in plan.seqs if s.sample)}
            zeros = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
            self.last = LastSampled(zeros, rows, zeros.cpu())
        for load in plan.loads:
            self.resident.pop(load.name, None)
            self.row_tables.remove(load.name)
            self.unloaded.add(load.name)

    def _without_unloaded(self, plan: StepPlan) -> StepPlan:
        """The plan without the adapters `forget` took out (a plan queued before the failure was known may still
        use one): their sequences run without LoRA; the scheduler fails those requests (their results are
        dropped), and the plan's other sequences run as planned."""
        if not self.unloaded or self.unloaded.isdisjoint(plan.slots):
            return plan
        slots = [name for name in plan.slots if name not in self.unloaded]
        index = {name: i for i, name in enumerate(slots)}
        seqs = [replace(s, slot=index.get(plan.slots[s.slot], -1)) if s.slot >= 0 else s for s in plan.seqs]
        return replace(plan, seqs=seqs, slots=slots)

    def _record_histories(self, plan: StepPlan) -> None:
        """Penalties need each sequence's tokens: keep them by position from the chunks that pass (a chunk at
        position 0 starts over, so a preempted request's recompute rebuilds them)."""
        for s in plan.seqs:
            if s.penalized:
                history = self.histories.setdefault(s.request_id, [])
                if len(history) < s.start and s.request_id in self.forgotten:  # its result is dropped
                    history.extend([0] * (s.start - len(history)))
                assert len(history) >= s.start, f"request {s.request_id}: a chunk skipped positions"
                del history[s.start:]
                history.extend(s.token_ids)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor, sampled: list[SeqPlan]) -> tuple[torch.Tensor, ...]:
        """(sampled ids int64 [len(sampled)], raw fp32 logits) on the device (`sampling.draw`)."""
        starts = _token_starts(plan.seqs)
        rows = [starts[i + 1] - 1 for i, s in enumerate(plan.seqs) if s.sample]
        logits = self.model.logits(hidden[to_device(rows, torch.int64, self.device)])
        self._last_logits = ([s.request_id for s in sampled], logits)
        return draw(logits, [self._spec(s) for s in sampled])

    def _spec(self, seq: SeqPlan) -> SampleSpec:
        history = self.histories.get(seq.request_id, []) if seq.penalized else []
        assert not seq.penalized or len(history) == seq.prompt_len + seq.sample_index, "penalty history out of step"
        return SampleSpec(
            seq.temperature, seq.top_p, seq.top_k, seq.seed, seq.sample_index, seq.min_p, seq.presence_penalty,
            seq.frequency_penalty, seq.repetition_penalty, tuple((int(t), float(b)) for t, b in seq.logit_bias),
            tuple(seq.banned_ids), seq.logprobs, history[:seq.prompt_len], history[seq.prompt_len:])

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> list[tuple]:
        """Logprobs of the prompt tokens in chunks that ask: the row at position p predicts the token at p + 1;
        a chunk's last row predicts the next chunk's first token (kept in `prompt_tails` until then). Per
        chunk (request id, position of its first entry, target ids, top-N, host copies of `logprob_tensors`)."""
        offsets = _token_starts(plan.seqs)
        out = []
        for i, s in enumerate(plan.seqs):
            if s.prompt_logprobs < 0 or s.start >= s.prompt_len:
                continue
            end = min(s.start + len(s.token_ids), s.prompt_len)
            logprobs = torch.log_softmax(self.model.logits(hidden[offsets[i]:offsets[i] + end - s.start]).float(), -1)
            tail = self.prompt_tails.pop(s.request_id, None)
            if tail is None and s.start > 0 and s.request_id in self.forgotten:  # its result is dropped
                tail = torch.zeros_like(logprobs[0])
            if s.start > 0:
                assert tail is not None, f"request {s.request_id}: prompt logprobs of an earlier chunk missing"
                predicted, targets, first = torch.cat([tail[None], logprobs[:-1]]), s.token_ids[:end - s.start], s.start
            else:
                predicted, targets, first = logprobs[:-1], s.token_ids[1:end], 1
            if end < s.prompt_len:
                self.prompt_tails[s.request_id] = logprobs[-1]
            tensors = ()
            if targets:
                ids = to_device(targets, torch.int64, self.device)
                tensors = tuple(to_host(t) for t in logprob_tensors(predicted, ids, s.prompt_logprobs))
            out.append((s.request_id, first, targets, s.prompt_logprobs, tensors))
        return out

    def _pending(self, plan: StepPlan) -> tuple[StepPlan, tuple[torch.Tensor, torch.Tensor] | None]:
        """A plan made while the previous step ran names a continuing sequence's next input as
        PENDING_TOKEN: the token sampled for it in the last launched step. Returns the plan and (flat input
        positions int64 [k], their ids int64 [k]) on the device, gathered from that step's sampled ids with
        no host sync; the caller writes them over the PENDING_TOKEN inputs. A penalized sequence's history
        needs its id on the host: then the plan is resolved on the host instead (`_resolve_pending`)."""
        waiting = [i for i, s in enumerate(plan.seqs) if s.token_ids[0] == PENDING_TOKEN]
        if not waiting:
            return plan, None
        if self.sample_on_this_rank and any(plan.seqs[i].penalized for i in waiting):
            self.pending_on_host += 1
            return self._resolve_pending(plan), None
        self.pending_on_device += 1
        offsets = _token_starts(plan.seqs)
        rows = [self.last.rows[plan.seqs[i].request_id] for i in waiting]
        values = self.last.tokens.index_select(0, to_device(rows, torch.int64, self.device))
        return plan, (to_device([offsets[i] for i in waiting], torch.int64, self.device), values)

    def _resolve_pending(self, plan: StepPlan) -> StepPlan:
        """The plan with its PENDING_TOKEN inputs replaced by the last launched step's ids, read on the host
        (waits for that step's device work)."""
        last = self.last.on_host()
        seqs = [replace(s, token_ids=[last[s.request_id]] + s.token_ids[1:]) if s.token_ids[0] == PENDING_TOKEN
                else s for s in plan.seqs]
        return replace(plan, seqs=seqs)

    def _share_tokens(self, tokens: torch.Tensor | None, count: int) -> torch.Tensor:
        """Tensor parallelism: rank 0 samples and broadcasts over the device (no host copy on any rank), so
        every rank can fill the next plan's pending tokens."""
        buffer = tokens if tokens is not None else torch.zeros(count, dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(buffer, src=0, group=self.model.group.process_group)
        return buffer

    def _forward(self, plan: StepPlan, pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states of every token of the step: a CUDA-graph replay for decode steps that fit one, a
        piecewise replay (graphs around eager attention) for other steps that fit, eager execution otherwise.
        `pending`: (flat positions, ids) on the device written over the inputs there (`_pending`)."""
        graphs, pieces = self.graphs, self.pieces
        token_slots, scales, tables = self._lora_tables(plan)
        widest = max((t[0].shape[1] for t in tables.values()), default=0)
        decode = graphs is not None and plan.is_decode and graphs.fits(
            len(plan.seqs), len(scales), widest, max(len(s.block_table) for s in plan.seqs))
        piecewise = not decode and pieces is not None and pieces.fits(plan.num_tokens, len(scales), widest)
        if decode or piecewise:
            positions, slots = self._positions(plan)
            input_ids = [t for s in plan.seqs for t in s.token_ids]
            inputs = StepInputs(input_ids, positions, slots, [s.block_table for s in plan.seqs],
                                  token_slots or [-1] * len(input_ids), scales, tables, pending)
            if decode:
                self.decode_graph_steps += 1
                return graphs.run(inputs)
            self.piecewise_steps += 1
            return pieces.run(inputs, self._attention_batch(plan, positions, slots))
        input_ids = self._tensor([t for s in plan.seqs for t in s.token_ids], torch.int64)
        if pending is not None:
            input_ids.index_copy_(0, *pending)
        lora = None
        if scales:
            tensor = self._tensor
            device = lambda t: to_device(t, t.dtype, self.device)  # noqa: E731
            modules = {m: ModuleLora(device(a), device(b), tensor(r, torch.int32)) for m, (a, b, r) in tables.items()}
            lora = LoraBatch(tensor(token_slots, torch.int32), tensor(scales, torch.float32), modules)
        return self.model(input_ids, self._attention_batch(plan), lora, self.pool, self.block_tokens)

    def enable_cuda_graphs(self, max_batch: int, max_blocks: int, max_slots: int, max_rank: int,
                           max_tokens: int = 0, capture: bool = True) -> None:
        """Replay decode steps from CUDA graphs and, with `max_tokens`, other steps of up to that many tokens
        piecewise (CUDA only, except `capture=False`: the same static buffers and buckets without graphs, for
        tests). Under tensor parallelism every rank captures the same buckets at the same step, NCCL
        collectives included."""
        scratch = self.pool.shape[1] - 1  # the pool's last page
        self.max_rank = max_rank
        if capture and self.device.type != "cuda":
            return
        mempool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs = DecodeGraphs(self.model, self.pool, self.block_tokens, scratch, max_batch, max_blocks,
                                   max_slots, max_rank, mempool, capture)
        if max_tokens:
            self.pieces = PiecewiseGraphs(self.model, self.pool, self.block_tokens, scratch, max_tokens, max_slots,
                                          max_rank, mempool, capture)

    def _load_adapters(self, plan: StepPlan) -> list[torch.cuda.Event]:
        """Copy the plan's adapter loads into their pool pages. On CUDA the copies go on the side stream
        (after the work already queued: a page freed by an earlier step is written after that step), the
        adapters this step uses first; the step's stream waits for those, while the copies of adapters loaded
        ahead for waiting requests (prefetch) overlap the step; a later step that uses one waits for its copy
        (launched before the loading step is finished, nothing else orders it after the copy). Returns one
        event per copy (`finish` waits for them: the host source may be reused after)."""
        used = set(plan.slots)
        loads = sorted(plan.loads, key=lambda load: load.name not in used)
        stream = self.load_stream
        if stream is None:
            for load in loads:
                self._load_adapter(load.name, load.pages)
            return []
        current = torch.cuda.current_stream(self.device)
        for name in used.intersection(self.unwaited):
            current.wait_event(self.unwaited.pop(name))
        if not loads:
            return []
        stream.wait_stream(current)
        needed, events = None, []
        with torch.cuda.stream(stream):
            for load in loads:
                self._load_adapter(load.name, load.pages)
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
                if load.name in used:
                    needed = event
                else:
                    self.unwaited[load.name] = event
        if needed is not None:
            current.wait_event(needed)
        return events

    def _load_adapter(self, name: str, pages: list[int]) -> None:
        packed = self.fetch_adapter(name)
        shard_pages = packed.for_rank(self.shard.rank)
        assert shard_pages.shape[1] == len(pages), f"adapter {name}: page table length mismatch"
        index = to_device(pages, torch.int64, self.device)
        self.pool[:, index] = shard_pages.to(self.device, self.dtype, non_blocking=True)
        layout = packed.info.layout
        rows = {
            module: ([layout.physical(v, pages) for v in r.a_rows], [layout.physical(v, pages) for v in r.b_rows])
            for module, r in layout.modules.items()
        }
        self.resident[name] = ResidentAdapter(packed.info.scale, packed.info.rank, rows)
        self.row_tables.add(name, rows)
        self.unloaded.discard(name)

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
        starts = _token_starts(seqs)
        return AttentionBatch(None, None, to_device(tables, tables.dtype, self.device),
                              self._tensor([s.start + len(s.token_ids) for s in seqs], torch.int32),
                              self._tensor(starts, torch.int32), is_decode)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def _lora_tables(self, plan: StepPlan) -> tuple[list[int], list[float], dict]:
        """Host-side LoRA metadata: per-token slots, per-slot scales, and per targeted module the row tables
        (A, Bᵀ) and ranks of the plan's slots (`RowTables.tables`; the same at every tensor-parallel size)."""
        if not plan.slots:
            return [], [], {}
        adapters = [self.resident[name] for name in plan.slots]
        token_slots = [s.slot for s in plan.seqs for _ in s.token_ids]
        modules = {m for a in adapters for m in a.rows}
        tables = {m: self.row_tables.tables(plan.slots, m) for m in modules}
        return token_slots, [a.scale for a in adapters], tables


def _token_starts(seqs: list[SeqPlan]) -> list[int]:
    """Where each sequence's tokens start in the step's flat token order, and the total at the end
    ([len(seqs) + 1] ints)."""
    return np.cumsum([0] + [len(s.token_ids) for s in seqs]).tolist()


def _decode_first(plan: StepPlan) -> StepPlan:
    """The plan with its single-token sequences first (stable): a mixed step then attends in two parts."""
    seqs = plan.seqs
    if plan.is_decode or all(len(s.token_ids) > 1 for s in seqs):
        return plan
    return replace(plan, seqs=sorted(seqs, key=lambda s: len(s.token_ids) > 1))

"""StepPlan: everything an executor needs to run one step, as plain integers, floats and strings.

The scheduler's process builds it; executors (in-process or in other processes, one per GPU rank) only
obey it. It is msgpack-friendly by construction (see `to_wire` / `from_wire`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from operator import attrgetter

from lorafleet.engine.sampling import TokenLogprobs


@dataclass(slots=True)
class SeqPlan:
    """One sequence's chunk: new token ids at positions start..start+len-1, its KV pages, its adapter
    slot (-1 = base), and if it samples, the sampling options. `prompt_len` tells prompt positions from
    output positions (penalties count output tokens); `banned_ids` are masked while min_tokens is not
    reached; `logprobs` / `prompt_logprobs` >= 0 ask for logprobs with that many top alternatives of the
    sampled token / of this chunk's prompt tokens (-1: none).

    Read-only by convention: a plan is built once per sequence and step (256 of them per step at a full
    batch), so it is a slotted dataclass, not a frozen one (whose initialiser costs ~7x more); use
    `dataclasses.replace` for a changed copy. Its list fields may be shared with the engine's books."""

    request_id: int
    token_ids: list[int]
    start: int
    block_table: list[int]
    slot: int
    sample: bool
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sample_index: int = 0
    prompt_len: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: list[list] = field(default_factory=list)  # [token id, bias] pairs
    banned_ids: list[int] = field(default_factory=list)
    logprobs: int = -1
    prompt_logprobs: int = -1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class AdapterLoad:
    """Write adapter `name`'s weights into `pages` (its page table, in order) before running."""

    name: str
    pages: list[int]


@dataclass(frozen=True)
class StepPlan:
    step: int
    seqs: list[SeqPlan]
    slots: list[str] = field(default_factory=list)
    loads: list[AdapterLoad] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # requests finished since the last plan (runner state)

    @property
    def is_decode(self) -> bool:
        return all(len(s.token_ids) == 1 for s in self.seqs)

    @cached_property
    def num_tokens(self) -> int:
        """Tokens of the step (computed once: the scheduler reads it several times per step)."""
        return sum(len(s.token_ids) for s in self.seqs)

    def to_wire(self) -> dict:
        """Seqs and loads as positional rows in field order (asdict's deep copy cost milliseconds per big step)."""
        seqs = [_SEQ_ROW(s) for s in self.seqs]
        loads = [_LOAD_ROW(a) for a in self.loads]
        return {"step": self.step, "seqs": seqs, "slots": self.slots, "loads": loads, "evicted": self.evicted,
                "released": self.released}

    @classmethod
    def from_wire(cls, raw: dict) -> StepPlan:
        return cls(
            step=raw["step"],
            seqs=[SeqPlan(*s) for s in raw["seqs"]],
            slots=list(raw["slots"]),
            loads=[AdapterLoad(*a) for a in raw["loads"]],
            evicted=list(raw["evicted"]),
            released=list(raw.get("released", ())),
        )


_SEQ_ROW = attrgetter(*(f.name for f in fields(SeqPlan)))
_LOAD_ROW = attrgetter(*(f.name for f in fields(AdapterLoad)))


@dataclass
class StepOutput:
    """An executor's answer to a StepPlan: the token sampled for every seq with `sample` (plan order), its
    logprobs where the seq asked (else None), and per request id whose chunk asked for prompt logprobs,
    (position of the first entry, the entries of this chunk's prompt positions in order)."""

    sampled: list[int]
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.logprobs:
            self.logprobs = [None] * len(self.sampled)

    def to_wire(self) -> dict:
        return {"sampled": self.sampled,
                "logprobs": [lp.to_wire() if lp is not None else None for lp in self.logprobs],
                "prompt_logprobs": [[rid, first, [e.to_wire() for e in entries]]
                                    for rid, (first, entries) in self.prompt_logprobs.items()]}

    @classmethod
    def from_wire(cls, raw: dict) -> StepOutput:
        logprobs = [TokenLogprobs.from_wire(lp) if lp is not None else None for lp in raw["logprobs"]]
        prompt = {rid: (first, [TokenLogprobs.from_wire(e) for e in entries])
                  for rid, first, entries in raw["prompt_logprobs"]}
        return cls([int(t) for t in raw["sampled"]], logprobs, prompt)

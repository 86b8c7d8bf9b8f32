"""StepPlan: everything an executor needs to run one step, as plain integers, floats and strings.

The scheduler's process builds it; executors (in-process or in other processes, one per GPU rank) only
obey it. It is msgpack-friendly by construction (see `to_wire` / `from_wire`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter


@dataclass(frozen=True)
class SeqPlan:
    """One sequence's chunk: new token ids at positions start..start+len-1, its KV pages, its adapter
    slot (-1 = base), and if it samples, the sampling options."""

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

    @property
    def is_decode(self) -> bool:
        return all(len(s.token_ids) == 1 for s in self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def to_wire(self) -> dict:
        """Seqs and loads as positional rows in field order (asdict's deep copy cost milliseconds per big step)."""
        seqs = [_SEQ_ROW(s) for s in self.seqs]
        loads = [_LOAD_ROW(a) for a in self.loads]
        return {"step": self.step, "seqs": seqs, "slots": self.slots, "loads": loads, "evicted": self.evicted}

    @classmethod
    def from_wire(cls, raw: dict) -> StepPlan:
        return cls(
            step=raw["step"],
            seqs=[SeqPlan(*s) for s in raw["seqs"]],
            slots=list(raw["slots"]),
            loads=[AdapterLoad(*a) for a in raw["loads"]],
            evicted=list(raw["evicted"]),
        )


_SEQ_ROW = attrgetter(*(f.name for f in fields(SeqPlan)))
_LOAD_ROW = attrgetter(*(f.name for f in fields(AdapterLoad)))

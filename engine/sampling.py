"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Each draw uses a generator seeded from (request seed, output index), so a request's samples do not
depend on its batch-mates or on being preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleSpec:
    """Sampling options of one row of logits."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    index: int


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """One token id per row of `logits` [rows, vocab] (fp32)."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, spec in enumerate(specs):
        if spec.temperature > 0.0:
            tokens[row] = _draw(logits[row], spec)
    return tokens


def _draw(logits: torch.Tensor, spec: SampleSpec) -> int:
    logits = logits.float() / spec.temperature
    if 0 < spec.top_k < logits.shape[-1]:
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= spec.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = torch.Generator(device=probs.device)
    generator.manual_seed((spec.seed * 1_000_003 + spec.index) % (2**63))
    return int(torch.multinomial(probs, 1, generator=generator))

"""Token sampling over a batch of logits, as tensor ops over the batch (no per-row Python work on the device).

Per row, in vLLM's order (vLLM v1 `Sampler.forward`):

1. raw logprobs = log_softmax(logits) (fp32) when the row asks for logprobs: vLLM's default
   `logprobs_mode="raw_logprobs"`, i.e. the model's distribution before any penalty, bias or temperature;
2. `min_tokens`: the row's `banned_ids` (EOS and `stop_token_ids`, set by the engine while fewer than
   `min_tokens` tokens were generated) get -inf;
3. `logit_bias` is added (OpenAI: -100..100 added to the logit);
4. penalties: `repetition_penalty` p over tokens seen in the prompt or the output (CTRL / HF / vLLM:
   logit / p if logit > 0 else logit * p), then `frequency_penalty` * count and `presence_penalty` * [count > 0]
   over the output's tokens (OpenAI's definition: mu[j] -= c[j] * alpha_frequency + [c[j] > 0] * alpha_presence);
5. temperature 0 rows take the argmax here; the others are shifted by their maximum and divided by the
   temperature (`scale`: safe down to the smallest positive temperature), then
   `min_p` (drop tokens whose probability is below min_p x the top probability), `top_k`, `top_p`;
6. the draw is a Gumbel-max over counter-based noise: uniform u = hash(seed, output index, token id)
   (splitmix64, integer tensor ops), token = argmax(logits - log(-log u)). The same (seed, index) gives the
   same noise on any device and in any batch, so a request's samples do not depend on its batch-mates or on
   being preempted and recomputed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorafleet.engine.transfer import to_device

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs / completions logprobs


@dataclass(frozen=True)
class SampleSpec:
    """Sampling options of one row of logits. `prompt_ids` / `output_ids` are the sequence's tokens so far
    (needed only when a penalty is set); `banned_ids` are masked (min_tokens); `logprobs` >= 0 asks for the
    chosen token's logprob and that many top alternatives (-1: none)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    index: int
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    banned_ids: tuple[int, ...] = ()
    logprobs: int = -1
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's logprobs: the chosen (or prompt) token's, and the top-N (`top_ids` by descending
    logprob). Natural log, fp32 values as Python floats."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]

    def to_wire(self) -> list:
        return [self.token_id, self.logprob, self.top_ids, self.top_logprobs]

    @classmethod
    def from_wire(cls, row: list) -> TokenLogprobs:
        return cls(int(row[0]), float(row[1]), list(row[2]), list(row[3]))


@dataclass
class Sampled:
    """One token per row, and per row its logprobs (None where the row did not ask)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> Sampled:
    """Sample one token per row of `logits` [rows, vocab]; see the module docstring for the order."""
    tokens, raw = draw(logits, specs)
    token_ids = tokens.tolist()
    wanted = [s.logprobs for s in specs]
    logprobs = token_logprobs(raw, token_ids, wanted) if max(wanted) >= 0 else [None] * len(specs)
    return Sampled(token_ids, logprobs)


def draw(logits: torch.Tensor, specs: list[SampleSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """The device half of `sample`: the sampled ids (int64 [rows], on the logits' device) and the fp32 raw
    logits the logprobs are taken from. Queues work only: no host sync (options reach the device through
    page-locked copies, `engine/transfer.py`)."""
    raw = finite_logits(logits)
    processed = process_logits(widened(raw, specs), specs)
    tokens = torch.argmax(processed, dim=-1)
    if any(s.temperature > 0.0 for s in specs):
        scaled = cut(scale(keep_top_k(processed, specs), specs), specs)
        seeds = _column(specs, "seed", torch.int64, raw.device)
        index = _column(specs, "index", torch.int64, raw.device)
        drawn = torch.argmax(scaled + gumbel_noise(seeds, index, raw.shape[-1]), dim=-1)
        positive = to_device([s.temperature > 0.0 for s in specs], torch.bool, raw.device)
        tokens = torch.where(positive, drawn, tokens)
    return tokens, raw


def widened(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """`logits` in float64 when a row has a penalty, else as they are. A repetition_penalty p < 1 divides
    positive logits by p: any p below about 1e-38 (in range: 0 < p) takes fp32 logits past the fp32 maximum,
    where they all tie at inf and the lowest token id wins instead of the largest logit. In float64 (with p
    floored at MIN_REPETITION_PENALTY) every penalized logit stays finite and ordered; `scale` brings the
    row back to fp32 after its shift by the row max, where only the top logit is 0."""
    return logits.double() if any(s.penalized for s in specs) else logits


MIN_REPETITION_PENALTY = 1e-268  # fp32 logits (|x| <= 3.4e38) divided by it stay below the float64 maximum


def process_logits(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Steps 2-4 (min_tokens bans, logit_bias, penalties) on fp32 `logits` [rows, vocab]; returns a new tensor."""
    out = logits.clone()
    rows, vocab = out.shape
    device = out.device
    if any(s.banned_ids for s in specs):
        banned = _ragged([s.banned_ids for s in specs], vocab, device)
        mask = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device).scatter_(1, banned, True)
        out = out.masked_fill(mask[:, :vocab], float("-inf"))
    if any(s.logit_bias for s in specs):
        ids = _ragged([[t for t, _ in s.logit_bias] for s in specs], vocab, device)
        bias = _ragged_values([[b for _, b in s.logit_bias] for s in specs], ids.shape[1], device)
        out = out + torch.zeros(rows, vocab + 1, device=device).scatter_add_(1, ids, bias)[:, :vocab]
    if any(s.penalized for s in specs):
        out = apply_penalties(out, specs)
    return out


def apply_penalties(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """repetition_penalty over prompt + output tokens, then frequency and presence penalties over the output's
    token counts, batched: counts are a scatter_add of the padded output ids into [rows, vocab]."""
    rows, vocab = logits.shape
    device = logits.device
    outputs = _ragged([s.output_ids for s in specs], vocab, device)
    counts = torch.zeros(rows, vocab + 1, device=device).scatter_add_(
        1, outputs, torch.ones(outputs.shape, device=device))[:, :vocab]
    prompts = _ragged([s.prompt_ids for s in specs], vocab, device)
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompts, True)[:, :vocab]
    seen |= counts > 0
    repetition = _column(specs, "repetition_penalty", torch.float64, device).clamp(min=MIN_REPETITION_PENALTY)
    repetition = repetition.to(logits.dtype)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    frequency = _column(specs, "frequency_penalty", logits.dtype, device)[:, None]
    presence = _column(specs, "presence_penalty", logits.dtype, device)[:, None]
    return logits - frequency * counts.to(logits.dtype) - presence * (counts > 0).to(logits.dtype)


def scale(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """(logits - row max) / temperature on fp32 or float64 `logits` [rows, vocab] (rows with temperature 0
    unscaled), in the same dtype.

    Numerically safe for any temperature > 0: after the shift the maximum is exactly 0 and every other
    logit is negative, and the division is a multiplication by 1/temperature computed in float64 and
    capped at the largest value of the logits' dtype (a float64 row of penalized logits keeps gaps as small
    as 1e-270 apart: capped at the float32 maximum they stayed below the draw's noise, not greedy). A
    temperature of 1e-300 (0 in float32; 1/t overflows) leaves the top logit(s) at 0 and the others at -inf
    or far below: greedy, never 0/0 or inf - inf. A row whose logits are all -inf is left as it is."""
    inverse = torch.tensor([1.0 / s.temperature if s.temperature > 0.0 else 1.0 for s in specs],
                           dtype=torch.float64).clamp(max=torch.finfo(logits.dtype).max)
    top = logits.max(dim=-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, 0.0)
    return (logits - top) * to_device(inverse, logits.dtype, logits.device)[:, None]


def keep_top_k(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """top_k (ties with the k-th kept) on fp32 `logits` [rows, vocab], before `scale`: the shift there may
    round near-equal logits together, which would change the k-th value's ties. `cut` applies top_k again,
    a no-op then (shift and scale keep the order)."""
    vocab = logits.shape[-1]
    ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in specs]
    if min(ks) >= vocab:
        return logits
    values = torch.topk(logits, max(ks), dim=-1).values
    kth = values.gather(1, to_device(ks, torch.int64, logits.device)[:, None] - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def distribution(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """The distribution [rows, vocab] (fp32; float64 when a row has a penalty) the rows with temperature > 0
    are drawn from: the softmax of the processed, scaled and cut logits (the Gumbel-max draw samples exactly
    this)."""
    processed = keep_top_k(process_logits(widened(finite_logits(logits), specs), specs), specs)
    return torch.softmax(cut(scale(processed, specs), specs), dim=-1)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits with NaN as -inf and +inf as the largest float (a broken model or adapter must not turn
    the softmax into NaN); a row with no finite logit still gives some token."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)


def cut(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """min_p, top_k (ties with the k-th kept) and top_p on temperature-scaled `logits` [rows, vocab] (fp32, or
    float64 for penalized rows: see `widened`; the top token is the largest in that dtype, so top_p 1e-300
    and min_p 1 keep exactly it even where penalized logits differ by 1e-270).

    min_p drops token i when p_i < min_p * p_max, tested in log space as logit_i - logit_max < log(min_p)
    (the same condition; probabilities rounded to equal would tie where the logits do not)."""
    device = logits.device
    if any(s.min_p > 0.0 for s in specs):
        floor = torch.log(_column(specs, "min_p", torch.float64, device)).to(logits.dtype)[:, None]
        top = logits.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits - top < floor, float("-inf"))
    vocab = logits.shape[-1]
    use_k = any(0 < s.top_k < vocab for s in specs)
    use_p = any(s.top_p < 1.0 for s in specs)
    if not (use_k or use_p):
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    if use_k:
        k = _column(specs, "top_k", torch.int64, device)
        k = torch.where((k > 0) & (k < vocab), k, vocab)
        kth = ordered.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if use_p:
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        top_p = _column(specs, "top_p", logits.dtype, device)[:, None]
        dropped = (before >= top_p) & (top_p < 1.0)
        dropped[:, 0] = False  # the most likely token stays, however small top_p (1e-300 is 0 in float32)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, dropped)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1) of shape [rows, vocab] from splitmix64(seed, index, token id) (int64 arithmetic wraps);
    `seeds`, `index`: int64 [rows]."""
    token = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = (seeds * _GOLDEN + index)[:, None] * _GOLDEN + token[None, :]
    x = x * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) / float(1 << 24)


def gumbel_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """-log(-log u): argmax(logits + this) draws from softmax(logits)."""
    return -torch.log(-torch.log(uniform_noise(seeds, index, vocab)))


def token_logprobs(raw: torch.Tensor, token_ids: list[int], top_n: list[int]) -> list[TokenLogprobs | None]:
    """log_softmax of fp32 `raw` [rows, vocab] at `token_ids` (one per row) and the top `top_n[row]`
    alternatives (-1: None for that row)."""
    tensors = logprob_tensors(raw, to_device(token_ids, torch.int64, raw.device), max(top_n))
    return assemble_logprobs(token_ids, *(t.tolist() for t in tensors), top_n)


def logprob_tensors(raw: torch.Tensor, token_ids: torch.Tensor, widest: int) -> tuple[torch.Tensor, ...]:
    """The device half of `token_logprobs`: the chosen tokens' logprobs (fp32 [rows]) and the top `widest`
    logprobs and ids ([rows, widest]) of fp32 `raw` [rows, vocab]; `token_ids` int64 [rows] on its device."""
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]
    if widest > 0:
        top_values, top_ids = torch.topk(logprobs, widest, dim=-1)
    else:
        top_values = torch.zeros(len(token_ids), 0, device=raw.device)
        top_ids = torch.zeros(len(token_ids), 0, dtype=torch.int64, device=raw.device)
    return chosen, top_values, top_ids


def assemble_logprobs(token_ids: list[int], chosen: list[float], top_values: list[list[float]],
                      top_ids: list[list[int]], top_n: list[int]) -> list[TokenLogprobs | None]:
    """`logprob_tensors`' values (as host lists) into one TokenLogprobs per row (None where top_n is -1)."""
    return [TokenLogprobs(t, c, ids[:n], values[:n]) if n >= 0 else None
            for t, c, ids, values, n in zip(token_ids, chosen, top_ids, top_values, top_n)]


def _column(specs: list[SampleSpec], name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device([getattr(s, name) for s in specs], dtype, device)


def _ragged(lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """int64 [rows, max(1, longest)], short rows padded with `pad` (a scratch column the callers drop)."""
    return to_device(torch.from_numpy(_pack_rows(lists, np.int64, pad, None)), torch.int64, device)


def _ragged_values(lists: Sequence[Sequence[float]], width: int, device: torch.device) -> torch.Tensor:
    return to_device(torch.from_numpy(_pack_rows(lists, np.float32, 0.0, width)), torch.float32, device)


def _pack_rows(lists: Sequence[Sequence], dtype, pad, width: int | None) -> np.ndarray:
    """Ragged rows into one padded array with one scatter (no per-row copies)."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    width = width or max(1, int(lengths.max(initial=0)))
    out = np.full((len(lists), width), pad, dtype=dtype)
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out

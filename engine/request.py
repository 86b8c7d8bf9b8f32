"""Requests and their sampling parameters: the scheduler's plain-data view of a generation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from lorafleet.engine.sampling import MAX_LOGPROBS, TokenLogprobs

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: a signed 64-bit integer, as vLLM's OpenAI server bounds them


class ParamError(ValueError):
    """A sampling parameter out of range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling options. temperature 0 is greedy; top_k 0 and top_p 1 disable those cuts."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _integer(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise ParamError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ParamError("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if not _integer(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise ParamError("top_k", f"must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if self.seed is not None and (not _integer(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ParamError("seed", f"must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", "must be non-empty strings")
        if not all(_integer(t) and t >= 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", "must be non-negative token ids")
        self._check_penalties()
        if not _integer(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _integer(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ParamError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    def _check_penalties(self) -> None:
        """Ranges of OpenAI (presence/frequency -2..2, logit_bias -100..100) and vLLM (min_p, repetition)."""
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ParamError("min_p", f"must be a number in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                raise ParamError(name, f"must be a number in [-2, 2], got {value!r}")
        if not _finite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise ParamError("repetition_penalty", f"must be a number in (0, 100], got {self.repetition_penalty!r}")
        for token, bias in self.logit_bias:
            if not _integer(token) or token < 0:
                raise ParamError("logit_bias", f"keys must be non-negative token ids, got {token!r}")
            if not _finite(bias) or not -100.0 <= bias <= 100.0:
                raise ParamError("logit_bias", f"values must be numbers in [-100, 100], got {bias!r}")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    """A finite float, or an integer a float can hold (10**400 is not: no OverflowError later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= 2**1023


PENDING_TOKEN = -1  # in a plan: "the token the executor sampled for this request in the step before"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A generation inside the engine. `num_computed` tokens of `token_ids` have KV in the pool.
    Requests compare by identity (the scheduler's queues look them up on every step)."""

    id: int
    external_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    seed: int
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    passed_over: int = 0
    preemptions: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None
    pending: int = 0  # tokens sampled by a step still in flight (their ids not known here yet)
    in_flight: int = 0  # steps sent to the executor with a chunk of this request, not completed yet
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # with `params.prompt_logprobs`

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, length: int) -> list[int]:
        """token_ids[start:start + length] without building token_ids (a decode step's one token); a token
        still pending (sampled by the step in flight) reads as PENDING_TOKEN."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            ids = self.output_ids[start - prompt:start - prompt + length]
        elif start + length <= prompt:
            return self.prompt_ids[start:start + length]
        else:
            ids = self.token_ids[start:start + length]
        return ids + [PENDING_TOKEN] * (length - len(ids))

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def ends_with_pending(self) -> bool:
        """Its pending token is its last (max_tokens reached): nothing more to run for it."""
        return self.pending > 0 and len(self.output_ids) + self.pending >= self.params.max_tokens


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: new tokens and text, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per new token, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first output, when asked; [0] is None

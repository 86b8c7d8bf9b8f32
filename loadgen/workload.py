"""S-LoRA's workload model and JSONL traces.

A workload is a list of `RequestSpec`s, each with its arrival time (seconds from the start of the run),
the adapter it targets (or None for the base model), its prompt and its `max_tokens`.

Definitions (also in docs/loadgen.md):

- Popularity: adapters are named `names[0..n-1]`; adapter i is picked with probability
  ``(i+1)**-alpha / sum_j (j+1)**-alpha`` (alpha=0 is uniform, larger alpha concentrates on the first
  names). With `base_fraction` p > 0, a request first goes to the base model with probability p.
- Arrivals: inter-arrival gaps are i.i.d. Gamma(shape=1/cv**2, scale=cv**2/rate), so the mean gap is
  1/rate and the gaps' coefficient of variation is cv (cv=1 is Poisson; cv=0 is a constant gap).
  The first request arrives after the first gap; requests arriving at or after `duration` are dropped.
- Lengths: input and output lengths are independent integers uniform over the inclusive ranges.
- Prompts: `prompt_kind="tokens"` gives exactly `input_len` token ids drawn uniformly from
  `token_range` (half-open); `"text"` gives `input_len` words drawn from a small fixed word list (the
  tokenized length then depends on the server's tokenizer).
- Each aspect draws from its own random stream derived from `seed`, so e.g. changing `alpha` does not
  change the arrival times or the lengths.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TRACE_FORMAT = "lorafleet.trace/1"
MAX_REQUESTS = 1_000_000  # expected requests (rate x duration) of one generated workload
# Gamma(1/cv^2) gaps: above MAX_CV (shape < 0.01) numpy's sampler starts returning gaps of exactly 0 (at cv 1e10
# every gap, and the arrival loop never reaches the duration); below MIN_CV 1/cv^2 overflows.
MIN_CV, MAX_CV = 1e-6, 10.0
WORDS = (
    "the",
    "model",
    "adapter",
    "serves",
    "many",
    "requests",
    "from",
    "one",
    "base",
    "with",
    "low",
    "rank",
    "weights",
    "and",
    "pages",
    "of",
    "memory",
    "on",
    "a",
    "device",
    "each",
    "token",
    "time",
    "batch",
)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when to send it and what to ask for."""

    index: int
    arrival_s: float
    adapter: str | None
    prompt: list[int] | str
    input_len: int
    max_tokens: int

    def __post_init__(self) -> None:
        if self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")


def parse_range(text: str, name: str) -> tuple[int, int]:
    """Parse "a:b" (or a single "a") into an inclusive integer range with 1 <= a <= b."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError as exc:
        raise ValueError(f"{name}: expected 'a:b' with integers, got {text!r}") from exc
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise ValueError(f"{name}: expected 'a:b' with 1 <= a <= b, got {text!r}")
    return lo, hi


@dataclass(frozen=True)
class WorkloadConfig:
    """Parameters of S-LoRA's synthetic workload (see the module docstring for exact definitions)."""

    adapters: tuple[str, ...]
    alpha: float = 1.0
    rate: float = 1.0
    cv: float = 1.0
    input_len: tuple[int, int] = (8, 512)
    output_len: tuple[int, int] = (8, 512)
    duration: float = 60.0
    seed: int = 0
    base_fraction: float = 0.0
    prompt_kind: str = "tokens"
    token_range: tuple[int, int] = (10, 500)

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.rate, self.cv, self.alpha, self.duration))
        checks = [
            (finite, f"rate, cv, alpha and duration must be finite, got {self.rate}, {self.cv}, {self.alpha}, "
             f"{self.duration}"),
            (self.rate > 0, f"rate must be > 0, got {self.rate}"),
            (
                self.cv == 0 or MIN_CV <= self.cv <= MAX_CV,
                f"cv must be 0 (constant gaps) or in [{MIN_CV:g}, {MAX_CV:g}], got {self.cv}",
            ),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.duration > 0, f"duration must be > 0, got {self.duration}"),
            (
                not finite or self.rate * self.duration <= MAX_REQUESTS,
                f"rate x duration = {self.rate * self.duration:.3g} requests; a workload holds at most "
                f"{MAX_REQUESTS:,} (each is drawn and kept in memory before the run)",
            ),
            (0 <= self.base_fraction <= 1, f"base_fraction must be in [0, 1], got {self.base_fraction}"),
            (
                self.prompt_kind in ("tokens", "text"),
                f"prompt_kind must be 'tokens' or 'text', got {self.prompt_kind!r}",
            ),
            (
                0 <= self.token_range[0] < self.token_range[1],
                f"token_range must satisfy 0 <= lo < hi, got {self.token_range}",
            ),
            (
                bool(self.adapters) or self.base_fraction == 1.0,
                "adapters is empty: give adapter names or set base_fraction=1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name, (lo, hi) in (("input_len", self.input_len), ("output_len", self.output_len)):
            if lo < 1 or hi < lo:
                raise ValueError(f"{name} must satisfy 1 <= a <= b, got {(lo, hi)}")

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """Probabilities of adapters 0..n-1: p_i proportional to (i+1)**-alpha."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -float(alpha)
    return weights / weights.sum()


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, duration: float) -> np.ndarray:
    """Arrival times in [0, duration) whose gaps are Gamma(1/cv^2, cv^2/rate) (constant 1/rate if cv=0)."""
    times: list[np.ndarray] = []
    now = 0.0
    chunk = max(16, int(rate * duration * 1.2) + 16)
    while now < duration:
        if cv == 0:
            gaps = np.full(chunk, 1.0 / rate)
        else:
            gaps = rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=chunk)
        arrivals = now + np.cumsum(gaps)
        now = float(arrivals[-1])
        times.append(arrivals)
    all_times = np.concatenate(times)
    return all_times[all_times < duration]


def _prompt(rng: np.random.Generator, config: WorkloadConfig, length: int) -> list[int] | str:
    if config.prompt_kind == "tokens":
        lo, hi = config.token_range
        return [int(t) for t in rng.integers(lo, hi, size=length)]
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=length))


def generate(config: WorkloadConfig) -> list[RequestSpec]:
    """Draw the workload's requests, sorted by arrival time; deterministic for a given config."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(5)]
    arrival_rng, adapter_rng, length_rng, prompt_rng, base_rng = streams
    arrivals = gamma_arrivals(arrival_rng, config.rate, config.cv, config.duration)
    count = len(arrivals)
    if config.adapters:
        probs = popularity(len(config.adapters), config.alpha)
        picks = adapter_rng.choice(len(config.adapters), size=count, p=probs)
    else:
        picks = np.zeros(count, dtype=np.int64)
    to_base = base_rng.random(count) < config.base_fraction
    input_lens = length_rng.integers(config.input_len[0], config.input_len[1] + 1, size=count)
    output_lens = length_rng.integers(config.output_len[0], config.output_len[1] + 1, size=count)
    specs = []
    for i in range(count):
        adapter = None if to_base[i] else config.adapters[int(picks[i])]
        specs.append(
            RequestSpec(
                index=i,
                arrival_s=float(arrivals[i]),
                adapter=adapter,
                prompt=_prompt(prompt_rng, config, int(input_lens[i])),
                input_len=int(input_lens[i]),
                max_tokens=int(output_lens[i]),
            )
        )
    return specs


def write_trace(path: str | Path, specs: list[RequestSpec], config: WorkloadConfig | None = None) -> None:
    """Write a JSONL trace: one header line `{"format": ..., "config": ...}`, then one request per line."""
    with open(path, "w", encoding="utf-8") as out:
        header: dict[str, object] = {"format": TRACE_FORMAT}
        if config is not None:
            header["config"] = config.to_json()
        out.write(json.dumps(header) + "\n")
        for spec in specs:
            out.write(json.dumps(asdict(spec), separators=(",", ":")) + "\n")


def _int_field(obj: dict[str, object], key: str, where: str, default: int | None = None, low: int = 0) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{where}: field {key!r} must be an integer >= {low}, got {value!r:.60}")
    return value


def _spec_from_json(obj: dict[str, object], line_no: int, index: int) -> RequestSpec:
    """One request line, checked field by field: JSON integers for the counts (never 1.5, true or "3"), a
    finite non-negative number for `arrival_s`."""
    where = f"trace line {line_no}"
    for key in ("arrival_s", "prompt", "max_tokens"):
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise ValueError(f"{where}: field 'prompt' must be a string or a list of token ids (integers >= 0)")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' must be a string or a list of token ids (integers >= 0)")
    if not prompt:
        raise ValueError(f"{where}: field 'prompt' is empty")
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError(f"{where}: field 'adapter' must be a string or null")
    arrival = obj["arrival_s"]
    if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not 0 <= arrival < math.inf:
        raise ValueError(f"{where}: field 'arrival_s' must be a finite number >= 0, got {arrival!r:.60}")
    default_len = len(prompt) if isinstance(prompt, list) else max(1, len(prompt.split()))
    return RequestSpec(
        index=_int_field(obj, "index", where, index),
        arrival_s=float(arrival),
        adapter=adapter,
        prompt=prompt,
        input_len=_int_field(obj, "input_len", where, default_len, low=1),
        max_tokens=_int_field(obj, "max_tokens", where, low=1),
    )


def read_trace(path: str | Path) -> tuple[list[RequestSpec], dict[str, object] | None]:
    """Read a JSONL trace; returns the requests sorted by arrival time and the header's config (if any).

    The header line is optional; blank lines are skipped; request lines need `arrival_s`, `prompt`
    and `max_tokens` (`adapter`, `index` and `input_len` are optional).
    """
    try:
        with open(path, encoding="utf-8") as src:
            return _parse_trace(src, path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"trace {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"trace {path}: cannot read it ({exc.strerror or exc})") from None


def _parse_trace(src, path: str | Path) -> tuple[list[RequestSpec], dict[str, object] | None]:
    specs: list[RequestSpec] = []
    config: dict[str, object] | None = None
    for line_no, line in enumerate(src, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"trace line {line_no}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ValueError(f"trace line {line_no}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise ValueError(f"trace line {line_no}: expected a JSON object")
        if "format" in obj:
            if obj["format"] != TRACE_FORMAT:
                raise ValueError(f"trace line {line_no}: unknown format {obj['format']!r:.80} "
                                 f"(expected {TRACE_FORMAT})")
            config = obj.get("config")  # type: ignore[assignment]
            continue
        specs.append(_spec_from_json(obj, line_no, len(specs)))
    indexes = [s.index for s in specs]
    if len(set(indexes)) != len(indexes):
        raise ValueError(f"trace {path}: field 'index' must be unique across requests")
    specs.sort(key=lambda s: s.arrival_s)
    return specs, config

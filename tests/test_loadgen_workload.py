"""Statistics and traces of the S-LoRA workload generator (lorafleet.loadgen.workload)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafleet.loadgen.workload import (
    RequestSpec,
    WorkloadConfig,
    gamma_arrivals,
    generate,
    parse_range,
    read_trace,
    write_trace,
)

NAMES = tuple(f"lora-{i}" for i in range(5))


def _gaps(arrivals: np.ndarray) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], arrivals]))


@pytest.mark.parametrize("rate,cv", [(50.0, 0.5), (20.0, 1.0), (80.0, 2.0)])
def test_gamma_arrivals_rate_and_cv(rate: float, cv: float) -> None:
    duration = 20000 / rate
    arrivals = gamma_arrivals(np.random.default_rng(7), rate, cv, duration)
    gaps = _gaps(arrivals)
    assert np.all(gaps >= 0) and arrivals[-1] < duration
    assert len(arrivals) == pytest.approx(rate * duration, rel=0.05)
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_cv_zero_gives_constant_gaps() -> None:
    arrivals = gamma_arrivals(np.random.default_rng(0), 4.0, 0.0, 10.0)
    np.testing.assert_allclose(arrivals, np.arange(1, 40) * 0.25)


def test_generated_arrivals_follow_the_config() -> None:
    specs = generate(
        WorkloadConfig(adapters=NAMES, rate=40.0, cv=1.5, duration=400.0, input_len=(1, 2), output_len=(1, 2), seed=3)
    )
    times = np.array([s.arrival_s for s in specs])
    assert np.all(np.diff(times) >= 0)
    gaps = _gaps(times)
    assert len(specs) == pytest.approx(16000, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.5, rel=0.06)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _adapter_counts(alpha: float, n: int = 5, seed: int = 11) -> np.ndarray:
    names = tuple(f"a{i}" for i in range(n))
    specs = generate(
        WorkloadConfig(
            adapters=names,
            alpha=alpha,
            rate=200.0,
            duration=100.0,
            input_len=(1, 1),
            output_len=(1, 1),
            seed=seed,
        )
    )
    index = {name: i for i, name in enumerate(names)}
    return np.bincount([index[s.adapter] for s in specs], minlength=n)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_popularity_follows_the_power_law(alpha: float) -> None:
    counts = _adapter_counts(alpha)
    truth = np.array([(i + 1) ** -alpha for i in range(5)])
    truth /= truth.sum()
    # chi-square with 4 degrees of freedom: 18.47 is the 0.999 quantile
    assert _chi_square(counts, truth) < 18.47
    # and the test has power: the same counts are far from a different exponent
    wrong = np.array([(i + 1) ** -(alpha + 0.5) for i in range(5)])
    assert _chi_square(counts, wrong / wrong.sum()) > 100


def test_base_fraction_sends_requests_to_the_base_model() -> None:
    specs = generate(
        WorkloadConfig(
            adapters=NAMES,
            rate=100.0,
            duration=100.0,
            base_fraction=0.25,
            input_len=(1, 1),
            output_len=(1, 1),
        )
    )
    share = sum(s.adapter is None for s in specs) / len(specs)
    assert share == pytest.approx(0.25, abs=0.02)


def test_lengths_and_prompts_are_within_ranges() -> None:
    config = WorkloadConfig(
        adapters=NAMES,
        rate=100.0,
        duration=30.0,
        input_len=(3, 9),
        output_len=(5, 7),
        token_range=(20, 30),
        seed=1,
    )
    specs = generate(config)
    ins = [s.input_len for s in specs]
    outs = [s.max_tokens for s in specs]
    assert set(ins) == set(range(3, 10)) and set(outs) == {5, 6, 7}  # inclusive ends are reached
    assert np.mean(ins) == pytest.approx(6.0, abs=0.2)
    for spec in specs:
        assert isinstance(spec.prompt, list) and len(spec.prompt) == spec.input_len
        assert all(20 <= t < 30 for t in spec.prompt)


def test_text_prompts_have_the_requested_word_count() -> None:
    specs = generate(WorkloadConfig(adapters=NAMES, rate=10.0, duration=5.0, input_len=(4, 8), prompt_kind="text"))
    assert specs and all(len(str(s.prompt).split()) == s.input_len for s in specs)


def test_seed_reproducible_and_streams_independent() -> None:
    config = WorkloadConfig(adapters=NAMES, rate=20.0, duration=10.0, input_len=(1, 50), output_len=(1, 50), seed=42)
    assert generate(config) == generate(config)
    other_seed = generate(WorkloadConfig(**{**config.__dict__, "seed": 43}))
    assert [s.arrival_s for s in other_seed] != [s.arrival_s for s in generate(config)]
    # changing the popularity does not move arrivals, lengths or prompts
    skewed = generate(WorkloadConfig(**{**config.__dict__, "alpha": 3.0}))
    strip = lambda specs: [(s.arrival_s, s.input_len, s.max_tokens, s.prompt) for s in specs]
    assert strip(skewed) == strip(generate(config))
    assert [s.adapter for s in skewed] != [s.adapter for s in generate(config)]


def test_trace_round_trip(tmp_path) -> None:
    config = WorkloadConfig(
        adapters=NAMES,
        rate=20.0,
        duration=3.0,
        input_len=(2, 6),
        output_len=(1, 4),
        base_fraction=0.3,
        seed=5,
    )
    specs = generate(config)
    path = tmp_path / "trace.jsonl"
    write_trace(path, specs, config)
    again, header = read_trace(path)
    assert again == specs
    assert header == json.loads(json.dumps(config.to_json()))
    assert len(path.read_text().splitlines()) == len(specs) + 1


def test_hand_written_trace_is_sorted_and_defaults_apply(tmp_path) -> None:
    path = tmp_path / "hand.jsonl"
    path.write_text(
        '{"arrival_s": 2.5, "prompt": "hello there world", "max_tokens": 3}\n\n'
        '{"arrival_s": 0.5, "adapter": "x", "prompt": [1, 2], "max_tokens": 1}\n'
    )
    specs, header = read_trace(path)
    assert header is None
    assert specs == [
        RequestSpec(index=1, arrival_s=0.5, adapter="x", prompt=[1, 2], input_len=2, max_tokens=1),
        RequestSpec(index=0, arrival_s=2.5, adapter=None, prompt="hello there world", input_len=3, max_tokens=3),
    ]


@pytest.mark.parametrize(
    "line,field",
    [
        ('{"prompt": [1], "max_tokens": 2}', "arrival_s"),
        ('{"arrival_s": 0, "prompt": [1, "a"], "max_tokens": 2}', "prompt"),
        ('{"arrival_s": 0, "prompt": [1], "max_tokens": 0}', "max_tokens"),
        ('{"arrival_s": 0, "prompt": [1], "max_tokens": 1, "adapter": 3}', "adapter"),
        ("not json", "invalid JSON"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path, line: str, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt": [1], "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"line 2.*{field}"):
        read_trace(path)


def test_parse_range_and_config_validation() -> None:
    assert parse_range("8:512", "--input-len") == (8, 512)
    assert parse_range("7", "--input-len") == (7, 7)
    for bad in ("0:4", "5:4", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="--input-len"):
            parse_range(bad, "--input-len")
    for field, value in (
        ("rate", 0.0),
        ("cv", -1.0),
        ("alpha", -0.5),
        ("duration", 0.0),
        ("base_fraction", 2.0),
    ):
        with pytest.raises(ValueError, match=field):
            WorkloadConfig(adapters=NAMES, **{field: value})
    with pytest.raises(ValueError, match="adapters"):
        WorkloadConfig(adapters=())
    assert generate(WorkloadConfig(adapters=(), base_fraction=1.0, duration=5.0, rate=4.0))[0].adapter is None

"""Sampling parameters against independent references: HF transformers' logits processors where they exist
(repetition penalty, min_p, top-k, top-p, min new tokens), OpenAI's formula for presence/frequency penalties,
HF's log-softmax for logprobs (fp32 tiny model, with adapters) — and the engine's behaviour under chunked
prefill, overlap and preemption."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import PeftOracle, make_peft_adapter, run_overlapped
from lorafleet.engine import LLM
from lorafleet.engine.request import ParamError, SamplingParams
from lorafleet.engine.sampling import SampleSpec, cut, process_logits, sample, uniform_noise

VOCAB = 64


def _openai_penalties(logits: torch.Tensor, output: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's definition: mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for token, count in Counter(output).items():
        out[token] -= count * frequency + presence
    return out


def _reference(logits: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    """One row through references, in vLLM's order: bans, logit_bias, repetition, frequency/presence."""
    row = logits.clone()
    row[list(spec.banned_ids)] = float("-inf")
    for token, bias in spec.logit_bias:
        row[token] += bias
    seen = torch.tensor([list(spec.prompt_ids) + list(spec.output_ids)])
    if seen.numel():
        row = RepetitionPenaltyLogitsProcessor(spec.repetition_penalty)(seen, row[None])[0]
    return _openai_penalties(row, list(spec.output_ids), spec.frequency_penalty, spec.presence_penalty)


def _random_specs(rng: random.Random, rows: int) -> list[SampleSpec]:
    specs = []
    for _ in range(rows):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
        output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 20))]
        specs.append(SampleSpec(
            temperature=1.0, top_p=1.0, top_k=0, seed=rng.randrange(1 << 30), index=len(output),
            presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
            logit_bias=tuple((rng.randrange(VOCAB), rng.uniform(-100, 100)) for _ in range(rng.randint(0, 3))),
            banned_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 2))), prompt_ids=prompt, output_ids=output))
    return specs


@pytest.mark.parametrize("seed", range(4))
def test_penalties_bias_and_bans_match_references(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    specs = _random_specs(rng, 12)
    logits = torch.randn(len(specs), VOCAB) * 4
    got = process_logits(logits, specs)
    want = torch.stack([_reference(logits[i], s) for i, s in enumerate(specs)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    greedy = [SampleSpec(**{**s.__dict__, "temperature": 0.0}) for s in specs]
    assert sample(logits, greedy).token_ids == torch.argmax(want, dim=-1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_min_p_top_k_top_p_match_hf_warpers(seed):
    torch.manual_seed(seed)
    logits = torch.randn(6, VOCAB) * 3
    cases = [(0.0, 5, 1.0), (0.0, 0, 0.7), (0.1, 0, 1.0), (0.05, 10, 0.9), (0.0, VOCAB, 1.0), (0.3, 3, 0.5)]
    specs = [SampleSpec(1.0, p, k, 0, 0, min_p=m) for m, k, p in cases]
    got = cut(logits, specs)
    for row, (min_p, top_k, top_p) in enumerate(cases):
        want = logits[row:row + 1].clone()  # vLLM's order: min_p, then top-k, then top-p
        if min_p > 0:
            want = MinPLogitsWarper(min_p)(None, want)
        if 0 < top_k < VOCAB:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        assert torch.equal(torch.isinf(got[row]), torch.isinf(want[0])), (min_p, top_k, top_p)


def test_draws_follow_the_distribution_and_depend_only_on_seed_and_index():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    draws = 4000
    specs = [SampleSpec(0.7, 1.0, 0, seed=11, index=i) for i in range(draws)]
    tokens = sample(logits.expand(draws, -1), specs).token_ids
    probs = torch.softmax(logits / 0.7, dim=-1)
    freq = torch.bincount(torch.tensor(tokens), minlength=len(logits)).float() / draws
    bound = 4 * torch.sqrt(probs * (1 - probs) / draws) + 1e-3
    assert torch.all((freq - probs).abs() <= bound), (freq, probs)
    again = sample(logits.expand(3, -1), [specs[5], specs[17], specs[5]]).token_ids
    assert again == [tokens[5], tokens[17], tokens[5]]
    noise = uniform_noise(torch.tensor([11, 12]), torch.tensor([0, 0]), 1000)
    assert 0 < noise.min() and noise.max() < 1 and not torch.equal(noise[0], noise[1])


def test_param_ranges_name_the_field():
    for kwargs, field in [({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"frequency_penalty": -3}, "frequency_penalty"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
                          ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
                          ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
                          ({"stop_token_ids": (-1,)}, "stop_token_ids")]:
        with pytest.raises(ParamError) as err:
            SamplingParams(**kwargs)
        assert err.value.field == field


# the engine --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return tiny_llama, {"r4": make_peft_adapter(tiny_llama, root / "r4", rank=4, seed=1),
                        "r8": make_peft_adapter(tiny_llama, root / "r8", rank=8, seed=2)}


@pytest.fixture(scope="module")
def oracle(assets):
    base, adapters = assets
    return PeftOracle(base, adapters)


def _llm(assets, **options) -> LLM:
    base, adapters = assets
    return LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, **options)


PROMPTS = [[5, 9, 33, 71, 12, 200, 17, 3, 99, 41, 42, 43, 44, 45], [7, 8], [250, 3, 4, 9, 9, 9]]
ADAPTERS = ["r8", None, "r4"]


def test_greedy_with_penalties_matches_hf_with_reference_penalties(assets, oracle):
    """Every step's logits from HF+PEFT, penalized by the references, argmax: the engine's greedy tokens."""
    options = dict(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.6, logit_bias={5: 3.0, 9: -2.0})
    outs = _llm(assets, num_pages=64, max_batch_tokens=8).generate(
        PROMPTS, adapters=ADAPTERS, max_tokens=10, temperature=0.0, ignore_eos=True, **options)
    for prompt, adapter, out in zip(PROMPTS, ADAPTERS, outs):
        want: list[int] = []
        for _ in range(10):
            spec = SampleSpec(0.0, 1.0, 0, 0, len(want), 0.0, 0.7, 0.4, 1.6, ((5, 3.0), (9, -2.0)),
                              prompt_ids=prompt, output_ids=want)
            want.append(int(torch.argmax(_reference(oracle.last_logits(prompt + want, adapter), spec))))
        assert out.token_ids == want


def test_min_tokens_holds_back_eos_and_stop_token_ids(assets, oracle):
    llm = _llm(assets, num_pages=64)
    eos = 1  # the tiny model's eos; a +100 bias makes it the greedy choice once allowed
    out = llm.generate([PROMPTS[0]], adapters=["r4"], max_tokens=12, min_tokens=5, logit_bias={eos: 100.0})[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 6 and out.token_ids[-1] == eos
    want: list[int] = []
    for _ in range(5):
        logits = oracle.last_logits(PROMPTS[0] + want, "r4")
        logits[eos] = float("-inf")
        want.append(int(torch.argmax(logits)))
    assert out.token_ids[:5] == want
    stop = llm.generate([PROMPTS[1]], max_tokens=12, min_tokens=3, stop_token_ids=[7], logit_bias={7: 100.0})[0]
    assert stop.token_ids[-1] == 7 and len(stop.token_ids) == 4 and 7 not in stop.token_ids[:3]


def test_logprobs_equal_hf_log_softmax(assets, oracle):
    """Raw logprobs (vLLM's default logprobs_mode): log_softmax of the model's logits at the same positions,
    for sampled tokens and prompt tokens, across chunked prefill (max_batch_tokens=5) and adapters."""
    outs = _llm(assets, num_pages=64, max_batch_tokens=5).generate(
        PROMPTS, adapters=ADAPTERS, max_tokens=6, temperature=0.9, seed=3, ignore_eos=True, logprobs=4,
        prompt_logprobs=3, presence_penalty=0.5)
    for prompt, adapter, out in zip(PROMPTS, ADAPTERS, outs):
        ids = prompt + out.token_ids
        assert len(out.logprobs) == 6 and len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        entries = out.prompt_logprobs[1:] + out.logprobs
        for position, entry in enumerate(entries, start=1):
            want = torch.log_softmax(oracle.last_logits(ids[:position], adapter), dim=-1)
            n = 3 if position < len(prompt) else 4
            assert entry.token_id == ids[position]
            assert abs(entry.logprob - float(want[ids[position]])) < 1e-4
            top = torch.topk(want, n)
            torch.testing.assert_close(torch.tensor(entry.top_logprobs), top.values, atol=1e-4, rtol=0)
            assert entry.top_ids == top.indices.tolist()


def test_penalties_logprobs_survive_preemption_and_overlap(assets):
    """Penalty counts come from the tokens the runner sees by position; a preempted request's recompute feeds
    them again, so a small pool (preemptions) with overlapped steps gives the tokens and logprobs of a big pool."""
    rng = random.Random(5)
    work = [(f"q{i}", [rng.randrange(3, 250) for _ in range(rng.randint(8, 40))], rng.choice(["r4", "r8", None]),
             SamplingParams(max_tokens=rng.randint(6, 16), temperature=rng.choice([0.0, 0.8]), seed=i, ignore_eos=True,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.02,
                            logprobs=2, prompt_logprobs=rng.choice([None, 1])))
            for i in range(12)]
    big, small = _llm(assets, num_pages=256).engine, _llm(assets, num_pages=14, max_batch_tokens=40).engine
    want, logprobs = {}, {}
    for engine in (big, small):
        for rid, prompt, adapter, params in work:
            engine.add_request(rid, prompt, params, adapter)
    while big.has_unfinished():
        for out in big.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(lp.logprob for lp in out.logprobs)
    run = run_overlapped(small)
    assert run.tokens == want
    for rid, values in logprobs.items():
        assert run.logprobs[rid] == pytest.approx(values, abs=1e-4)
    assert small.scheduler.preemptions > 0, "the pool was meant to be small enough to preempt"
    assert set(small.executor.histories) <= set(small._released), "finished requests' state goes with the next plan"


@pytest.mark.gpu
def test_sampling_on_cuda_equals_cpu():
    """The counter-based noise is integer arithmetic: the same seeds draw the same tokens on CUDA as on CPU;
    penalties, bias and logprobs agree to fp32 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = random.Random(7)
    torch.manual_seed(7)
    specs = [SampleSpec(**{**s.__dict__, "temperature": rng.choice([0.0, 0.7, 1.3]), "top_k": rng.choice([0, 5]),
                           "top_p": rng.choice([1.0, 0.9]), "min_p": rng.choice([0.0, 0.05]), "logprobs": 3})
             for s in _random_specs(rng, 64)]
    logits = torch.randn(len(specs), VOCAB) * 3
    cpu, gpu = sample(logits, specs), sample(logits.cuda(), specs)
    assert cpu.token_ids == gpu.token_ids
    for a, b in zip(cpu.logprobs, gpu.logprobs):
        assert a.top_ids == b.top_ids and abs(a.logprob - b.logprob) < 1e-5
    torch.testing.assert_close(process_logits(logits.cuda(), specs).cpu(), process_logits(logits, specs))


@pytest.mark.parametrize("penalty", [1e-20, 1e-38, 1e-45, 1e-300, 5e-324])
def test_tiny_repetition_penalty_keeps_the_order_of_the_penalized_logits(penalty):
    """A repetition_penalty p in (0, 1) divides the seen tokens' positive logits by p: in fp32 anything below
    ~1e-38 sent them all to inf, where they tied and the lowest token id won instead of the largest logit.
    The reference is the exact arithmetic (fractions) of the definition."""
    from fractions import Fraction

    from lorafleet.engine.sampling import distribution

    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 4
    seen = [[5, 9, 40, 63], [0, 1, 2, 3, 63], list(range(VOCAB))]
    want = []
    for row, ids in zip(logits.tolist(), seen):
        exact = [Fraction(x) / Fraction(penalty) if i in ids and x > 0 else
                 Fraction(x) * Fraction(penalty) if i in ids else Fraction(x) for i, x in enumerate(row)]
        want.append(max(range(VOCAB), key=exact.__getitem__))
    for temperature in (0.0, 5e-324, 1e-30, 1.0):
        specs = [SampleSpec(temperature=temperature, top_p=1.0, top_k=0, seed=7, index=i, repetition_penalty=penalty,
                            prompt_ids=ids) for i, ids in enumerate(seen)]
        assert sample(logits, specs).token_ids == want, temperature  # the gaps are >= 1e19 / temperature
        probs = distribution(logits, specs)
        assert torch.isfinite(probs).all() and probs.argmax(dim=-1).tolist() == want


@pytest.mark.parametrize("penalty", [1e-38, 1e-300])
def test_tiny_temperature_is_greedy_over_tiny_penalized_gaps(penalty):
    """Negative logits of seen tokens times a tiny repetition_penalty differ by ~1e-270: a temperature of
    1e-300 still makes those gaps huge (greedy), but 1/temperature capped at the float32 maximum left them
    below the draw's noise, so the sampled token differed from the greedy one."""
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB) * 4 - 100  # every logit negative, as after logit_bias -100 on all
    seen = list(range(VOCAB))
    greedy = [SampleSpec(temperature=0.0, top_p=1.0, top_k=0, seed=s, index=0, repetition_penalty=penalty,
                         prompt_ids=seen) for s in range(4)]
    want = sample(logits, greedy).token_ids
    assert want == torch.argmax(logits, dim=-1).tolist()  # x * p keeps the order of negative logits
    for temperature in (1e-300, 5e-324):
        specs = [SampleSpec(**{**s.__dict__, "temperature": temperature}) for s in greedy]
        assert sample(logits, specs).token_ids == want, temperature


@pytest.mark.parametrize("cut_by", [{"top_p": 1e-300}, {"min_p": 1.0}, {"top_k": 1}])
def test_tiny_top_p_or_min_p_one_keeps_the_top_penalized_token(cut_by):
    """Seen tokens' negative logits times repetition_penalty 1e-300 differ by ~1e-270 (float64): top_p 1e-300,
    min_p 1 and top_k 1 must keep exactly the largest, at any temperature; rounded to fp32 after the
    temperature scale they tied and the draw picked any of them."""
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB) * 4 - 100
    base = {"top_p": 1.0, "top_k": 0, "index": 0, "repetition_penalty": 1e-300, "prompt_ids": list(range(VOCAB))}
    want = torch.argmax(logits, dim=-1).tolist()
    for temperature in (1.0, 100.0):
        specs = [SampleSpec(**{**base, **cut_by, "temperature": temperature, "seed": s}) for s in range(4)]
        assert sample(logits, specs).token_ids == want, temperature


def test_min_tokens_with_every_token_a_stop_token_is_refused(assets):
    """min_tokens holds back EOS and stop_token_ids; when they cover the whole vocabulary the row had no token
    left and the sampler returned token 0, a banned one, as if allowed. Refused naming min_tokens."""
    llm = _llm(assets, num_pages=64)
    vocab = llm.engine.model.vocab_size
    with pytest.raises(ParamError, match="^min_tokens: cannot be met"):
        llm.generate([PROMPTS[1]], max_tokens=4, min_tokens=2, stop_token_ids=list(range(vocab)))
    allowed = [t for t in range(vocab) if t != 9]  # one token left: min_tokens can be met with it
    out = llm.generate([PROMPTS[1]], max_tokens=4, min_tokens=2, stop_token_ids=allowed, ignore_eos=True)[0]
    assert out.token_ids[:2] == [9, 9]

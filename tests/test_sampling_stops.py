"""Sampling against a reference of its definition (exact decimal arithmetic), numerically safe at the
extremes of the accepted ranges; stop strings against a simple reference over random token streams."""

from __future__ import annotations

import decimal

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorafleet.engine.detokenize import TextStream
from lorafleet.engine.sampling import SampleSpec, distribution, sample

VOCAB = 40


def reference_probabilities(logits: list[float], temperature: float, top_p: float, top_k: int) -> list[float]:
    """The definition, in 60-digit decimal arithmetic: softmax(logits / temperature); keep the top_k largest
    logits (ties at the k-th kept); then keep tokens in order of probability while the mass before them is
    below top_p; renormalise."""
    ctx = decimal.Context(prec=60, Emin=-10**9, Emax=10**9)
    d = [ctx.create_decimal_from_float(x) for x in logits]
    keep = list(range(len(d)))
    if 0 < top_k < len(d):
        kth = sorted(d, reverse=True)[top_k - 1]
        keep = [i for i in keep if d[i] >= kth]
    t = ctx.create_decimal_from_float(temperature)
    top = max(d[i] for i in keep)
    weights = {i: ctx.exp(ctx.divide(d[i] - top, t)) for i in keep}
    total = sum(weights.values(), decimal.Decimal(0))
    probs = {i: ctx.divide(w, total) for i, w in weights.items()}
    if top_p < 1.0:
        p = ctx.create_decimal_from_float(top_p)
        before, kept = decimal.Decimal(0), {}
        for i in sorted(probs, key=lambda i: -probs[i]):
            assume(abs(before - p) > decimal.Decimal("1e-5"))  # a boundary fp32 rounding could tip either way
            if before < p or not kept:
                kept[i] = probs[i]
            before += probs[i]
        cut = [probs[i] for i in probs if i not in kept]
        assume(not cut or max(cut) < min(kept.values()) * decimal.Decimal("0.999999"))  # no tie across the cut
        total = sum(kept.values(), decimal.Decimal(0))
        probs = {i: ctx.divide(w, total) for i, w in kept.items()}
    return [float(probs.get(i, 0)) for i in range(len(d))]


TEMPERATURES = st.one_of(st.sampled_from([1e-300, 5e-324, 1e-30, 1e-8, 1e-3, 0.7, 1.0, 2.0, 100.0]),
                         st.floats(1e-300, 100.0))
TOP_PS = st.one_of(st.sampled_from([1e-300, 5e-324, 1e-9, 0.1, 0.5, 0.9, 0.999, 1.0]),
                   st.floats(1e-300, 1.0, exclude_min=False))


@settings(max_examples=150, deadline=None)
@given(logits=st.lists(st.floats(-30, 30), min_size=VOCAB, max_size=VOCAB), scale=st.sampled_from([1.0, 1e3, 1e30]),
       temperature=TEMPERATURES, top_p=TOP_PS, top_k=st.integers(-1, VOCAB + 5))
def test_probabilities_equal_the_definition(logits, scale, temperature, top_p, top_k):
    logits = [x * scale for x in logits]
    row = torch.tensor([logits], dtype=torch.float32)
    got = distribution(row, [SampleSpec(temperature, top_p, top_k, 0, 0)])[0]
    assert torch.isfinite(got).all() and abs(float(got.sum()) - 1.0) < 1e-5
    want = reference_probabilities(row[0].tolist(), temperature, top_p, top_k)
    assert got.tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (5e-324, 1.0), (1.0, 1e-300), (1.0, 5e-324),
                                                (1e-300, 1e-300), (100.0, 1e-300)])
def test_tiny_temperature_or_top_p_is_greedy(temperature, top_p):
    """Issue #16: temperature 1e-300 behaved as 0/0 and top_p 1e-300 rounded to 0 in float32: NaN or empty
    distributions that killed the executor. Both now give the most likely token, row after row."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=generator) * 5
    logits[3, :] = logits[3, 0]  # a row of ties: any of them is right for greedy; argmax takes the first
    specs = [SampleSpec(temperature, top_p, 0, seed, 0) for seed in range(64)]
    got = sample(logits, specs).token_ids
    want = torch.argmax(logits, dim=-1).tolist()
    assert [g for i, g in enumerate(got) if i != 3] == [w for i, w in enumerate(want) if i != 3]
    assert 0 <= got[3] < 1000


def test_non_finite_logits_never_give_non_finite_probabilities():
    spec = SampleSpec(1.0, 0.9, 0, 1, 0)
    for row in ([0.0, float("inf"), 1.0, float("nan"), 2.0], [1e38, -1e38, 3e38, 0.0, float("-inf")],
                [float("nan"), 1.0, float("nan"), 0.5, 0.0]):
        probs = distribution(torch.tensor([row]), [spec])[0]
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-5, row
        assert 0 <= sample(torch.tensor([row]), [spec]).token_ids[0] < 5
    for row in ([float("nan")] * 5, [float("-inf")] * 5):  # no finite logit: still a token, no error
        assert 0 <= sample(torch.tensor([row]), [spec]).token_ids[0] < 5


# stop strings ----------------------------------------------------------------------------------------------
def reference_stop(texts: list[str], stops: list[str]) -> str:
    """The output text, given the text after each token: at the first token after which some stop string
    occurs, the text is cut before the earliest occurrence of any stop string."""
    for text in texts:
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[:min(found)]
    return texts[-1] if texts else ""


def cumulative(tokens: list[str]) -> list[str]:
    return ["".join(tokens[:k]) for k in range(1, len(tokens) + 1)]


def streamed(tokens: list[str], stops: list[str]) -> tuple[str, list[str]]:
    """What the engine sends: a delta after every token, then the rest at the end (if no stop string)."""
    stream, deltas, text = TextStream(tuple(stops)), [], ""
    for token in tokens:
        text += token
        deltas.append(stream.update(text))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return "".join(deltas), deltas


ALPHABET = "ab<>9x"
pieces = st.text(ALPHABET, min_size=1, max_size=4)


@settings(max_examples=500, deadline=None)
@given(tokens=st.lists(pieces, max_size=30), stops=st.lists(pieces, min_size=1, max_size=4))
def test_stop_strings_equal_the_reference_streamed_or_not(tokens, stops):
    out, deltas = streamed(tokens, stops)
    assert out == reference_stop(cumulative(tokens), stops)
    assert out == streamed(tokens, list(reversed(stops)))[0]  # the order of the list does not matter
    assert not any(s in out for s in stops)
    sent = ""
    for delta in deltas:  # every moment's sent text is a prefix of the final output (nothing to take back)
        sent += delta
        assert out.startswith(sent)


@pytest.mark.parametrize("stops", [["<ex", "89>"], ["89>", "<ex"]])
def test_two_stop_strings_completed_by_one_token_earliest_wins(stops):
    """Issue #16: `stop: ["<ex", "89>"]` and a token `<extra_289>` kept the text up to the later match."""
    out, _ = streamed(["say ", "<extra_289>", " more"], stops)
    assert out == "say "


def test_two_stop_strings_through_the_engine(tiny_llama):
    """The same through the engine's detokenizer with a byte tokenizer whose filler tokens read `<extra_N>`."""
    from lorafleet.engine import LLM

    llm = LLM(str(tiny_llama))
    free = llm.generate(["hello"], max_tokens=12, temperature=0.0, ignore_eos=True)[0]
    texts = [llm.tokenizer.decode(free.token_ids[:k], skip_special_tokens=True) for k in range(1, 13)]
    assert len(free.text) >= 4 and texts[-1] == free.text
    a, b = free.text[1:3], free.text[2:4]  # overlapping: the first starts earlier
    want = reference_stop(texts, [a, b])
    assert len(want) <= 1
    for stops in ([b, a], [a, b]):
        got = llm.generate(["hello"], max_tokens=12, temperature=0.0, ignore_eos=True, stop=stops)[0]
        assert (got.text, got.finish_reason) == (want, "stop"), stops


def test_stop_prefix_held_back_across_stop_strings():
    """A prefix of a later-listed stop string that starts earlier must be held back too."""
    stream = TextStream(("zq", "xab"))
    assert stream.update("0xa") == "0"  # "xa" may become "xab": held, though "a" is no prefix of "zq"
    assert stream.update("0xaz") == "xa"  # now "xa" is no start of a stop string; "z" is: held
    assert stream.update("0xazq") == "" and stream.stopped
    assert stream.flush() == ""

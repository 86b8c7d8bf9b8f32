"""Engine behaviour on CPU: chunked prefill, sampling options, stop conditions, aborts, offline API errors."""

from __future__ import annotations

import pytest
import torch

from conftest import PeftOracle, make_peft_adapter, run_overlapped
from lorafleet.engine import LLM
from lorafleet.engine.request import ParamError, SamplingParams
from lorafleet.engine.sampling import SampleSpec, sample


@pytest.fixture(scope="module")
def assets(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return tiny_llama, {"r4": make_peft_adapter(tiny_llama, root / "r4", rank=4, seed=1),
                        "r16": make_peft_adapter(tiny_llama, root / "r16", rank=16, seed=2)}


@pytest.fixture(scope="module")
def llm(assets):
    base, adapters = assets
    return LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, num_pages=256)


PROMPTS = [[5, 9, 33, 71, 12, 200, 17, 3, 99, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7, 8], [250, 3, 4, 9]]


def test_chunked_prefill_matches_peft(assets):
    base, adapters = assets
    oracle = PeftOracle(base, adapters)
    llm = LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, max_batch_tokens=5, num_pages=64)
    outs = llm.generate(PROMPTS, adapters=["r16", None, "r4"], max_tokens=6, ignore_eos=True)
    for prompt, adapter, out in zip(PROMPTS, ["r16", None, "r4"], outs):
        assert out.token_ids == oracle.greedy(prompt, adapter, 6)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    alone = llm.generate([PROMPTS[0]], adapters=["r4"], max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    mixed = llm.generate(PROMPTS, adapters=["r4", "r16", None], max_tokens=8, temperature=1.0, seed=123,
                         ignore_eos=True)
    assert alone[0].token_ids == mixed[0].token_ids
    other = llm.generate([PROMPTS[0]], adapters=["r4"], max_tokens=8, temperature=1.0, seed=124, ignore_eos=True)
    assert other[0].token_ids != alone[0].token_ids


def test_sampler_cuts():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]])
    for index in range(50):
        token = sample(logits, [SampleSpec(5.0, 1.0, 2, seed=1, index=index)]).token_ids[0]
        assert token in (1, 2), "top_k=2 must keep only the two best tokens"
        token = sample(logits, [SampleSpec(1.0, 0.5, 0, seed=2, index=index)]).token_ids[0]
        assert token == 1, "top_p=0.5 keeps only the most likely token here"
    assert sample(logits, [SampleSpec(0.0, 1.0, 0, 0, 0)]).token_ids == [1]


def test_max_tokens_eos_and_stop(llm):
    greedy = llm.generate([PROMPTS[1]], max_tokens=10, ignore_eos=True)[0]
    assert len(greedy.token_ids) == 10 and greedy.finish_reason == "length"
    stop_id = greedy.token_ids[3]
    stopped = llm.generate([PROMPTS[1]], max_tokens=10, stop_token_ids=[stop_id], ignore_eos=True)[0]
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    full = llm.generate(["hello"], max_tokens=12, ignore_eos=True)[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = llm.generate(["hello"], max_tokens=12, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_abort_frees_pages(llm):
    engine = llm.engine
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0), "r16")
    engine.step()
    assert engine.pool.usage()["kv"] > 0
    assert engine.abort("x")
    assert engine.pool.usage()["kv"] == 0 and not engine.pool.pins
    engine.pool.check()
    assert not engine.abort("x")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"max_tokens": 10_000}, "max_tokens"), ({"bogus": 1}, "bogus"),
])
def test_bad_parameters_name_the_field(llm, kwargs, field):
    with pytest.raises(ParamError) as info:
        llm.generate([PROMPTS[1]], **kwargs)
    assert info.value.field == field


def test_unknown_adapter_and_bad_tokens(llm):
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded"):
        llm.generate([PROMPTS[1]], adapters=["nope"])
    with pytest.raises(ParamError, match="prompt"):
        llm.generate([[1, 2, 100_000]])


def test_mistral_sliding_window_caps_the_context():
    from lorafleet.engine.config import ModelConfig

    raw = {"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 32768, "sliding_window": 4096}
    assert ModelConfig.from_dict(raw).context_limit == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}).context_limit == 32768
    qwen = {**raw, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}
    assert ModelConfig.from_dict(qwen).context_limit == 32768


def test_waiting_requests_adapters_are_prefetched_into_pages(assets):
    base, adapters = assets
    llm = LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, num_pages=256, max_num_seqs=1)
    engine = llm.engine
    for i, adapter in enumerate(["r4", "r16"]):
        engine.add_request(f"p{i}", PROMPTS[2], SamplingParams(max_tokens=3, temperature=0.0), adapter)
    engine.step()  # runs p0 (r4) alone; p1 waits, and its adapter is loaded into free pages meanwhile
    assert [r.external_id for r in engine.scheduler.waiting] == ["p1"]
    assert engine.pool.is_resident("r16") and engine.scheduler.prefetched == 1
    while engine.has_unfinished():
        engine.step()
    engine.pool.check()
    off = LLM(str(base), adapters={k: str(v) for k, v in adapters.items()}, num_pages=256, max_num_seqs=1,
              prefetch_adapters=0)
    on = llm.generate(PROMPTS, adapters=["r4", "r16", "r4"], max_tokens=5, ignore_eos=True)
    want = off.generate(PROMPTS, adapters=["r4", "r16", "r4"], max_tokens=5, ignore_eos=True)
    assert [o.token_ids for o in on] == [o.token_ids for o in want]
    assert off.engine.scheduler.prefetched == 0


def _add_mixed(engine, stop_token: int) -> None:
    """Sampled and greedy requests that end at different steps: by length, by a stop token, by cancel."""
    work = [
        ("a", PROMPTS[0], "r4", SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)),
        ("b", PROMPTS[1], "r16", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
        ("c", PROMPTS[2], None, SamplingParams(max_tokens=9, temperature=0.7, top_k=20, seed=9, ignore_eos=True)),
        ("d", PROMPTS[0][:7], "r16", SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_token,),
                                                    ignore_eos=True)),
        ("e", PROMPTS[2][::-1], "r4", SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)),
    ]
    for rid, prompt, adapter, params in work:
        engine.add_request(rid, prompt, params, adapter)


def test_overlapped_steps_match_serial_steps(assets):
    """Planning step n+1 before step n returns (the serving loop) changes no token: pending tokens resolve to
    what was sampled, seeded samples keep their index, and requests ending at step n waste only step n+1's
    token, which nobody sees."""
    base, adapters = assets
    paths = {k: str(v) for k, v in adapters.items()}
    serial = LLM(str(base), adapters=paths, num_pages=256).engine
    probe = LLM(str(base), adapters=paths, num_pages=256).generate([PROMPTS[0][:7]], adapters=["r16"],
                                                                  max_tokens=6, ignore_eos=True)[0]
    stop_token = probe.token_ids[3]
    _add_mixed(serial, stop_token)
    want: dict[str, list[int]] = {}
    while serial.has_unfinished():
        for out in serial.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    overlapped = LLM(str(base), adapters=paths, num_pages=256).engine
    _add_mixed(overlapped, stop_token)
    run = run_overlapped(overlapped, cancel_after={"e": 4})
    assert run.plans_with_pending > 0
    assert {k: v for k, v in run.tokens.items() if k != "e"} == {k: v for k, v in want.items() if k != "e"}
    assert run.tokens["e"] == want["e"][:4] and run.reasons["e"] == "cancelled"
    assert run.reasons["d"] == "stop" and run.tokens["d"][-1] == stop_token and len(run.tokens["d"]) == 4
    assert len(run.tokens["b"]) == 3 and len(run.tokens["a"]) == 12
    overlapped.pool.check()
    assert overlapped.pool.usage()["kv"] == 0 and not overlapped.scheduler.running


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlapped_steps_with_preemption_and_cancels_match_serial(assets, seed):
    """Random workloads on a pool small enough to preempt, with cancels arriving while a step is in flight."""
    import random

    base, adapters = assets
    paths = {k: str(v) for k, v in adapters.items()}
    rng = random.Random(seed)
    work = [(f"q{i}", [rng.randrange(3, 250) for _ in range(rng.randint(8, 40))], rng.choice(["r4", "r16", None]),
             SamplingParams(max_tokens=rng.randint(6, 16), temperature=rng.choice([0.0, 0.8]), seed=i,
                            ignore_eos=True)) for i in range(14)]
    cancel_after = {rid: rng.randint(1, 4) for rid, *_ in rng.sample(work, 4)}
    engines = [LLM(str(base), adapters=paths, num_pages=14, max_batch_tokens=40, max_num_seqs=8).engine
               for _ in range(2)]
    for engine in engines:
        for rid, prompt, adapter, params in work:
            engine.add_request(rid, prompt, params, adapter)
    serial, want = engines[0], {}
    while serial.has_unfinished():
        for out in serial.step():
            got = want.setdefault(out.request_id, [])
            got += out.new_token_ids
            if not out.finished and len(got) >= cancel_after.get(out.request_id, 1 << 30):
                serial.abort(out.request_id)
    run = run_overlapped(engines[1], cancel_after=cancel_after)
    assert run.tokens == want
    assert engines[1].scheduler.preemptions > 0, "the pool was meant to be small enough to preempt"
    for engine in engines:
        engine.pool.check()
        assert engine.pool.usage()["kv"] == 0 and not engine.scheduler.running and not engine.scheduler.waiting

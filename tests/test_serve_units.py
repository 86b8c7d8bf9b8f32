"""Serving building blocks without a server: message schema, shared-memory ring channels, the admission
policy, request parsing, and the scheduler actor driving an in-process executor."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.actors.admission import AdmissionPolicy
from lorafleet.actors.channels import ChannelClosed, LocalChannel, RingChannel, RingEndpoint, RingFull, ShmRing
from lorafleet.actors.protocol import ApiError, ParseContext, parse_generation, parse_ws_generate
from lorafleet.actors.schema import (
    AdapterFetched,
    DeltaItem,
    RunStep,
    SchedulerStats,
    SchemaError,
    StagedAdapter,
    StepDeltas,
    StepResult,
    Submit,
    decode,
    encode,
    to_wire,
)
from lorafleet.engine.request import PENDING_TOKEN

# schema -------------------------------------------------------------------------------------------


def test_schema_round_trips_nested_messages():
    staged = StagedAdapter("a", "seg", 128, [2, 3, 64], "float32", 2.0, 4, {"q_proj": 4}, {"q_proj": [[0, 8], [64]]}, 3)
    msgs = [
        RunStep({"step": 1, "seqs": []}, [staged]),
        StepResult(3, 0, [1, 2, 3], 0.5),
        StepDeltas(7, [DeltaItem("r1", [5], "x"), DeltaItem("r2", [], "", True, "stop", 3, 4, None, None, 1.0)]),
        Submit("r", [1, 2], {"max_tokens": 3, "stop": ["a"]}, None, None, 1.5, 9),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize("raw, fragment", [
    ({"type": "nope"}, "unknown message type"),
    ({"step": 1}, "unknown message type"),
    ({"type": "step_result", "step": 1, "rank": 0, "sampled": [1]}, "step_result.seconds: missing"),
    ({"type": "step_result", "step": 1, "rank": 0, "sampled": [1], "seconds": 1.0, "x": 1}, ".x: unknown field"),
    ({"type": "step_result", "step": "1", "rank": 0, "sampled": [1], "seconds": 1.0}, ".step: must be int"),
    ({"type": "step_result", "step": 1, "rank": 0, "sampled": [1, "2"], "seconds": 1.0}, "sampled[1]: must be int"),
    ({"type": "step_result", "step": True, "rank": 0, "sampled": [], "seconds": 1.0}, ".step: must be int"),
    ({"type": "run_step", "plan": {}, "staged": [{"type": "shutdown"}]}, "staged[0]: must be a 'staged_adapter'"),
])
def test_schema_rejects_malformed_frames(raw, fragment):
    with pytest.raises(SchemaError, match=None) as info:
        decode(msgpack.packb(raw))
    assert fragment in str(info.value)


def test_schema_rejects_garbage_and_in_process_only_messages():
    with pytest.raises(SchemaError, match="not valid msgpack"):
        decode(b"\xc1\xc1")
    with pytest.raises(SchemaError, match="must be a map"):
        decode(msgpack.packb([1, 2]))
    with pytest.raises(SchemaError, match="in-process only"):
        encode(AdapterFetched("a", "/p", object(), 0.1))


# shared-memory ring ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=60))
def test_ring_preserves_frames_across_wraparound(frames):
    ring = ShmRing.create(capacity=1024)
    try:
        pending: list[bytes] = []
        got: list[bytes] = []
        rng = random.Random(len(frames))
        for frame in frames:
            try:
                ring.write(frame)
                pending.append(frame)
            except RingFull:
                got.append(ring.read())
                ring.write(frame)
                pending.append(frame)
            if rng.random() < 0.5:
                got.append(ring.read())
        while (frame := ring.read()) is not None:
            got.append(frame)
        assert [g for g in got if g is not None] == pending
    finally:
        ring.close()


def test_ring_refuses_a_frame_larger_than_its_space():
    ring = ShmRing.create(capacity=64)
    try:
        with pytest.raises(RingFull):
            ring.write(b"x" * 61)
        ring.write(b"x" * 60)
        assert ring.read() == b"x" * 60
    finally:
        ring.close()


async def test_ring_channel_talks_to_a_blocking_endpoint_and_sees_its_end():
    a_to_b, b_to_a = ShmRing.create(), ShmRing.create()
    wake_b_r, wake_b_w = os.pipe()
    wake_a_r, wake_a_w = os.pipe()
    channel = RingChannel(a_to_b, b_to_a, wake_b_w, wake_a_r)
    endpoint = RingEndpoint(b_to_a, a_to_b, wake_a_w, wake_b_r)

    def echo() -> None:
        while True:
            msg = endpoint.recv()
            if isinstance(msg, StepResult) and msg.step < 0:
                break
            endpoint.send(StepResult(msg.step + 1, msg.rank, msg.sampled[::-1], msg.seconds))
        os.close(wake_a_w)

    thread = threading.Thread(target=echo)
    thread.start()
    for i in range(50):
        channel.send(StepResult(i, 0, [i, i + 1], 0.0))
    replies = [await asyncio.wait_for(channel.recv(), 10) for _ in range(50)]
    channel.send(StepResult(-1, 0, [], 0.0))
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(channel.recv(), 10)
    await asyncio.to_thread(thread.join)
    assert [r.step for r in replies] == list(range(1, 51))
    assert replies[3].sampled == [4, 3]
    channel.close()
    os.close(wake_b_r)
    a_to_b.close()
    b_to_a.close()


# admission ------------------------------------------------------------------------------------------


def _submit(n_tokens: int = 10, slo: float | None = None) -> Submit:
    return Submit("r", list(range(n_tokens)), {}, None, slo, 0.0)


def test_admission_bounds_the_queue_counting_unseen_submits():
    policy = AdmissionPolicy(max_queue=2, max_batch_tokens=100)
    assert policy.decide(_submit()) is None
    policy.admitted(_submit())
    assert policy.decide(_submit()) is None
    policy.admitted(_submit())
    refusal = policy.decide(_submit())
    assert refusal is not None and refusal.code == "queue_full" and refusal.status == 429
    assert refusal.retry_after >= 1
    policy.observe(SchedulerStats(1, seen_seq=2, num_waiting=0, num_running=2, waiting_tokens=0, step_ms=10.0))
    assert policy.queue_length() == 0 and policy.decide(_submit()) is None


def test_admission_early_aborts_requests_that_cannot_meet_their_slo():
    policy = AdmissionPolicy(max_queue=100, max_batch_tokens=100)
    assert policy.decide(_submit(50, slo=1.0)) is None  # nothing measured yet: no estimate, no refusal
    policy.observe(SchedulerStats(5, seen_seq=0, num_waiting=3, num_running=0, waiting_tokens=350, step_ms=20.0))
    # 350 waiting + 50 own tokens at 100 per step = 4 steps, + 1 step = 100 ms
    assert policy.estimate_ttft_ms(50) == pytest.approx(100.0)
    assert policy.decide(_submit(50, slo=150.0)) is None
    refusal = policy.decide(_submit(50, slo=99.0))
    assert refusal is not None and refusal.code == "slo_unattainable" and refusal.param == "slo_ttft_ms"
    assert policy.decide(_submit(50, slo=None)) is None


# request parsing ------------------------------------------------------------------------------------


class _Tok:
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 200) for c in text]


CTX = ParseContext("base", {"a1"}, max_model_len=64, vocab_size=300, tokenizer=_Tok())


@pytest.mark.parametrize("body, code, param", [
    ({"prompt": "x", "model": "zz"}, "model_not_found", "model"),
    ({"prompt": "x", "model": 3}, "invalid_parameter", "model"),
    ({"prompt": ""}, "invalid_parameter", "prompt"),
    ({"prompt": [1, 2, 999]}, "invalid_parameter", "prompt"),
    ({"prompt": ["a", ""]}, "invalid_parameter", "prompt[1]"),
    ({"prompt": [[1], [999]]}, "invalid_parameter", "prompt[1]"),
    ({"prompt": "x", "max_tokens": 0}, "invalid_parameter", "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "invalid_parameter", "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "invalid_parameter", "temperature"),
    ({"prompt": "x", "top_k": -5}, "invalid_parameter", "top_k"),
    ({"prompt": "x", "n": 17}, "invalid_parameter", "n"),
    ({"prompt": ["x"] * 20, "n": 16}, "invalid_parameter", "n"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "unsupported_parameter", "best_of"),
    ({"prompt": "x", "logprobs": 21}, "invalid_parameter", "logprobs"),
    ({"prompt": "x", "suffix": "y"}, "unsupported_parameter", "suffix"),
    ({"prompt": "x", "no_such": 1}, "unknown_parameter", "no_such"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "invalid_parameter", "stream_options"),
    ({"prompt": "x", "stop": ["s"] * 17}, "invalid_parameter", "stop"),
    ({"prompt": "x", "stop": 5}, "invalid_parameter", "stop"),
    ({"prompt": "x" * 64}, "context_length_exceeded", "prompt"),
    ({"prompt": "x" * 60, "max_tokens": 10}, "context_length_exceeded", "max_tokens"),
    ({"prompt": "x", "slo_ttft_ms": -1}, "invalid_parameter", "slo_ttft_ms"),
    ({"prompt": "x", "stream": "yes"}, "invalid_parameter", "stream"),
])
def test_parse_rejects_bad_fields_naming_them(body, code, param):
    with pytest.raises(ApiError) as info:
        parse_generation(body, CTX, chat=False)
    assert (info.value.code, info.value.param) == (code, param)
    assert info.value.body()["error"]["param"] == param


def test_parse_accepts_openai_and_ws_shapes():
    spec = parse_generation({"prompt": "hi", "model": "a1", "stop": "x", "max_tokens": 5, "stream": True,
                             "stream_options": {"include_usage": True}, "return_token_ids": True}, CTX, chat=False)
    assert spec.adapter == "a1" and spec.params["stop"] == ("x",) and spec.include_usage and spec.return_token_ids
    chat = parse_ws_generate({"type": "generate", "id": "c", "messages": [{"role": "user", "content": "yo"}]}, CTX)
    assert chat.adapter is None and chat.prompt_ids == _Tok().encode("user: yo\nassistant:")
    with pytest.raises(ApiError):
        parse_ws_generate({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, CTX)


# the scheduler actor over an in-process executor --------------------------------------------------------


class _InProcessGroup:
    """ExecutorGroup stand-in: runs the plan on the engine's own ModelRunner."""

    def __init__(self, runner) -> None:
        self.runner, self.steps, self.ahead = runner, 0, 0  # ahead: plans made before the previous result
        self.results: list[StepResult] = []

    def send(self, plan, packed):
        assert len(self.results) < 2, "at most one step queued behind the one running"
        self.steps += 1
        self.ahead += any(PENDING_TOKEN in s.token_ids for s in plan.seqs)
        output = self.runner.execute(plan).to_wire()
        self.results.append(StepResult(plan.step, 0, output["sampled"], 0.0, output["logprobs"],
                                       output["prompt_logprobs"]))

    async def receive(self):
        await asyncio.sleep(0)
        return self.results.pop(0)


async def test_scheduler_actor_emits_one_message_per_step_matching_offline(tiny_llama, tmp_path):
    from conftest import make_peft_adapter
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.scheduler import SchedulerActor
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    adapters = {f"r{r}": str(make_peft_adapter(tiny_llama, tmp_path / f"r{r}", r, seed=r)) for r in (2, 8)}
    prompts = [[5 + i, 9, 30 + i] for i in range(6)]
    names = ["r2", "r8", None, "r2", "r8", None]
    want = LLM(str(tiny_llama), adapters=adapters).generate(prompts, adapters=names, max_tokens=6)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    boxes = [LocalChannel() for _ in range(4)]
    inbox, router, admission, prefetch = boxes
    actor = SchedulerActor(engine, _InProcessGroup(engine.executor), inbox, router, admission, prefetch, ServeHub())
    task = asyncio.create_task(actor.run())
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        inbox.send(Submit(f"q{i}", prompt, {"max_tokens": 6, "temperature": 0.0}, name, None, 0.0, i + 1))
    tokens: dict[str, list[int]] = {f"q{i}": [] for i in range(6)}
    finished, messages = set(), 0
    while len(finished) < 6:
        msg = await asyncio.wait_for(router.recv(), 60)
        if isinstance(msg, StepDeltas):
            messages += 1
            assert len({item.request_id for item in msg.items}) == len(msg.items)
            for item in msg.items:
                tokens[item.request_id] += item.token_ids
                if item.finished:
                    finished.add(item.request_id)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [tokens[f"q{i}"] for i in range(6)] == [w.token_ids for w in want]
    assert messages == actor.executors.steps  # every step samples here: one StepDeltas message each
    assert actor.executors.ahead > 0, "the actor never planned a step while the previous one ran"
    assert engine.pool.usage()["kv"] == 0


async def test_scheduler_actor_fails_only_requests_whose_adapter_cannot_be_staged(tiny_llama, tmp_path):
    from conftest import make_peft_adapter
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.scheduler import SchedulerActor
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    good = str(make_peft_adapter(tiny_llama, tmp_path / "good", 4, seed=1))
    bad = str(make_peft_adapter(tiny_llama, tmp_path / "bad", 2, seed=2))
    want = LLM(str(tiny_llama), adapters={"good": good}).generate([[7, 8, 9], [4, 5]], adapters=["good", None],
                                                                   max_tokens=5)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {"good": good, "bad": bad})
    engine.store.cache.pop("bad")  # not in the host cache, and its file is now corrupt: staging must fail
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    hub = ServeHub()
    actor = SchedulerActor(engine, _InProcessGroup(engine.executor), inbox, router, admission, prefetch, hub)
    task = asyncio.create_task(actor.run())
    for rid, prompt, name in (("g", [7, 8, 9], "good"), ("b", [1, 2, 3], "bad"), ("n", [4, 5], None)):
        inbox.send(Submit(rid, prompt, {"max_tokens": 5, "temperature": 0.0}, name, None, 0.0))
    tokens: dict[str, list[int]] = {"g": [], "n": []}
    ends: dict[str, DeltaItem] = {}
    while len(ends) < 3:
        msg = await asyncio.wait_for(router.recv(), 60)
        for item in msg.items if isinstance(msg, StepDeltas) else []:
            tokens.setdefault(item.request_id, []).extend(item.token_ids)
            if item.finished:
                ends[item.request_id] = item
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert ends["b"].error_code == "adapter_invalid" and "bad" not in engine.store.infos
    assert [tokens["g"], tokens["n"]] == [w.token_ids for w in want]
    assert engine.pool.usage()["kv"] == 0
    engine.pool.check()


async def test_prefetcher_loads_into_the_host_cache_through_the_scheduler(tiny_llama, tmp_path):
    import torch

    from conftest import make_peft_adapter
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.prefetcher import AdapterLoader, PrefetcherActor
    from lorafleet.actors.scheduler import SchedulerActor
    from lorafleet.actors.schema import AdapterFetchFailed, Prefetch
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    path = str(make_peft_adapter(tiny_llama, tmp_path / "p", 4, seed=3))
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {"p": path})
    reference = engine.store.cache.pop("p").pages
    hub = ServeHub()
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    loader = AdapterLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    prefetcher = PrefetcherActor(loader, prefetch, inbox, hub)
    actor = SchedulerActor(engine, _InProcessGroup(engine.executor), inbox, router, admission, prefetch, hub)
    prefetch_task = asyncio.create_task(prefetcher.run())
    prefetch.send(Prefetch({"missing": str(tmp_path / "nope"), "p": path}))  # in order: the failure first
    failed = await asyncio.wait_for(inbox.recv(), 60)
    assert isinstance(failed, AdapterFetchFailed) and failed.name == "missing" and "adapter_config" in failed.message
    await actor._handle(failed)  # not registered: nothing to fail
    fetched = await asyncio.wait_for(inbox.recv(), 60)
    await actor._handle(fetched)
    prefetch_task.cancel()
    await asyncio.gather(prefetch_task, return_exceptions=True)
    assert engine.store.is_cached("p") and torch.equal(engine.store.cache["p"].pages, reference)
    assert (hub.prefetch.requested, hub.prefetch.loaded, hub.prefetch.failed) == (2, 1, 1)


@pytest.mark.parametrize("dtype, shards", [("float32", 1), ("float16", 1), ("bfloat16", 1), ("float32", 2)])
def test_stager_moves_adapter_pages_through_shared_memory(dtype, shards):
    import torch

    from lorafleet.actors.executor import StagedReader, Stager
    from lorafleet.engine.adapter_store import AdapterInfo, PackedAdapter
    from lorafleet.engine.layout import AdapterLayout

    dims = {"q_proj": (64, 64), "v_proj": (64, 32)}
    packs = []
    for name, rank in (("a", 2), ("b", 5)):
        layout = AdapterLayout.build({"q_proj": rank, "v_proj": rank}, dims, 256)
        info = AdapterInfo(name, "", rank, 0.5 * rank, {"q_proj": rank, "v_proj": rank}, layout)
        shape = (3, layout.num_pages, 256) if shards == 1 else (shards, 3, layout.num_pages, 256)
        packs.append(PackedAdapter(info, torch.randn(shape).to(getattr(torch, dtype)), shards))
    stager = Stager(initial_bytes=1024)  # too small: staging must grow into a new segment
    reader = StagedReader(256)
    try:
        staged = stager.stage(packs)
        reader.set_step(staged)
        for pack in packs:
            got = reader.fetch(pack.info.name)
            assert torch.equal(got.pages, pack.pages) and got.pages.dtype == pack.pages.dtype
            assert got.info == pack.info and got.shards == shards
            assert torch.equal(got.for_rank(shards - 1), pack.for_rank(shards - 1))
        stager.release_retired()
        with pytest.raises(KeyError, match="not staged"):
            reader.fetch("c")
    finally:
        reader.close()
        stager.close()


def test_stager_stages_the_next_step_without_touching_the_running_one():
    """Step n+1 is staged while step n's executor may still read its pages: the two use different segments."""
    import torch

    from lorafleet.actors.executor import StagedReader, Stager
    from lorafleet.engine.adapter_store import AdapterInfo, PackedAdapter
    from lorafleet.engine.layout import AdapterLayout

    def pack(name: str, rank: int) -> PackedAdapter:
        layout = AdapterLayout.build({"q_proj": rank}, {"q_proj": (64, 64)}, 256)
        info = AdapterInfo(name, "", rank, 1.0, {"q_proj": rank}, layout)
        return PackedAdapter(info, torch.randn(2, layout.num_pages, 256))

    stager, reader = Stager(initial_bytes=1 << 16), StagedReader(256)
    try:
        first, second, third = pack("a", 4), pack("b", 8), pack("c", 2)
        reader.set_step(stager.stage([first]))
        running = reader.fetch("a").pages  # step n reads this view while step n+1 is staged
        staged = stager.stage([second])
        assert torch.equal(running, first.pages), "staging step n+1 overwrote step n's pages"
        del running
        reader.set_step(staged)
        assert torch.equal(reader.fetch("b").pages, second.pages)
        reader.set_step(stager.stage([third]))  # step n is done by now: its segment is reused
        assert torch.equal(reader.fetch("c").pages, third.pages)
        assert len({s.name for s in stager.segments}) == 2 and len(reader.segments) == 2
    finally:
        reader.close()
        stager.close()


@pytest.mark.parametrize("shape", ["tiny", "llama-2-7b"])
def test_plan_ring_holds_two_worst_case_steps(shape):
    """Every sequence at the longest context, a full token budget, a full batch of max-rank adapter loads."""
    from lorafleet.actors.executor import plan_bytes_bound, plan_ring_bytes
    from lorafleet.engine.config import EngineConfig, ModelConfig, page_geometry
    from lorafleet.engine.plan import AdapterLoad, SeqPlan, StepPlan
    from lorafleet.engine.synthetic import SHAPES

    cfg = ModelConfig.from_dict(dict(SHAPES[shape]))
    config = EngineConfig(max_num_seqs=64, max_batch_tokens=2048, max_adapters_per_batch=32, max_lora_rank=64)
    bound = plan_bytes_bound(cfg, config)
    block_tokens, page_elements = page_geometry(cfg, config.block_tokens)
    blocks = -(-cfg.context_limit // block_tokens)
    big = 2**31 - 1
    seqs = [SeqPlan(big, [cfg.vocab_size - 1] * (2048 - 63 if i == 0 else 1), cfg.context_limit - 1, [big] * blocks,
                    31, True, 0.7, 0.9, 50, 2**62, 2**20) for i in range(64)]
    dims = cfg.module_dims()
    pages = -(-64 * sum(i + o for i, o in dims.values()) // page_elements)
    names = [f"synthetic-{1000 + i}" for i in range(34)]
    plan = StepPlan(big, seqs, names[:32], [AdapterLoad(n, [big] * pages) for n in names], names[:8])
    staged = [StagedAdapter(n, "psm_0123456789ab", big, [32, pages, page_elements], "bfloat16", 0.125, 64,
                            {m: 64 for m in dims}, {m: [[big] * 64, [big] * 64] for m in dims}, pages) for n in names]
    size = len(encode(RunStep(plan.to_wire(), staged)))
    assert size <= bound, f"a worst-case step encodes to {size} bytes, the estimate is {bound}"
    assert plan_ring_bytes(cfg, config) >= 2 * size


_TAGS = ["submit", "cancel", "step_result", "run_step", "staged_adapter", "step_deltas", "delta_item", "nope",
         "adapter_fetched"]
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True), st.text(max_size=5))
_VALUE = st.recursive(_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_TAGS), st.dictionaries(st.sampled_from(["request_id", "step", "rank", "sampled", "seconds",
                                                                "items", "plan", "staged", "prompt_ids", "x"]),
                                               _VALUE, max_size=6))
def test_schema_decoding_fuzz_only_raises_schema_errors(tag, fields):
    try:
        msg = decode(msgpack.packb({"type": tag, **fields}))
    except SchemaError:
        return
    assert decode(encode(msg)) == msg or msg != msg  # a decoded message re-encodes (NaN never equals itself)


_ITEM = st.builds(DeltaItem, st.text(max_size=4), st.lists(st.integers(0, 2**31), max_size=3), st.text(max_size=4))
_NESTED = st.recursive(st.one_of(_LEAF, _ITEM), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=16)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _NESTED, max_size=4), st.lists(_ITEM, max_size=4),
       st.lists(st.tuples(st.integers(0, 2**40), st.lists(st.integers(-1, 2**31), max_size=5), st.booleans(),
                          st.floats(allow_nan=False)), max_size=4))
def test_schema_encode_is_the_packed_plain_map(plan, items, rows):
    """encode lets msgpack walk lists and maps (calling back only for nested messages): its bytes are those of
    the fully converted map that to_wire builds, for nested messages at any depth, tuples and plan rows."""
    staged = StagedAdapter("a", "seg", 128, [2, 3, 64], "float32", 2.0, 4, {"q_proj": 4}, {"q_proj": [[0, 8], [64]]}, 3)
    for msg in (RunStep({**plan, "seqs": rows}, [staged]), StepDeltas(3, items), StepResult(1, 0, [5, 6], 0.25)):
        assert encode(msg) == msgpack.packb(to_wire(msg), use_bin_type=True)
        # repr: NaN leaves (allowed in _LEAF) compare unequal to themselves
        assert repr(decode(encode(msg))) == repr(decode(msgpack.packb(to_wire(msg), use_bin_type=True)))


def test_schema_encode_refuses_what_to_wire_refuses():
    inner = AdapterFetched("a", "/p", object(), 0.1)
    for bad_msg, error in ((RunStep({"x": [inner]}), SchemaError), (RunStep({"x": object()}), TypeError)):
        with pytest.raises(error):
            msgpack.packb(to_wire(bad_msg), use_bin_type=True)
        with pytest.raises(error):
            encode(bad_msg)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([int, float, str, bool]), st.lists(_LEAF, max_size=6))
def test_schema_list_fast_path_is_the_per_item_check(item, value):
    """Decoding list[T] of scalars checks the whole list at once; its result, or its error naming the first bad
    item, is what converting item by item gives."""
    from lorafleet.actors import schema

    def outcome(fn):
        try:
            return fn()
        except SchemaError as exc:
            return str(exc)

    got = outcome(lambda: schema._convert(value, list[item], "m.f"))
    want = outcome(lambda: [schema._convert(v, item, f"m.f[{i}]") for i, v in enumerate(value)])
    assert got == want and [type(v) for v in got] == [type(v) for v in want] if isinstance(got, list) else got == want


def test_adapter_root_names_adapters_by_relative_path(tmp_path):
    from lorafleet.engine.adapter_index import scan_adapter_root

    for rel in ("sql", "team-a/summarize", "team-a/deep/x"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    assert scan_adapter_root(tmp_path) == {
        "sql": str(tmp_path / "sql"), "team-a/deep/x": str(tmp_path / "team-a/deep/x"),
        "team-a/summarize": str(tmp_path / "team-a/summarize")}


def test_admission_counts_only_the_submits_the_scheduler_has_not_seen():
    policy = AdmissionPolicy(max_queue=10, max_batch_tokens=100)
    for n in (30, 40, 50):
        policy.admitted(_submit(n))
    policy.observe(SchedulerStats(1, seen_seq=2, num_waiting=2, num_running=0, waiting_tokens=70, step_ms=10.0))
    assert policy.unseen_tokens == 50 and policy.queue_length() == 3
    # 70 waiting + 50 unseen + 80 own = 200 tokens at 100 per step = 2 steps, + 1 step = 30 ms
    assert policy.estimate_ttft_ms(80) == pytest.approx(30.0)


@pytest.mark.parametrize("name", ["\x1b[31mred", "a\x00b", "\u202eevil", "line\nbreak", "tab\tx", 'q"=x'])
def test_text_log_values_escape_every_unprintable_character(name):
    """An adapter name (any string a client or an upload chooses) with a terminal escape, NUL or a bidi
    override went into the text log raw; every such value is JSON-quoted now, one line, printable."""
    import json
    import logging

    from lorafleet.actors.logs import TextFormatter

    record = logging.LogRecord("lorafleet.adapters", logging.INFO, __file__, 1, "adapter registered", None, None)
    record.fields = {"adapter": name, "step": 3}
    line = TextFormatter().format(record)
    assert line.isprintable() and line.endswith(" step=3")
    value = line.split(" adapter=", 1)[1].rsplit(" step=", 1)[0]
    assert json.loads(value) == name

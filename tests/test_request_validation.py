"""Every request field bounded before it reaches an actor or a wire format: one validation path
(`parse_generation`) for OpenAI bodies and WS frames, errors naming the field; what passes can be packed
into the scheduler's msgpack messages."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.actors.fields import MAX_DEPTH, ApiError, check_document
from lorafleet.actors.protocol import SAMPLING_PARAMS, ParseContext, client_id, parse_generation, parse_ws_generate
from lorafleet.actors.schema import Submit, encode
from lorafleet.engine.plan import SeqPlan, StepPlan


class _Tok:
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 200) for c in text]


VOCAB = 300
CTX = ParseContext("base", {"a1"}, max_model_len=64, vocab_size=VOCAB, tokenizer=_Tok())
BIG = 10**400  # the JSON integer literal 1 followed by 400 zeros


def _refused(body: dict, chat: bool = False) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_generation(body, CTX, chat)
    assert info.value.status == 400 or info.value.status == 404
    return info.value


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", BIG), ("seed", 1.5), ("seed", True),
    ("top_k", 2**64), ("top_k", VOCAB + 1), ("top_k", -2), ("top_k", 2.0),
    ("max_tokens", 2**64), ("max_tokens", BIG), ("max_tokens", 0), ("max_completion_tokens", -1),
    ("temperature", BIG), ("temperature", -BIG), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", 100.5), ("temperature", "0"), ("top_p", 0), ("top_p", 0.0), ("top_p", 1 + 1e-12),
    ("top_p", BIG), ("top_p", -math.inf), ("slo_ttft_ms", BIG), ("slo_ttft_ms", 0), ("slo_ttft_ms", math.nan),
    ("stop", "\ud800"), ("stop", ["ok", "x\udfff"]), ("stop", [""]), ("stop", ["s"] * 17), ("stop", "x" * 257),
    ("stop", [1]), ("stop_token_ids", [VOCAB]), ("stop_token_ids", [-1]), ("stop_token_ids", [2**64]),
    ("stop_token_ids", list(range(1025))), ("stop_token_ids", "1"), ("ignore_eos", 1), ("stream", "yes"),
    ("stream_options", []), ("return_token_ids", 0), ("n", 2**64), ("best_of", BIG),
    ("model", "\ud800"), ("model", "m" * 1025), ("model", 3), ("prompt", "\ud800"), ("prompt", [1, 2**64]),
    ("prompt", [1, VOCAB]), ("prompt", [[1], [VOCAB]]), ("prompt", list(range(65))), ("prompt", {"a": 1}),
    ("logprobs", 2**64), ("echo", "yes"),
])
def test_out_of_range_fields_are_refused_naming_the_field(field, value):
    body = {"prompt": "hi", field: value}
    error = _refused(body)
    assert error.param is not None and error.param.split("[")[0].split(".")[0] in (field, "prompt"), error
    assert error.code in ("invalid_parameter", "unsupported_parameter", "context_length_exceeded"), error
    assert len(error.message) < 400


def test_seed_bounds_are_the_signed_64_bit_range():
    for seed in (-(2**63), 2**63 - 1, 0, -1):
        spec = parse_generation({"prompt": "hi", "seed": seed}, CTX, chat=False)
        assert spec.params["seed"] == seed
        encode(Submit("r", spec.prompt_ids, spec.params, None, None, 0.0))  # the scheduler's wire form
        msgpack.packb(StepPlan(0, [SeqPlan(0, [1], 0, [0], -1, True, seed=seed)]).to_wire())
    assert _refused({"prompt": "hi", "seed": 2**63}).param == "seed"


def test_top_k_up_to_the_vocabulary_is_accepted():
    assert parse_generation({"prompt": "hi", "top_k": VOCAB}, CTX, chat=False).params["top_k"] == VOCAB


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "extra": {"deep": _nested(MAX_DEPTH + 5)}}, "extra.deep"),
    ({"prompt": "hi", "stop": _nested(10_000)}, "stop"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]}, "messages[0].content"),
    ({"prompt": "hi", "\ud800": 1}, "body"),
    ({"prompt": "hi", "x": b"bytes"}, "x"),
    ({"prompt": "hi", "x": msgpack.ExtType(5, b"z")}, "x"),
    ({"prompt": "hi", "x": [msgpack.Timestamp(1, 0)]}, "x[0]"),
])
def test_document_checks_name_the_path(body, param):
    chat = "messages" in body
    error = _refused(body, chat)
    assert error.param.startswith(param), error


def test_deep_nesting_is_refused_without_recursion():
    check_document({"a": _nested(MAX_DEPTH - 2)})
    with pytest.raises(ApiError) as info:
        check_document({"a": _nested(100_000)})
    assert info.value.param.startswith("a")


def test_ws_id_must_be_text():
    for bad_id in ("\ud800", "", "x" * 257, 5, None, ["a"]):
        with pytest.raises(ApiError) as info:
            client_id({"id": bad_id})
        assert info.value.param == "id"
    assert client_id({"id": "é€😀"}) == "é€😀"


def test_chat_template_that_raises_is_400_naming_messages():
    """A template that refuses non-alternating roles (as Llama-2's does, with raise_exception)."""
    from lorafleet.engine.demo import demo_model_dir
    from lorafleet.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_model_dir())
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    ctx = ParseContext("base", set(), 256, 256, tokenizer)
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert parse_generation({"messages": good}, ctx, chat=True).prompt_ids
    with pytest.raises(ApiError) as info:
        parse_ws_generate({"messages": [good[0], good[0]]}, ctx)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_parameter", "messages")
    assert "roles must alternate" in info.value.message


ALTERNATING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}{{ message['content'] }}{{ '\\n' }}{%- endfor -%}"
)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["\ud800", "x\udfff", BIG, -BIG, 2**64, 2**63, -(2**63) - 1, 1e-300, 5e-324, 1e308]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
FIELDS = [p.name for p in SAMPLING_PARAMS] + ["prompt", "messages", "model", "stream", "stream_options",
                                              "slo_ttft_ms", "n", "best_of", "logprobs", "max_completion_tokens"]


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6), chat=st.booleans())
def test_any_body_is_a_spec_that_packs_or_an_api_error_naming_a_field(body, chat):
    try:
        spec = parse_generation(body, CTX, chat)
    except ApiError as exc:
        assert exc.param, exc
        assert exc.status in (400, 404)
        return
    encode(Submit("r", spec.prompt_ids, spec.params, spec.adapter, spec.slo_ttft_ms, 0.0))
    assert all(math.isfinite(v) for v in spec.params.values() if isinstance(v, float))


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo",
     "unknown_parameter"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "invalid_parameter"),
    ({"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text", "strict": True}},
     "response_format.strict", "unknown_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
     "invalid_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     "invalid_parameter"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 6},
     "max_completion_tokens", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 0},
     "max_completion_tokens", "invalid_parameter"),
    ({"prompt": ["ok", "x" * 70]}, "prompt[1]", "context_length_exceeded"),
    ({"prompt": [[5], [5] * 64]}, "prompt[1]", "context_length_exceeded"),
    ({"prompt": "x" * 70}, "prompt", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[1].type", "unsupported_parameter"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages[1].content[0].type", "unsupported_parameter"),
])
def test_nested_fields_are_checked_and_named_by_their_path(body, param, code):
    """Inside `stream_options`, `response_format` and content parts nothing is silently ignored or defaulted: an
    unknown key, a wrong type, a missing text or a non-text part is 400 naming its path (OpenAI's shape); so is a
    completion limit sent under both its names with different values, and the one prompt of a list that does
    not fit the context."""
    error = _refused(body, "messages" in body)
    assert (error.param, error.code) == (param, code), error


def test_known_nested_fields_and_text_parts_are_served():
    spec = parse_generation({"prompt": "hi", "stream": True, "stream_options": {
        "include_usage": True, "include_obfuscation": False, "continuous_usage_stats": False}}, CTX, chat=False)
    assert spec.include_usage
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    chat = parse_generation({"messages": [{"role": "user", "content": parts}],
                             "response_format": {"type": "text"}}, CTX, chat=True)
    plain = parse_generation({"messages": [{"role": "user", "content": "hi"}]}, CTX, chat=True)
    assert chat.prompt_ids == plain.prompt_ids
    both = parse_generation({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "max_completion_tokens": 3}, CTX, chat=True)
    assert both.params["max_tokens"] == 3

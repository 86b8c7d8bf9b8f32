"""OpenAI compatibility with the clients people use, over real sockets against `lorafleet serve` on the embedded
demo model (it echoes its input line; its adapters transform it): the `openai` client (sync, async, streaming,
its exception classes, models.retrieve), litellm, langchain-openai and lm-eval's `local-completions`.

Logprobs are checked against HF transformers' log-softmax of the demo model at the same positions."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest
import torch
from test_serve_support import start_server, stop_server

openai = pytest.importorskip("openai")

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server():
    proc = start_server([])
    yield proc
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def base(client) -> str:
    from lorafleet.engine.demo import TASKS

    return next(m.id for m in client.models.list().data if m.id not in TASKS)


@pytest.fixture(scope="module")
def hf():
    """The demo model in HF transformers (fp32) with its tokenizer: the independent truth for logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.engine.demo import demo_adapter_dirs, demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(demo_adapter_dirs()["upper"]), adapter_name="upper")
    return model.eval(), tokenizer


def _hf_logprobs(hf, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids), vocab] log-softmax: row p is the distribution of the token at position p + 1."""
    model, _ = hf
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


# the openai client ----------------------------------------------------------------------------------------


def test_completions_prompt_forms_n_and_choice_index(client, base, hf):
    """One choice per prompt x n; `index` = prompt index * n + sample index (OpenAI's numbering)."""
    lines = ["abc de", "hello", "xyz"]
    out = client.completions.create(model=base, prompt=[x + "\n" for x in lines], max_tokens=16, temperature=0, n=2)
    assert sorted(c.index for c in out.choices) == list(range(6))
    for choice in out.choices:
        assert choice.text == lines[choice.index // 2] + "\n", choice
    assert out.usage.prompt_tokens == sum(len(x) + 1 for x in lines)
    tokenizer = hf[1]
    ids = client.completions.create(model=base, prompt=[tokenizer.encode("hi\n"), tokenizer.encode("g\n")],
                                    max_tokens=4, temperature=0)
    assert [c.text for c in sorted(ids.choices, key=lambda c: c.index)] == ["hi\n", "g\n"]
    single = client.completions.create(model="upper", prompt=tokenizer.encode("abc\n"), max_tokens=5, temperature=0)
    assert single.choices[0].text == "ABC\n"


def test_n_samples_equal_single_requests_with_derived_seeds(client, base):
    """n samples with seed s are the n single requests with seeds s, s + 1, ... (vLLM's derivation)."""
    kwargs = dict(model="reverse", prompt="lorafleet\n", max_tokens=10, temperature=1.5)
    many = client.completions.create(n=3, seed=41, **kwargs)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts == [client.completions.create(seed=41 + i, **kwargs).choices[0].text for i in range(3)]
    assert len(set(texts)) > 1, "temperature 1.5 samples should differ"
    chat = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "abc"}], n=2, seed=5,
                                          temperature=1.5, max_tokens=6)
    assert [c.index for c in chat.choices] == [0, 1]


def test_echo_logprobs_equal_hf_log_softmax(client, hf):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 1, over prompt and completion tokens."""
    _, tokenizer = hf
    prompt = "lorafleet\nLORA"
    out = client.completions.create(model="upper", prompt=prompt, echo=True, logprobs=3, max_tokens=1,
                                    temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    ids = tokenizer.encode(prompt)
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    all_ids = ids + [tokenizer.convert_tokens_to_ids(lp.tokens[-1])]
    want = _hf_logprobs(hf, all_ids, "upper")
    for position in range(1, len(all_ids)):
        assert abs(lp.token_logprobs[position] - float(want[position - 1, all_ids[position]])) < 1e-4
        top = torch.topk(want[position - 1], 3)
        got = lp.top_logprobs[position]
        assert len(got) == 3
        for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(got[tokenizer.convert_ids_to_tokens(token_id)] - value) < 1e-4


def test_chat_logprobs_and_default_max_tokens(client, base, hf):
    """Chat logprobs (top_logprobs) equal HF's; without max_tokens a chat runs to the end of the context."""
    _, tokenizer = hf
    out = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hello"}], logprobs=True,
                                         top_logprobs=2, temperature=0)
    content = out.choices[0].logprobs.content
    ids = tokenizer.encode("hello\n")
    generated = [tokenizer.convert_tokens_to_ids(c.token) for c in content]
    want = _hf_logprobs(hf, ids + generated, None)
    for i, entry in enumerate(content):
        assert abs(entry.logprob - float(want[len(ids) - 1 + i, generated[i]])) < 1e-4
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert out.choices[0].message.content == "hello\n"
    long = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "abc"}], temperature=0,
                                          extra_body={"ignore_eos": True})
    max_model_len = client.models.retrieve(base).model_extra["max_model_len"]
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == max_model_len - long.usage.prompt_tokens


def test_chat_histories_of_agents_are_accepted(client, base):
    """Assistant turns with content null and tool_calls, tool results, and other roles reach the template."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "qwe"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "ipython", "content": "x"},
        {"role": "user", "content": "abc"},
    ]
    out = client.chat.completions.create(model=base, messages=messages, temperature=0, max_tokens=8)
    assert out.choices[0].message.content == "abc\n"


def test_errors_are_the_clients_exception_classes(client, base):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt="a", max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    assert client.models.retrieve("upper").id == "upper"
    for kwargs, param in [
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (dict(max_completion_tokens=0), "max_completion_tokens"),
        (dict(extra_body={"best_of": 3}), "best_of"),
        (dict(extra_body={"no_such_field": 1}), "no_such_field"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=base, messages=[{"role": "user", "content": "a"}], **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=base, messages=[{"role": "system", "content": "no user turn"}])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=base, prompt="abc\n", max_tokens=4, extra_body={"slo_ttft_ms": 0.001})
    assert err.value.body["code"] == "slo_unattainable"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=base, prompt="a" * 300, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    assert "This model's maximum context length is 256 tokens" in err.value.body["message"]


async def test_async_client_streams_with_logprobs(server, base):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(model="upper", messages=[{"role": "user", "content": "abc"}],
                                                  stream=True, logprobs=True, top_logprobs=1, temperature=0)
    text, tokens = "", []
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                tokens += [c.token for c in chunk.choices[0].logprobs.content]
    assert text == "ABC\n" and "".join(tokens).startswith("ABC\n")
    many = await asyncio.gather(*[client.completions.create(model=m, prompt="abc\n", max_tokens=5, temperature=0)
                                  for m in ("upper", "reverse", base)])
    assert [r.choices[0].text for r in many] == ["ABC\n", "cba\n", "abc\n"]
    stream = await client.completions.create(model=base, prompt=["ab\n", "cd\n"], n=2, stream=True, max_tokens=5,
                                             temperature=0, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert texts == {0: "ab\n", 1: "ab\n", 2: "cd\n", 3: "cd\n"}
    assert usage.completion_tokens == 16  # 4 choices of "xy\n" + EOS
    stream = await client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "abcd"}],
                                                  n=2, stream=True, temperature=0, max_tokens=8)
    chat: dict[int, str] = {}
    roles: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            chat[choice.index] = chat.get(choice.index, "") + (choice.delta.content or "")
    assert chat == {0: "dcba\n", 1: "dcba\n"} and roles == {0: "assistant", 1: "assistant"}
    await client.close()


async def test_tokenize_detokenize_version_and_request_id(server, base, hf):
    hi, ab = hf[1].encode("hi\n"), hf[1].encode("ab\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/tokenize", json={"model": base, "prompt": "hi\n"}) as resp:
            tokens = await resp.json()
        assert tokens["tokens"] == hi and tokens["count"] == 3 and tokens["max_model_len"] == 256
        async with session.post(server.url + "/detokenize", json={"model": base, "tokens": hi[:2]}) as resp:
            assert (await resp.json())["prompt"] == "hi"
        async with session.post(server.url + "/detokenize", json={"model": base, "tokens": [10**6]}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "tokens"
        async with session.get(server.url + "/version") as resp:
            assert "version" in await resp.json()
        body = {"model": base, "prompt": "ab\n", "max_tokens": 3, "return_token_ids": True}
        async with session.post(server.url + "/v1/completions", json=body, headers={"X-Request-Id": "abc-1"}) as resp:
            assert resp.headers["X-Request-Id"] == "abc-1"
            out = await resp.json()
        assert out["choices"][0]["prompt_token_ids"] == ab and "prompt_token_ids" not in out
        async with session.post(server.url + "/v1/completions", json={**body, "stream": True}) as resp:
            assert resp.headers.get("X-Request-Id")
            raw = await resp.text()
        assert '"prompt_token_ids":' + json.dumps(ab, separators=(",", ":")) in raw
        body = {"model": base, "prompt": "ab\n", "max_tokens": 3, "stop_token_ids": [500]}
        async with session.post(server.url + "/v1/completions", json=body) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "stop_token_ids"


def test_a_control_token_spelled_in_a_message_is_text(client, base, server, hf):
    """User content that spells the EOS token ("</s>") is tokenized as text in a chat (HF's apply_chat_template
    with sanitize_control_tokens is the truth; the EOS id appears nowhere), so content cannot end a turn or forge
    one; a completions prompt is the client's own raw text and keeps it as the control token, as vLLM does."""
    import requests

    _, tokenizer = hf
    messages = [{"role": "user", "content": "ab</s>cd"}]
    got = requests.post(server.url + "/tokenize", json={"model": base, "messages": messages}, timeout=30).json()
    truth = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          sanitize_control_tokens=True)["input_ids"]
    assert got["tokens"] == list(truth) and tokenizer.eos_token_id not in got["tokens"]
    raw = requests.post(server.url + "/tokenize", json={"model": base, "prompt": "ab</s>cd"}, timeout=30).json()
    assert tokenizer.eos_token_id in raw["tokens"]
    reply = client.chat.completions.create(model="upper", messages=messages, max_tokens=20, temperature=0)
    same = client.completions.create(model="upper", prompt=list(truth), max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == same.choices[0].text  # the chat ran on exactly those ids


async def test_websocket_n_index_and_logprobs(server, base, hf):
    """WS frames: one done per choice with its `index`, logprobs in deltas (raw, equal to HF's), the prompt's
    logprobs with the first delta; the n samples equal single seeded frames with seeds seed + j."""
    tokenizer = hf[1]
    frame = {"type": "generate", "id": "g", "model": "upper", "prompt": "lorafleet\n", "max_tokens": 6,
             "temperature": 1.3, "seed": 9, "n": 2, "logprobs": 2, "prompt_logprobs": 1, "echo": True}
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        frames = await _ws_run(ws, frame, ends=2)
        singles = [await _ws_run(ws, {**frame, "id": f"s{j}", "n": 1, "seed": 9 + j}, ends=1) for j in range(2)]
    deltas = {j: [f for f in frames if f["type"] == "delta" and f["index"] == j] for j in range(2)}
    assert sorted(f["index"] for f in frames if f["type"] == "done") == [0, 1]
    assert [f["remaining"] for f in frames if f["type"] == "done"] == [1, 0]
    for j in range(2):
        ids = [t for f in deltas[j] for t in f["token_ids"]]
        assert ids == [t for f in singles[j] if f["type"] == "delta" for t in f["token_ids"]]
        prompt = tokenizer.encode("lorafleet\n")
        first = deltas[j][0]["prompt_logprobs"]
        assert first[0] is None and [e["token_id"] for e in first[1:]] == prompt[1:]
        assert deltas[j][0]["text"].startswith("lorafleet\n"), "echo: the prompt's text comes first"
        want = _hf_logprobs(hf, prompt + ids, "upper")
        for position, entry in enumerate(first[1:], start=1):
            assert abs(entry["logprob"] - float(want[position - 1, prompt[position]])) < 1e-4
        entries = [e for f in deltas[j] for e in f["logprobs"]]
        assert [e["token_id"] for e in entries] == ids and all(len(e["top_logprobs"]) == 2 for e in entries)
        for i, entry in enumerate(entries):
            assert abs(entry["logprob"] - float(want[len(prompt) - 1 + i, ids[i]])) < 1e-4


async def _ws_run(ws, frame: dict, ends: int) -> list[dict]:
    await ws.send_json(frame)
    frames = []
    while ends:
        msg = await ws.receive_json(timeout=60)
        assert msg["type"] != "error", msg
        frames.append(msg)
        ends -= msg["type"] == "done"
    return frames


# litellm and langchain ------------------------------------------------------------------------------------


def test_litellm_completion_text_completion_and_context_window(server, base):
    litellm = pytest.importorskip("litellm")
    kwargs = dict(api_base=server.url + "/v1", api_key="none")
    out = litellm.completion(model=f"openai/{base}", messages=[{"role": "user", "content": "abc"}], temperature=0,
                             max_tokens=8, **kwargs)
    assert out.choices[0].message.content == "abc\n"
    text = litellm.text_completion(model=f"openai/{base}", prompt=["ab\n", "xy\n"], temperature=0, max_tokens=5,
                                   **kwargs)
    assert sorted(c.text for c in text.choices) == ["ab\n", "xy\n"]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{base}", messages=[{"role": "user", "content": "a" * 400}], max_tokens=4,
                           **kwargs)
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="openai/nope", messages=[{"role": "user", "content": "a"}], max_tokens=4, **kwargs)
    with pytest.raises(litellm.RateLimitError):  # a first-token deadline no step can meet: 429 slo_unattainable
        litellm.completion(model=f"openai/{base}", messages=[{"role": "user", "content": "abc"}], max_tokens=4,
                           extra_body={"slo_ttft_ms": 0.001}, num_retries=0, **kwargs)


def test_langchain_batch_and_stream(server, base):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model=base, base_url=server.url + "/v1", api_key="none", temperature=0,
                                       max_tokens=10)
    assert [m.content for m in chat.batch(["abc", "hello", "xy z"])] == ["abc\n", "hello\n", "xy z\n"]
    assert "".join(chunk.content for chunk in chat.stream("qwerty")) == "qwerty\n"
    llm = langchain_openai.OpenAI(model="upper", base_url=server.url + "/v1", api_key="none", temperature=0,
                                  max_tokens=10, batch_size=4)
    words = ["abc", "lora", "fleet", "serve", "token"]
    assert llm.batch([w + "\n" for w in words]) == [w.upper() + "\n" for w in words]
    assert "".join(llm.stream("xyz\n")) == "XYZ\n"


# lm-eval --------------------------------------------------------------------------------------------------


def test_lm_eval_local_completions_loglikelihood_and_generate_until(server, base, monkeypatch):
    """Both task kinds with --batch_size 4 (lists of token-id prompts; echo + logprobs for the choices). The
    demo model echoes: the echo choice is the most likely and generation reproduces the line."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lorafleet.engine.demo import demo_model_dir

    monkeypatch.chdir(TASKS_DIR)  # the task YAML names its data file relative to the working directory
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"model={base},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                    f"tokenizer={demo_model_dir()},num_concurrent=1,max_retries=1,max_length=256"),
        tasks=["lorafleet_demo_choice", "lorafleet_demo_echo"], batch_size=4,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    scores = results["results"]
    assert scores["lorafleet_demo_choice"]["acc,none"] == 1.0, scores
    assert scores["lorafleet_demo_echo"]["exact_match,none"] >= 11 / 12, scores
    assert os.path.exists(TASKS_DIR / "demo_lines.jsonl")

"""`lorafleet serve` end to end over real sockets: WS and OpenAI SSE outputs equal the offline LLM's
greedy outputs; cancel/disconnect free pages; errors keep the socket usable; runtime adapter admin."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from test_serve_support import (
    WsClient,
    get_json,
    offline_truth,
    post_json,
    start_server,
    stop_server,
    wait_state,
    workload,
    write_assets,
)

MAX_TOKENS = 10
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, adapter_root, adapters = write_assets(root)
    work = workload(sorted(adapters))
    truth = offline_truth(model, adapters, work, MAX_TOKENS)
    return {"root": root, "model": model, "adapter_root": adapter_root, "adapters": adapters, "work": work,
            "truth": truth}


@pytest.fixture(scope="module")
def server(assets):
    proc = start_server(["--model", str(assets["model"]), "--adapter-root", str(assets["adapter_root"]),
                         "--admin-key", ADMIN, "--served-model-name", "tiny-base"])
    yield proc
    assert stop_server(proc) == 0, proc.output()


def _frame(i: int, prompt: str, adapter: str | None, **extra) -> dict:
    frame = {"type": "generate", "id": f"c{i}", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
             **extra}
    if adapter is not None:
        frame["model"] = adapter
    return frame


async def _run_on_socket(url: str, items: list[tuple[int, str, str | None]], binary: bool = False) -> dict:
    protocols = ("lorafleet.msgpack",) if binary else ()
    async with aiohttp.ClientSession() as session, session.ws_connect(url, protocols=protocols) as ws:
        client = WsClient(ws, binary)
        reader = asyncio.create_task(client.read_loop())
        futures = [client.expect(f"c{i}") for i, _, _ in items]
        for i, prompt, adapter in items:
            await client.send(_frame(i, prompt, adapter))
        await asyncio.wait_for(asyncio.gather(*futures), 120)
        await ws.close()
        await reader
        return {i: client.result(f"c{i}") for i, _, _ in items}


def _check(results: dict, truth: list[dict]) -> None:
    for i, got in results.items():
        want = truth[i]
        assert got["types"][0] == "accepted" and got["types"][-1] == "done", got["types"]
        assert got["token_ids"] == want["token_ids"], f"request {i}"
        assert got["text"] == want["text"], f"request {i}"
        assert got["finish_reason"] == want["finish_reason"], f"request {i}"
        usage = got["end"]["usage"]
        assert usage["completion_tokens"] == len(want["token_ids"])
        assert set(got["end"]["timing"]) == {"queue_ms", "ttft_ms", "e2e_ms"}


async def test_ws_one_socket_32_generations_equal_offline(server, assets):
    items = [(i, p, a) for i, (p, a) in enumerate(assets["work"])]
    assert len({a for _, _, a in items if a}) >= 8
    _check(await _run_on_socket(server.ws_url, items), assets["truth"])


async def test_ws_several_sockets_equal_offline_incl_msgpack(server, assets):
    items = [(i, p, a) for i, (p, a) in enumerate(assets["work"])]
    groups = [items[k::4] for k in range(4)]
    results = await asyncio.gather(*[_run_on_socket(server.ws_url, g, binary=(k == 0)) for k, g in enumerate(groups)])
    merged = {i: r for part in results for i, r in part.items()}
    assert len(merged) == 32
    _check(merged, assets["truth"])


async def test_openai_client_sse_equals_offline(server, assets):
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(prompt: str, adapter: str | None) -> tuple[list[int], str, str | None, dict | None]:
        stream = await client.completions.create(
            model=adapter or "tiny-base", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        ids, text, reason, usage = [], "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                ids += choice.model_extra.get("token_ids") or []
                text += choice.text
                reason = choice.finish_reason or reason
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        return ids, text, reason, usage

    try:
        results = await asyncio.gather(*[one(p, a) for p, a in assets["work"]])
    finally:
        await client.close()
    for (ids, text, reason, usage), want in zip(results, assets["truth"]):
        assert ids == want["token_ids"]
        assert text == want["text"]
        assert reason == want["finish_reason"]
        assert usage["completion_tokens"] == len(want["token_ids"])


async def test_openai_non_streaming_completion_and_chat(server, assets):
    prompt, adapter = assets["work"][3]
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post_json(session, server.url + "/v1/completions", {
            "model": adapter, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == assets["truth"][3]["token_ids"]
        assert body["usage"]["completion_tokens"] == len(assets["truth"][3]["token_ids"])
        status, body, _ = await post_json(session, server.url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        status, models = await get_json(session, server.url + "/v1/models")
        assert status == 200
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id["tiny-base"]["parent"] is None
        assert all(by_id[name]["parent"] == "tiny-base" for name in assets["adapters"])
        assert by_id["a0-r1"]["root"].endswith("a0-r1")


async def test_ws_errors_then_socket_still_works(server, assets):
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        await client.send_raw("{not json")
        await client.send({"type": "bogus", "id": "x"})
        await client.send({**_frame(9, "dup", None), "id": "dup", "max_tokens": 40, "ignore_eos": True})
        await client.send({**_frame(9, "dup", None), "id": "dup"})
        for cid, frame in {
            "e1": _frame(1, "hi", "no-such-adapter"),
            "e2": {**_frame(2, "hi", None), "temperature": -1},
            "e3": {**_frame(3, "hi", None), "max_tokens": "ten"},
            "e4": {**_frame(4, "hi", None), "stop": [""]},
            "e5": {**_frame(5, "hi", None), "max_tokens": 5000},
        }.items():
            await client.send({**frame, "id": cid})
        ends = {cid: await asyncio.wait_for(client.expect(cid), 30) for cid in ("e1", "e2", "e3", "e4", "e5")}
        prompt, adapter = assets["work"][5]
        await client.send(_frame(5, prompt, adapter))
        done = await asyncio.wait_for(client.expect("c5"), 60)
        dup = await asyncio.wait_for(client.expect("dup"), 60)
        await ws.close()
        await reader
    codes = [f["error"]["code"] for f in client.errors_without_id]
    assert codes == ["invalid_json", "unknown_type", "duplicate_id"]
    assert dup["type"] == "done" and dup["usage"]["completion_tokens"] == 40
    assert ends["e1"]["error"]["code"] == "model_not_found"
    assert (ends["e2"]["error"]["code"], ends["e2"]["error"]["param"]) == ("invalid_parameter", "temperature")
    assert (ends["e3"]["error"]["code"], ends["e3"]["error"]["param"]) == ("invalid_parameter", "max_tokens")
    assert ends["e4"]["error"]["param"] == "stop"
    assert ends["e5"]["error"]["code"] == "context_length_exceeded"
    assert done["type"] == "done"
    assert client.result("c5")["token_ids"] == assets["truth"][5]["token_ids"]


async def test_http_errors_are_openai_shaped(server):
    url = server.url + "/v1/completions"
    async with aiohttp.ClientSession() as session:
        cases = [
            ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
            ({"prompt": "x", "n": 2, "best_of": 4}, 400, "unsupported_parameter"),
            ({"prompt": "x", "seeed": 2}, 400, "unknown_parameter"),
            ({"prompt": "x", "top_p": 0}, 400, "invalid_parameter"),
            ({"prompt": []}, 400, "invalid_parameter"),
            ({"prompt": "x" * 2000}, 400, "context_length_exceeded"),
        ]
        for body, status, code in cases:
            got, answer, _ = await post_json(session, url, body)
            assert (got, answer["error"]["code"]) == (status, code), answer
            assert set(answer["error"]) == {"message", "type", "param", "code"}
        async with session.post(url, data=b"{", headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
        async with session.post(url, data=b"x" * (2 << 20)) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"


async def test_openai_client_chat_stream(server, assets):
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    try:
        stream = await client.chat.completions.create(model="a2-r3", messages=messages, max_tokens=6, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model="a2-r3", messages=messages, max_tokens=6, temperature=0)
    finally:
        await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def _idle(snapshot: dict) -> bool:
    return snapshot["usage"]["kv"] == 0 and not snapshot["running"] and not snapshot["waiting"]


async def test_cancel_mid_stream_frees_pages(server, assets):
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        await client.send({**_frame(0, "cancel me please", "a3-r4"), "max_tokens": 900, "ignore_eos": True})
        while not any(f["type"] == "delta" for f in client.frames.get("c0", [])):
            await asyncio.sleep(0.02)
        busy = (await get_json(session, server.url + "/v1/debug/state", AUTH))[1]["snapshot"]
        await client.send({"type": "cancel", "id": "c0"})
        end = await asyncio.wait_for(client.expect("c0"), 30)
        assert end["type"] == "done" and end["finish_reason"] == "cancelled"
        assert end["usage"]["completion_tokens"] < 900
        snapshot = await wait_state(session, server.url, _idle, AUTH)
        client.ended.pop("c0")
        await client.send({**_frame(0, "the id is free again", None), "max_tokens": 3})  # reuse the ended id
        again = await asyncio.wait_for(client.expect("c0"), 30)
        await ws.close()
        await reader
    assert again["type"] == "done" and again["usage"]["completion_tokens"] <= 3
    assert busy["usage"]["kv"] > 0
    assert not any(owner.startswith("kv:") for owner in snapshot["page_owner"])


async def test_abrupt_disconnect_frees_pages(server):
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        for i in range(3):
            await client.send({**_frame(i, f"disconnect {i}", None), "max_tokens": 900, "ignore_eos": True})
        while not any(f["type"] == "delta" for f in client.frames.get("c0", [])):
            await asyncio.sleep(0.02)
        await wait_state(session, server.url, lambda s: s["usage"]["kv"] > 0, AUTH)
        ws._response.connection.transport.abort()  # no close frame: the peer just vanishes
        await asyncio.wait_for(reader, 30)
        snapshot = await wait_state(session, server.url, _idle, AUTH)
    assert not any(owner.startswith("kv:") for owner in snapshot["page_owner"])


async def test_runtime_load_unload_and_path_checks(server, assets, tmp_path):
    from lorafleet.engine import LLM
    from lorafleet.engine.synthetic import write_adapter

    late = write_adapter(assets["adapter_root"] / "late" / "r5", assets["model"], 5, seed=77, std=0.2)
    outside = write_adapter(tmp_path / "outside", assets["model"], 2, seed=78)
    corrupt = write_adapter(assets["adapter_root"] / "broken", assets["model"], 2, seed=79)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    too_big = write_adapter(assets["adapter_root"] / "huge", assets["model"], 128, seed=80)
    dora = write_adapter(assets["adapter_root"] / "dora", assets["model"], 2, seed=81)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    other = tmp_path / "other-model"  # a model of another width: its adapters' shapes do not match
    other.mkdir()
    raw = json.loads((assets["model"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "hidden_size": 32}))
    wrong = write_adapter(assets["adapter_root"] / "wrong", other, 2, seed=82)
    load, unload = server.url + "/v1/load_lora_adapter", server.url + "/v1/unload_lora_adapter"
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post_json(session, load, {"lora_name": "late", "lora_path": str(late)})
        assert (status, body["error"]["code"]) == (403, "forbidden"), body
        for path in (str(outside), "../" + outside.parent.name + "/outside", "late/../../" + outside.name):
            status, body, _ = await post_json(session, load, {"lora_name": "evil", "lora_path": path}, AUTH)
            assert (status, body["error"]["code"]) == (403, "forbidden_path"), (path, body)
        for name, path in (("broken", corrupt), ("huge", too_big), ("dora", dora), ("wrong", wrong)):
            status, body, _ = await post_json(session, load, {"lora_name": name, "lora_path": str(path)}, AUTH)
            assert (status, body["error"]["code"]) == (400, "adapter_invalid"), body
        status, body, _ = await post_json(session, load, {"lora_name": "late", "lora_path": "late/r5"}, AUTH)
        assert status == 200, body
        status, body, _ = await post_json(session, load, {"lora_name": "late", "lora_path": "late/r5"}, AUTH)
        assert (status, body["error"]["code"]) == (400, "adapter_exists")
        models = (await get_json(session, server.url + "/v1/models"))[1]["data"]
        assert "late" in {m["id"] for m in models} and "broken" not in {m["id"] for m in models}
        request = {"model": "late", "prompt": "runtime adapter", "max_tokens": MAX_TOKENS, "temperature": 0,
                   "return_token_ids": True}
        status, body, _ = await post_json(session, server.url + "/v1/completions", request)
        assert status == 200, body
        llm = LLM(str(assets["model"]), adapters={"late": str(late)})
        want = llm.generate(["runtime adapter"], adapters=["late"], max_tokens=MAX_TOKENS)[0]
        assert body["choices"][0]["token_ids"] == want.token_ids
        prompt, adapter = assets["work"][1]
        status, body, _ = await post_json(session, server.url + "/v1/completions", {
            "model": adapter, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
        assert body["choices"][0]["token_ids"] == assets["truth"][1]["token_ids"]
        async with session.ws_connect(server.ws_url) as ws:  # an adapter in use cannot be unloaded
            client = WsClient(ws)
            reader = asyncio.create_task(client.read_loop())
            await client.send({**_frame(0, "busy", "late"), "max_tokens": 900, "ignore_eos": True})
            while not any(f["type"] == "delta" for f in client.frames.get("c0", [])):
                await asyncio.sleep(0.02)
            status, body, _ = await post_json(session, unload, {"lora_name": "late"}, AUTH)
            assert (status, body["error"]["code"]) == (409, "adapter_in_use"), body
            await client.send({"type": "cancel", "id": "c0"})
            await asyncio.wait_for(client.expect("c0"), 30)
            await ws.close()
            await reader
        status, body, _ = await post_json(session, unload, {"lora_name": "late"}, AUTH)
        assert status == 200, body
        status, body, _ = await post_json(session, server.url + "/v1/completions", request)
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        status, body, _ = await post_json(session, unload, {"lora_name": "late"}, AUTH)
        assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_sse_client_disconnect_frees_pages(server):
    body = {"prompt": "sse disconnect", "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(server.url + "/v1/completions", json=body)
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        await wait_state(session, server.url, lambda s: s["usage"]["kv"] > 0, AUTH)
        resp.connection.transport.abort()
        resp.close()
        snapshot = await wait_state(session, server.url, _idle, AUTH)
    assert not any(owner.startswith("kv:") for owner in snapshot["page_owner"])


def test_bad_startup_adapter_exits_2(assets, tmp_path):
    import subprocess
    import sys

    from lorafleet.engine.synthetic import write_adapter

    dora = write_adapter(tmp_path / "dora", assets["model"], 2)
    config = (dora / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (dora / "adapter_config.json").write_text(config)
    proc = subprocess.run([sys.executable, "-m", "lorafleet", "serve", "--model", str(assets["model"]), "--port", "0",
                           "--adapter", f"dora={dora}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "use_dora" in proc.stderr


async def test_ws_token_id_prompts_and_chat_messages(server):
    ids = [40, 41, 42, 43, 44]
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    async with aiohttp.ClientSession() as session:
        status, http, _ = await post_json(session, server.url + "/v1/completions", {
            "model": "a4-r6", "prompt": ids, "max_tokens": 6, "temperature": 0, "return_token_ids": True})
        status_chat, chat, _ = await post_json(session, server.url + "/v1/chat/completions", {
            "messages": messages, "max_tokens": 6, "temperature": 0})
        async with session.ws_connect(server.ws_url, protocols=("lorafleet.msgpack",)) as ws:
            assert ws.protocol == "lorafleet.msgpack"
            client = WsClient(ws, binary=True)
            reader = asyncio.create_task(client.read_loop())
            await client.send({"type": "generate", "id": "t", "model": "a4-r6", "prompt": ids, "max_tokens": 6,
                               "temperature": 0})
            await client.send({"type": "generate", "id": "m", "messages": messages, "max_tokens": 6,
                               "temperature": 0})
            await asyncio.wait_for(asyncio.gather(client.expect("t"), client.expect("m")), 60)
            await ws.close()
            await reader
    assert status == status_chat == 200
    assert client.result("t")["token_ids"] == http["choices"][0]["token_ids"]
    assert client.result("t")["end"]["usage"]["prompt_tokens"] == len(ids)
    assert client.result("m")["text"] == chat["choices"][0]["message"]["content"]

"""The demo end to end through a real `lorafleet serve` (no arguments = the embedded demo): 72 concurrent
WebSocket generations spread over all 8 task adapters plus the base model, with fresh random inputs.
Each response must be its own adapter's transform of its own input (>= 95% of all) and equal to what
HF transformers + PEFT generate for the same input. Any mix-up of adapters inside a batch fails it."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
from test_demo_assets import BASE, MAX_NEW_TOKENS, generate, load_demo_peft
from test_serve_support import WsClient, get_json, start_server, stop_server

from lorafleet.engine.demo import TASKS, echo, random_input

PER_TARGET = 8
MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def server():
    proc = start_server([])
    yield proc
    assert stop_server(proc) == 0


def _work(base_name: str) -> list[tuple[str, str, str]]:
    """(request id, model name, input line) — interleaved so every batch mixes adapters."""
    rng = random.Random(20261128)
    targets = [*TASKS, base_name]
    return [(f"r{i}", targets[i % len(targets)], random_input(rng)) for i in range(PER_TARGET * len(targets))]


async def _serve_all(server, work) -> dict:
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        ends = [client.expect(rid) for rid, _, _ in work]
        for rid, model, line in work:
            await client.send({"type": "generate", "id": rid, "model": model, "prompt": line + "\n",
                               "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0})
        await asyncio.wait_for(asyncio.gather(*ends), timeout=300)
        await ws.close()
        await reader
        return {rid: client.result(rid) for rid, _, _ in work}


async def test_demo_adapters_through_the_server_match_peft_and_their_tasks(server):
    async with aiohttp.ClientSession() as session:
        _, models = await get_json(session, server.url + "/v1/models")
    names = {m["id"] for m in models["data"]}
    assert set(TASKS) <= names, f"the demo adapters are served by default: {sorted(names)}"
    base_name = next(m["id"] for m in models["data"] if m["id"] not in TASKS)
    work = _work(base_name)
    results = await _serve_all(server, work)
    peft = _peft_outputs(work, base_name)
    correct: dict[str, int] = {}
    for rid, model, line in work:
        got = results[rid]
        assert got["finish_reason"] in ("stop", "length"), got["end"]
        assert got["token_ids"] == peft[rid], f"{model} on {line!r}: server differs from PEFT"
        transform = echo if model == base_name else TASKS[model]
        correct[model] = correct.get(model, 0) + (got["text"].rstrip("\n") == transform(line))
    # Pooled over all 72 (8 per target is too few to resolve 95% per adapter; the per-adapter figures on 40-200
    # held-out lines are in tests/test_demo_assets.py and engine/demo/README.md). A mix-up would miss far more.
    print("correct per target:", correct)
    assert sum(correct.values()) / len(work) >= MIN_ACCURACY, correct
    assert min(correct.values()) >= PER_TARGET - 1, correct


def _peft_outputs(work, base_name: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    from lorafleet.engine.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    names = [BASE if m == base_name else m for _, m, _ in work]
    ids = generate(load_demo_peft(), tokenizer, [line for _, _, line in work], adapter_names=names)
    return {rid: row for (rid, _, _), row in zip(work, ids)}

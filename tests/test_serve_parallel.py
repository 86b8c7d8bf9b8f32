"""`lorafleet serve --tensor-parallel-size 2` on CPU (gloo): two executor ranks, outputs equal the offline
single-process LLM's greedy outputs for adapter and base requests."""

from __future__ import annotations

import asyncio

import aiohttp
from test_serve_support import get_json, post_json, start_server, stop_server, wait_gone, write_assets


async def test_two_rank_executors_equal_offline(tmp_path):
    from lorafleet.engine import LLM

    model, _, adapters = write_assets(tmp_path)
    names = [n for n in adapters if int(n.rsplit("-r", 1)[1]) % 2 == 0][:3]  # ranks must split over 2
    work = [(f"tp prompt {i}", [*names, None][i % 4]) for i in range(8)]
    llm = LLM(str(model), adapters={n: str(adapters[n]) for n in names})
    want = llm.generate([p for p, _ in work], adapters=[a for _, a in work], max_tokens=8)
    args = [a for n in names for a in ("--adapter", f"{n}={adapters[n]}")]
    server = start_server(["--model", str(model), *args, "--tensor-parallel-size", "2"])
    try:
        async with aiohttp.ClientSession() as session:
            health = (await get_json(session, server.url + "/health"))[1]
            answers = await asyncio.gather(*[post_json(session, server.url + "/v1/completions", {
                "model": a, "prompt": p, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
                for p, a in work])
    finally:
        code = stop_server(server)
    assert [e["rank"] for e in health["executors"]] == [0, 1]
    for (status, body, _), w in zip(answers, want):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == w.token_ids
    assert code == 0, server.output()
    assert all(wait_gone(e["pid"]) for e in health["executors"])

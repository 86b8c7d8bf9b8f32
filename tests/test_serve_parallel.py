"""`lorafleet serve --tensor-parallel-size 2` on CPU (gloo): two executor ranks over a real socket give the
offline single-process LLM's greedy outputs for adapters of ranks 3, 5, 7, 8 and 16 (odd ranks padded per
shard) on attention-only, MLP-only and all targets, mixed with base requests."""

from __future__ import annotations

import asyncio

import aiohttp
from test_serve_support import ALL, ATTN, get_json, post_json, start_server, stop_server, wait_gone

from lorafleet.loadgen.bench import server_tensor_parallel_size

ADAPTERS = [(3, ATTN), (5, ("gate_proj", "up_proj", "down_proj")), (7, ALL), (8, ("q_proj", "v_proj")), (16, ALL)]


async def test_two_rank_executors_equal_offline(tmp_path):
    from lorafleet.engine import LLM
    from lorafleet.engine.synthetic import write_adapter, write_model

    model = write_model("tiny", tmp_path / "model")
    adapters = {f"a{i}-r{r}": str(write_adapter(tmp_path / f"a{i}", model, r, targets=t, seed=100 + i, std=0.2))
                for i, (r, t) in enumerate(ADAPTERS)}
    names = [*adapters, None]
    work = [(f"tp prompt {i} " + "x" * (i % 7), names[i % len(names)]) for i in range(12)]
    llm = LLM(str(model), adapters=adapters)
    want = llm.generate([p for p, _ in work], adapters=[a for _, a in work], max_tokens=8, ignore_eos=True)
    args = [a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]
    server = start_server(["--model", str(model), *args, "--tensor-parallel-size", "2", "--max-adapters-per-batch",
                           "3"])
    try:
        async with aiohttp.ClientSession() as session:
            health = (await get_json(session, server.url + "/health"))[1]
            bench_tp = await asyncio.to_thread(server_tensor_parallel_size, server.url)
            answers = await asyncio.gather(*[post_json(session, server.url + "/v1/completions", {
                "model": a, "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}) for p, a in work])
    finally:
        code = stop_server(server)
    assert [e["rank"] for e in health["executors"]] == [0, 1]
    assert bench_tp == 2, "lorafleet bench labels this server's rows tensor_parallel_size 2"
    for (status, body, _), w in zip(answers, want):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == w.token_ids
    assert code == 0, server.output()
    assert all(wait_gone(e["pid"]) for e in health["executors"])

"""`lorafleet serve` on CUDA (skipped without it): the executor process on the GPU, steps overlapped with
planning and adapter pages copied from page-locked staging, gives the offline engine's greedy tokens."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from test_serve_support import post_json, start_server, stop_server, write_assets

from lorafleet.engine import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


async def _ask(url: str, work: list[tuple[str, str | None]], max_tokens: int) -> list:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*[post_json(session, url + "/v1/completions", {
            "model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}) for prompt, adapter in work])


def test_served_on_gpu_equals_offline(tmp_path):
    model, _, adapters = write_assets(tmp_path)
    names = [*adapters, None]
    work = [(f"gpu prompt {i} " * (1 + i % 5), names[i % len(names)]) for i in range(40)]
    llm = LLM(str(model), adapters={n: str(p) for n, p in adapters.items()}, device="cuda", dtype="float32")
    want = llm.generate([p for p, _ in work], adapters=[a for _, a in work], max_tokens=12, ignore_eos=True)
    args = [a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]
    server = start_server(["--model", str(model), *args, "--device", "cuda", "--dtype", "float32",
                           "--max-adapters-per-batch", "3"])
    try:
        answers = asyncio.run(_ask(server.url, work, 12))
    finally:
        code = stop_server(server)
    for (status, body, _), w in zip(answers, want):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == w.token_ids
    assert code == 0, server.output()

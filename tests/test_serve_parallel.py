"""`lorafleet serve --tensor-parallel-size 2` on CPU (gloo): two executor ranks over a real socket give the
offline single-process LLM's greedy outputs for adapters of ranks 3, 5, 7, 8 and 16 (any rank at any size: the
rank is never split) on attention-only, MLP-only and all targets, mixed with base requests."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
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
            async with session.get(server.url + "/metrics") as resp:
                metrics = await resp.text()
            answers = await asyncio.gather(*[post_json(session, server.url + "/v1/completions", {
                "model": a, "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}) for p, a in work])
            async with session.get(server.url + "/metrics") as resp:
                after = await resp.text()
    finally:
        code = stop_server(server)
    assert [e["rank"] for e in health["executors"]] == [0, 1]
    assert bench_tp == 2, "lorafleet bench labels this server's rows tensor_parallel_size 2"
    peaks = {f.name: f.samples[0].value for f in text_string_to_metric_families(metrics)
             if f.name.endswith(("device_copy_bandwidth_bytes", "device_matmul_flops"))}
    assert len(peaks) == 2 and all(v > 0 for v in peaks.values()), peaks  # rank 0 measured; rank 1 reports zeros
    for (status, body, _), w in zip(answers, want):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == w.token_ids
    events = {s.labels["event"]: s.value for f in text_string_to_metric_families(after) if f.name.endswith("events")
              for s in f.samples}
    # both ranks ran steps launched before the step ahead of them was finished (the pipeline's held step)
    assert events.get("executor_overlapped_steps", 0) > 0, events
    assert code == 0, server.output()
    assert all(wait_gone(e["pid"]) for e in health["executors"])


class _FakeChannel:
    """A rank's channel that answers start-up with `reply`, or never (None: blocked in the rendezvous)."""

    def __init__(self, reply) -> None:
        self.reply = reply

    async def recv(self):
        if self.reply is None:
            await asyncio.Event().wait()
        return self.reply

    def send(self, msg) -> None:
        pass

    def close(self) -> None:
        pass


async def test_a_rank_failing_at_start_up_is_reported_while_others_still_wait():
    """Rank 1 fails (e.g. no GPU for it) while rank 0 waits for it in the rendezvous: the group reports rank 1's
    error at once instead of waiting for rank 0's reply (which would only come with its rendezvous timeout)."""
    import multiprocessing
    import time

    from lorafleet.actors.executor import ExecutorDied, ExecutorGroup, Stager, _Rank
    from lorafleet.actors.schema import ExecutorFailed

    ctx = multiprocessing.get_context("fork")
    ranks = []
    for rank, reply in enumerate([None, ExecutorFailed(1, "ConfigError: tensor_parallel_size 2 needs 2 GPUs")]):
        process = ctx.Process(target=time.sleep, args=(1.0,))
        process.start()
        ranks.append(_Rank(rank, process, _FakeChannel(reply), ()))
    group = ExecutorGroup(ranks, Stager())
    try:
        await asyncio.wait_for(group.wait_ready(start_timeout=600.0), 120.0)
    except ExecutorDied as exc:
        assert exc.rank == 1 and "needs 2 GPUs" in str(exc)
    else:
        raise AssertionError("the failing rank was not reported")
    assert all(not r.process.is_alive() for r in ranks), "the group was stopped"

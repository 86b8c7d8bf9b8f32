"""What an operator sees from a running `lorafleet serve` (the embedded demo model, JSON logs), checked
over real sockets with the OpenAI client library and a WebSocket: the banner (device, dtype, pool,
threads), one access line per request whose fields equal what the client got, adapter lifecycle lines
(loaded, evicted, registered), no tokenizer warning for an over-long prompt, client errors counted by
code in /metrics (with vLLM's model_name label), admin routes closed without an admin key, and
GET / leading to the dashboard."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.actors.startup import thread_policy
from lorafleet.engine import demo

openai = pytest.importorskip("openai")

BASE = demo.BASE_MODEL_NAME
ADAPTERS = ("upper", "rot13", "caesar3", "title", "novowels")  # 5, 7, 13, 4 and 20 pool pages


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in list(self.stdout) if line.strip()]

    def access(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.records() if r["logger"] == "access"}


def launch(args: list[str], timeout: float = 240.0) -> Served:
    """`lorafleet serve ARGS --port 0 --log-format json`; stdout and stderr kept apart, line by line."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet", "serve", "--port", "0", "--log-format", "json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = Served(proc, "")
    ready: queue.Queue[str | None] = queue.Queue()

    def pump(stream, lines: list[str], watch: bool) -> None:
        for line in stream:
            lines.append(line)
            if watch and '"url"' in line and "ready on" in line:
                ready.put(json.loads(line)["url"])
        if watch:
            ready.put(None)

    threading.Thread(target=pump, args=(proc.stdout, served.stdout, True), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, served.stderr, False), daemon=True).start()
    try:
        url = ready.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        proc.kill()
        proc.wait()
        raise RuntimeError("server did not start:\n" + "".join(served.stdout + served.stderr))
    served.url = url
    return served


def stop(served: Served) -> int:
    served.proc.terminate()
    try:
        return served.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        return served.proc.wait()


@pytest.fixture(scope="module")
def demo_server():
    # 40 pages: the five adapters used one after another (49 pages) cannot all stay resident
    served = launch(["--num-pages", "40"])
    yield served
    assert stop(served) == 0, "".join(served.stdout + served.stderr)


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def failures(samples: dict) -> dict[str, float]:
    out = {}
    for (name, labels), value in samples.items():
        if name == "lorafleet:request_failure_total":
            labels = dict(labels)
            assert labels["model_name"] == BASE
            out[labels["code"]] = value
    return out


async def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def test_banner_states_device_dtype_pool_and_threads(demo_server):
    records = demo_server.records()
    banner = {k: v for r in records if r["logger"] == "server" for k, v in r.items()}
    assert banner["device"] == "cpu" and banner["dtype"] == "float32" and banner["pool_pages"] == 40
    policy = thread_policy(0, 1)
    assert banner["executor_threads"] == policy.executor_threads and banner["cores"] == policy.cores


async def test_executor_runs_the_thread_count_the_banner_states(demo_server):
    async with aiohttp.ClientSession() as session, session.get(demo_server.url + "/health") as resp:
        health = await resp.json()
    (executor,) = health["executors"]
    assert executor["torch_threads"] == thread_policy(0, 1).executor_threads


async def test_access_lines_match_what_clients_got(demo_server):
    client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="unused")
    got = {}
    for name in ADAPTERS:  # one after another: loads, and evictions from the 40-page pool
        resp = await client.completions.create(model=name, prompt="hello there\n", max_tokens=24, temperature=0)
        got[resp.id.removeprefix("cmpl-")] = (name, resp.usage)
    async with aiohttp.ClientSession() as session, session.ws_connect(demo_server.url.replace("http", "ws")
                                                                      + "/v1/stream") as ws:
        await ws.send_json({"type": "generate", "id": "w1", "model": "upper", "prompt": "ws\n", "max_tokens": 8})
        done = None
        while done is None:
            frame = json.loads((await ws.receive()).data)
            done = frame if frame["type"] in ("done", "error") else None
    assert done["type"] == "done"
    lines = await wait_for(lambda: (a := demo_server.access()) and all(i in a for i in got) and len(a) >= 6 and a,
                           "an access line per request")
    for request_id, (name, usage) in got.items():
        line = lines[request_id]
        assert (line["adapter"], line["status"], line["finish_reason"]) == (name, 200, "stop")
        assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["e2e_ms"]
    ws_line = next(r for r in lines.values() if r["adapter"] == "upper" and r["completion_tokens"]
                   == done["usage"]["completion_tokens"] and r["e2e_ms"] == round(done["timing"]["e2e_ms"], 1))
    assert ws_line["prompt_tokens"] == done["usage"]["prompt_tokens"]
    adapter_lines = [r for r in demo_server.records() if r["logger"] == "adapters"]
    loaded = {r["adapter"] for r in adapter_lines if r["msg"] == "adapter loaded into the pool"}
    evicted = {r["adapter"] for r in adapter_lines if r["msg"] == "adapter evicted from the pool"}
    assert set(ADAPTERS) <= loaded and evicted, adapter_lines


async def test_client_errors_are_counted_by_code_and_logged(demo_server):
    before = failures(await scrape(demo_server.url))
    client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.completions.create(model="no-such-adapter", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        await client.completions.create(model="upper", prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as bad_param:
        await client.completions.create(model="upper", prompt="x", max_tokens=4, temperature=-1)
    codes = [e.value.code for e in (missing, long_prompt, bad_param)]
    async with aiohttp.ClientSession() as session, session.ws_connect(demo_server.url.replace("http", "ws")
                                                                      + "/v1/stream") as ws:
        await ws.send_json({"type": "generate", "id": "bad", "model": "nope", "prompt": "x"})
        frame = json.loads((await ws.receive()).data)
    assert frame["type"] == "error" and frame["error"]["code"] == "model_not_found"
    codes.append("model_not_found")
    after = failures(await scrape(demo_server.url))
    for code in set(codes):
        assert after.get(code, 0) - before.get(code, 0) == codes.count(code), (code, before, after)
    lines = [r for r in demo_server.access().values() if r.get("error")]
    assert {r["error"] for r in lines} >= set(codes)
    assert {r["status"] for r in lines if r["error"] == "model_not_found"} == {404}
    output = "".join(demo_server.stdout + demo_server.stderr)
    assert "Token indices sequence length" not in output and "[transformers]" not in output


async def test_metrics_names_and_model_name_label(demo_server):
    samples = await scrape(demo_server.url)
    names = {name for name, _ in samples}
    assert "lorafleet:pool_capacity_pages" in names and "lorafleet:pool_pages_total" not in names
    assert samples[("lorafleet:pool_capacity_pages", (("model_name", BASE),))] == 40
    unlabelled = {name for name, labels in samples if "model_name" not in dict(labels)}
    assert unlabelled == {"lorafleet:lora_requests_info", "lorafleet:cache_config_info"}  # as in vLLM


async def test_admin_routes_refuse_without_an_admin_key(demo_server):
    async with aiohttp.ClientSession() as session:
        for route, body in (("load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                            ("unload_lora_adapter", {"lora_name": "upper"})):
            async with session.post(f"{demo_server.url}/v1/{route}", json=body,
                                    headers={"Authorization": "Bearer guess"}) as resp:
                assert resp.status == 403
                error = (await resp.json())["error"]
                assert error["code"] == "admin_disabled"
                assert f"/v1/{route} is disabled" in error["message"], error  # the route, not a redacted '<path>'
        async with session.get(demo_server.url + "/v1/models") as resp:
            assert "upper" in {m["id"] for m in (await resp.json())["data"]}
        async with session.get(demo_server.url + "/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/dashboard"


async def test_admin_lifecycle_lines_with_a_key(tmp_path):
    from lorafleet.engine.synthetic import write_adapter, write_model

    model = write_model("tiny", tmp_path / "model")
    write_adapter(tmp_path / "root" / "late", model, 4, seed=3)
    served = launch([str(model), "--adapter-root", str(tmp_path / "root"), "--admin-key", "k", "--torch-threads",
                     "1", "--disable-log-requests"], timeout=120)
    try:
        auth = {"Authorization": "Bearer k"}
        async with aiohttp.ClientSession() as session:
            async with session.post(served.url + "/v1/load_lora_adapter", headers=auth,
                                    json={"lora_name": "fresh", "lora_path": "late"}) as resp:
                assert resp.status == 200, await resp.text()
            async with session.post(served.url + "/v1/completions", json={
                    "model": "fresh", "prompt": [5, 6, 7], "max_tokens": 3}) as resp:
                assert resp.status == 200
            async with session.post(served.url + "/v1/unload_lora_adapter", headers=auth,
                                    json={"lora_name": "fresh"}) as resp:
                assert resp.status == 200
        # the lines reach us through a reader thread: wait until the unload's line is in, not just any line
        events = await wait_for(lambda: (lines := [(r["msg"], r.get("via")) for r in served.records()
                                                   if r["logger"] == "adapters" and r.get("adapter") == "fresh"])
                                and ("adapter unregistered", "admin") in lines and lines,
                                "the adapter's unregistered line")
        assert events[0] == ("adapter registered", "admin") and events[-1] == ("adapter unregistered", "admin")
        assert ("adapter loaded into the pool", None) in events
        assert not [r for r in served.records() if r["logger"] == "access"]  # --disable-log-requests
    finally:
        assert stop(served) == 0
    assert os.path.isdir(tmp_path / "root" / "late")

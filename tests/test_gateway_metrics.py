"""`lorafleet serve --metric-prefix vllm:` as a backend of the Kubernetes Gateway API Inference Extension:
the endpoint picker's default metric names and label formats, scraped over a real socket from a running
demo server while generations for two adapters are in flight, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_support import start_server, stop_server


@pytest.fixture(scope="module")
def server():
    proc = start_server(["--metric-prefix", "vllm:", "--max-num-seqs", "2", "--num-pages", "256"])
    yield proc
    assert stop_server(proc) == 0


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(await resp.text())}


def _sample(families: dict, name: str):
    (sample,) = families[name].samples
    return sample


async def _long(session: aiohttp.ClientSession, url: str, model: str) -> dict:
    body = {"model": model, "prompt": "abc\n", "max_tokens": 48, "ignore_eos": True, "temperature": 0.0}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_endpoint_picker_reads_vllm_names_while_adapters_run_and_wait(server):
    async with aiohttp.ClientSession() as session:
        idle = await _scrape(session, server.url)
        assert not [n for n in idle if not n.startswith("vllm:")], "every family carries the prefix"
        # two sequences run at a time (--max-num-seqs 2): upper and reverse run, rot13 waits
        jobs = [asyncio.create_task(_long(session, server.url, m)) for m in ("upper", "reverse", "rot13", "rot13")]
        seen = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and seen is None:
            families = await _scrape(session, server.url)
            info = _sample(families, "vllm:lora_requests_info")
            if info.labels["running_lora_adapters"].count(",") == 1 and info.labels["waiting_lora_adapters"]:
                seen = families
            await asyncio.sleep(0.02)
        await asyncio.gather(*jobs)
    assert seen is not None, "never scraped two running adapters and a waiting one"
    info = _sample(seen, "vllm:lora_requests_info")
    assert seen["vllm:lora_requests_info"].type == "gauge"
    running = info.labels["running_lora_adapters"].split(",")
    assert " " not in info.labels["running_lora_adapters"] and len(running) == 2
    assert set(running) <= {"upper", "reverse", "rot13"}
    assert set(info.labels["waiting_lora_adapters"].split(",")) <= {"upper", "reverse", "rot13"}
    assert info.labels["max_lora"] == "16"
    assert abs(info.value - time.time()) < 60, "the value is a UNIX timestamp"
    assert _sample(seen, "vllm:num_requests_running").value == 2
    assert _sample(seen, "vllm:num_requests_waiting").value >= 1
    assert seen["vllm:num_requests_waiting"].type == "gauge"
    assert 0.0 < _sample(seen, "vllm:kv_cache_usage_perc").value <= 1.0
    cache = _sample(seen, "vllm:cache_config_info")
    assert cache.value == 1.0 and cache.labels["num_gpu_blocks"] == "256"
    assert int(cache.labels["block_size"]) >= 16


def test_a_bad_metric_prefix_is_refused_naming_the_flag():
    out = subprocess.run([sys.executable, "-m", "lorafleet", "serve", "--metric-prefix", "vllm-x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--metric-prefix" in out.stderr and "vllm-x" in out.stderr

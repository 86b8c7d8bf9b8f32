"""/metrics and /ws/dashboard against a real engine: values agree with the engine's state at one moment."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest
from dashboard_harness import Harness, make_assets, traffic
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.dashboard import Hub, RequestRecord, StepRecord
from lorafleet.dashboard.feed import OwnerTable, patches, rle, unrle
from lorafleet.dashboard.prom import adapter_tiers
from lorafleet.dashboard.stats import FleetStats, Histogram, percentile
from lorafleet.engine.engine import EngineSnapshot

P = "lorafleet:"


# pure pieces ------------------------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_le():
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    hist.observe(0.2, weight=3)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 6), ("+Inf", 7)]
    assert hist.count == 7 and hist.total == pytest.approx(0.05 + 0.1 + 0.5 + 3.0 + 0.6)


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


def test_rle_and_patches_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 3000))
        old = rng.integers(0, 4, n).repeat(3)[:n].astype(np.int32)
        new = old.copy()
        idx = rng.integers(0, n, int(rng.integers(0, 40)))
        new[idx] = rng.integers(0, 9, idx.size)
        assert unrle(rle(old)) == old.tolist()
        patched = old.tolist()
        for start, runs in patches(old, new):
            values = unrle(runs)
            patched[start: start + len(values)] = values
        assert patched == new.tolist()
    assert rle(np.zeros(0, dtype=np.int32)) == [] and patches(old, old) == []


def test_owner_table_rebuilds_when_it_grows():
    table = OwnerTable()
    first = table.encode(["", "kv:1", "adapter:a", "kv:1"])
    assert first.tolist() == [0, 1, 2, 1] and table.generation == 0
    for i in range(5000):
        table.encode([f"kv:{i}"])
    table.encode(["", "adapter:a"])
    assert table.generation >= 1 and len(table.names) < 5000


def _snap(step: int, waiting, running, resident, usage=None) -> EngineSnapshot:
    return EngineSnapshot(step, 4, ["", "", "", ""], usage or {"free": 4, "kv": 0, "adapter": 0}, 0, 0,
                          waiting, running, resident, [], ["a", "b"], 0, 0)


def test_stats_derive_loads_waits_and_prefetch_hits():
    hub = Hub()
    stats = FleetStats(hub, default_slo_ttft_ms=100.0)
    stats.on_snapshot(_snap(1, [("r1", "a"), ("r2", "b")], [], ["b"]), now=10.0)
    stats.on_snapshot(_snap(2, [], [("r1", "a"), ("r2", "b")], ["a", "b"]), now=10.5)
    assert stats.adapter_loads == 1 and stats.adapters["a"].loads == 1
    assert stats.adapters["a"].last_load_wait_ms == pytest.approx(500.0)
    assert (stats.prefetch_hits, stats.prefetch_misses) == (1, 1)
    hub.publish_step(StepRecord(3, 2, 2, 12.0, ["a"], adapter_loads=["a", "b"], adapter_load_ms={"b": 3.0}))
    assert stats.adapters["a"].mean_load_ms == 12.0 and stats.adapters["b"].mean_load_ms == 3.0
    assert stats.adapter_load.count == 2
    now = time.time()
    hub.publish_record(RequestRecord("x", "a", 5, 9, "length", ttft_ms=50.0, e2e_ms=300.0, tpot_ms=20.0,
                                     finished_at=now))
    hub.publish_record(RequestRecord("y", "a", 5, 2, "stop", ttft_ms=150.0, e2e_ms=200.0, tpot_ms=10.0,
                                     finished_at=now))
    hub.publish_record(RequestRecord("z", None, 5, 0, None, error_code="early_aborted", finished_at=now))
    summary = stats.summary(now)
    assert summary.requests == 3 and summary.slo_met == 1 and summary.slo_attainment == pytest.approx(1 / 3)
    assert stats.itl.count == 8 + 1 and stats.tpot.count == 2 and stats.ttft.count == 2
    assert stats.success == {"length": 1, "stop": 1} and stats.failures == {"early_aborted": 1}
    assert stats.adapters["a"].requests == 2 and stats.adapters["a"].completion_tokens == 11


# against a real engine ------------------------------------------------------------------------------------
@pytest.fixture
async def harness(tmp_path):
    model, adapters = make_assets(tmp_path, [4, 8, 8, 16, 16, 32, 32, 64])
    h = Harness(model, adapters, num_pages=100, max_adapters_per_batch=4, max_num_seqs=12, step_delay=0.002)
    url = await h.start()
    yield h, url, list(adapters)
    await h.stop()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, **labels) -> float:
    """The sample of gauge or counter `name` (counters expose `<name>_total`) with these labels."""
    for sample in families[P + name].samples:
        if sample.name in (P + name, P + name + "_total") and all(sample.labels.get(k) == v
                                                                  for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def _hist(families: dict, name: str) -> tuple[float, float, float]:
    samples = families[P + name].samples
    count = next(s.value for s in samples if s.name.endswith("_count"))
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    inf = next(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    return count, total, inf


def check_agreement(text: str, hub: Hub, max_lora: int) -> None:
    """Every engine-derived family equals what the hub's snapshot and records say."""
    f = _families(text)
    snap = hub.snapshot
    assert _value(f, "engine_step") == snap.step
    assert _value(f, "num_requests_running") == len(snap.running)
    assert _value(f, "num_requests_waiting") == len(snap.waiting)
    for kind in ("free", "kv", "adapter"):
        assert _value(f, "pool_pages", kind=kind) == snap.usage[kind]
        assert snap.usage[kind] == sum(1 for o in snap.page_owner if o.startswith(kind) or (kind == "free" and not o))
    assert _value(f, "kv_cache_usage_perc") == pytest.approx(snap.usage["kv"] / snap.num_pages)
    assert _value(f, "num_preemptions") == snap.preemptions
    assert _value(f, "adapter_evictions") == snap.evictions
    assert _value(f, "adapter_cache_hits") == snap.cache_hits
    assert _value(f, "adapter_cache_misses") == snap.cache_misses
    for tier, count in adapter_tiers(snap).items():
        assert _value(f, "adapters", tier=tier) == count
    info = f[P + "lora_requests_info"].samples[0].labels
    assert info["running_lora_adapters"] == ",".join(sorted({a for _, a in snap.running if a}))
    assert info["waiting_lora_adapters"] == ",".join(sorted({a for _, a in snap.waiting if a}))
    assert info["max_lora"] == str(max_lora)
    records = list(hub.records)
    ttft = [r.ttft_ms / 1e3 for r in records if r.ttft_ms is not None]
    count, total, inf = _hist(f, "time_to_first_token_seconds")
    assert count == inf == len(ttft) and total == pytest.approx(sum(ttft))
    count, _, _ = _hist(f, "e2e_request_latency_seconds")
    assert count == sum(r.e2e_ms is not None for r in records)
    for reason in {r.finish_reason for r in records if r.error_code is None}:
        expected = sum(r.finish_reason == reason and r.error_code is None for r in records)
        assert _value(f, "request_success", finished_reason=reason) == expected
    assert _value(f, "generation_tokens") == sum(r.completion_tokens for r in records)
    assert _value(f, "early_aborted_requests") == hub.counters.get("early_aborted", 0)


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def _scrape_paused(h: Harness, url: str) -> str:
    """A scrape during which the (paused) hub did not change."""
    for _ in range(20):
        snap, n = h.hub.snapshot, len(h.hub.records)
        text = await _scrape(url)
        if h.hub.snapshot is snap and len(h.hub.records) == n:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError("the hub kept changing while paused")


async def test_metrics_agree_with_engine_during_and_after_traffic(harness):
    h, url, names = harness
    mix = [None, *names]
    load = asyncio.create_task(traffic(url, mix, count=60, concurrency=10, seed=1))
    busy_seen = 0
    for _ in range(6):
        await asyncio.sleep(0.6)
        await h.pause()
        check_agreement(await _scrape_paused(h, url), h.hub, max_lora=4)
        busy_seen += len(h.hub.snapshot.running) > 0
        h.resume()
    finals = await asyncio.wait_for(load, 240)
    assert len(finals) == 60 and all(e["type"] == "done" for e in finals)
    await asyncio.wait_for(h.idle.wait(), 30)
    await h.pause()
    text = await _scrape_paused(h, url)
    check_agreement(text, h.hub, max_lora=4)
    f = _families(text)
    assert busy_seen >= 1
    assert _value(f, "request_success", finished_reason="length") == 60
    assert _value(f, "adapter_loads") >= 4 and _value(f, "adapter_evictions") >= 1
    with_adapter = sum(r.adapter is not None for r in h.hub.records)
    assert _value(f, "adapter_prefetch_hits") + _value(f, "adapter_prefetch_misses") >= with_adapter > 0
    assert _value(f, "slo_attainment") == pytest.approx(1.0)
    assert not any(name.startswith(P) for name in REGISTRY._names_to_collectors), "uses the global registry"


async def test_dashboard_feed_snapshot_then_deltas_decode_to_the_pool(harness):
    h, url, names = harness
    load = asyncio.create_task(traffic(url, [None, *names], count=30, concurrency=8, seed=2))
    owners: list[str] = []
    table: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws/dashboard") as ws:
        stamps = []
        for i in range(12):
            msg = json.loads((await ws.receive(timeout=5)).data)
            stamps.append(time.monotonic())
            assert msg["type"] == ("snapshot" if i == 0 else "delta")
            owners, table = _apply(msg, owners, table)
        assert (len(stamps) - 1) / (stamps[-1] - stamps[0]) >= 2.0
        await h.pause()
        await asyncio.sleep(0.3)
        snap = h.hub.snapshot
        for _ in range(10):
            msg = json.loads((await ws.receive(timeout=5)).data)
            owners, table = _apply(msg, owners, table)
            if msg["engine"]["step"] == snap.step:
                break
        assert owners == snap.page_owner
        assert msg["engine"]["usage"] == snap.usage and msg["engine"]["running"] == len(snap.running)
        h.resume()
    await asyncio.wait_for(load, 240)


def _apply(msg: dict, owners: list[str], table: list[str]) -> tuple[list[str], list[str]]:
    """Client-side decoding as static/dashboard.js does it."""
    table = table[: msg["owners_from"]] + msg["owners"]
    if msg["type"] == "snapshot":
        return [table[c] for c in unrle(msg["pool"])], table
    owners = list(owners)
    for start, runs in msg["pool_patches"]:
        values = [table[c] for c in unrle(runs)]
        owners[start: start + len(values)] = values
    return owners, table


async def test_load_and_unload_adapter_are_admin_only(harness, tmp_path):
    h, url, names = harness
    from lorafleet.engine.synthetic import write_adapter

    path = write_adapter(tmp_path / "extra", tmp_path / "model", rank=8, seed=99)
    body = {"lora_name": "extra", "lora_path": str(path)}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 401
        auth = {"Authorization": "Bearer secret"}
        async with session.post(url + "/v1/load_lora_adapter", json=body, headers=auth) as resp:
            assert resp.status == 200
        f = _families(await _scrape(url))
        assert sum(_value(f, "adapters", tier=t) for t in ("gpu", "host", "disk")) == len(names) + 1
        async with session.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}, headers=auth) as r:
            assert r.status == 200
    assert "extra" not in h.hub.snapshot.registered_adapters


def test_metric_prefix_and_per_app_registries():
    from lorafleet.dashboard.prom import make_registry, render

    hub = Hub()
    hub.publish_snapshot(_snap(3, [("w", "b")], [("r", "a")], ["a"], {"free": 1, "kv": 2, "adapter": 1}))
    stats = FleetStats(hub)
    vllm = _families(render(make_registry(stats, 8, prefix="vllm:")).decode())
    ours = _families(render(make_registry(stats, 8)).decode())
    assert vllm["vllm:num_requests_running"].samples[0].value == 1
    assert vllm["vllm:kv_cache_usage_perc"].samples[0].value == 0.5
    assert {n.replace("vllm:", P) for n in vllm} == set(ours)
    info = ours[P + "lora_requests_info"].samples[0].labels
    assert info == {"running_lora_adapters": "a", "waiting_lora_adapters": "b", "max_lora": "8"}


def test_serving_extras_only_when_the_hub_has_them():
    from dataclasses import dataclass

    from lorafleet.dashboard.feed import serving_extras

    @dataclass
    class Counters:
        requested: int = 3
        loaded: int = 2

    class ServingHub(Hub):
        healthy, health_reason, prefetch = False, "executor failed", Counters()

    assert serving_extras(Hub()) == {}
    extras = serving_extras(ServingHub())
    assert extras["health"] == {"healthy": False, "reason": "executor failed", "draining": False}
    assert extras["prefetcher"] == {"requested": 3, "loaded": 2}

"""Fleet figures on the demo model (CPU is enough): routing overhead, 1 vs 2 replicas, adapter affinity.

    python bench/fleet.py --out bench/results/fleet-cpu.json

For each configuration (1 replica with our router; 2 replicas with our router; 2 replicas with Ray's default
router) it starts `lorafleet fleet` (its own local Ray cluster), then:

1. overhead: `--overhead-requests` sequential one-token completions through the fleet and straight to one
   replica's own server (its loopback URL from /fleet/state), interleaved; p50/p99 of both and of the
   difference of the medians;
2. throughput: `--requests` completions (demo adapters drawn Zipf-like, plus the base model; random demo
   inputs; `--max-tokens` tokens) with `--concurrency` in flight; requests/s, output tokens/s, the share
   answered right by meaning;
3. affinity: per adapter, the share of its requests served by its most used replica ("home hit rate"), in
   that run and in a low-load run (`--low-concurrency` in flight, below the spill queue).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp

from lorafleet.engine.demo import BASE_MODEL_NAME, TASKS, echo, random_input
from lorafleet.loadgen.launch import Launched, launch, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fleet(replicas: int, router: str, server_args: list[str], ray_cpus: int) -> Launched:
    port = free_port()
    cmd = [sys.executable, "-m", "lorafleet", "fleet", "--replicas", str(replicas), "--port", str(port),
           "--ray-num-cpus", str(ray_cpus), "--router", router, "--", "--torch-threads", "1", *server_args]
    return launch(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, "lorafleet fleet: ready on ", 600, new_session=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def complete(session: aiohttp.ClientSession, url: str, model: str, line: str,
                   max_tokens: int) -> tuple[float, str | None, str, int]:
    """(seconds, serving replica, text, completion tokens)."""
    body = {"model": model, "prompt": line + "\n", "max_tokens": max_tokens, "temperature": 0.0}
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {data}")
        seconds = time.perf_counter() - start
        return (seconds, resp.headers.get("x-lorafleet-replica"), data["choices"][0]["text"],
                data["usage"]["completion_tokens"])


async def overhead(url: str, n: int) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/fleet/state") as resp:
            replica, report = sorted((await resp.json())["replicas"].items())[0]
        direct_url = report["url"]
        for _ in range(5):  # warm both paths
            await complete(session, url, "upper", "warm", 1)
            await complete(session, direct_url, "upper", "warm", 1)
        fleet, direct = [], []
        for i in range(n):
            line = "overhead probe" if i % 2 else "abc"
            fleet.append((await complete(session, url, BASE_MODEL_NAME, line, 1))[0])
            direct.append((await complete(session, direct_url, BASE_MODEL_NAME, line, 1))[0])
    ms = lambda xs, q: round(1000 * pct(xs, q), 2)
    return {"requests": n, "max_tokens": 1, "model": "base", "direct_server": f"replica {replica}'s own server",
            "fleet_ms": {"p50": ms(fleet, 50), "p99": ms(fleet, 99)},
            "direct_ms": {"p50": ms(direct, 50), "p99": ms(direct, 99)},
            "overhead_ms": {"p50": round(ms(fleet, 50) - ms(direct, 50), 2),
                            "p99": round(ms(fleet, 99) - ms(direct, 99), 2)}}


def workload(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    targets = [*TASKS, BASE_MODEL_NAME]
    weights = [1 / (i + 1) for i in range(len(targets))]  # Zipf-like popularity
    return [(rng.choices(targets, weights)[0], random_input(rng)) for _ in range(n)]


async def throughput(url: str, work: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[str, str, float, str | None, str, int]] = []

    async def one(session, model, line):
        async with sem:
            seconds, replica, text, tokens = await complete(session, url, model, line, max_tokens)
            results.append((model, line, seconds, replica, text, tokens))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, m, line) for m, line in work))
        elapsed = time.perf_counter() - start
    right = sum(text.rstrip("\n") == (echo if m == BASE_MODEL_NAME else TASKS[m])(line)
                for m, line, _, _, text, _ in results)
    by_adapter: dict[str, Counter] = defaultdict(Counter)
    for m, _, _, replica, _, _ in results:
        by_adapter[m][replica] += 1
    home = {m: round(c.most_common(1)[0][1] / sum(c.values()), 3) for m, c in sorted(by_adapter.items())
            if m != BASE_MODEL_NAME}
    adapter_requests = sum(sum(c.values()) for m, c in by_adapter.items() if m != BASE_MODEL_NAME)
    weighted = sum(by_adapter[m].most_common(1)[0][1] for m in home) / max(1, adapter_requests)
    latencies = [r[2] for r in results]
    return {"requests": len(results), "concurrency": concurrency, "max_tokens": max_tokens,
            "seconds": round(elapsed, 2), "requests_per_s": round(len(results) / elapsed, 2),
            "output_tokens_per_s": round(sum(r[5] for r in results) / elapsed, 1),
            "latency_s": {"p50": round(pct(latencies, 50), 3), "p99": round(pct(latencies, 99), 3)},
            "right_by_meaning": round(right / len(results), 3),
            "base_requests_by_replica": dict(by_adapter[BASE_MODEL_NAME]),
            "adapter_home_hit_rate": {"mean_over_requests": round(weighted, 3), "per_adapter": home,
                                      "replicas_per_adapter": {m: len(c) for m, c in sorted(by_adapter.items())
                                                               if m != BASE_MODEL_NAME}}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/fleet-cpu.json")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--low-concurrency", type=int, default=3, help="in flight for the low-load affinity run")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--ray-num-cpus", type=int, default=4)
    p.add_argument("--seed", type=int, default=20261130)
    p.add_argument("--server-args", default="", help="more `lorafleet serve` arguments for every replica, one string "
                   "(e.g. \"--device cuda --dtype bfloat16\": one GPU per replica)")
    args = p.parse_args(argv)
    server_args = ["--max-num-seqs", str(args.max_num_seqs), *shlex.split(args.server_args)]
    work = workload(args.requests, args.seed)
    runs = {}
    for name, replicas, router in (("1-replica", 1, "affinity"), ("2-replicas", 2, "affinity"),
                                   ("2-replicas-ray-default-router", 2, "ray-default")):
        fleet = start_fleet(replicas, router, server_args, args.ray_num_cpus)
        url = fleet.url
        try:
            run = {"replicas": replicas, "router": router}
            if name == "2-replicas":
                run["overhead"] = asyncio.run(overhead(url, args.overhead_requests))
            asyncio.run(throughput(url, work[: max(16, len(work) // 8)], args.concurrency, args.max_tokens))  # warm
            run["throughput"] = asyncio.run(throughput(url, work, args.concurrency, args.max_tokens))
            if replicas > 1:  # below the spill queue: where each adapter goes when nothing forces it to spread
                run["low_load"] = asyncio.run(throughput(url, work[: len(work) // 2], args.low_concurrency,
                                                         args.max_tokens))
            runs[name] = run
            print(name, json.dumps(run), flush=True)
        finally:
            stop(fleet.proc, signal.SIGINT, 120, new_session=True)
    one, two = runs["1-replica"]["throughput"], runs["2-replicas"]["throughput"]
    ray_default = runs["2-replicas-ray-default-router"]
    result = {
        "command": "python bench/fleet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server_args": server_args, "runs": runs,
        "summary": {"overhead_ms_p50": runs["2-replicas"]["overhead"]["overhead_ms"]["p50"],
                    "overhead_ms_p99": runs["2-replicas"]["overhead"]["overhead_ms"]["p99"],
                    "throughput_2_vs_1": round(two["requests_per_s"] / one["requests_per_s"], 2),
                    "home_hit_rate_affinity": two["adapter_home_hit_rate"]["mean_over_requests"],
                    "home_hit_rate_ray_default": ray_default["throughput"]["adapter_home_hit_rate"][
                        "mean_over_requests"],
                    "home_hit_rate_low_load_affinity": runs["2-replicas"]["low_load"]["adapter_home_hit_rate"][
                        "mean_over_requests"],
                    "home_hit_rate_low_load_ray_default": ray_default["low_load"]["adapter_home_hit_rate"][
                        "mean_over_requests"],
                    "throughput_2_affinity_vs_ray_default": round(
                        two["requests_per_s"] / ray_default["throughput"]["requests_per_s"], 2)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Event-loop cost per step of delivering a step's deltas to streaming clients, without a GPU.

The real frontend (actors/frontend.py, actors/openai_api.py, the aiohttp app of actors/app.py and the Router)
serves on a loopback socket in this process. A step source stands in for the scheduler actor: it answers each
Submit with Admitted and, every `--step-ms`, sends one `StepDeltas` carrying one token for every running
request (the last one with its finish), exactly the message the scheduler sends. A client in a separate
process keeps `--concurrency` streaming generations in flight: over `--num-sockets` WebSockets (as the load
generator's `--protocol ws --num-sockets 4` does: aiohttp's client, permessage-deflate as it negotiates) or
as that many OpenAI SSE streams (`/v1/completions`, `stream: true`), starting a new generation when one ends.

The event loop's busy time is measured by timing its selector (time outside `select` = work on the loop);
the step source's own time is timed and subtracted, so `delivery_ms_per_step` is the loop time per step that
delivering a step's deltas (and reading the clients' new requests) costs — the time the scheduler actor,
which shares that loop, cannot use. `lag_ms` is how late each step's message went out against its schedule.

    python bench/frontend_host.py --protocol ws --out bench/results/frontend-host-ws-cpu.json [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing
import os
import pstats
import random
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
from aiohttp import web

from lorafleet.actors.app import build_app
from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.frontend import Frontend, Router
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.protocol import ParseContext
from lorafleet.actors.schema import Admitted, Cancel, DeltaItem, StepDeltas, Submit

MODEL = "bench-base"
WORDS = [" the", " a", " lorafleet", " token", " step", " of", "\n", " 42", " é", " and"]


class StepSource:
    """The scheduler's stand-in: Admitted for each Submit, one StepDeltas per `step_s` for all running
    requests (one token each; `max_tokens` reached → finished with usage and timing)."""

    def __init__(self, admission: LocalChannel, router_box: LocalChannel, step_s: float) -> None:
        self.admission, self.router_box, self.step_s = admission, router_box, step_s
        self.running: dict[str, list[int]] = {}  # request id -> [generated, max_tokens, prompt_tokens]
        self.steps = self.items = 0
        self.busy_s = self.cpu_s = 0.0
        self.lags: list[float] = []

    def _mailbox(self) -> None:
        while (msg := self.admission.poll()) is not None:
            if isinstance(msg, Submit):
                self.running[msg.request_id] = [0, int(msg.params.get("max_tokens") or 16), len(msg.prompt_ids)]
                self.router_box.send(Admitted(msg.request_id))
            elif isinstance(msg, Cancel) and msg.request_id in self.running:
                del self.running[msg.request_id]

    def _step(self) -> None:
        items = []
        for rid, state in list(self.running.items()):
            state[0] += 1
            token = 3 + (self.items + len(items)) * 7919 % 31997
            if state[0] >= state[1]:
                del self.running[rid]
                items.append(DeltaItem(rid, [token], WORDS[token % len(WORDS)], True, "length", state[2], state[0],
                                       queue_ms=1.0, ttft_ms=30.0, e2e_ms=25.0 * state[0]))
            else:
                items.append(DeltaItem(rid, [token], WORDS[token % len(WORDS)]))
        self.steps, self.items = self.steps + 1, self.items + len(items)
        self.router_box.send(StepDeltas(self.steps, items))

    async def run(self) -> None:
        due = time.perf_counter()
        while True:
            due += self.step_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:  # behind schedule: yield once so the loop's other work runs, then step
                await asyncio.sleep(0)
            started, cpu = time.perf_counter(), time.thread_time()
            self.lags.append(max(0.0, started - due))
            self._mailbox()
            self._step()
            self.busy_s += time.perf_counter() - started
            self.cpu_s += time.thread_time() - cpu


class LoopClock:
    """Time the loop spends inside its selector's `select` (idle); wall minus that is its busy time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.idle_s = 0.0
        selector = loop._selector  # asyncio's selector loop: every wait for I/O or a timer goes through it
        inner = selector.select

        def select(timeout=None):
            started = time.perf_counter()
            try:
                return inner(timeout)
            finally:
                self.idle_s += time.perf_counter() - started

        selector.select = select


# the client (its own process) ----------------------------------------------------------------------------
async def _ws_client(url: str, sockets: int, concurrency: int, min_tokens: int, max_tokens: int,
                     counts, stop) -> None:
    rng = random.Random(1)
    async with aiohttp.ClientSession() as session:
        async def one_socket(k: int, share: int) -> None:
            ws = await session.ws_connect(url.replace("http", "ws", 1) + "/v1/stream", heartbeat=None)
            serial = 0

            async def generate() -> None:
                nonlocal serial
                serial += 1
                await ws.send_str(json.dumps({"type": "generate", "id": f"s{k}-{serial}", "model": MODEL,
                                              "prompt": [5] * rng.randint(8, 64), "ignore_eos": True,
                                              "max_tokens": rng.randint(min_tokens, max_tokens)}))

            for _ in range(share):
                await generate()
            async for msg in ws:
                frame = json.loads(msg.data)
                counts[0] += 1
                if frame["type"] == "done":
                    counts[1] += 1
                    if not stop.is_set():
                        await generate()
                elif frame["type"] == "error":
                    counts[2] += 1

        shares = [concurrency // sockets + (k < concurrency % sockets) for k in range(sockets)]
        await asyncio.gather(*(one_socket(k, share) for k, share in enumerate(shares)))


async def _sse_client(url: str, concurrency: int, min_tokens: int, max_tokens: int, counts, stop) -> None:
    rng = random.Random(1)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def stream() -> None:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": [5] * rng.randint(8, 64), "ignore_eos": True, "stream": True,
                        "max_tokens": rng.randint(min_tokens, max_tokens)}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        counts[2] += 1
                        await resp.read()
                        continue
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            counts[0] += 1
                counts[1] += 1

        await asyncio.gather(*(stream() for _ in range(concurrency)))


def client_main(args: dict, counts, stop) -> None:
    coro = _ws_client(args["url"], args["num_sockets"], args["concurrency"], args["min_tokens"],
                      args["max_tokens"], counts, stop) if args["protocol"] == "ws" else \
        _sse_client(args["url"], args["concurrency"], args["min_tokens"], args["max_tokens"], counts, stop)
    try:
        asyncio.run(coro)
    except (aiohttp.ClientError, ConnectionError):
        pass


# the measurement ------------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop)
    admission, scheduler, router_box = LocalChannel(), LocalChannel(), LocalChannel()
    router = Router(router_box)
    ctx = ParseContext(MODEL, set(), 4096, 32000)
    frontend = Frontend(ctx, admission, scheduler, router, ServeHub())
    runner = web.AppRunner(build_app(frontend), access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    source = StepSource(admission, router_box, args.step_ms / 1000)
    tasks = [asyncio.create_task(router.run()), asyncio.create_task(source.run())]
    mp = multiprocessing.get_context("spawn")
    counts, stop = mp.Array("q", 3, lock=False), mp.Event()
    client = mp.Process(target=client_main, args=({**vars(args), "url": url}, counts, stop), daemon=True)
    client.start()
    try:
        await asyncio.sleep(args.warmup)
        profiler = cProfile.Profile() if args.profile else None
        start = _snapshot(source, clock, counts)
        cpu0 = time.process_time()
        if profiler:
            profiler.enable()
        await asyncio.sleep(args.seconds)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - cpu0
        end = _snapshot(source, clock, counts)
    finally:
        stop.set()
        client.terminate()
        client.join(5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return _result(start, end, source, cpu)


def _snapshot(source: StepSource, clock: LoopClock, counts) -> dict:
    return {"t": time.perf_counter(), "idle": clock.idle_s, "steps": source.steps, "items": source.items,
            "source": source.busy_s, "source_cpu": source.cpu_s, "lags": len(source.lags), "frames": counts[0],
            "done": counts[1], "errors": counts[2]}


def _result(a: dict, b: dict, source: StepSource, cpu_s: float) -> dict:
    wall = b["t"] - a["t"]
    steps = b["steps"] - a["steps"]
    busy = wall - (b["idle"] - a["idle"])
    delivery = busy - (b["source"] - a["source"])
    lags = sorted(source.lags[a["lags"]:b["lags"]])
    return {
        "seconds": round(wall, 2), "steps": steps, "steps_per_s": round(steps / wall, 1),
        "mean_seqs_per_step": round((b["items"] - a["items"]) / steps, 1),
        "frames_per_s": round((b["frames"] - a["frames"]) / wall),
        "generations_done_per_s": round((b["done"] - a["done"]) / wall, 1),
        "client_errors": b["errors"] - a["errors"],
        "loop_busy_fraction": round(busy / wall, 3),
        "loop_busy_ms_per_step": round(busy * 1000 / steps, 3),
        "source_ms_per_step": round((b["source"] - a["source"]) * 1000 / steps, 3),
        "delivery_ms_per_step": round(delivery * 1000 / steps, 3),
        "delivery_us_per_frame": round(delivery * 1e6 / max(1, b["items"] - a["items"]), 2),
        "process_cpu_ms_per_step": round(cpu_s * 1000 / steps, 3),
        "delivery_cpu_ms_per_step": round((cpu_s - (b["source_cpu"] - a["source_cpu"])) * 1000 / steps, 3),
        "delivery_cpu_us_per_frame": round((cpu_s - (b["source_cpu"] - a["source_cpu"])) * 1e6
                                           / max(1, b["items"] - a["items"]), 2),
        "lag_ms_p50": round(statistics.median(lags) * 1000, 2) if lags else None,
        "lag_ms_p99": round(lags[int(0.99 * (len(lags) - 1))] * 1000, 2) if lags else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("ws", "sse"), default="ws")
    parser.add_argument("--num-sockets", type=int, default=4, help="WebSockets (ws); SSE uses one per stream")
    parser.add_argument("--concurrency", type=int, default=256, help="generations in flight")
    parser.add_argument("--step-ms", type=float, default=25.0, help="one StepDeltas every this many ms")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured window")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(json.dumps(result, indent=1))
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        doc = {"schema": "lorafleet.frontend-host/1",
               "command": "python bench/frontend_host.py " + " ".join(sys.argv[1:]), "commit": commit,
               "config": vars(args), "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
               "result": result}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

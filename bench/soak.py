"""Overload soak on the CPU demo server: load ~3x its measured capacity, with a phase of artificially slowed
steps, checking that every request ends exactly once, that admitted requests get their first token within
the first-token deadline, and that the server is healthy at the end.

    python bench/soak.py --out bench/results/soak-cpu.json            # the committed run (docs/benchmarks.md)
    python bench/soak.py --phase-s 5 --calibrate-s 3 --out /tmp/s.json  # a short run (tests/test_soak.py)

Phases: `normal` (no delay), `slowed` (every executor step sleeps --slow-step-s first, through the
test-only LORAFLEET_TEST_STEP_DELAY_FILE hook in actors/executor.py), `recovered` (no delay). Arrivals are
Poisson at --overload times the capacity measured by a closed-loop calibration before the phases. 80% of
requests stream over WebSockets (a few sockets, many generations each), 20% are non-streamed HTTP
completions. Results (JSON): sent, completed, shed by reason, first-token latency percentiles (the server's
own `timing.ttft_ms` of WS generations, and the client's), violations (missing or duplicate terminal frames,
first tokens past the deadline), /health at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lorafleet.loadgen.launch import Launched, launch, stop

STEP_DELAY_ENV = "LORAFLEET_TEST_STEP_DELAY_FILE"
SHED_CODES = ("queue_full", "slo_unattainable", "too_many_generations")  # load refused or dropped, by design


@dataclass
class Outcome:
    """One request as the client saw it."""

    phase: str
    kind: str  # ws | http
    sent_at: float
    terminals: int = 0
    result: str = ""  # completed | shed:<code> | error:<code>
    stage: str = ""  # admission (refused before `accepted`) | evicted (error after `accepted`)
    ttft_server_ms: float | None = None
    ttft_client_ms: float | None = None


@dataclass
class Soak:
    url: str
    deadline_ms: float
    max_tokens: int
    sockets: list = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    events: dict[str, asyncio.Event] = field(default_factory=dict)
    first_delta: dict[str, float] = field(default_factory=dict)

    async def read_socket(self, ws) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            self.on_frame(json.loads(msg.data))

    def on_frame(self, frame: dict) -> None:
        cid, kind = frame.get("id"), frame.get("type")
        out = self.outcomes.get(cid)
        if out is None:
            return
        if kind == "accepted":
            out.stage = "evicted"
        elif kind == "delta" and cid not in self.first_delta:
            self.first_delta[cid] = time.monotonic()
        elif kind in ("done", "error"):
            out.terminals += 1
            if kind == "done":
                out.result = "completed"
                out.ttft_server_ms = frame["timing"]["ttft_ms"]
                if cid in self.first_delta:
                    out.ttft_client_ms = (self.first_delta[cid] - out.sent_at) * 1000
            else:
                code = frame["error"]["code"]
                shed = code in SHED_CODES
                out.result = ("shed:" if shed else "error:") + code
                out.stage = out.stage or "admission"
            self.events[cid].set()

    async def send_ws(self, cid: str, phase: str, prompt: str) -> None:
        ws = self.sockets[hash(cid) % len(self.sockets)]
        self.outcomes[cid] = Outcome(phase, "ws", time.monotonic())
        self.events[cid] = asyncio.Event()
        await ws.send_str(json.dumps({"type": "generate", "id": cid, "prompt": prompt, "max_tokens": self.max_tokens,
                                      "ignore_eos": True, "temperature": 0}))

    async def send_http(self, session, cid: str, phase: str, prompt: str) -> None:
        out = self.outcomes[cid] = Outcome(phase, "http", time.monotonic())
        self.events[cid] = asyncio.Event()
        body = {"prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0}
        try:
            async with session.post(self.url + "/v1/completions", json=body) as resp:
                data = await resp.json()
            out.terminals = 1
            if resp.status == 200:
                out.result = "completed"
            else:
                code = data["error"]["code"]
                out.result = ("shed:" if code in SHED_CODES else "error:") + code
                out.stage = "admission" if resp.status == 429 else "evicted"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            out.result = f"error:client_{type(exc).__name__}"
        self.events[cid].set()


async def _health(session, url: str) -> tuple[int, dict]:
    async with session.get(url + "/health") as resp:
        return resp.status, await resp.json()


async def calibrate(soak: Soak, seconds: float, concurrency: int) -> float:
    """Completed requests per second of a closed loop of `concurrency` WS generations (the capacity)."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            cid = f"cal-{w}-{i}"
            i += 1
            await soak.send_ws(cid, "calibrate", f"calibrate {i}\n")
            await soak.events[cid].wait()
            done += soak.outcomes[cid].result == "completed"

    started = time.monotonic()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return done / (time.monotonic() - started)


async def run_phases(soak: Soak, session, phases: list[tuple[str, float, float]], rate: float, delay_file: Path,
                     seed: int) -> None:
    rng = random.Random(seed)
    tasks = []
    n = 0
    for name, seconds, delay in phases:
        delay_file.write_text(str(delay))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            cid = f"{name}-{n}"
            prompt = f"soak request {n}: " + "lorafleet " * rng.randrange(4) + "\n"
            if rng.random() < 0.8:
                await soak.send_ws(cid, name, prompt)
            else:
                tasks.append(asyncio.create_task(soak.send_http(session, cid, name, prompt)))
            n += 1
            await asyncio.sleep(rng.expovariate(rate))
    delay_file.write_text("0")
    await asyncio.gather(*tasks)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def summarize(soak: Soak, phases: list[str]) -> dict:
    def figures(outs: list[Outcome]) -> dict:
        completed = [o for o in outs if o.result == "completed"]
        shed = Counter(f"{o.result.removeprefix('shed:')}@{o.stage}" for o in outs if o.result.startswith("shed:"))
        ttft = [o.ttft_server_ms for o in completed if o.ttft_server_ms is not None]
        client = [o.ttft_client_ms for o in completed if o.ttft_client_ms is not None]
        return {
            "sent": len(outs), "completed": len(completed), "shed": dict(sorted(shed.items())),
            "errors": dict(Counter(o.result for o in outs if o.result.startswith("error:"))),
            "ttft_server_ms": {"p50": _percentile(ttft, 0.5), "p99": _percentile(ttft, 0.99),
                               "max": round(max(ttft), 1) if ttft else None},
            "ttft_client_ms": {"p50": _percentile(client, 0.5), "p99": _percentile(client, 0.99),
                               "max": round(max(client), 1) if client else None},
            "violations": {
                "no_terminal": sum(o.terminals == 0 for o in outs),
                "several_terminals": sum(o.terminals > 1 for o in outs),
                "ttft_over_deadline": sum(o.ttft_server_ms is not None and o.ttft_server_ms > soak.deadline_ms
                                          for o in completed),
            },
        }

    outs = [o for o in soak.outcomes.values() if o.phase != "calibrate"]
    return {"all": figures(outs), "phases": {p: figures([o for o in outs if o.phase == p]) for p in phases}}


def start_server(args: argparse.Namespace, delay_file: Path) -> Launched:
    cmd = [sys.executable, "-m", "lorafleet", "serve", "--port", "0", "--torch-threads", "1",
           "--disable-log-requests", "--slo-ttft-ms", str(args.deadline_ms), *args.server_args]
    return launch(cmd, {**os.environ, STEP_DELAY_ENV: str(delay_file)})


def _warnings(lines: list[str]) -> list[str]:
    """The server's warnings, errors and tracebacks among its output lines."""
    words = ("WARNING", "ERROR", "Traceback", "Task exception", "stalled")
    return [line.rstrip() for line in lines if any(word in line for word in words)]


async def soak_run(args: argparse.Namespace, url: str, delay_file: Path) -> dict:
    timeout = aiohttp.ClientTimeout(total=args.deadline_ms / 1000 + 120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        soak = Soak(url, args.deadline_ms, args.max_tokens)
        soak.sockets = [await session.ws_connect(url.replace("http", "ws", 1) + "/v1/stream")
                        for _ in range(args.sockets)]
        readers = [asyncio.create_task(soak.read_socket(ws)) for ws in soak.sockets]
        capacity = await calibrate(soak, args.calibrate_s, args.calibrate_concurrency)
        rate = max(1.0, args.overload * capacity)
        phases = [("normal", args.phase_s, 0.0), ("slowed", args.phase_s, args.slow_step_s),
                  ("recovered", args.phase_s, 0.0)]
        started = time.monotonic()
        await run_phases(soak, session, phases, rate, delay_file, args.seed)
        pending = [e.wait() for e in soak.events.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), args.deadline_ms / 1000 + 60)
        except asyncio.TimeoutError:
            pass  # counted as no_terminal below
        await asyncio.sleep(1.0)  # a duplicate terminal frame would arrive now
        health = await _health(session, url)
        for ws in soak.sockets:
            await ws.close()
        await asyncio.gather(*readers)
    result = summarize(soak, [p for p, _, _ in phases])
    result.update(capacity_req_s=round(capacity, 2), offered_req_s=round(rate, 2),
                  duration_s=round(time.monotonic() - started, 1),
                  health_at_end={"status": health[0], "body": health[1].get("status")})
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/soak-cpu.json")
    p.add_argument("--phase-s", type=float, default=30.0, help="seconds of each phase (normal, slowed, recovered)")
    p.add_argument("--calibrate-s", type=float, default=8.0)
    p.add_argument("--calibrate-concurrency", type=int, default=8)
    p.add_argument("--overload", type=float, default=3.0, help="offered load / measured capacity")
    p.add_argument("--slow-step-s", type=float, default=0.1, help="sleep per step in the slowed phase")
    p.add_argument("--deadline-ms", type=float, default=2000.0, help="the server's --slo-ttft-ms")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sockets", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", dest="server_args", action="append", default=[],
                   help="extra `lorafleet serve` argument (repeatable)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        delay_file = Path(tmp) / "step-delay"
        delay_file.write_text("0")
        server = start_server(args, delay_file)
        try:
            result = asyncio.run(soak_run(args, server.url, delay_file))
        finally:
            exit_code = stop(server.proc, timeout=60)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"bench": "soak", "config": config, "machine": {"platform": platform.platform(),
              "cpus": os.cpu_count()}, **result, "server_exit_code": exit_code,
              "server_warnings": _warnings(server.lines)[-50:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("capacity_req_s", "offered_req_s", "all", "health_at_end",
                                             "server_exit_code")}, indent=2))
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)

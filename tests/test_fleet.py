"""`lorafleet fleet` on Ray Serve: two replicas of the demo model behind one endpoint, one Ray cluster for the
whole module (started by the fleet command itself, as an operator would). Answers are checked by meaning
against the demo tasks (engine/demo/tasks.py), routing by the `x-lorafleet-replica` header and the WebSocket
`accepted` frame, metrics with prometheus_client's parser; HTTP goes through the `openai` client. The fault
test runs last: it kills one replica's server under load."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("ray.serve")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lorafleet.engine.demo import BASE_MODEL_NAME, TASKS, demo_adapter_dirs, echo, random_input  # noqa: E402
from lorafleet.loadgen.launch import launch, stop  # noqa: E402

pytestmark = pytest.mark.slow
MAX_NUM_SEQS = 4
MAX_QUEUED = 40  # requests waiting in the fleet's router before 429 (above every other test's backlog)
ADMIN = {"Authorization": "Bearer fleet-admin-key"}  # runtime loads and /fleet/state need the admin key
START_TIMEOUT = 420.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self, proc: subprocess.Popen, url: str, root: Path, lines: list[str]) -> None:
        self.proc, self.url, self.root, self.lines = proc, url, root, lines

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/stream"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    port = _free_port()
    cmd = [sys.executable, "-m", "lorafleet", "fleet", "--replicas", "2", "--port", str(port), "--ray-num-cpus", "4",
           "--num-cpus-per-replica", "1", "--max-queued-requests", str(MAX_QUEUED), "--", "--adapter-root", str(root),
           "--torch-threads", "1", "--max-num-seqs", str(MAX_NUM_SEQS), "--num-pages", "256",
           "--admin-key", "fleet-admin-key"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    started = launch(cmd, env, "lorafleet fleet: ready on ", START_TIMEOUT, new_session=True)
    yield Fleet(started.proc, started.url, root, started.lines)
    assert stop(started.proc, signal.SIGINT, 90, new_session=True) == 0, started.output(200)


def _client(fleet: Fleet):
    import openai

    return openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def _complete(client, model: str, line: str, max_tokens: int = 20, **extra) -> tuple[str, str]:
    """(replica that served it, completion text) through the openai client."""
    raw = await client.completions.with_raw_response.create(model=model, prompt=line + "\n", max_tokens=max_tokens,
                                                           temperature=0.0, extra_body=extra or None)
    return raw.headers["x-lorafleet-replica"], raw.parse().choices[0].text


def _expected(model: str, line: str) -> str:
    return (echo if model == BASE_MODEL_NAME else TASKS[model])(line)


async def _state(session: aiohttp.ClientSession, fleet: Fleet) -> dict:
    async with session.get(fleet.url + "/fleet/state", headers=ADMIN) as resp:
        return await resp.json()


async def _replicas(fleet: Fleet) -> set[str]:
    async with aiohttp.ClientSession() as session:
        return set((await _state(session, fleet))["replicas"])


async def test_every_adapter_answers_by_meaning_and_base_requests_reach_both_replicas(fleet):
    rng = random.Random(20261130)
    client = _client(fleet)
    # base traffic is not multiplexed: sequential requests to an idle fleet spread over both replicas (ties broken
    # at random). First, before the burst below: after it the router's cached queue lengths (Ray's cache, entries
    # kept up to 10 s) need not both be back at 0, and then all 12 went to one replica (once in a few runs on a
    # loaded machine)
    served = [(await _complete(client, BASE_MODEL_NAME, "hello"))[0] for _ in range(12)]
    assert set(served) == await _replicas(fleet), Counter(served)
    work = [(m, random_input(rng)) for m in [*TASKS, BASE_MODEL_NAME] for _ in range(3)]
    results = await asyncio.gather(*(_complete(client, m, line) for m, line in work))
    right = Counter(m for (m, line), (_, text) in zip(work, results) if text.rstrip("\n") == _expected(m, line))
    assert sum(right.values()) >= 0.9 * len(work), right
    assert all(right[m] >= 2 for m in [*TASKS, BASE_MODEL_NAME]), right


async def test_one_adapters_sequential_requests_stay_on_one_replica(fleet):
    client = _client(fleet)
    served = [await _complete(client, "caesar3", line) for line in ("abc", "hello", "xyz abc", "the cat", "zz")]
    assert len({replica for replica, _ in served}) == 1, served
    assert [text.rstrip("\n") for _, text in served] == [TASKS["caesar3"](x) for x in
                                                          ("abc", "hello", "xyz abc", "the cat", "zz")]


async def test_a_burst_for_one_adapter_spreads_once_its_home_replicas_queue_grows(fleet):
    client = _client(fleet)
    home = (await _complete(client, "sort", "warm up"))[0]
    rng = random.Random(7)
    lines = [random_input(rng, 10, 12) for _ in range(4 * MAX_NUM_SEQS)]
    results = await asyncio.gather(*(_complete(client, "sort", line) for line in lines))
    served = Counter(replica for replica, _ in results)
    assert set(served) == await _replicas(fleet), served
    assert served[home] >= MAX_NUM_SEQS // 2, f"the home replica {home} takes the first ones: {served}"
    assert sum(text.rstrip("\n") == TASKS["sort"](line) for line, (_, text) in zip(lines, results)) >= 15


async def test_one_websocket_streams_four_adapters_and_a_cancel_stops_the_right_one(fleet):
    frames: dict[str, list[dict]] = {}
    lines = {"w0": "hello world", "w1": "abc def", "w2": "lorafleet", "w3": "the fleet"}
    models = {"w0": "upper", "w1": "reverse", "w2": "rot13", "w3": "title"}
    async with aiohttp.ClientSession() as session:
        before = await _cancelled_by_replica(session, fleet)
        async with session.ws_connect(fleet.ws_url) as ws:
            for cid, model in models.items():
                long = cid == "w1"
                await ws.send_str(json.dumps({"type": "generate", "id": cid, "model": model,
                                              "prompt": lines[cid] + "\n", "max_tokens": 100 if long else 20,
                                              "ignore_eos": long, "temperature": 0.0}))
            ended: set[str] = set()
            while len(ended) < len(models):
                frame = json.loads((await asyncio.wait_for(ws.receive(), 120)).data)
                frames.setdefault(frame["id"], []).append(frame)
                if frame["id"] == "w1" and frame["type"] == "delta" and sum(f["type"] == "delta"
                                                                            for f in frames["w1"]) == 3:
                    await ws.send_str(json.dumps({"type": "cancel", "id": "w1"}))
                if frame["type"] in ("done", "error"):
                    ended.add(frame["id"])
        accepted = {cid: fs[0] for cid, fs in frames.items()}
        assert all(f["type"] == "accepted" and f["replica"] for f in accepted.values()), accepted
        for cid in ("w0", "w2", "w3"):
            text = "".join(f["text"] for f in frames[cid] if f["type"] == "delta")
            assert frames[cid][-1]["finish_reason"] == "stop" and text.rstrip("\n") == TASKS[models[cid]](lines[cid])
        assert frames["w1"][-1]["type"] == "done" and frames["w1"][-1]["finish_reason"] == "cancelled"
        assert sum(f["type"] == "delta" for f in frames["w1"]) < 60, "the cancelled generation stopped early"
        # the cancel reached the server that ran it: that replica counts one more cancelled request, no other does
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = await _cancelled_by_replica(session, fleet)
            grew = {r for r in after if after[r] > before.get(r, 0)}
            if grew:
                break
            await asyncio.sleep(0.2)
        assert grew == {accepted["w1"]["replica"]}, (before, after)


async def test_bad_input_gets_a_clear_error_and_the_socket_keeps_serving(fleet):
    async with aiohttp.ClientSession() as session:
        async with session.post(fleet.url + "/v1/completions", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "body"
        async with session.post(fleet.url + "/v1/completions",
                                json={"model": "no-such-adapter", "prompt": "x", "max_tokens": 2}) as resp:
            assert resp.status == 404 and "no-such-adapter" in (await resp.json())["error"]["message"]
        async with session.ws_connect(fleet.ws_url) as ws:
            await ws.send_str("{not json")
            await ws.send_str(json.dumps({"type": "generate", "model": "upper", "prompt": "x\n"}))
            await ws.send_str(json.dumps({"type": "stop", "id": "s1"}))
            await ws.send_str(json.dumps({"type": "generate", "id": "s2", "model": "upper", "prompt": "x\n",
                                          "max_tokens": -3}))
            await ws.send_str(json.dumps({"type": "generate", "id": "ok", "model": "upper", "prompt": "abc\n",
                                          "max_tokens": 20, "temperature": 0.0}))
            frames = []
            while not frames or not (frames[-1]["id"] == "ok" and frames[-1]["type"] in ("done", "error")):
                frames.append(json.loads((await asyncio.wait_for(ws.receive(), 60)).data))
    errors = [f for f in frames if f["type"] == "error"]
    assert [(f["id"], f["error"]["code"]) for f in errors[:3]] == [
        (None, "invalid_json"), (None, "invalid_request"), ("s1", "unknown_type")], errors
    assert any(f["id"] == "s2" and f["error"]["param"] == "max_tokens" for f in errors), errors
    assert "".join(f.get("text", "") for f in frames if f["id"] == "ok").rstrip("\n") == "ABC"


async def test_past_the_fleet_queue_requests_get_429_queue_full_and_the_rest_are_served(fleet):
    import openai

    client = _client(fleet)
    rng = random.Random(5)
    lines = [random_input(rng) for _ in range(3 * MAX_QUEUED)]

    async def one(line: str):  # 24 tokens each (past the answer): the slots stay taken while the rest arrive
        try:
            return await _complete(client, "title", line, max_tokens=24, ignore_eos=True)
        except openai.RateLimitError as exc:
            return exc

    results = await asyncio.gather(*(one(line) for line in lines))
    refused = [r for r in results if isinstance(r, Exception)]
    served = [(line, r) for line, r in zip(lines, results) if not isinstance(r, Exception)]
    assert refused and served, (len(refused), len(served))
    assert all(r.status_code == 429 and r.body["code"] == "queue_full" and r.response.headers["Retry-After"]
               for r in refused)
    assert len(served) >= MAX_QUEUED, "the queue and the replicas' slots were all used"
    right = sum(text.split("\n")[0] == TASKS["title"](line) for line, (_, text) in served)
    assert right >= len(served) - 1


async def _metrics(session: aiohttp.ClientSession, fleet: Fleet) -> dict:
    async with session.get(fleet.url + "/metrics") as resp:
        assert resp.status == 200
        return {f.name: f for f in text_string_to_metric_families(await resp.text())}


async def _cancelled_by_replica(session: aiohttp.ClientSession, fleet: Fleet) -> dict[str, float]:
    family = (await _metrics(session, fleet))["lorafleet:request_success"]
    return {s.labels["replica"]: s.value for s in family.samples
            if s.labels.get("finished_reason") == "cancelled" and s.name.endswith("_total")}


async def _burst(client, model: str, lines: list[str]) -> list[tuple[str, str]]:
    return await asyncio.gather(*(_complete(client, model, line) for line in lines))


async def _answers_on_every_replica(fleet: Fleet, model: str, task: str, seed: int) -> None:
    """A burst for `model` spreads over both replicas and every answer is `task` applied to its input."""
    rng = random.Random(seed)
    lines = [random_input(rng, 10, 12) for _ in range(4 * MAX_NUM_SEQS)]
    results = await _burst(_client(fleet), model, lines)
    assert set(r for r, _ in results) == await _replicas(fleet), (model, Counter(r for r, _ in results))
    right = sum(text.rstrip("\n") == TASKS[task](line) for line, (_, text) in zip(lines, results))
    assert right >= len(lines) - 1, (model, results)


async def _listed(fleet: Fleet) -> dict[str, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(fleet.url + "/v1/models") as resp:
            return {m["id"]: m for m in (await resp.json())["data"]}


async def test_a_runtime_loaded_adapter_is_loaded_on_and_answers_from_both_replicas(fleet):
    shutil.copytree(demo_adapter_dirs()["upper"], fleet.root / "loaded" / "upper-copy")
    async with aiohttp.ClientSession() as session:
        async with session.post(fleet.url + "/v1/load_lora_adapter", headers=ADMIN,
                                json={"lora_name": "shouty", "lora_path": "loaded/upper-copy"}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert set(body["replicas"]) == await _replicas(fleet) and all(
            r["status_code"] == 200 for r in body["replicas"].values()), body
    await _answers_on_every_replica(fleet, "shouty", "upper", seed=3)
    listed = await _listed(fleet)
    assert set(listed["shouty"]["replicas"]) == await _replicas(fleet)
    assert set(TASKS) <= set(listed) and listed[BASE_MODEL_NAME]["parent"] is None


async def test_an_adapter_added_under_the_root_is_resolved_on_first_use_by_both_replicas(fleet):
    shutil.copytree(demo_adapter_dirs()["reverse"], fleet.root / "team-a" / "reverse-copy")  # after start-up
    assert "team-a/reverse-copy" not in await _listed(fleet)
    await _answers_on_every_replica(fleet, "team-a/reverse-copy", "reverse", seed=4)


async def test_fleet_metrics_health_and_dashboard_carry_both_replicas(fleet):
    replicas = await _replicas(fleet)
    assert len(replicas) == 2
    await _burst(_client(fleet), BASE_MODEL_NAME, ["abc"] * (4 * MAX_NUM_SEQS))  # more than one replica takes
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10  # replicas report every 0.5 s
        while True:
            families = await _metrics(session, fleet)
            served = {s.labels["replica"]: s.value for s in families["lorafleet:generation_tokens"].samples
                      if s.name.endswith("_total")}
            if (set(served) == replicas and min(served.values()) > 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert set(served) == replicas and min(served.values()) > 0, f"both replicas generated tokens: {served}"
        for name in ("lorafleet:num_requests_running", "lorafleet:kv_cache_usage_perc",
                     "lorafleet:lora_requests_info", "lorafleet:cache_config_info"):
            assert {s.labels["replica"] for s in families[name].samples} == replicas, name
        states = {s.labels["state"]: s.value for s in families["lorafleet:fleet_replicas"].samples}
        assert states == {"expected": 2, "reporting": 2, "healthy": 2}
        async with session.get(fleet.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        state = await _state(session, fleet)
        async with session.get(fleet.url + "/dashboard") as resp:
            page = await resp.text()
        rows = {r: page.split(f"<td>{r}</td>", 1)[1].split("</tr>", 1)[0] for r in replicas}
        for replica, row in rows.items():
            assert all(a in row for a in state["replicas"][replica]["resident"]), (replica, row)
            assert all(a in row for a in ("caesar3", "upper")), row


async def _http_job(client, model: str, line: str, stream: bool) -> str:
    """'completed' (right or not), 'error:<code>' for an error status or a mid-stream error event."""
    import openai

    try:
        if not stream:
            await _complete(client, model, line, max_tokens=24, ignore_eos=True)
            return "completed"
        got = await client.completions.create(model=model, prompt=line + "\n", max_tokens=24, temperature=0.0,
                                              stream=True, extra_body={"ignore_eos": True})
        async for _ in got:
            pass
        return "completed"
    except openai.APIStatusError as exc:
        return f"error:{exc.status_code}"
    except openai.APIConnectionError as exc:  # the response broke off without a terminal event
        return f"lost:{exc!r}"
    except openai.APIError as exc:  # the SSE error event of a stream whose replica failed mid-way
        return f"error:{(exc.body or {}).get('code') if isinstance(exc.body, dict) else exc.body}"


async def _ws_jobs(fleet: Fleet, jobs: list[tuple[str, str]]) -> list[str]:
    ends: dict[str, dict] = {}
    async with aiohttp.ClientSession() as session, session.ws_connect(fleet.ws_url) as ws:
        for i, (model, line) in enumerate(jobs):
            await ws.send_str(json.dumps({"type": "generate", "id": f"k{i}", "model": model, "prompt": line + "\n",
                                          "max_tokens": 24, "ignore_eos": True, "temperature": 0.0}))
        while len(ends) < len(jobs):
            frame = json.loads((await asyncio.wait_for(ws.receive(), 120)).data)
            if frame["type"] in ("done", "error"):
                ends[frame["id"]] = frame
    return [("completed" if f["type"] == "done" else f"error:{f['error']['code']}") for f in ends.values()]


async def _serves_every_adapter_again(client, models: list[str], since: float) -> float | None:
    """Seconds from `since` until one round of requests, one per adapter and the base, all answer right."""
    while time.monotonic() - since < 30:
        answers = await asyncio.gather(*(_complete(client, m, "abc def") for m in models), return_exceptions=True)
        wrong = [(round(time.monotonic() - since, 1), m, repr(a)[:200]) for m, a in zip(models, answers)
                 if isinstance(a, BaseException) or a[1].rstrip("\n") != _expected(m, "abc def")]
        if not wrong:
            return time.monotonic() - since
        print("not yet:", wrong)
        await asyncio.sleep(0.1)
    return None


async def _kill_under_load(fleet: Fleet, pid_key: str) -> None:
    """Kill one replica's process `pid_key` ("pid": its server, "actor_pid": the Ray replica itself) while 18
    generations stream over both replicas; check every request ends, health and recovery."""
    client = _client(fleet)
    models = [*TASKS, BASE_MODEL_NAME]
    rng = random.Random(11)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 180  # a replica replaced after an earlier kill may still be starting
        while True:
            async with session.get(fleet.url + "/health") as resp:
                if (await resp.json())["status"] == "ok" or time.monotonic() > deadline:
                    break
            await asyncio.sleep(1.0)
        victim, report = sorted((await _state(session, fleet))["replicas"].items())[0]
        http = [asyncio.create_task(_http_job(client, models[i % len(models)], random_input(rng), i % 2 == 0))
                for i in range(12)]
        ws = asyncio.create_task(_ws_jobs(fleet, [(models[i % len(models)], random_input(rng)) for i in range(6)]))
        await asyncio.sleep(0.5)  # generations are under way on both replicas
        os.kill(report[pid_key], signal.SIGKILL)
        killed = time.monotonic()
        recovered = asyncio.create_task(_serves_every_adapter_again(client, models, killed))
        degraded = None
        while time.monotonic() - killed < 10 and degraded is None:
            async with session.get(fleet.url + "/health") as resp:
                body = await resp.json()
                if body["status"] == "degraded":
                    degraded = body
            await asyncio.sleep(0.2)
        outcomes = await asyncio.wait_for(asyncio.gather(*http, ws), 240)
        served_all_after = await recovered
        events = {s.labels["event"]: s.value for s in (await _metrics(session, fleet))["lorafleet:fleet_events"].samples
                  if s.name.endswith("_total")}
    flat = [*outcomes[:-1], *outcomes[-1]]
    print(pid_key, "killed: outcomes", Counter(flat), "events", events, "every adapter served again after",
          served_all_after, "s; health", degraded)
    assert len(flat) == 18 and all(o == "completed" or o.startswith("error:") for o in flat), flat
    # a whole-body (non-streaming) response has no first byte before it is done: a failure is always retried
    assert all(o == "completed" for o in outcomes[1:-1:2]), outcomes[:-1]
    assert Counter(flat)["completed"] >= 6, Counter(flat)
    assert degraded is not None and degraded["replicas_healthy"] == 1, "health said degraded while one was down"
    assert served_all_after is not None and served_all_after <= 10.0, served_all_after


async def test_killing_one_replicas_server_mid_load(fleet):
    await _kill_under_load(fleet, "pid")


async def test_killing_one_replica_actor_mid_load(fleet):
    await _kill_under_load(fleet, "actor_pid")

"""Adapters in a live `lorafleet serve`, over real sockets: the adapter root is indexed at start-up and each
adapter validated on first use (a bad one refused with 400 `adapter_invalid`, listed in a warning, the server
serving on); runtime loads of bad adapters answer 400 and kill nothing; an adapter may not take the base
model's served name; a bad `--adapter` stops start-up with one line and exit 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch
from adapter_faults import SERVE_FAULTS, write_fault
from test_serve_support import WsClient, get_json, post_json, start_server, stop_server

MAX_TOKENS = 6
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BASE = "tuned-base"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from lorafleet.engine.synthetic import write_adapter, write_model

    root = tmp_path_factory.mktemp("adapter-serving")
    model = write_model("tiny", root / "model")
    adapter_root = root / "adapters"
    good = write_adapter(adapter_root / "team" / "good", model, 4, seed=5, std=0.2)
    bad = {name: write_fault(adapter_root / name, model, fault) for name, fault in SERVE_FAULTS.items()}
    for name in ("swap/dir", "swap/file"):  # indexed at start-up, replaced by links out of the root later
        write_adapter(adapter_root / name, model, 2, seed=6)
    outside = write_adapter(root / "outside", model, 2, seed=7, std=0.2)
    half = write_adapter(adapter_root / "upload" / "half", model, 3, seed=8, std=0.2)  # its weights arrive later
    weights = (half / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").unlink()
    return {"model": model, "root": adapter_root, "good": good, "bad": bad, "tmp": root, "outside": outside,
            "half": (half, weights)}


@pytest.fixture(scope="module")
def server(assets):
    proc = start_server(["--model", str(assets["model"]), "--adapter-root", str(assets["root"]),
                         "--admin-key", ADMIN, "--served-model-name", BASE])
    yield proc
    assert stop_server(proc) == 0, proc.output()


def _offline(model: Path, name: str, path: Path, prompt: str) -> list[int]:
    from lorafleet.engine import LLM

    llm = LLM(str(model), adapters={name: str(path)})
    return llm.generate([prompt], adapters=[name], max_tokens=MAX_TOKENS, temperature=0.0)[0].token_ids


async def _complete(session, url: str, model: str, prompt: str = "adapter root") -> tuple[int, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    status, out, _ = await post_json(session, url + "/v1/completions", body)
    return status, out


async def test_indexed_adapters_are_listed_and_read_on_first_use(server, assets):
    async with aiohttp.ClientSession() as session:
        listed = {m["id"] for m in (await get_json(session, server.url + "/v1/models"))[1]["data"]}
        assert {"team/good", *SERVE_FAULTS} <= listed  # indexed by name, nothing read yet
        status, body = await _complete(session, server.url, "team/good")
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == _offline(assets["model"], "g", assets["good"], "adapter root")


async def test_bad_adapter_under_root_is_refused_on_use_and_the_server_serves_on(server, assets):
    async with aiohttp.ClientSession() as session:
        for name, fault in SERVE_FAULTS.items():
            for _ in range(2):  # the second refusal comes from the remembered verdict
                status, body = await _complete(session, server.url, name)
                assert (status, body["error"]["code"]) == (400, "adapter_invalid"), (name, body)
                assert fault.names in body["error"]["message"], (name, body)
                assert "Traceback" not in body["error"]["message"]
            assert (await _complete(session, server.url, BASE))[0] == 200
        state = (await get_json(session, server.url + "/v1/debug/state", AUTH))[1]
        assert set(state["invalid_adapters"]) == set(SERVE_FAULTS)
        listed = {m["id"] for m in (await get_json(session, server.url + "/v1/models"))[1]["data"]}
        assert not listed & set(SERVE_FAULTS) and "team/good" in listed
    assert server.proc.poll() is None
    warnings = [line for line in server.lines if " WARNING adapters " in line]  # the structured log's level and logger
    assert {name for name in SERVE_FAULTS if any(repr(name) in w for w in warnings)} == set(SERVE_FAULTS)


async def test_bad_adapter_over_websocket_errors_that_id_only(server):
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        bad_name = next(iter(SERVE_FAULTS))
        frames = [{"type": "generate", "id": "bad", "model": bad_name, "prompt": "x", "max_tokens": 3},
                  {"type": "generate", "id": "ok", "model": BASE, "prompt": "x", "max_tokens": 3}]
        for frame in frames:
            await client.send(frame)
        end = await asyncio.wait_for(asyncio.gather(client.expect("bad"), client.expect("ok")), 60)
        assert end[0]["type"] == "error" and end[0]["error"]["code"] == "adapter_invalid"
        assert end[1]["type"] == "done"
        await ws.close()
        await reader


async def test_adapter_added_after_start_is_resolved_by_name(server, assets):
    from lorafleet.engine.synthetic import write_adapter

    late = write_adapter(assets["root"] / "late" / "v2", assets["model"], 3, seed=9, std=0.2)
    async with aiohttp.ClientSession() as session:
        status, body = await _complete(session, server.url, "late/v2", "late one")
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == _offline(assets["model"], "late", late, "late one")
        for name in ("late", "late/v3", "../model", "/etc", "late/v2/.."):  # not adapters under the root
            status, body = await _complete(session, server.url, name)
            assert (status, body["error"]["code"]) == (404, "model_not_found"), (name, body)


async def test_runtime_load_of_bad_adapters_answers_400_and_serves_on(server, assets):
    load = server.url + "/v1/load_lora_adapter"
    async with aiohttp.ClientSession() as session:
        for name, path in assets["bad"].items():
            status, body, _ = await post_json(session, load, {"lora_name": "rt-" + name, "lora_path": str(path)},
                                              AUTH)
            assert (status, body["error"]["code"]) == (400, "adapter_invalid"), (name, body)
            assert SERVE_FAULTS[name].names in body["error"]["message"], body
            assert (await _complete(session, server.url, BASE))[0] == 200
        status, body, _ = await post_json(session, load, {"lora_name": BASE, "lora_path": str(assets["good"])}, AUTH)
        assert (status, body["error"]["param"]) == (400, "lora_name"), body
    assert server.proc.poll() is None


async def test_an_indexed_adapter_replaced_by_a_link_out_of_the_root_is_not_found(server, assets):
    """The confinement was checked for indexed adapters only at the start-up scan: a directory (or its weights
    file) replaced by a link out of the root afterwards was read and served. Every lookup checks it now."""
    import shutil

    root, outside = assets["root"], assets["outside"]
    shutil.rmtree(root / "swap" / "dir")
    (root / "swap" / "dir").symlink_to(outside, target_is_directory=True)
    weights = root / "swap" / "file" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "adapter_model.safetensors")
    async with aiohttp.ClientSession() as session:
        for name in ("swap/dir", "swap/file"):
            status, body = await _complete(session, server.url, name)
            assert (status, body["error"]["code"]) == (404, "model_not_found"), (name, body)
        assert (await _complete(session, server.url, BASE))[0] == 200


async def test_an_adapter_refused_before_its_weights_arrived_is_read_again_once_they_do(server, assets):
    """The invalid verdict was kept until adapter_config.json changed: an upload whose config landed before its
    weights, used in between, stayed refused after the weights arrived (until a restart or a touch of the
    config). A change of either file tries it again."""
    half, weights = assets["half"]
    async with aiohttp.ClientSession() as session:
        status, body = await _complete(session, server.url, "upload/half", "late weights")
        assert (status, body["error"]["code"]) == (400, "adapter_invalid"), body
        assert "adapter_model.safetensors not found" in body["error"]["message"]
        (half / "adapter_model.safetensors").write_bytes(weights)
        status, body = await _complete(session, server.url, "upload/half", "late weights")
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == _offline(assets["model"], "h", half, "late weights")


def test_a_cache_refill_does_not_follow_a_link_out_of_the_root(tiny_llama, tmp_path):
    """A registered adapter is read again whenever the host cache refills it: its files may have been replaced
    by links out of the adapter root since its first use. The prefetcher's loader refuses to follow them
    (an --adapter directory outside the root is the operator's own and read as given)."""
    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.engine.adapters import AdapterError
    from lorafleet.engine.config import ModelConfig
    from lorafleet.engine.synthetic import write_adapter

    root = tmp_path / "root"
    inside = write_adapter(root / "a", tiny_llama, 2, seed=1)
    elsewhere = write_adapter(tmp_path / "elsewhere", tiny_llama, 2, seed=2)
    loader = AdapterLoader(ModelConfig.from_dir(tiny_llama), 1024, torch.float32, 8, root=str(root))
    assert loader.load("a", str(inside)).info.rank == 2
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(elsewhere / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="'adapter_model.safetensors' links outside the adapter root"):
        loader.load("a", str(inside))
    (elsewhere / "link.json").symlink_to(elsewhere / "adapter_config.json")
    assert loader.load("e", str(elsewhere)).info.rank == 2


def _serve_exit(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorafleet", "serve", "--port", "0", "--torch-threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_startup_refuses_an_adapter_named_like_the_base_model(assets):
    done = _serve_exit(["--model", str(assets["model"]), "--served-model-name", "tuned",
                        "--adapter", f"tuned={assets['good']}"])
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "'tuned'" in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["alpha-null", "array-document"])
def test_startup_with_a_bad_adapter_exits_2_with_one_line(assets, name):
    done = _serve_exit(["--model", str(assets["model"]), "--adapter", f"x={assets['bad'][name]}"])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and SERVE_FAULTS[name].names in lines[0], done.stderr


def test_json_fault_documents_are_what_they_say(assets):
    raw = (assets["bad"]["array-document"] / "adapter_config.json").read_text()
    assert isinstance(json.loads(raw), list)


async def test_scheduler_reads_a_root_adapter_once_for_its_waiting_requests(tiny_llama, tmp_path):
    """In process: requests for an adapter of the root that is not loaded wait for one read; a cancel while
    waiting ends that request alone; a bad adapter refuses all its waiters, and later ones without a read."""
    from test_serve_units import _InProcessGroup

    from lorafleet.actors.channels import LocalChannel
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.prefetcher import AdapterLoader, PrefetcherActor
    from lorafleet.actors.scheduler import SchedulerActor
    from lorafleet.actors.schema import Admitted, Cancel, Rejected, StepDeltas, Submit
    from lorafleet.engine import LLM
    from lorafleet.engine.adapter_index import AdapterIndex
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig
    from lorafleet.engine.synthetic import write_adapter

    good = write_adapter(tmp_path / "root" / "g", tiny_llama, 4, seed=2, std=0.2)
    write_fault(tmp_path / "root" / "b", tiny_llama, SERVE_FAULTS["alpha-string"])
    want = LLM(str(tiny_llama), adapters={"g": str(good)}).generate([[7, 8, 9]], adapters=["g"], max_tokens=4)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), {})
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    hub = ServeHub()
    loader = AdapterLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    actor = SchedulerActor(engine, _InProcessGroup(engine.executor), inbox, router, admission, prefetch, hub,
                           index=AdapterIndex.scan(tmp_path / "root"))
    tasks = [asyncio.create_task(actor.run()), asyncio.create_task(PrefetcherActor(loader, prefetch, inbox, hub).run())]
    params = {"max_tokens": 4, "temperature": 0.0}
    for rid, name in (("g1", "g"), ("g2", "g"), ("b1", "b"), ("g3", "g")):
        inbox.send(Submit(rid, [7, 8, 9], params, name, None, 0.0))
    inbox.send(Cancel("g3"))
    events: dict[str, list] = {}
    finished: set[str] = set()
    while finished != {"g1", "g2", "b1", "g3"}:
        msg = await asyncio.wait_for(router.recv(), 60)
        items = msg.items if isinstance(msg, StepDeltas) else [msg]
        for item in items:
            events.setdefault(item.request_id, []).append(item)
            if isinstance(item, Rejected) or getattr(item, "finished", False):
                finished.add(item.request_id)
    assert hub.prefetch.requested == 2  # one read per adapter, whatever the number of waiting requests
    for rid in ("g1", "g2"):
        assert isinstance(events[rid][0], Admitted)
        assert [t for e in events[rid][1:] for t in e.token_ids] == want[0].token_ids
    assert events["g3"][-1].finish_reason == "cancelled" and not events["g3"][-1].token_ids
    refusal = events["b1"][0]
    assert (refusal.code, refusal.status, refusal.param) == ("adapter_invalid", 400, "model")
    assert "lora_alpha" in refusal.message and "b" in hub.invalid_adapters and "b" not in hub.adapters
    inbox.send(Submit("b2", [1], params, "b", None, 0.0))
    again = await asyncio.wait_for(router.recv(), 60)
    assert isinstance(again, Rejected) and again.code == "adapter_invalid" and hub.prefetch.requested == 2
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    engine.pool.check()


async def test_only_the_canonical_relative_path_names_a_root_adapter(server):
    """Each spelling of a path ('./team/good', 'team//good', 'team/good/', 'team/../team/good') used to load
    the same directory again as another adapter, listed and counted apart: any client could grow the
    server's adapters without bound. Only the indexed form, the path relative to the root, names it."""
    aliases = ["./team/good", "team//good", "team/good/", "team/./good", "team/../team/good", "././team/good"]
    async with aiohttp.ClientSession() as session:
        for name in aliases:
            status, body = await _complete(session, server.url, name)
            assert (status, body["error"]["code"], body["error"]["param"]) == (404, "model_not_found", "model"), \
                (name, body)
        listed = {m["id"] for m in (await get_json(session, server.url + "/v1/models"))[1]["data"]}
        assert not listed & set(aliases)
        assert (await _complete(session, server.url, "team/good"))[0] == 200

"""Adapter traffic off the step's path: the shared host arena (allocator, views across processes), the
store's reserve → fill → commit cycle with holds by steps in flight, and the scheduler actor admitting a
request only once the prefetcher has packed its adapter (outputs equal the offline engine; an unreadable
adapter fails only its requests)."""

from __future__ import annotations

import asyncio
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import torch

from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.schema import DeltaItem, StepDeltas, Submit
from lorafleet.engine.host_arena import ALIGN, HostArena


def test_arena_allocates_first_fit_and_coalesces_under_random_traffic():
    arena = HostArena(64 * ALIGN)
    rng = random.Random(3)
    held: dict[int, int] = {}
    try:
        for _ in range(400):
            if held and rng.random() < 0.45:
                offset = rng.choice(list(held))
                arena.release(offset)
                del held[offset]
            else:
                size = rng.randint(1, 9 * ALIGN)
                offset = arena.allocate(size)
                if offset is None:  # only when no free extent is large enough
                    assert all(free < -(-size // ALIGN) * ALIGN for _, free in arena._free)
                    continue
                assert offset % ALIGN == 0
                span = (offset, offset + -(-size // ALIGN) * ALIGN)
                assert all(span[1] <= o or o + s <= span[0] for o, s in arena._used.items() if o != offset)
                held[offset] = size
            arena.check()
        for offset in list(held):
            arena.release(offset)
        arena.check()
        assert arena._free == [(0, arena.capacity)] and arena.used_bytes == 0
        with pytest.raises(KeyError):
            arena.release(0)
    finally:
        arena.close()


def test_arena_views_are_shared_with_an_attached_mapping():
    arena = HostArena(4 * ALIGN)
    other = HostArena.attach(arena.name)
    try:
        offset = arena.allocate(3000)
        src = torch.arange(750, dtype=torch.float32).view(3, 250)
        arena.tensor(offset, torch.float32, (3, 250)).copy_(src)
        assert torch.equal(other.tensor(offset, torch.float32, (3, 250)), src)
    finally:
        other.close()
        arena.close()


@pytest.fixture()
def adapters(tiny_llama, tmp_path):
    from conftest import make_peft_adapter

    return {f"a{i}": str(make_peft_adapter(tiny_llama, tmp_path / f"a{i}", rank, seed=i))
            for i, rank in enumerate((2, 4, 8, 4))}


def _arena_store(engine, capacity_adapters: float) -> HostArena:
    """Move the engine's host cache into an arena holding about `capacity_adapters` of its largest adapters."""
    store = engine.store
    largest = max(store.packed_bytes(name) for name in store.infos)
    store.arena = HostArena(int(capacity_adapters * (largest + ALIGN)))
    store.cache.clear()
    return store.arena


def test_store_reserve_commit_and_holds(tiny_llama, adapters):
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    reference = {name: engine.store.cache[name].pages.clone() for name in adapters}
    store = engine.store
    sizes = {name: -(-store.packed_bytes(name) // ALIGN) * ALIGN for name in adapters}
    store.arena = arena = HostArena(sizes["a0"] + sizes["a1"] + sizes["a2"] - ALIGN)  # not all three
    store.cache.clear()
    try:
        assert not store.is_ready("a0")
        for name in ("a0", "a1"):
            target = store.reserve(name)
            store.pack_into(target, adapters[name])
            assert store.commit(name, target.arena_offset) and store.is_ready(name)
            assert torch.equal(store.fetch(name).pages, reference[name])
        store.hold(["a0"], step=5)  # a step in flight reads a0: never evicted before it completes
        target = store.reserve("a2")
        assert target is not None and "a0" in store.cache and "a1" not in store.cache
        store.pack_into(target, adapters["a2"])
        store.commit("a2", target.arena_offset)
        assert store.reserve("a3", keep={"a2"}) is None  # a0 held, a2 kept: no room
        store.release_through(5)
        target = store.reserve("a3")
        assert target is not None and "a0" not in store.cache
        store.unregister("a3")  # while a worker fills it: the extent is freed when the worker reports
        store.pack_into(target, adapters["a3"])
        assert not store.commit("a3", target.arena_offset)
        arena.check()
        assert arena.used_bytes == sum(sizes[name] for name in store.cache)
        with pytest.raises(Exception, match="not in the host cache"):
            store.fetch("a1")
    finally:
        store.cache.clear()
        store.reserved.clear()
        arena.close()


class _InProcessGroup:
    """ExecutorGroup stand-in: runs each plan on the engine's own ModelRunner (whose fetch reads the store)."""

    def __init__(self, runner) -> None:
        self.runner, self.results, self.loads = runner, [], []

    def send(self, plan, packed):
        from lorafleet.actors.schema import StepResult

        assert all(p.arena_offset is not None for p in packed), "a load was staged from outside the arena"
        self.loads += [load.name for load in plan.loads]
        output = self.runner.execute(plan).to_wire()
        self.results.append(StepResult(plan.step, 0, output["sampled"], 0.001, output["logprobs"],
                                       output["prompt_logprobs"]))

    async def receive(self):
        await asyncio.sleep(0)
        return self.results.pop(0)


@dataclass
class _Actors:
    """The scheduler actor (and the prefetcher, given a loader) running in this loop on local channels."""

    actor: object
    inbox: LocalChannel
    router: LocalChannel
    hub: object


@asynccontextmanager
async def _actors(engine, loader=None, group=None, workers: int = 2, **options):
    """Run SchedulerActor over `engine` (`group`: an _InProcessGroup of its executor by default; `options` go to
    the actor) and, with `loader`, a PrefetcherActor; both are cancelled on exit."""
    from lorafleet.actors.hub import ServeHub
    from lorafleet.actors.prefetcher import PrefetcherActor
    from lorafleet.actors.scheduler import SchedulerActor

    hub = ServeHub()
    inbox, router, admission, prefetch = (LocalChannel() for _ in range(4))
    group = group if group is not None else _InProcessGroup(engine.executor)
    actor = SchedulerActor(engine, group, inbox, router, admission, prefetch, hub, **options)
    tasks = [asyncio.create_task(actor.run())]
    if loader is not None:
        tasks.append(asyncio.create_task(PrefetcherActor(loader, prefetch, inbox, hub, workers=workers).run()))
    try:
        yield _Actors(actor, inbox, router, hub)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_scheduler_waits_for_packing_and_fails_only_unreadable_adapters(tiny_llama, adapters, tmp_path):
    from conftest import make_peft_adapter
    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.actors.scheduler import ADAPTER_LOAD_BYTES, ADAPTER_LOAD_STALLS
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    bad = str(make_peft_adapter(tiny_llama, tmp_path / "bad", 2, seed=9))
    prompts = [[7 + i, 8, 9, 3 * i + 1] for i in range(10)]
    names = ["a0", "a1", None, "a2", "a3", "a0", "a2", "a1", None, "a3"]
    want = LLM(str(tiny_llama), adapters=adapters).generate(prompts, adapters=names, max_tokens=6)
    config = EngineConfig(max_adapter_load_bytes_per_step=1, max_adapters_per_batch=3)
    engine, _ = build_engine(str(tiny_llama), config, {**adapters, "bad": bad})
    arena = _arena_store(engine, 3.5)  # room for three adapters of four: the cache must evict
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    loader = AdapterLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    group = _InProcessGroup(engine.executor)
    async with _actors(engine, loader, group) as run:
        hub = run.hub
        for i, (prompt, name) in enumerate(zip(prompts, names)):
            run.inbox.send(Submit(f"q{i}", prompt, {"max_tokens": 6, "temperature": 0.0}, name, None, 0.0, i + 1))
        run.inbox.send(Submit("b", [1, 2, 3], {"max_tokens": 6, "temperature": 0.0}, "bad", None, 0.0, 11))
        tokens: dict[str, list[int]] = {}
        ends: dict[str, DeltaItem] = {}
        while len(ends) < 11:
            msg = await asyncio.wait_for(run.router.recv(), 60)
            for item in msg.items if isinstance(msg, StepDeltas) else []:
                tokens.setdefault(item.request_id, []).extend(item.token_ids)
                if item.finished:
                    ends[item.request_id] = item
    try:
        assert ends["b"].error_code == "adapter_invalid" and "bad" not in engine.store.infos
        assert [tokens.get(f"q{i}", []) for i in range(10)] == [w.token_ids for w in want]
        assert hub.counters[ADAPTER_LOAD_STALLS] > 0, "no request waited for its adapter's packing"
        assert hub.counters[ADAPTER_LOAD_BYTES] > 0 and set(group.loads) == {"a0", "a1", "a2", "a3"}
        assert not engine.store.busy and not engine.store.reserved
        arena.check()
        engine.pool.check()
        assert engine.pool.usage()["kv"] == 0
    finally:
        engine.store.cache.clear()
        arena.close()


def test_batch_adapter_bytes_bound_holds_every_step_and_keeps_outputs(tiny_llama, adapters):
    """With the distinct adapters' bytes of a step bounded (about two of these adapters) and a wide clustering
    window, every planned step stays within the bound (or holds one adapter) and greedy outputs equal
    HF+PEFT's."""
    from conftest import PeftOracle
    from lorafleet.engine import LLM

    rng = random.Random(5)
    names = [rng.choice([*adapters, None]) for _ in range(14)]
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 9))] for _ in names]
    oracle = PeftOracle(tiny_llama, adapters)
    want = [oracle.greedy(p, a, 5) for p, a in zip(prompts, names)]
    llm = LLM(str(tiny_llama), adapters=adapters, max_batch_adapter_fraction=1.0, cluster_window=64)
    engine = llm.engine
    scheduler = engine.scheduler
    sizes = sorted(scheduler._adapter_bytes(name) for name in adapters)
    scheduler.max_batch_adapter_bytes = bound = sizes[-1] + sizes[0]  # the two extremes, not three
    seen, passed = [], []
    plan_step = engine.plan_step

    def checked_plan_step():
        planned = plan_step()
        if planned is not None:
            slots = planned[1].slots
            used = sum(scheduler._adapter_bytes(name) for name in slots)
            assert len(slots) <= 1 or used <= bound, f"step reads {used} adapter bytes > {bound}"
            seen.append(len(slots))
            passed.append(any(r.passed_over for r in scheduler.waiting))
        return planned

    engine.plan_step = checked_plan_step
    got = llm.generate(prompts, adapters=names, max_tokens=5, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    assert max(seen) >= 2, "the bound was meant to allow two adapters at once"
    assert any(passed), "the bound never made a request wait"
    assert scheduler.max_batch_adapter_bytes > 0


async def test_a_request_waiting_for_its_adapter_does_not_block_the_ones_behind_it(tiny_llama, adapters):
    """The head of the queue waits for its adapter's packing (held back here) while a base request and a request
    of an already packed adapter behind it run to completion; once packed, it runs and matches offline."""
    import threading

    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    gate = threading.Event()

    class HeldLoader(AdapterLoader):
        def pack_into(self, target, path):
            if target.info.name == "a2":
                gate.wait(30)
            return super().pack_into(target, path)

    prompts = {"slow": [7, 8, 9], "base": [4, 5, 6], "fast": [1, 2, 3, 4]}
    names = {"slow": "a2", "base": None, "fast": "a0"}
    want = LLM(str(tiny_llama), adapters=adapters).generate(list(prompts.values()), adapters=list(names.values()),
                                                           max_tokens=6)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    arena = _arena_store(engine, 4)
    loader = HeldLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    done: list[str] = []
    try:
        async with _actors(engine, loader) as run:
            for seq, rid in enumerate(prompts, 1):  # "slow" is first in the queue
                run.inbox.send(Submit(rid, prompts[rid], {"max_tokens": 6, "temperature": 0.0}, names[rid], None, 0.0,
                                      seq))
            while len(done) < 3:
                msg = await asyncio.wait_for(run.router.recv(), 60)
                for item in msg.items if isinstance(msg, StepDeltas) else []:
                    tokens[item.request_id] += item.token_ids
                    if item.finished:
                        done.append(item.request_id)
                if sorted(done) == ["base", "fast"] and not gate.is_set():
                    assert tokens["slow"] == [] and not engine.store.is_ready("a2")
                    gate.set()  # now let its packing finish
    finally:
        gate.set()
    try:
        assert done[-1] == "slow"
        assert [tokens[rid] for rid in prompts] == [w.token_ids for w in want]
        assert run.hub.counters["adapter_load_stalls"] > 0
    finally:
        engine.store.cache.clear()
        arena.close()


async def test_a_runtime_load_is_read_off_the_step_loop_and_then_served_exactly(tiny_llama, adapters, tmp_path):
    """POST /v1/load_lora_adapter read and validated the directory inside the scheduler's mailbox handler:
    every running request's stream stopped for as long as the read took (seconds for a large adapter). Here
    the read is held: a running request must finish meanwhile, a second load of the same name is refused
    (adapter_exists), and once read the adapter generates as the offline engine with it."""
    import threading

    from conftest import make_peft_adapter
    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.actors.schema import AdminOp, AdminResult
    from lorafleet.engine import LLM
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    new = str(make_peft_adapter(tiny_llama, tmp_path / "new", 4, seed=11))
    prompts, names = [[3, 4, 5], [9, 8, 7, 6]], ["a0", "new"]
    want = LLM(str(tiny_llama), adapters={**adapters, "new": new}).generate(prompts, adapters=names, max_tokens=12,
                                                                           ignore_eos=True)
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    arena = _arena_store(engine, 4)
    gate = threading.Event()
    read = engine.store._read

    def held_read(name, path):
        if name == "new":
            gate.wait(30)
        return read(name, path)

    engine.store._read = held_read
    loader = AdapterLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    tokens: dict[str, list[int]] = {"run": [], "use": []}
    results: dict[str, AdminResult] = {}
    params = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    try:
        async with _actors(engine, loader) as run:
            async def until(done) -> None:
                while not done():
                    msg = await asyncio.wait_for(run.router.recv(), 15)
                    if isinstance(msg, AdminResult):
                        results[msg.request_id] = msg
                    for item in msg.items if isinstance(msg, StepDeltas) else []:
                        tokens[item.request_id] += item.token_ids

            run.inbox.send(Submit("run", prompts[0], params, "a0", None, 0.0, 1))
            await until(lambda: tokens["run"])
            run.inbox.send(AdminOp("load-1", "load", "new", new))
            run.inbox.send(AdminOp("load-2", "load", "new", new))
            await until(lambda: len(tokens["run"]) == 12 and "load-2" in results)  # while the read is held
            assert not gate.is_set() and "load-1" not in results
            assert (results["load-2"].ok, results["load-2"].code) == (False, "adapter_exists")
            gate.set()
            await until(lambda: "load-1" in results)
            assert results["load-1"].ok, results["load-1"].message
            run.inbox.send(Submit("use", prompts[1], params, "new", None, 0.0, 2))
            await until(lambda: len(tokens["use"]) == 12)
    finally:
        gate.set()
    try:
        assert [tokens["run"], tokens["use"]] == [w.token_ids for w in want]
    finally:
        engine.store.cache.clear()
        arena.close()


def test_a_refill_from_changed_files_is_refused_not_mixed_with_the_registered_scale(tiny_llama, adapters):
    """The host cache reads an adapter back from disk whenever it refills it. Its files changed since it was
    registered (alpha_pattern added, same shapes) used to be packed anyway: the new per-module scales folded
    into B under the registered scale 2, an adapter that never existed. Any change of its files now fails the
    refill (the scheduler then unregisters it; under the adapter root the next request reads the new one)."""
    import json
    import os
    from pathlib import Path

    from lorafleet.engine.adapters import AdapterError
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig

    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    store = engine.store
    reference = store.cache["a1"].pages.clone()
    store.cache.clear()  # without an arena: a miss reads the directory again
    assert torch.equal(store.fetch("a1").pages, reference)
    arena = _arena_store(engine, 2)
    try:
        target = store.reserve("a1")
        store.pack_into(target, adapters["a1"])  # unchanged files: the registered adapter again
        assert torch.equal(target.pages, reference)
        store.abandon("a1", target.arena_offset)
        config = Path(adapters["a1"]) / "adapter_config.json"
        doc = json.loads(config.read_text())
        config.write_text(json.dumps({**doc, "alpha_pattern": {"q_proj": 4 * doc["lora_alpha"]}}))
        target = store.reserve("a1")
        with pytest.raises(AdapterError, match="adapter 'a1' changed on disk since it was registered"):
            store.pack_into(target, adapters["a1"])
        store.abandon("a1", target.arena_offset)
        config.write_text(json.dumps(doc))  # the same bytes again, a new modification time: still another file
        os.utime(config, ns=(1, 1))
        target = store.reserve("a1")
        with pytest.raises(AdapterError, match="changed on disk since it was registered"):
            store.pack_into(target, adapters["a1"])
        store.abandon("a1", target.arena_offset)
        store.arena = None
        with pytest.raises(AdapterError, match="changed on disk since it was registered"):
            store.fetch("a1")  # the offline engine's miss path checks it too
    finally:
        store.cache.clear()
        store.reserved.clear()
        arena.close()


async def test_a_runtime_load_of_an_adapter_the_pool_cannot_hold_is_refused(tiny_llama, adapters, tmp_path):
    """A runtime load registered an adapter whose pages fill the whole pool; every request for it was then
    refused naming max_tokens. The load itself is refused now (adapter_invalid, naming `r`)."""
    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.actors.schema import AdminOp, AdminResult
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import TARGET_MODULES, EngineConfig
    from lorafleet.engine.synthetic import write_adapter

    big = str(write_adapter(tmp_path / "big", tiny_llama, 32, targets=TARGET_MODULES, seed=1, std=0.01))
    engine, _ = build_engine(str(tiny_llama), EngineConfig(num_pages=12), adapters)  # big: 17 pages
    arena = _arena_store(engine, 4)
    loader = AdapterLoader(engine.model, engine.store.page_elements, engine.store.dtype, 64)
    try:
        async with _actors(engine, loader, workers=1) as run:
            run.inbox.send(AdminOp("load", "load", "big", big))
            result = await asyncio.wait_for(run.router.recv(), 30)
    finally:
        arena.close()
    assert isinstance(result, AdminResult) and (result.ok, result.code) == (False, "adapter_invalid")
    assert result.message.startswith("r: adapter 'big' (rank 32, 7 modules) needs") and "big" not in engine.store.infos


async def test_a_runtime_load_rechecks_the_root_confinement_when_it_reads(tiny_llama, adapters, tmp_path):
    """The HTTP handler checks lora_path against --adapter-root, the scheduler reads the directory later: a file
    replaced by a link out of the root meanwhile was read. The read checks again (here: the link is there
    when the op reaches the scheduler)."""
    from lorafleet.actors.schema import AdminOp
    from lorafleet.engine.adapter_index import AdapterIndex
    from lorafleet.engine.build import build_engine
    from lorafleet.engine.config import EngineConfig
    from lorafleet.engine.synthetic import write_adapter

    root = tmp_path / "root"
    inside = write_adapter(root / "x", tiny_llama, 2, seed=1)
    outside = write_adapter(tmp_path / "secret", tiny_llama, 2, seed=2)
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    engine, _ = build_engine(str(tiny_llama), EngineConfig(), adapters)
    async with _actors(engine, index=AdapterIndex(root)) as run:
        run.inbox.send(AdminOp("load", "load", "x", str(inside)))
        result = await asyncio.wait_for(run.router.recv(), 30)
    assert (result.ok, result.code) == (False, "adapter_invalid") and "x" not in engine.store.infos
    assert result.message == "lora_path: 'adapter_model.safetensors' links outside the adapter root"

"""Property tests of the unified pool's books: after any sequence of operations no page has two owners and
every page is accounted for; the scheduler never fails a request that eviction/preemption could serve."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.engine.config import EngineConfig
from lorafleet.engine.pool import ADAPTER, KV, OutOfPages, PagePool
from lorafleet.engine.request import Request, SamplingParams, Status
from lorafleet.engine.scheduler import Scheduler

ADAPTER_PAGES = {"a": 1, "b": 3, "c": 5, "d": 8}

pool_ops = st.lists(
    st.one_of(
        st.tuples(st.just("grow"), st.integers(0, 5), st.integers(1, 4)),
        st.tuples(st.just("free"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("load"), st.sampled_from(sorted(ADAPTER_PAGES)), st.just(0)),
        st.tuples(st.just("evict"), st.sampled_from(sorted(ADAPTER_PAGES)), st.just(0)),
        st.tuples(st.just("pin"), st.sampled_from(sorted(ADAPTER_PAGES)), st.just(0)),
        st.tuples(st.just("unpin"), st.sampled_from(sorted(ADAPTER_PAGES)), st.just(0)),
    ),
    max_size=60,
)


@given(num_pages=st.integers(1, 24), ops=pool_ops)
@settings(max_examples=300, deadline=None)
def test_pool_books_balance_after_any_operations(num_pages, ops):
    pool = PagePool(num_pages)
    for op, key, count in ops:
        free_before = pool.num_free
        try:
            _apply(pool, op, key, count)
        except OutOfPages:
            assert pool.num_free == free_before, "a failed allocation must not take pages"
        pool.check()
        assert sum(pool.usage().values()) == num_pages


def _apply(pool: PagePool, op: str, key, count: int) -> None:
    if op == "grow":
        pool.grow_kv(key, count)
    elif op == "free":
        pool.free_kv(key)
    elif op == "load" and not pool.is_resident(key):
        pool.load_adapter(key, ADAPTER_PAGES[key])
    elif op == "evict" and pool.is_resident(key) and not pool.pins[key]:
        pool.evict_adapter(key)
    elif op == "pin" and pool.is_resident(key):
        pool.pin(key)
    elif op == "unpin" and pool.pins[key]:
        pool.unpin(key)


def test_pool_owner_labels():
    pool = PagePool(4)
    kv = pool.grow_kv(7, 2)
    ad = pool.load_adapter("x", 1)
    assert [pool.owner[p] for p in kv] == [(KV, 7), (KV, 7)]
    assert pool.owner[ad[0]] == (ADAPTER, "x")
    pool.check()


requests = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 30), st.sampled_from([None, *sorted(ADAPTER_PAGES)])),
    min_size=1, max_size=25,
)


@given(num_pages=st.integers(12, 40), reqs=requests, cap=st.integers(1, 4), budget=st.integers(8, 64),
       aborts=st.lists(st.integers(0, 24), max_size=5))
@settings(max_examples=150, deadline=None)
def test_scheduler_serves_everything_and_books_balance(num_pages, reqs, cap, budget, aborts):
    config = EngineConfig(num_pages=num_pages, block_tokens=4, max_batch_tokens=budget, max_num_seqs=8,
                          max_adapters_per_batch=cap)
    pool = PagePool(num_pages)
    scheduler = Scheduler(config, pool, ADAPTER_PAGES.__getitem__)
    all_requests = []
    for i, (prompt_len, max_tokens, adapter) in enumerate(reqs):
        need = scheduler.blocks_for(prompt_len + max_tokens) + (ADAPTER_PAGES[adapter] if adapter else 0)
        if need > num_pages:
            continue  # the engine refuses these at add_request
        request = Request(i, str(i), [1] * prompt_len, adapter, SamplingParams(max_tokens=max_tokens), 0, float(i))
        all_requests.append(request)
        scheduler.add(request)
    for step in range(2000):
        if not scheduler.has_work():
            break
        plan = scheduler.schedule()
        assert plan.chunks, "work is pending but nothing could be scheduled (deadlock)"
        assert len(plan.adapters) <= cap
        assert sum(c.length for c in plan.chunks) <= budget
        _run_fake_step(scheduler, plan)
        for index in aborts:
            if step == 3 and index < len(all_requests) and all_requests[index].status is not Status.FINISHED:
                scheduler.finish(all_requests[index], "cancelled")
        pool.check()
    assert not scheduler.has_work(), "requests left unserved"
    assert pool.usage()["kv"] == 0 and not pool.pins


def _run_fake_step(scheduler: Scheduler, plan) -> None:
    for chunk in plan.chunks:
        request = chunk.request
        request.num_computed += chunk.length
        if chunk.sample:
            request.output_ids.append(1)
            if len(request.output_ids) >= request.params.max_tokens:
                scheduler.finish(request, "length")

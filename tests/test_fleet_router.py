"""The fleet's request router's ranking (actors/fleet/router.py) over stand-in replicas, without a Ray cluster:
affinity, the spill threshold, the bound on replicas per adapter, base spread, failed and avoided replicas."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from lorafleet.actors.fleet.router import AdapterAffinityRouter  # noqa: E402


@dataclass
class Replica:
    name: str
    models: set[str] = field(default_factory=set)
    load: int = 0
    healthy: bool = True

    @property
    def replica_id(self):
        return SimpleNamespace(unique_id=self.name)

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return self.models

    @property
    def routing_stats(self) -> dict:
        return {"healthy": self.healthy, "running": self.load, "waiting": 0}


class NoCache:
    def get(self, replica_id):
        return None  # the router falls back to the servers' reported queues


def _router(max_replicas_per_adapter: int = 2, spill_queue: int = 2) -> AdapterAffinityRouter:
    router = object.__new__(AdapterAffinityRouter)  # the ranking needs none of Ray's routing machinery
    router._replica_queue_len_cache = NoCache()
    router.initialize_state(max_replicas_per_adapter=max_replicas_per_adapter, spill_queue=spill_queue)
    return router


def _request(adapter: str = "", **route) -> SimpleNamespace:
    return SimpleNamespace(kwargs={"route": route}, metadata=SimpleNamespace(multiplexed_model_id=adapter),
                           routing_context=SimpleNamespace(should_backoff=False))


def _ranks(router, replicas, request) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert all(len(rank) == 1 for rank in ranks)
    assert request.routing_context.should_backoff
    return [rank[0].name for rank in ranks]


def test_an_adapter_goes_home_first_and_spreads_only_past_the_spill_queue():
    a, b, c = Replica("a", {"x"}, load=1), Replica("b", load=0), Replica("c", load=3)
    router = _router(max_replicas_per_adapter=2, spill_queue=2)
    assert _ranks(router, [a, b, c], _request("x")) == ["a", "b", "c"]  # home first even though b is idler
    a.load = 2  # the home reached the spill queue: the idlest other replica competes with it on load
    assert _ranks(router, [a, b, c], _request("x")) == ["b", "a", "c"]


def test_an_adapter_sticks_to_one_favourite_home_below_the_spill_queue():
    a, b = Replica("a", {"x", "y", "z"}), Replica("b", {"x", "y", "z"})
    router = _router(spill_queue=2)
    favourites = {m: {_ranks(router, [a, b], _request(m))[0] for _ in range(20)} for m in ("x", "y", "z")}
    assert all(len(f) == 1 for f in favourites.values()), favourites
    chosen = favourites["x"].pop()
    (a if chosen == "a" else b).load = 1  # a request in flight there does not move the adapter yet
    assert _ranks(router, [a, b], _request("x"))[0] == chosen
    (a if chosen == "a" else b).load = 2  # at the spill queue: the other home is preferred
    assert _ranks(router, [a, b], _request("x"))[0] != chosen


def test_a_hot_adapter_takes_at_most_max_replicas_per_adapter():
    a, b, c = Replica("a", {"x"}, load=9), Replica("b", {"x"}, load=9), Replica("c", load=0)
    assert sorted(_ranks(_router(max_replicas_per_adapter=2), [a, b, c], _request("x"))) == ["a", "b"]
    assert set(_ranks(_router(max_replicas_per_adapter=3), [a, b, c], _request("x"))) == {"a", "b", "c"}


def test_a_new_adapter_goes_to_the_replica_with_fewest_adapters():
    a, b = Replica("a", {"p", "q"}, load=0), Replica("b", {"r"}, load=1)
    assert _ranks(_router(), [a, b], _request("new"))[0] == "b"


def test_base_requests_spread_over_every_replica_by_load_ties_in_turn():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    router = _router()
    firsts = Counter(_ranks(router, replicas, _request(""))[0] for _ in range(300))
    assert firsts == {"a": 100, "b": 100, "c": 100}, firsts
    pair = [_ranks(router, replicas[1:], _request(""))[0] for _ in range(12)]  # sequential, an idle pair
    assert all(x != y for x, y in zip(pair, pair[1:])), pair
    replicas[0].load = replicas[1].load = 2
    assert _ranks(router, replicas, _request(""))[0] == "c"


def test_failed_and_avoided_replicas_are_skipped_while_another_is_up():
    a, b = Replica("a", {"x"}), Replica("b")
    assert _ranks(_router(), [a, b], _request("x", avoid=["a"])) == ["b"]
    a.healthy = False
    assert _ranks(_router(), [a, b], _request("x")) == ["b"]
    b.healthy = False  # nobody is up: still try (a replacement may be starting) rather than stall
    assert set(_ranks(_router(), [a, b], _request("x"))) == {"a", "b"}
    assert _ranks(_router(), [a, b], _request("x", avoid=["a", "b"])) in (["a", "b"], ["b", "a"], ["a"])

"""The fleet's Ray Serve request router: adapter affinity with a bounded spread, base traffic over all.

Ray's default router (power of two choices + multiplexing) keeps an adapter on the replicas that loaded it
and spills to another only once those reach `max_ongoing_requests`, never bounds how many replicas a hot
adapter takes, and cannot exclude a replica that just failed a request. This router, per request:

- `route={"avoid": [ids]}` (a retry): never those replicas;
- replicas whose last routing stats say their server is down are skipped while any other is up;
- no multiplexed model id (the base model): every replica, the least loaded first, ties in turn;
- an adapter: its home replicas (those holding it, Ray's multiplexed model ids), the adapter's favourite
  home first (rendezvous hashing, so sequential requests stick to one) unless it holds `spill_queue`
  requests already. When every home has at
  least `spill_queue` requests in flight and it has fewer than `max_replicas_per_adapter` homes, the least
  loaded other replica joins the same rank, so the burst spreads before the homes saturate; with no home,
  the replica with the fewest adapters, then the shortest queue, then the adapter's favourite.

Every rank holds one replica, in this order; Ray sends the request to the first whose queue is below
`max_ongoing_requests` and backs off when none is.

Load is the router's cached in-flight count of a replica, else the queue its server reported
(`record_routing_stats`: running + waiting).
"""

from __future__ import annotations

import zlib
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


def route_hint(pending: PendingRequest | None) -> dict[str, Any]:
    if pending is None:
        return {}
    hint = pending.kwargs.get("route") if isinstance(pending.kwargs, dict) else None
    return hint if isinstance(hint, dict) else {}


class AdapterAffinityRouter(MultiplexMixin, RequestRouter):
    """See the module docstring. Not FIFO-mixed: a replica chosen for a request serves THAT request, since the
    choice follows the request's own hints. kwargs (RequestRouterConfig.request_router_kwargs):
    `max_replicas_per_adapter`, `spill_queue`."""

    def initialize_state(self, max_replicas_per_adapter: int = 2, spill_queue: int = 4, **kwargs: Any) -> None:
        self.max_replicas_per_adapter = max(1, int(max_replicas_per_adapter))
        self.spill_queue = max(1, int(spill_queue))
        self._turn = 0  # where the tie order starts (see _order)

    def _load(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return cached
        stats = replica.routing_stats or {}
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0))

    def _order(self, replicas: list[RunningReplica], *keys) -> list[list[RunningReplica]]:
        """One replica per rank, least loaded first, ties in turn: the tie order is the replicas by id, started
        one further at each call, so sequential requests to equally loaded replicas take turns (with ties at
        random, 12 sequential base requests to an idle pair would all go to one replica once in ~2000 runs).
        Single-replica ranks keep the choice here: within a rank Ray takes any replica whose queue length it
        has cached over one it would have to probe."""
        by_id = sorted(replicas, key=lambda r: r.replica_id.unique_id)
        self._turn += 1
        start = self._turn % len(by_id) if by_id else 0
        in_turn = by_id[start:] + by_id[:start]
        return [[r] for r in sorted(in_turn, key=lambda r: (*(k(r) for k in keys), self._load(r)))]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        hint = route_hint(pending_request)
        avoid = set(hint.get("avoid") or ())
        allowed = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid] or candidate_replicas
        live = [r for r in allowed if (r.routing_stats or {}).get("healthy", True)] or allowed
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter:
            return self._order(live)
        return self._adapter_ranks(adapter, live)

    def _adapter_ranks(self, adapter: str, live: list[RunningReplica]) -> list[list[RunningReplica]]:
        homes = [r for r in live if adapter in r.multiplexed_model_ids]
        others = [r for r in live if adapter not in r.multiplexed_model_ids]

        def preference(r: RunningReplica) -> int:  # rendezvous hashing: a stable favourite per adapter
            return zlib.crc32(f"{adapter}\0{r.replica_id.unique_id}".encode())

        if not homes:
            return self._order(live, lambda r: len(r.multiplexed_model_ids), self._load, preference)
        below_spill = self._order(homes, lambda r: self._load(r) >= self.spill_queue, preference)
        if len(homes) >= self.max_replicas_per_adapter or not others:
            return below_spill
        if min(self._load(r) for r in homes) >= self.spill_queue:
            spill = self._order(others)[0]
            return self._order(homes + spill) + [r for r in self._order(others) if r != spill]
        return below_spill + self._order(others)

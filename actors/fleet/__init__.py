"""`lorafleet fleet`: many `lorafleet serve` processes behind one endpoint, on Ray Serve.

    child.py        a replica's own `lorafleet serve` child on loopback: start, watch, HTTP and WebSocket to it
    router.py       the Ray request router: adapter affinity, bounded spread, base spread, retry/target hints
    metrics.py      the fleet's /metrics: every replica's families with a `replica` label, plus fleet families
    deployments.py  the Serve deployments: FleetState (membership, reports), LoraReplica, FleetIngress
    cli.py          argument parsing, the Ray/Serve start-up, `lorafleet fleet`

Only `child.py`, `metrics.py` and `cli.py`'s parser import nothing of Ray; nothing here imports the engine
(docs/scale-out.md).
"""

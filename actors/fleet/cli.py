"""`lorafleet fleet [FLEET OPTIONS] [-- SERVE OPTIONS]`: start (or join) a Ray cluster and run the fleet.

Everything after `--` is passed to every replica's `lorafleet serve` (model, adapters, --adapter-root,
--tensor-parallel-size, --max-num-seqs, keys...); `--host/--port` there are the fleet's business and
refused. Defaults derived from them: `--max-ongoing-requests` = the server's --max-num-seqs (a replica is
sent no more than it runs at once, so queueing happens in the router, where it can still choose),
`--models-per-replica` = its --max-adapters-per-batch, `--spill-queue` = half its --max-num-seqs,
`--num-gpus-per-replica` = its --tensor-parallel-size on CUDA, else 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass

from lorafleet.args import Parser

APP_NAME = "lorafleet"
QUIET = {"enable_access_log": False}  # one log line per call would drown the servers' own output


@dataclass
class FleetOptions:
    replicas: int
    server_args: list[str]
    max_ongoing_requests: int
    models_per_replica: int
    max_replicas_per_adapter: int
    spill_queue: int
    num_gpus_per_replica: float
    num_cpus_per_replica: float
    retries: int
    health_check_period_s: float
    router: str = "affinity"
    max_queued_requests: int = 1024


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, FleetOptions]:
    fleet_argv, server_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = Parser(prog="lorafleet fleet", description="Serve many lorafleet replicas on Ray Serve; "
                                "arguments after -- go to every replica's `lorafleet serve`.")
    p.add_argument("--replicas", type=int, default=2, help="lorafleet serve replicas (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="the fleet's HTTP/WebSocket address")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica (default: --max-num-seqs)")
    p.add_argument("--models-per-replica", type=int, default=None,
                   help="adapters a replica holds for routing (default: --max-adapters-per-batch)")
    p.add_argument("--max-replicas-per-adapter", type=int, default=2, help="a hot adapter spreads to at most N")
    p.add_argument("--spill-queue", type=int, default=None,
                   help="in-flight requests on every home replica before an adapter spreads (default max-num-seqs/2)")
    p.add_argument("--num-gpus-per-replica", type=float, default=None)
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for a replica before new ones get 429 queue_full (-1: unbounded)")
    p.add_argument("--retries", type=int, default=3, help="other replicas tried before the first byte")
    p.add_argument("--health-check-period-s", type=float, default=1.0)
    p.add_argument("--router", choices=("affinity", "ray-default"), default="affinity",
                   help="affinity: ours (actors/fleet/router.py); ray-default: Ray's power-of-two-choices router "
                   "with its own multiplexing (for comparison: no spread bound, no retry avoidance)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="logical CPUs of a local Ray cluster")
    args = p.parse_args(fleet_argv)
    from lorafleet.actors.serve import parse_args as serve_args

    if any(a.split("=")[0] in ("--host", "--port") for a in server_args):
        p.error("--host/--port after -- : the fleet chooses each replica's loopback port itself")
    server = serve_args(server_args)
    if args.replicas < 1:
        p.error("--replicas must be >= 1")
    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = float(server.tensor_parallel_size) if server.device.startswith("cuda") else 0.0
    options = FleetOptions(
        replicas=args.replicas, server_args=server_args,
        max_ongoing_requests=args.max_ongoing_requests or server.max_num_seqs,
        models_per_replica=args.models_per_replica or server.max_adapters_per_batch,
        max_replicas_per_adapter=args.max_replicas_per_adapter,
        spill_queue=args.spill_queue or max(1, server.max_num_seqs // 2),
        num_gpus_per_replica=gpus, num_cpus_per_replica=args.num_cpus_per_replica, retries=args.retries,
        health_check_period_s=args.health_check_period_s, router=args.router,
        max_queued_requests=args.max_queued_requests)
    return args, options


def build_app(options: FleetOptions):
    """The Serve application: FleetIngress -> LoraReplica x replicas, both reading/writing FleetState."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from lorafleet.actors.fleet.ingress import FleetIngress
    from lorafleet.actors.fleet.replica import replica_class
    from lorafleet.actors.fleet.router import AdapterAffinityRouter
    from lorafleet.actors.fleet.state import FleetStateBase

    state = serve.deployment(FleetStateBase, name="FleetState", num_replicas=1, max_ongoing_requests=10_000,
                             ray_actor_options={"num_cpus": 0}, logging_config=QUIET).bind()
    router = RequestRouterConfig(
        request_router_class=AdapterAffinityRouter, request_routing_stats_period_s=0.5,
        request_router_kwargs={"max_replicas_per_adapter": options.max_replicas_per_adapter,
                               "spill_queue": options.spill_queue}) if options.router == "affinity" \
        else RequestRouterConfig(request_routing_stats_period_s=0.5)
    replica = serve.deployment(
        replica_class(options.models_per_replica), name="LoraReplica", num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
        request_router_config=router,
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=15.0, logging_config=QUIET,
        ray_actor_options={"num_cpus": options.num_cpus_per_replica, "num_gpus": options.num_gpus_per_replica},
    ).bind(options.server_args, state)
    ingress = serve.deployment(FleetIngress, name="FleetIngress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
    return ingress.bind(replica, state, {"replicas": options.replicas, "retries": options.retries,
                                         "server_args": options.server_args,
                                         "max_queued_requests": options.max_queued_requests})


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import ray
        from ray import serve
    except ImportError:
        print("lorafleet fleet: needs Ray Serve: pip install 'lorafleet[fleet]'", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address, num_cpus=args.ray_num_cpus, include_dashboard=False,
             log_to_driver=True, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"lorafleet fleet: {options.replicas} replica(s)\n"
              f"  OpenAI API  {url}/v1\n  WebSocket   {url.replace('http', 'ws', 1)}/v1/stream\n"
              f"  dashboard   {url}/dashboard\n  health      {url}/health\n"
              f"lorafleet fleet: ready on {url}", flush=True)
        stop.wait()
        print("lorafleet fleet: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

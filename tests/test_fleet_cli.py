"""`lorafleet fleet` arguments (no Ray needed): defaults derived from the replicas' serve arguments, and the
refusals (argparse exits 2 naming the flag)."""

from __future__ import annotations

import pytest

from lorafleet.actors.fleet.cli import parse_args


def test_defaults_follow_the_servers_own_limits():
    _, options = parse_args(["--replicas", "3", "--", "--max-num-seqs", "12", "--max-adapters-per-batch", "6",
                             "--device", "cuda", "--tensor-parallel-size", "2"])
    assert (options.replicas, options.max_ongoing_requests, options.models_per_replica) == (3, 12, 6)
    assert options.spill_queue == 6 and options.num_gpus_per_replica == 2.0
    assert options.server_args[:2] == ["--max-num-seqs", "12"]
    _, cpu = parse_args([])
    assert cpu.num_gpus_per_replica == 0.0 and cpu.max_ongoing_requests == 64 and cpu.router == "affinity"


@pytest.mark.parametrize("argv, needle", [
    (["--", "--port", "9000"], "--host/--port"),
    (["--replicas", "0"], "--replicas"),
    (["--router", "nearest"], "--router"),
    (["--", "--max-num-seqs", "many"], "--max-num-seqs"),
])
def test_refusals_name_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err

"""The `lorafleet` command: dispatches to the subcommands' own modules."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "serve"
    if command == "serve":
        from lorafleet.actors.serve import main as serve_main

        return serve_main(argv)
    if command == "fleet":
        from lorafleet.actors.fleet.cli import main as fleet_main

        return fleet_main(argv)
    if command == "loadgen":
        from lorafleet.loadgen.cli import main as loadgen_main

        return loadgen_main(argv)
    if command == "bench":
        from lorafleet.loadgen.bench import main as bench_main

        return bench_main(argv)
    print(f"lorafleet: unknown command {command!r}; use serve, fleet, loadgen or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `lorafleet` command: dispatches to the subcommands' own modules.

`lorafleet --help` lists the subcommands, `lorafleet --version` prints the installed version, and
`lorafleet COMMAND --help` shows that command's flags with their defaults. With no command (or a first
argument that is a flag) the command is `serve`, so `lorafleet --port 9000` still serves.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: `module:function` takes argv (without the command) and returns the exit status."""

    name: str
    target: str
    help: str


COMMANDS = (
    Command("serve", "lorafleet.actors.serve:main",
            "serve a base model and its LoRA adapters (OpenAI API, WebSocket stream, dashboard, /metrics)"),
    Command("fleet", "lorafleet.actors.fleet.cli:main",
            "many serve replicas behind one endpoint on Ray Serve, adapter-affinity routing (lorafleet[fleet])"),
    Command("loadgen", "lorafleet.loadgen.cli:main",
            "replay S-LoRA's workload (or a JSONL trace) against a running server and summarise it"),
    Command("bench", "lorafleet.loadgen.bench:main",
            "one workload against several backends (PEFT baseline, lorafleet, no-LoRA) and adapter counts, one JSON"),
)


def version() -> str:
    """The installed distribution's version (the source tree's pyproject version when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lorafleet")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    rows = "\n".join(f"  {c.name.ljust(width)}  {c.help}" for c in COMMANDS)
    return (f"usage: lorafleet [--help] [--version] COMMAND [ARGS ...]\n\n"
            f"Serve thousands of LoRA adapters of one base LLM.\n\n"
            f"commands:\n{rows}\n\n"
            f"With no COMMAND, or when the first argument is a flag, the command is `serve`.\n"
            f"`lorafleet COMMAND --help` lists that command's flags and their defaults.\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(f"lorafleet {version()}")
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "serve"
    command = next((c for c in COMMANDS if c.name == name), None)
    if command is None:
        names = ", ".join(c.name for c in COMMANDS)
        print(f"lorafleet: unknown command {name!r} (commands: {names}; see lorafleet --help)", file=sys.stderr)
        return 2
    module, function = command.target.split(":")
    return getattr(importlib.import_module(module), function)(argv)


if __name__ == "__main__":
    sys.exit(main())

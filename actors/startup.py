"""Start-up decisions made before anything heavy loads: the torch thread policy and the listening socket.

Thread policy (docs/serving.md): PyTorch's default gives every process one intra-op thread per core. The
server runs one asyncio process (HTTP, tokenizer, planning, adapter packing) plus one executor process per
tensor-parallel rank, so on a small CPU machine the defaults oversubscribe the cores and the OpenMP workers
spin against each other (reported on 2 cores: first tokens ~100x later under light load). The policy keeps
one core for the asyncio process and splits the rest evenly over the executors, at least one thread each;
the asyncio process itself runs torch on one thread.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPolicy:
    """Torch intra-op threads per executor process and for the asyncio process, and why."""

    executor_threads: int
    frontend_threads: int
    cores: int
    reason: str

    def describe(self) -> str:
        return (f"{self.executor_threads} torch thread(s) per executor, {self.frontend_threads} in the server "
                f"process ({self.reason})")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_policy(requested: int, executors: int, cores: int | None = None) -> ThreadPolicy:
    """`requested` > 0 is taken as given (--torch-threads); 0 chooses from `cores` (default: usable_cores())
    and the number of executor processes: one core for the asyncio process, the rest split evenly."""
    cores = usable_cores() if cores is None else cores
    if requested > 0:
        return ThreadPolicy(requested, 1, cores, "--torch-threads")
    per_executor = max(1, (cores - 1) // max(1, executors))
    return ThreadPolicy(per_executor, 1, cores, f"{cores} usable core(s), {executors} executor(s): one core kept "
                        "for the server process")


class PortInUse(OSError):
    """The listening address is taken (or not ours to bind); raised before the model loads."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for host:port, so a busy port fails start-up at once and the
    web app later serves on exactly this socket (no window for another process to take the port).
    Raises PortInUse with a one-line reason."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"--host {host!r}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock

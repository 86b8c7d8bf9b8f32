"""Start a `lorafleet` command (`serve`, `fleet`) as a child process, wait for its ready line, stop it.

The child's stdout and stderr are read line by line by a thread for its whole life (a full pipe would block
the server) and kept in a list the caller can show when something goes wrong. Used by the benchmarks that
start their own server (bench/fleet.py, bench/soak.py) and by the serving tests.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field

READY = "ready on "


@dataclass
class Launched:
    """A started child: its process, the URL its ready line named, and every line it printed so far."""

    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    def output(self, last: int | None = None) -> str:
        return "".join(self.lines[-last:] if last else self.lines)


def launch(cmd: list[str], env: dict[str, str] | None = None, marker: str = READY, timeout: float = 300.0,
           new_session: bool = False) -> Launched:
    """Run `cmd` and wait up to `timeout` s for a line holding `marker` followed by a URL (`http...`).

    `new_session` starts the child in its own process session (a fleet: Ray's processes go with it on
    `stop`). Raises RuntimeError, with the child's last 200 lines, when it exits or stays silent that long;
    the child is killed then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env if env is not None else dict(os.environ), start_new_session=new_session)
    launched = Launched(proc, "")
    ready: queue.Queue[str | None] = queue.Queue()
    pattern = re.compile(re.escape(marker) + r"(http\S+)")

    def pump() -> None:
        for line in proc.stdout:
            launched.lines.append(line)
            found = pattern.search(line)
            if found:
                ready.put(found.group(1))
        ready.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = ready.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        _kill(proc, new_session)
        raise RuntimeError(f"{' '.join(cmd[:4])} did not start within {timeout:.0f} s:\n" + launched.output(200))
    launched.url = url
    return launched


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 120.0,
         new_session: bool = False) -> int | None:
    """Send `sig` and wait up to `timeout` s; returns the exit code, or None when the child had to be killed
    (its whole process session with `new_session`)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, new_session)
        return None


def _kill(proc: subprocess.Popen, new_session: bool) -> None:
    if new_session:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        proc.kill()
    proc.wait()

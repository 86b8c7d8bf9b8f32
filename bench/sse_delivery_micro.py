"""CPU per SSE event of the OpenAI streaming path alone, in process, without sockets.

256 streams of one choice each are fed 200 steps of one token (the Router's `_deliver`, as a `StepDeltas` pass
does); each stream's handler encodes its chunks and writes them to a stand-in response that only counts bytes.
So the figure is the frontend's own work per event (Router callback, Completion.update, chunk encoding, the
handler's wake-up and write call), without the kernel's `send()` that dominates bench/frontend_host.py and
without that benchmark's run-to-run noise on a shared machine. `--module PATH` loads another version of
actors/openai_api.py (e.g. `git show REV:actors/openai_api.py > old.py`) to compare; a version without
`SseStream` is driven through its `Merged` + `_events` reader.

    python bench/sse_delivery_micro.py [--module old.py] [--repeats 3] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from types import ModuleType

from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.frontend import Frontend, Generation, Merged, Router
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.protocol import GenerationSpec, ParseContext
from lorafleet.actors.schema import DeltaItem

STREAMS, STEPS = 256, 200


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Response:
    def __init__(self) -> None:
        self.bytes = 0

    async def write(self, data: bytes) -> None:
        self.bytes += len(data)

    async def write_eof(self) -> None:
        pass


class _Request(dict):
    def __init__(self, frontend: Frontend) -> None:
        super().__init__()
        self.app, self.transport = {"frontend": frontend}, _Transport()


def _load(path: str | None) -> ModuleType:
    if path is None:
        from lorafleet.actors import openai_api

        return openai_api
    spec = importlib.util.spec_from_file_location("openai_api_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def _run(api: ModuleType) -> tuple[float, int]:
    frontend = Frontend(ParseContext("m", set(), 1 << 16, 32000), LocalChannel(), LocalChannel(),
                        Router(LocalChannel()), ServeHub())
    spec = GenerationSpec("m", None, [1, 2], {})
    responses = [_Response() for _ in range(STREAMS)]
    tasks = []
    for i in range(STREAMS):
        generation = Generation(frontend, f"r{i}", dataclasses.replace(spec, index=i), asyncio.Queue())
        out = api.Completion(False, spec, f"cmpl-{i}", None)
        if hasattr(api, "SseStream"):
            coro = api.SseStream(_Request(frontend), responses[i], [generation], out).run()
        else:
            coro = api._events(responses[i], Merged([generation]), out)
        tasks.append(asyncio.create_task(coro))
    await asyncio.sleep(0)
    started = time.process_time()
    for step in range(STEPS):
        last = step == STEPS - 1
        for i in range(STREAMS):
            frontend.router._deliver(f"r{i}", DeltaItem(f"r{i}", [5], "tok ", last, "length" if last else None, 2,
                                                        step + 1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return (time.process_time() - started) / (STREAMS * STEPS) * 1e6, sum(r.bytes for r in responses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="path of another actors/openai_api.py to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    api = _load(args.module)
    runs = [asyncio.run(_run(api)) for _ in range(args.repeats)]
    result = {"module": args.module or "lorafleet.actors.openai_api", "streams": STREAMS, "steps": STEPS,
              "us_per_event": [round(us, 2) for us, _ in runs], "us_per_event_median":
              round(statistics.median(us for us, _ in runs), 2), "bytes": runs[0][1]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

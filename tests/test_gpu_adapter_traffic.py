"""Adapter traffic on CUDA (skipped without it): the host arena page-locks, loads copied on the side stream
land in the pool exactly, and an engine that loads adapters ahead and under a one-load-per-step bound gives
the greedy tokens of an engine that loads each adapter when its request is admitted (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_TARGETS, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM
from lorafleet.engine.host_arena import HostArena

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_arena_page_locks_and_copies_asynchronously():
    from lorafleet.actors.executor import StagedReader

    arena = HostArena(64 << 20)
    reader = StagedReader(256, pin=True)
    try:
        reader.attach_arena(arena.name)
        assert arena.name in reader.pinned, "cudaHostRegister refused the arena"
        offset = arena.allocate(32 << 20)
        src = arena.tensor(offset, torch.float16, (16 << 20,))
        src.copy_(torch.arange(16 << 20, dtype=torch.float32).remainder(2048).half())
        view = torch.frombuffer(reader.arena[arena.name].buf, dtype=torch.float16, count=16 << 20, offset=offset)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got = view.to("cuda", non_blocking=True)
        stream.synchronize()
        assert torch.equal(got.cpu(), src)
        del view
    finally:
        reader.close()
        arena.close()


def test_side_stream_loads_and_load_bound_keep_greedy_tokens(tmp_path):
    base = make_hf_model("gqa", tmp_path / "base", seed=2)
    adapters = {f"r{r}": str(make_peft_adapter(base, tmp_path / f"r{r}", rank=r, targets=ALL_TARGETS, seed=r))
                for r in (2, 8, 16, 32)}
    prompts = [[5 + i, 9, 13, 2 * i + 3, 7] for i in range(12)]
    names = [[*adapters, None][i % 5] for i in range(12)]
    plain = LLM(str(base), adapters=adapters, device="cuda", num_pages=256, prefetch_adapters=0)
    want = plain.generate(prompts, adapters=names, max_tokens=8)
    gpu = LLM(str(base), adapters=adapters, device="cuda", num_pages=256, prefetch_adapters=4,
              max_adapter_load_bytes_per_step=1)
    got = gpu.generate(prompts, adapters=names, max_tokens=8)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    runner = gpu.engine.executor
    assert runner.load_stream is not None
    assert gpu.engine.scheduler.load_stalls > 0

"""Tensor parallelism on CPU (gloo rank processes): tp=2 (and tp=4) greedy outputs equal tp=1 and HF+PEFT for
batches mixing adapters of any rank (ranks not divisible by the size are padded with zero rows) and any
targets with base-only requests, eagerly and through the graphed steps' static buffers (without capture);
ranks agree on the pool; a killed rank fails cleanly."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_TARGETS, PeftOracle, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.adapters import AdapterWeights, padded_rank, shard_adapter
from lorafleet.engine.parallel import ExecutorDied
from lorafleet.engine.request import SamplingParams

ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [(3, ATTENTION), (5, MLP), (7, ALL_TARGETS), (8, ("q_proj", "v_proj")), (16, ALL_TARGETS),
            (5, ("o_proj", "down_proj")), (64, ALL_TARGETS)]


def _prompts(count: int) -> list[list[int]]:
    return [[i + 3, 2 * i + 5, 7, 11, 13 + i, 40 + i, 90 + i, 4][: 3 + i % 6] for i in range(count)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    base = make_hf_model("qwen2", root / "base", seed=3)  # GQA + QKV bias: 2 kv heads -> 1 per rank
    adapters = {f"r{r}-{i}": str(make_peft_adapter(base, root / f"a{i}", rank=r, targets=t, seed=10 + i))
                for i, (r, t) in enumerate(ADAPTERS)}
    # per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern), odd ranks padded per module
    patterns = {"rank_pattern": {"q_proj": 7, "down_proj": 3}, "alpha_pattern": {"v_proj": 3}}
    adapters["pattern"] = str(make_peft_adapter(base, root / "pattern", rank=4, targets=ALL_TARGETS, seed=40,
                                                **patterns))
    return base, adapters


def _mixed(adapters: dict[str, str], count: int) -> tuple[list[list[int]], list[str | None]]:
    names = [*adapters, None]
    return _prompts(count), [names[i % len(names)] for i in range(count)]


@pytest.mark.parametrize("rank,size", [(3, 2), (5, 2), (3, 4), (7, 4), (1, 4), (64, 4)])
def test_shards_of_any_rank_rebuild_the_delta(rank, size):
    """The S-LoRA partition of a rank not divisible by the size: equal shard shapes (zero-padded rank), and the
    column-parallel (all-gather) and row-parallel (all-reduce) recombinations give x·Aᵀ·Bᵀ exactly."""
    gen = torch.Generator().manual_seed(rank * 10 + size)
    a = {m: torch.randn(1, rank, 8, generator=gen, dtype=torch.float64) for m in ("q_proj", "o_proj")}
    b = {m: torch.randn(1, 8, rank, generator=gen, dtype=torch.float64) for m in ("q_proj", "o_proj")}
    weights = AdapterWeights("a", rank, 1.0, a, b)
    parts = [shard_adapter(weights, k, size) for k in range(size)]
    assert len({tuple(p.matrices().items()) for p in parts}) == 1, "every rank's shard has the same shapes"
    assert parts[0].a["q_proj"].shape[1] == padded_rank(rank, size) // size and parts[0].rank == rank
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    want = {m: x @ a[m][0].T @ b[m][0].T for m in a}
    v = torch.cat([x @ p.a["q_proj"][0].T for p in parts], dim=1)  # all-gather of the rank-row shards
    torch.testing.assert_close(torch.cat([v @ p.b["q_proj"][0].T for p in parts], dim=1), want["q_proj"])
    x_parts = x.chunk(size, dim=1)  # a row-parallel layer's input arrives split by columns
    v = sum(xk @ p.a["o_proj"][0].T for xk, p in zip(x_parts, parts))  # all-reduce of the partials
    local = padded_rank(rank, size) // size
    got = sum(v[:, k * local:(k + 1) * local] @ p.b["o_proj"][0].T for k, p in enumerate(parts))
    torch.testing.assert_close(got, want["o_proj"])


def _reference_shard(tensor: torch.Tensor, pad_dim: int, pad: int, split: int, rank: int, size: int):
    """The partition as written in docs/tensor-parallel.md: zero-pad the rank dimension, then cut equal parts."""
    shape = list(tensor.shape)
    shape[pad_dim] = pad
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=pad_dim).chunk(size, dim=split)[rank]


@pytest.mark.parametrize("rank,size", [(3, 2), (8, 2), (1, 4), (7, 4), (64, 4), (16, 8)])
def test_shards_are_views_and_their_shapes_known_without_sharding(rank, size):
    """`shard_adapter` copies nothing where the rank divides evenly (a view of the adapter) and pads only the
    rank's own slice where it does not; `shard_matrices` gives every shard's shapes from the adapter alone."""
    from lorafleet.engine.adapters import shard_matrices

    gen = torch.Generator().manual_seed(rank)
    a = {m: torch.randn(2, rank, 16, generator=gen) for m in ("q_proj", "o_proj")}
    b = {m: torch.randn(2, 24, rank, generator=gen) for m in ("q_proj", "o_proj")}
    weights = AdapterWeights("a", rank, 1.0, a, b)
    pad = padded_rank(rank, size) - rank
    for k in range(size):
        part = shard_adapter(weights, k, size)
        assert part.matrices() == shard_matrices(weights, size)
        torch.testing.assert_close(part.a["q_proj"], _reference_shard(a["q_proj"], 1, pad, 1, k, size), rtol=0, atol=0)
        torch.testing.assert_close(part.b["q_proj"], _reference_shard(b["q_proj"], 2, pad, 1, k, size), rtol=0, atol=0)
        torch.testing.assert_close(part.a["o_proj"], _reference_shard(a["o_proj"], 1, pad, 2, k, size), rtol=0, atol=0)
        torch.testing.assert_close(part.b["o_proj"], _reference_shard(b["o_proj"], 2, pad, 2, k, size), rtol=0, atol=0)
        if not pad:  # views into the adapter's own storage
            for mine, whole in ((part.a, a), (part.b, b)):
                assert all(mine[m].untyped_storage().data_ptr() == whole[m].untyped_storage().data_ptr()
                           for m in whole)


def test_registering_at_tp2_shards_nothing(tiny_llama, monkeypatch):
    """Server start-up registers every --synthetic-adapters adapter in the main process: at tp=2 that must not
    shard (copy) each adapter once per rank — the cause of a 13B, 1000-adapter tp=2 server taking 156-180 s
    to start instead of ~20 s. Shards are made only when an adapter is packed, once per rank."""
    import lorafleet.engine.adapter_store as adapter_store
    from lorafleet.engine.adapters import load_adapter, pack_adapter
    from lorafleet.engine.config import ModelConfig, page_geometry
    from lorafleet.engine.host_arena import HostArena
    from lorafleet.engine.synthetic import synthetic_adapter_path

    calls = []
    real = adapter_store.shard_adapter
    monkeypatch.setattr(adapter_store, "shard_adapter", lambda w, k, n: calls.append((w.name, k)) or real(w, k, n))
    model = ModelConfig.from_dir(tiny_llama)
    _, page_elements = page_geometry(model, 16, 2)
    arena = HostArena(8 << 20)
    try:
        store = AdapterStore(model, page_elements, torch.float32, 64, arena.capacity, shards=2, arena=arena)
        paths = {f"s{i}": synthetic_adapter_path((3, 16, 64)[i % 3], i) for i in range(30)}
        for name, path in paths.items():
            store.register(name, path)
        assert calls == [], "registering sharded adapters"
        target = store.reserve("s0")
        store.pack_into(target, paths["s0"])
        assert calls == [("s0", 0), ("s0", 1)]
        weights = load_adapter("s0", paths["s0"], model, 64)  # rank 3: padded to 4
        for k in range(2):
            want = pack_adapter(real(weights, k, 2), store.infos["s0"].layout, torch.float32)
            torch.testing.assert_close(target.for_rank(k), want, rtol=0, atol=0)
    finally:
        arena.close()


def test_synthetic_llama_2_70b_is_made_per_rank_shard():
    """Issue #14: `synthetic:llama-2-70b` at tp=4 — each rank makes only its own blocks of a sharded weight, the
    blocks of all ranks equal the whole tensor, and the per-rank pool sizing counts 1/4 of the linear layers
    plus the replicated embeddings (checked against transformers' own parameter count on the meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafleet.engine.build import rank_param_bytes
    from lorafleet.engine.config import EngineConfig, ModelConfig, page_geometry
    from lorafleet.engine.synthetic import SHAPES, RandomSource
    from lorafleet.engine.weights import Shard

    raw = dict(SHAPES["llama-2-70b"])
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size) == (80, 8192, 64, 8, 28672, 32000)
    source = RandomSource(raw, seed=0)
    made: list[tuple[int, ...]] = []
    noise = source._noise
    source._noise = lambda name, block=0, shape=None: made.append(shape) or noise(name, block, shape)
    name = "model.layers.3.self_attn.k_proj.weight"  # [1024, 8192], column-parallel
    parts = [source.get_shard(name, 0, Shard(k, 4)) for k in range(4)]
    assert [p.shape for p in parts] == [(256, 8192)] * 4 and max(s[0] for s in made) == 128
    assert torch.equal(torch.cat(parts), source.get(name))
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"}))
    total = sum(p.numel() for p in hf.parameters())
    replicated = 2 * 32000 * 8192 + (2 * 80 + 1) * 8192
    config = EngineConfig(dtype="bfloat16", tensor_parallel_size=4)
    assert rank_param_bytes(cfg, config) == 2 * ((total - replicated) // 4 + replicated)
    assert page_geometry(cfg, 16, 4) == (64, 64 * 2 * 1024 // 4), "a page holds a 28672-wide down_proj A row"


def test_synthetic_weights_made_per_shard_serve_tp1_outputs(tmp_path, monkeypatch):
    """A synthetic model without weight files (as the large shapes are): each tp=2 rank generates only its own
    blocks of the random weights, and greedy outputs equal tp=1's, with adapters of ranks 3 and 8."""
    from lorafleet.engine import synthetic

    monkeypatch.setattr(synthetic, "WRITE_WEIGHTS_UP_TO", 0)  # the config and tokenizer only
    model = synthetic.write_model("tiny", tmp_path / "model", seed=4)
    assert not (model / "model.safetensors").exists()
    adapters = {f"r{r}": str(synthetic.write_adapter(tmp_path / f"r{r}", model, r, targets=t, seed=r, std=0.2))
                for r, t in ((3, ALL_TARGETS), (8, ATTENTION))}
    prompts, which = _mixed(adapters, 6)
    expected = LLM(str(model), adapters=adapters).generate(prompts, adapters=which, max_tokens=6, ignore_eos=True)
    with LLM(str(model), adapters=adapters, tp=2) as llm:
        outs = llm.generate(prompts, adapters=which, max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]


def test_tp2_equals_tp1_and_hf_peft_with_any_rank(assets):
    base, adapters = assets
    prompts, which = _mixed(adapters, 16)
    # 80 pages: every adapter fits (r64 needs 64), but not all at once -> evictions happen at both sizes.
    options = dict(num_pages=80, max_adapters_per_batch=3)
    expected = LLM(str(base), adapters=adapters, **options).generate(prompts, adapters=which, max_tokens=8,
                                                                     ignore_eos=True)
    with LLM(str(base), adapters=adapters, tp=2, **options) as llm:
        outs = llm.generate(prompts, adapters=which, max_tokens=8, ignore_eos=True)
        assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
        assert llm.engine.pool.evictions > 0
        stats = llm.engine.executor.rank_stats()
        resident = sorted(llm.engine.pool.adapter_pages)
        assert [s["resident"] for s in stats] == [resident, resident]
        assert stats[0]["pool_shape"] == stats[1]["pool_shape"]
    oracle = PeftOracle(base, {n: adapters[n] for n in adapters if n.startswith(("r3-", "r5-", "r7-", "pattern"))})
    for prompt, name, out in zip(prompts, which, outs):
        if name is None or name in oracle.adapters:
            assert out.token_ids == oracle.greedy(prompt, name, 8), name


def test_tp2_static_tables_equal_tp1(assets):
    """The graphed steps' paths (static buffers at the padded maximum rank, fixed shrink width, bucket padding)
    without capture: chunked prefills beside decodes (piecewise) and decode steps (whole), at tp=2, equal the
    plain tp=1 engine."""
    base, adapters = assets
    prompts, which = _mixed(adapters, 10)
    prompts = [p * 4 for p in prompts]  # long enough to be chunked by a 24-token budget
    options = dict(num_pages=160, max_adapters_per_batch=4, max_batch_tokens=24, max_num_seqs=6)
    expected = LLM(str(base), adapters=adapters, **options).generate(prompts, adapters=which, max_tokens=6,
                                                                     ignore_eos=True)
    with LLM(str(base), adapters=adapters, tp=2, graph_capture=False, **options) as llm:
        outs = llm.generate(prompts, adapters=which, max_tokens=6, ignore_eos=True)
        stats = llm.engine.executor.rank_stats()
    pieces, decodes = ([s[key] for s in stats] for key in ("piecewise_steps", "decode_graph_steps"))
    assert pieces[0] == pieces[1] > 5 and decodes[0] == decodes[1] > 2, "many steps through the static buffers"
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]


def test_tp4_gqa_with_eight_kv_heads_equals_tp1(tmp_path):
    """Issue #14's CPU check: GQA with 16 query / 8 KV heads over 4 ranks (4 query and 2 KV heads each), adapters
    of ranks 3, 8, 64."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    base = make_hf_model(config, tmp_path / "base", seed=7)
    adapters = {f"r{r}": str(make_peft_adapter(base, tmp_path / f"r{r}", rank=r, targets=t, seed=r))
                for r, t in ((3, ALL_TARGETS), (8, ATTENTION), (64, MLP))}
    prompts, which = _mixed(adapters, 8)
    expected = LLM(str(base), adapters=adapters, num_pages=200).generate(prompts, adapters=which, max_tokens=6,
                                                                          ignore_eos=True)
    with LLM(str(base), adapters=adapters, tp=4, num_pages=200) as llm:
        outs = llm.generate(prompts, adapters=which, max_tokens=6, ignore_eos=True)
        shapes = [s["pool_shape"] for s in llm.engine.executor.rank_stats()]
    assert shapes == [[2, 201, 16 * 2 * 2 * 8]] * 4, "pages of 16 tokens x K and V of 2 KV heads (d=8) per rank"
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]


def test_killed_rank_fails_the_step_without_hanging(assets):
    base, adapters = assets
    llm = LLM(str(base), adapters=adapters, tp=2, num_pages=80)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0), "r7-2")
    engine.step()
    engine.executor.procs[1].kill()
    with pytest.raises(ExecutorDied, match="rank 1"):
        for _ in range(50):
            engine.step()
    assert not engine.executor.procs, "every rank process was stopped"
    assert torch.distributed.is_available()

"""Tensor parallelism on CPU (gloo rank processes): tp=2 (and tp=4) greedy outputs equal tp=1 and HF+PEFT for
batches mixing adapters of any rank (the rank dimension is never split: ranks not divisible by the size need
nothing special) and any targets with base-only requests, eagerly and through the graphed steps' static
buffers (without capture); a step issues the same collectives with adapters as without; ranks agree on the
pool; a killed rank fails cleanly."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_TARGETS, PeftOracle, make_hf_model, make_peft_adapter
from lorafleet.engine import LLM
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.adapters import AdapterWeights, shard_adapter
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
    # per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern), odd ranks on some modules
    patterns = {"rank_pattern": {"q_proj": 7, "down_proj": 3}, "alpha_pattern": {"v_proj": 3}}
    adapters["pattern"] = str(make_peft_adapter(base, root / "pattern", rank=4, targets=ALL_TARGETS, seed=40,
                                                **patterns))
    return base, adapters


def _mixed(adapters: dict[str, str], count: int) -> tuple[list[list[int]], list[str | None]]:
    names = [*adapters, None]
    return _prompts(count), [names[i % len(names)] for i in range(count)]


def _adapter(rank: int, seed: int, layers: int = 1, in_dim: int = 8, out_dim: int = 8) -> AdapterWeights:
    """A random fp64 adapter on q_proj (column-parallel) and o_proj (row-parallel)."""
    gen = torch.Generator().manual_seed(seed)
    a = {m: torch.randn(layers, rank, in_dim, generator=gen, dtype=torch.float64) for m in ("q_proj", "o_proj")}
    b = {m: torch.randn(layers, out_dim, rank, generator=gen, dtype=torch.float64) for m in ("q_proj", "o_proj")}
    return AdapterWeights("a", rank, 1.0, a, b)


@pytest.mark.parametrize("rank,size", [(3, 2), (5, 2), (3, 4), (7, 4), (1, 4), (64, 4)])
def test_shards_of_any_rank_rebuild_the_delta(rank, size):
    """The partition along the base split, for ranks not divisible by the size: every shard keeps all r rank
    rows (equal shapes on every rank, nothing padded); column-parallel shards give their output columns of
    x·Aᵀ·Bᵀ from the whole x, row-parallel shards partial sums from their input slice that add up to x·Aᵀ·Bᵀ
    (what the base all-reduce does), with no exchange of intermediates."""
    weights = _adapter(rank, rank * 10 + size, in_dim=8, out_dim=12)
    parts = [shard_adapter(weights, k, size) for k in range(size)]
    assert len({tuple(p.matrices().items()) for p in parts}) == 1, "every rank's shard has the same shapes"
    assert parts[0].matrices() == {"q_proj": (rank, 8, rank, 12 // size), "o_proj": (rank, 8 // size, rank, 12)}
    assert parts[0].rank == rank and parts[0].scale == weights.scale
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    a, b = weights.a, weights.b
    want = {m: x @ a[m][0].T @ b[m][0].T for m in a}
    columns = [x @ p.a["q_proj"][0].T @ p.b["q_proj"][0].T for p in parts]  # each rank: its output columns
    torch.testing.assert_close(torch.cat(columns, dim=1), want["q_proj"])
    x_parts = x.chunk(size, dim=1)  # a row-parallel layer's input arrives split by columns
    partials = [xk @ p.a["o_proj"][0].T @ p.b["o_proj"][0].T for xk, p in zip(x_parts, parts)]
    torch.testing.assert_close(sum(partials), want["o_proj"])


@pytest.mark.parametrize("rank,size", [(3, 2), (8, 2), (1, 4), (7, 4), (64, 4), (16, 8)])
def test_shards_are_views_and_their_shapes_known_without_sharding(rank, size):
    """`shard_adapter` copies nothing (views of the adapter's own storage) and cuts exactly the base layer's
    slices: the whole A and this rank's rows of B (column-parallel), this rank's columns of A and the whole B
    (row-parallel); `shard_matrices` gives every shard's shapes from the adapter alone."""
    from lorafleet.engine.adapters import shard_matrices

    weights = _adapter(rank, rank, layers=2, in_dim=16, out_dim=24)
    a, b = weights.a, weights.b
    for k in range(size):
        part = shard_adapter(weights, k, size)
        assert part.matrices() == shard_matrices(weights, size)
        exact = dict(rtol=0, atol=0)
        torch.testing.assert_close(part.a["q_proj"], a["q_proj"], **exact)
        torch.testing.assert_close(part.b["q_proj"], b["q_proj"].chunk(size, dim=1)[k], **exact)
        torch.testing.assert_close(part.a["o_proj"], a["o_proj"].chunk(size, dim=2)[k], **exact)
        torch.testing.assert_close(part.b["o_proj"], b["o_proj"], **exact)
        for mine, whole in ((part.a, a), (part.b, b)):
            assert all(mine[m].untyped_storage().data_ptr() == whole[m].untyped_storage().data_ptr() for m in whole)


def test_rank_shard_bytes_equal_the_roofline_figure(tiny_llama):
    """The step roofline's adapter bytes per rank (StepCostModel at tp=2) are the bytes of a real adapter's
    shard on one rank, for every target module: the whole A and half of Bᵀ (q, k, v, gate, up), half of A and the
    whole Bᵀ (o, down) — r·(in + out/2) or r·(in/2 + out) per module, above the r·(in + out)/2 of a rank split."""
    from lorafleet.engine.adapters import load_adapter
    from lorafleet.engine.config import ModelConfig
    from lorafleet.engine.plan import SeqPlan, StepPlan
    from lorafleet.engine.roofline import StepCostModel
    from lorafleet.engine.synthetic import synthetic_adapter_path

    model = ModelConfig.from_dir(tiny_llama)
    weights = load_adapter("s", synthetic_adapter_path(5, 1, tuple(ALL_TARGETS)), model, 64)
    assert set(weights.targets) == set(ALL_TARGETS)
    plan = StepPlan(0, [SeqPlan(0, [1], 3, [0], 0, True)], ["s"])
    figure = StepCostModel(model, 4, tp=2).cost(plan, {"s": weights.ranks()}).adapter_bytes
    for k in range(2):
        part = shard_adapter(weights, k, 2)
        assert sum(t.numel() for t in (*part.a.values(), *part.b.values())) * 4 == figure
    whole = StepCostModel(model, 4).cost(plan, {"s": weights.ranks()}).adapter_bytes
    assert whole // 2 < figure < whole


class _Collectives:
    """Stands in for torch.distributed's collectives in one process: records (op, shape, bytes) of every call
    and leaves the tensors as they are (an all-reduce over one rank's partials; enough to count them)."""

    OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_to_all_single", "reduce", "gather", "scatter", "send", "recv")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        for op in self.OPS:
            monkeypatch.setattr(torch.distributed, op, self._recorder(op))

    def _recorder(self, op: str):
        def record(*args, **kwargs):
            tensor = next(a for a in args if isinstance(a, torch.Tensor))
            self.calls.append((op, tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return record


@pytest.mark.parametrize("graph_capture", [None, False])
def test_lora_adds_no_collective_at_tp2(tiny_llama, monkeypatch, graph_capture):
    """Rank 0 of a tp=2 model in this process, torch.distributed's collectives recorded: steps serving adapters
    of ranks 3 and 16 on every target module issue exactly the collectives of the same steps without LoRA — per
    layer the base all-reduces of o_proj and down_proj ([tokens, hidden]), per step one broadcast of the
    sampled tokens — eagerly and through the graphed steps' static buffers (`graph_capture=False`)."""
    from lorafleet.engine.build import build_runner
    from lorafleet.engine.config import EngineConfig, ModelConfig, page_geometry
    from lorafleet.engine.engine import Engine
    from lorafleet.engine.synthetic import synthetic_adapter_path
    from lorafleet.engine.weights import Shard

    model = ModelConfig.from_dir(tiny_llama)
    extra = {} if graph_capture is None else dict(graph_capture=graph_capture, max_batch_tokens=32)
    config = EngineConfig(tensor_parallel_size=2, num_pages=64, cuda_graphs=graph_capture is not None, **extra)
    block_tokens, page_elements = page_geometry(model, config.block_tokens, 2)
    collectives = _Collectives(monkeypatch)
    runs = {}
    for lora in (True, False):
        store = AdapterStore(model, page_elements, torch.float32, config.max_lora_rank, shards=2)
        runner, _ = build_runner(tiny_llama, config, Shard(0, 2), store.fetch)
        engine = Engine(model, config, store, runner, None, block_tokens)
        for r in (3, 16):
            engine.add_adapter(f"r{r}", synthetic_adapter_path(r, r, ALL_TARGETS))
        for i, prompt in enumerate(_prompts(4)):
            adapter = ("r3", "r16")[i % 2] if lora else None
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), adapter)
        collectives.calls.clear()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        runs[lora] = (steps, list(collectives.calls))
    assert runs[True] == runs[False], "LoRA changed the collectives of a step"
    steps, calls = runs[True]
    reduces = [c for c in calls if c[0] == "all_reduce"]
    assert {c[0] for c in calls} == {"all_reduce", "broadcast"} and len(reduces) == 2 * model.num_layers * steps
    assert all(shape[-1] == model.hidden_size for _, shape, _ in reduces), "only the base all-reduces"
    if graph_capture is not None:
        assert runner.piecewise_steps > 0 and runner.decode_graph_steps > 0


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
        weights = load_adapter("s0", paths["s0"], model, 64)  # rank 3 at tp=2: no padding, no split rank
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
    # 110 pages: every adapter fits (r64 on all targets needs 64 pages at tp=1, 92 per rank at tp=2: each rank
    # holds more than half of it in half-size pages), but not all at once -> evictions happen at tp=2.
    options = dict(num_pages=110, max_adapters_per_batch=3)
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
    """The graphed steps' paths (static row tables max_lora_rank wide, bucket padding) without capture:
    chunked prefills beside decodes (piecewise) and decode steps (whole), at tp=2, equal the plain tp=1 engine."""
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
    of ranks 3, 5, 7, 8, 16 and 64 (none but 8, 16 and 64 divisible by 4) on all, MLP-only, o/down-only and
    attention-only targets, mixed with base requests."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    base = make_hf_model(config, tmp_path / "base", seed=7)
    adapters = {f"r{r}": str(make_peft_adapter(base, tmp_path / f"r{r}", rank=r, targets=t, seed=r))
                for r, t in ((3, ALL_TARGETS), (5, MLP), (7, ("o_proj", "down_proj")), (8, ATTENTION),
                             (16, ALL_TARGETS), (64, MLP))}
    prompts, which = _mixed(adapters, 10)
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


def test_a_survivors_error_names_the_rank_that_died():
    """When rank 1 is killed, rank 0's collective fails too (gloo: connection closed by peer) and its error may
    reach the main process first: the failure still names the dead rank as the cause, with the survivor's error."""
    from types import SimpleNamespace

    from lorafleet.engine.parallel import ProcessGroupExecutor

    group = ProcessGroupExecutor.__new__(ProcessGroupExecutor)
    group.procs = [SimpleNamespace(is_alive=lambda: True, exitcode=None),
                   SimpleNamespace(is_alive=lambda: False, exitcode=-9)]
    message = group._failure(0, "RuntimeError: Connection closed by peer")
    assert message.startswith("rank 1 exited with code -9") and "Connection closed by peer" in message
    group.procs[1] = SimpleNamespace(is_alive=lambda: True, exitcode=None)
    assert group._failure(0, "ValueError: bad").startswith("rank 0 failed")

"""The step roofline: weight bytes against the HF model's own parameter count, prefill FLOPs against
torch's FlopCounterMode over the HF forward, KV and adapter bytes by hand on a small plan, and the figures'
way out (/metrics text → the bench's per-row roofline)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.config import ModelConfig
from lorafleet.engine.plan import SeqPlan, StepPlan
from lorafleet.engine.roofline import DevicePeak, StepCost, StepCostModel, measure_peak


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32, attn_implementation="eager")
    return model.eval(), ModelConfig.from_dir(tiny_llama)


def test_weight_bytes_equal_the_hf_parameters(hf):
    model, cfg = hf
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if cfg.tie_word_embeddings:
        params += model.lm_head.weight.numel()
    tokens = 5
    assert StepCostModel(cfg, 4).weight_bytes(tokens) == 4 * (params + tokens * cfg.hidden_size)


def test_prefill_flops_equal_the_flop_counter_over_hf(hf):
    """One sequence's prefill of q tokens with no cached prefix, the last token sampled. FlopCounterMode
    counts the eager attention's two full q×q products, of which a causal kernel computes the lower
    triangle: the model's figure is the counter's minus the masked half."""
    from torch.utils.flop_counter import FlopCounterMode

    model, cfg = hf
    q = 12
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.arange(3, 3 + q)[None], logits_to_keep=1)
    masked = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * (q * (q - 1) / 2)
    plan = StepPlan(0, [SeqPlan(0, list(range(q)), 0, [0], -1, True)])
    cost = StepCostModel(cfg, 4).cost(plan, {})
    assert cost.prefill_flops == counter.get_total_flops() - masked
    decode = StepPlan(1, [SeqPlan(0, [5], q, [0], -1, True)])
    assert StepCostModel(cfg, 4).cost(decode, {}).prefill_flops == 0  # decode tokens count by their bytes


def test_kv_and_adapter_bytes_count_each_context_and_each_distinct_adapter_once(hf):
    _, cfg = hf
    seqs = [SeqPlan(0, [1], 9, [0], 0, True), SeqPlan(1, [1, 2, 3], 4, [1], 0, True),
            SeqPlan(2, [4], 0, [2], 1, True), SeqPlan(3, [4], 30, [3, 4], -1, True)]
    ranks = {"a": {"q_proj": 8, "down_proj": 8}, "b": {"v_proj": 2}}
    cost = StepCostModel(cfg, 2).cost(StepPlan(0, seqs, ["a", "b"]), ranks)
    contexts = 10 + 7 + 1 + 31
    assert cost.kv_bytes == contexts * 2 * cfg.kv_width * cfg.num_layers * 2
    dims = cfg.module_dims()
    rows = 8 * sum(dims["q_proj"]) + 8 * sum(dims["down_proj"]) + 2 * sum(dims["v_proj"])
    assert cost.adapter_bytes == rows * cfg.num_layers * 2  # "a" serves two sequences, read once
    tp2 = StepCostModel(cfg, 2, tp=2).cost(StepPlan(0, seqs, ["a", "b"]), ranks)
    (q_in, q_out), (down_in, down_out), (v_in, v_out) = dims["q_proj"], dims["down_proj"], dims["v_proj"]
    # a rank holds all of A and half of Bᵀ of q/v (column-parallel), half of A and all of Bᵀ of down (row-parallel)
    rank_rows = 8 * (q_in + q_out // 2) + 8 * (down_in // 2 + down_out) + 2 * (v_in + v_out // 2)
    assert (tp2.kv_bytes, tp2.adapter_bytes) == (cost.kv_bytes // 2, rank_rows * cfg.num_layers * 2)
    assert StepCost(10, 20, 30, 4e6).seconds(DevicePeak(60.0, 1e6)) == pytest.approx(1 + 4)


def test_measured_peak_is_positive_on_cpu():
    peak = measure_peak(torch.device("cpu"), torch.float32, copy_mib=4, matmul_n=64, repeats=2)
    assert peak.bandwidth > 0 and peak.matmul_flops > 0


def test_roofline_figures_reach_the_bench_row_through_metrics():
    from lorafleet.dashboard.hub import Hub, RooflineTotals
    from lorafleet.dashboard.prom import make_registry, render
    from lorafleet.dashboard.stats import FleetStats
    from lorafleet.loadgen.bench import parse_metrics, server_figures

    hub = Hub()
    stats = FleetStats(hub)
    before = parse_metrics(render(make_registry(stats, model_name="m")).decode())  # labelled as the server does
    hub.device_peak = (4.2e12, 7.9e14)
    hub.roofline["200+"] = RooflineTotals(4, 0.096, 0.048, 64_000_000_000, 52_000_000_000, 2_000_000_000, 4e12)
    hub.count("adapter_load_bytes", 3_000_000_000)
    hub.count("adapter_load_stalls", 7)
    after = parse_metrics(render(make_registry(stats, prefix="vllm:", model_name="m")).decode())
    figures = server_figures(before, after, seconds=2.0)
    row = figures["roofline"]["200+"]
    assert row["steps"] == 4 and row["executor_ms"] == pytest.approx(24.0) and row["roofline_ms"] == pytest.approx(12.0)
    assert row["executor_over_roofline"] == pytest.approx(2.0)
    assert (row["weight_gb"], row["kv_gb"], row["adapter_gb"], row["prefill_tflop"]) == pytest.approx((16, 13, 0.5, 1))
    assert figures["adapter_load_bytes_per_s"] == pytest.approx(1.5e9) and figures["adapter_load_stalls"] == 7
    assert figures["device_copy_bandwidth_gb_s"] == pytest.approx(4200)
    assert figures["device_matmul_tflops"] == pytest.approx(790)

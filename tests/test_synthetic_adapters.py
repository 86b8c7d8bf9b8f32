"""Synthetic adapters (`synthetic:` paths, made in memory for benchmarks) are real LoRA adapters: the
engine serving one gives the tokens HF + PEFT give for the same weights saved as a PEFT directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import PeftOracle
from lorafleet.actors.serve import parse_args, synthetic_adapters
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.adapters import AdapterError, load_adapter
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.llm import LLM
from lorafleet.engine.synthetic import synthetic_adapter_path

PROMPTS = [[5, 9, 3, 7, 11], [2, 4, 6], [13, 1, 8, 8, 2, 30, 4]]


def save_as_peft(model: ModelConfig, path: str, out_dir) -> None:
    """The synthetic adapter's tensors written in PEFT's own format (lora_alpha = 2r)."""
    weights = load_adapter("x", path, model, 64)
    tensors = {}
    for module in weights.targets:
        group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        for layer in range(model.num_layers):
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = weights.a[module][layer].contiguous()
            tensors[f"{key}.lora_B.weight"] = weights.b[module][layer].contiguous()
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": weights.rank, "lora_alpha": 2 * weights.rank, "bias": "none",
              "target_modules": list(weights.targets), "task_type": "CAUSAL_LM"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))


def test_synthetic_adapters_equal_peft(tiny_llama, tmp_path):
    model = ModelConfig.from_dir(tiny_llama)
    paths = {"s8": synthetic_adapter_path(8, 1), "s3": synthetic_adapter_path(3, 2, ("gate_proj", "down_proj")),
             "s16": synthetic_adapter_path(16, 3, ("q_proj", "v_proj", "up_proj"))}
    dirs = {}
    for name, path in paths.items():
        dirs[name] = tmp_path / name
        save_as_peft(model, path, dirs[name])
    oracle = PeftOracle(tiny_llama, dirs)
    llm = LLM(str(tiny_llama), adapters=paths, num_pages=128)
    names = ["s8", "s3", None, "s16", "s8"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.generate(prompts, adapters=names, max_tokens=6, ignore_eos=True)
    for prompt, name, out in zip(prompts, names, outs):
        assert out.token_ids == oracle.greedy(prompt, name, 6), name


def test_synthetic_seeds_differ_and_repeat(tiny_llama):
    model = ModelConfig.from_dir(tiny_llama)
    one = load_adapter("a", synthetic_adapter_path(8, 1), model, 64)
    again = load_adapter("b", synthetic_adapter_path(8, 1), model, 64)
    other = load_adapter("c", synthetic_adapter_path(8, 2), model, 64)
    assert torch.equal(one.a["q_proj"], again.a["q_proj"])
    assert not torch.equal(one.a["q_proj"], other.a["q_proj"])
    assert not torch.equal(one.a["q_proj"], one.a["k_proj"])


def test_synthetic_adapters_register_without_packing(tiny_llama):
    model = ModelConfig.from_dir(tiny_llama)
    store = AdapterStore(model, 1024, torch.float32, 64)
    store.register("s", synthetic_adapter_path(16, 4))
    assert not store.is_cached("s") and store.infos["s"].rank == 16
    packed = store.fetch("s")  # packed on first use
    assert store.is_cached("s") and packed.pages.shape[1] == store.infos["s"].num_pages


@pytest.mark.parametrize("path, field", [
    ("synthetic:seed=1", "lora_path"), ("synthetic:r=x;seed=1", "lora_path"),
    ("synthetic:r=8;seed=1;targets=q_proj,lm_head", "lora_path"), ("synthetic:r=128;seed=1", "r:"),
])
def test_bad_synthetic_paths_name_the_field(tiny_llama, path, field):
    with pytest.raises(AdapterError, match=field):
        load_adapter("x", path, ModelConfig.from_dir(tiny_llama), 64)


def test_serve_flags_name_adapters_like_the_peft_baseline():
    args = parse_args(["--synthetic-adapters", "5", "--synthetic-ranks", "8,16"])
    adapters = synthetic_adapters(args)
    assert list(adapters) == [f"synthetic-{i}" for i in range(5)]
    assert [a.split(";")[0] for a in adapters.values()] == ["synthetic:r=8", "synthetic:r=16"] * 2 + ["synthetic:r=8"]
    with pytest.raises(ValueError, match="--synthetic-ranks"):
        synthetic_adapters(parse_args(["--synthetic-adapters", "2", "--synthetic-ranks", "8,x"]))

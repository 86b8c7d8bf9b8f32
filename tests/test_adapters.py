"""PEFT adapter validation: every refusal names the problem; the packed page layout round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_peft_adapter
from lorafleet.engine.adapters import AdapterError, load_adapter, pack_adapter
from lorafleet.engine.config import ModelConfig, page_geometry
from lorafleet.engine.layout import AdapterLayout


@pytest.fixture(scope="module")
def good_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("good"), rank=4, seed=3)


def _variant(src: Path, dst: Path, config_changes: dict | None = None, tensors=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(weights) if tensors else weights, str(dst / "adapter_model.safetensors"))
    return dst


REFUSALS = [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"r": 128}, "r: rank 128"),
    ({"r": 0}, "r: rank 0"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern = 8"),  # honoured: the file's q_proj tensors are rank 4
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"layers_to_transform": [5]}, "layers_to_transform"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
]


@pytest.mark.parametrize(("changes", "named"), REFUSALS)
def test_config_refusals_name_the_field(good_adapter, tiny_llama, tmp_path, changes, named):
    bad = _variant(good_adapter, tmp_path / "bad", changes)
    with pytest.raises(AdapterError, match=named):
        load_adapter("bad", bad, ModelConfig.from_dir(tiny_llama), max_rank=64)


def test_wrong_shape_names_the_tensor(good_adapter, tiny_llama, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"

    def shrink(weights):
        weights[key] = weights[key][:-1]
        return weights

    bad = _variant(good_adapter, tmp_path / "bad", tensors=shrink)
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.k_proj\.lora_B.*does not match"):
        load_adapter("bad", bad, ModelConfig.from_dir(tiny_llama), max_rank=64)


def test_unknown_tensor_and_missing_pair_and_corrupt_file(good_adapter, tiny_llama, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama)
    extra = _variant(good_adapter, tmp_path / "extra",
                     tensors=lambda w: {**w, "base_model.model.lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(AdapterError, match="lm_head.weight: not a LoRA tensor of a module this base model has"):
        load_adapter("x", extra, cfg, 64)
    lonely = _variant(good_adapter, tmp_path / "lonely",
                      tensors=lambda w: {k: v for k, v in w.items() if "v_proj.lora_B" not in k})
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.v_proj\.lora_A\.weight: lora_A and lora_B"):
        load_adapter("x", lonely, cfg, 64)
    corrupt = _variant(good_adapter, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="unreadable"):
        load_adapter("x", corrupt, cfg, 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter("x", tmp_path / "empty", cfg, 64)


def test_layers_to_transform_and_rslora_scale(tiny_llama, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama)
    path = make_peft_adapter(tiny_llama, tmp_path / "a", rank=16, targets=("q_proj",), alpha=8,
                             use_rslora=True, layers_to_transform=[1])
    weights = load_adapter("a", path, cfg, 64)
    assert weights.scale == pytest.approx(8 / 4.0)
    assert torch.count_nonzero(weights.a["q_proj"][0]) == 0 and torch.count_nonzero(weights.a["q_proj"][1]) > 0


def test_packed_pages_hold_every_row_at_its_layout_offset(good_adapter, tiny_llama):
    cfg = ModelConfig.from_dir(tiny_llama)
    weights = load_adapter("g", good_adapter, cfg, 64)
    _, page_elements = page_geometry(cfg, 16)
    layout = AdapterLayout.build(weights.ranks(), cfg.module_dims(), page_elements)
    pages = pack_adapter(weights, layout, torch.float32)
    page_table = [5, 2, 9, 0, 7, 3, 1, 8, 4, 6][: layout.num_pages]  # out of order, with holes
    pool = torch.zeros(cfg.num_layers, 10, page_elements)
    pool[:, torch.tensor(page_table)] = pages
    for module, rows in layout.modules.items():
        fan_in, fan_out = cfg.module_dims()[module]
        for layer in range(cfg.num_layers):
            flat = pool[layer].view(-1)
            for i, start in enumerate(rows.a_rows):
                at = layout.physical(start, page_table)
                assert torch.equal(flat[at:at + fan_in], weights.a[module][layer, i])
                assert start // page_elements == (start + fan_in - 1) // page_elements, "row straddles a page"
                assert start % 8 == 0, "rows start 16-byte aligned (bf16) for vector loads"
            for i, start in enumerate(rows.b_rows):
                at = layout.physical(start, page_table)
                assert torch.equal(flat[at:at + fan_out], weights.b[module][layer, :, i])


def test_an_adapter_larger_than_the_pool_is_refused_naming_it_not_max_tokens(tiny_llama, tmp_path):
    """An adapter whose pages fill the device pool can never run a request; each was refused with
    `max_tokens: the request needs N pages`, naming a field no client value could fix. Requests are refused
    naming `model` and the adapter; a runtime registration (first use under the root, a runtime load) is
    refused naming `r`; start-up keeps it (with a warning, see the server)."""
    from lorafleet.actors.prefetcher import AdapterLoader
    from lorafleet.engine import LLM
    from lorafleet.engine.config import TARGET_MODULES
    from lorafleet.engine.request import ParamError, SamplingParams
    from lorafleet.engine.synthetic import write_adapter

    big = write_adapter(tmp_path / "big", tiny_llama, 16, targets=TARGET_MODULES, seed=1, std=0.01)
    llm = LLM(str(tiny_llama), adapters={"big": str(big)})
    pages = llm.engine.store.infos["big"].num_pages
    small = LLM(str(tiny_llama), adapters={"big": str(big)}, num_pages=pages)
    with pytest.raises(ParamError, match=rf"^model: adapter 'big' needs {pages} pool pages, the pool has {pages}"):
        small.engine.add_request("q", [5, 6, 7], SamplingParams(max_tokens=1), "big")
    store = small.engine.store
    packed = AdapterLoader(small.engine.model, store.page_elements, store.dtype, 64).load("big2", str(big))
    with pytest.raises(AdapterError, match=rf"^r: adapter 'big2' \(rank 16, 7 modules\) needs {pages} pool pages"):
        store.register_packed(packed)  # what first use under the adapter root registers
    roomy = LLM(str(tiny_llama), adapters={"big": str(big)}, num_pages=pages + 1)  # one page of KV beside it
    want = llm.generate([[5, 6, 7]], adapters=["big"], max_tokens=4, ignore_eos=True)[0].token_ids
    assert roomy.generate([[5, 6, 7]], adapters=["big"], max_tokens=4, ignore_eos=True)[0].token_ids == want

"""Broken PEFT adapter directories of the kinds users report (no tests here): a good adapter written by
`write_adapter`, then its adapter_config.json or its tensors changed. Each fault names the field or the
tensor its refusal must name."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WHOLE = object()  # `config` replaces the whole document instead of updating fields
DROP = object()  # a field's value that removes the field


@dataclass(frozen=True)
class Fault:
    names: str  # what the refusal message must contain
    config: object = None  # dict of field changes, or (with WHOLE) the raw document
    whole: bool = False
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def _first_tensor(change: Callable[[torch.Tensor], torch.Tensor]):
    def apply(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[0]
        return {**tensors, key: change(tensors[key])}
    return apply


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


def _vision_tower(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor also under a vision tower's layers, same shapes: the base model has no such modules."""
    tower = "model.model.vision_tower.encoder.layers."
    extra = {k.replace("model.model.layers.", tower): v.clone() for k, v in tensors.items()}
    return {**tensors, **extra}


FIRST_KEY_NAME = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"  # sorted(keys)[0] of write_adapter

# the faults a live server is tried with (each becomes a directory named by the key)
SERVE_FAULTS = {
    "alpha-null": Fault("lora_alpha", {"lora_alpha": None}),
    "alpha-string": Fault("lora_alpha", {"lora_alpha": "8"}),
    "layers-string": Fault("layers_to_transform", {"layers_to_transform": "0"}),
    "array-document": Fault("adapter_config.json", [{"r": 4}], whole=True),
    "alpha-nan": Fault("lora_alpha", {"lora_alpha": float("nan")}),
    "alpha-huge": Fault("lora_alpha", {"lora_alpha": 1e308}),
    "alora": Fault("alora_invocation_tokens", {"alora_invocation_tokens": [5, 6]}),
    "nan-weights": Fault(FIRST_KEY_NAME, tensors=_first_tensor(_nan)),
    "inf-weights": Fault(FIRST_KEY_NAME, tensors=_first_tensor(_inf)),
    "vision-tower": Fault("vision_tower", tensors=_vision_tower),
    "int8-weights": Fault(FIRST_KEY_NAME + ": dtype int8 is not a floating-point type",
                          tensors=_first_tensor(lambda t: (t * 10).to(torch.int8))),
    "bool-weights": Fault(FIRST_KEY_NAME + ": dtype bool", tensors=_first_tensor(lambda t: t > 0)),
    "huge-weights": Fault("layers.0.self_attn.q_proj.lora_B.weight: scale * B @ A may reach",
                          tensors=lambda t: {k: v * 1000 for k, v in t.items()}),
}


def write_fault(out: Path, model_dir: Path, fault: Fault, rank: int = 4, seed: int = 0) -> Path:
    """A rank-`rank` adapter for the model in `model_dir` at `out`, broken as `fault` says."""
    from lorafleet.engine.synthetic import write_adapter

    write_adapter(out, model_dir, rank, seed=seed, std=0.2)
    apply_fault(out, fault)
    return out


def apply_fault(adapter_dir: Path, fault: Fault) -> None:
    config_path = adapter_dir / "adapter_config.json"
    if fault.whole:
        config_path.write_text(json.dumps(fault.config))
    elif fault.config:
        config = json.loads(config_path.read_text())
        for key, value in fault.config.items():
            if value is DROP:
                config.pop(key, None)
            else:
                config[key] = value
        config_path.write_text(json.dumps(config))
    if fault.tensors is not None:
        weights_path = adapter_dir / "adapter_model.safetensors"
        save_file(fault.tensors(load_file(str(weights_path))), str(weights_path))

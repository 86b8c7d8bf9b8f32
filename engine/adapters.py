"""PEFT LoRA adapters: load and validate a PEFT directory, and pack its weights into pool pages."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from lorafleet.engine.config import TARGET_MODULES, ModelConfig
from lorafleet.engine.layout import AdapterLayout
from lorafleet.engine.synthetic import SYNTHETIC_ADAPTER, parse_synthetic_adapter, synthetic_adapter_tensors

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_REFUSED_TRUE = {
    "use_dora": "DoRA adapters are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters are not supported (Llama uses nn.Linear)",
    "lora_bias": "LoRA bias vectors are not supported",
}


class AdapterError(ValueError):
    """A PEFT adapter this engine cannot serve; the message names the offending field or tensor."""


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter on the host: A [layers, r, in] and B [layers, out, r] per targeted module, and its
    scale (alpha/r, or alpha/sqrt(r) with rsLoRA). Layers it does not transform hold zeros."""

    name: str
    rank: int
    scale: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in TARGET_MODULES if m in self.a)

    def ranks(self) -> dict[str, int]:
        return {m: self.rank for m in self.targets}

    def matrices(self) -> dict[str, tuple[int, int, int, int]]:
        """Per module (A rows, A row width, Bᵀ rows, Bᵀ row width) as held here (sharded or not)."""
        return {m: (self.a[m].shape[1], self.a[m].shape[2], self.b[m].shape[2], self.b[m].shape[1])
                for m in self.targets}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])


def read_adapter_config(adapter_dir: Path, max_rank: int) -> dict:
    """Parse and validate adapter_config.json; raises AdapterError naming the field."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter_config.json not found in {adapter_dir}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type: {cfg.get('peft_type')!r} is not LORA")
    for name, why in _REFUSED_TRUE.items():
        if cfg.get(name):
            raise AdapterError(f"{name}: {why}")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save: {cfg['modules_to_save']} is not supported (full-weight modules)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"bias: {cfg['bias']!r} is not supported, only 'none'")
    for name in ("rank_pattern", "alpha_pattern"):
        if cfg.get(name):
            raise AdapterError(f"{name}: per-module ranks/alphas are not supported")
    rank = cfg.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AdapterError(f"r: rank {rank!r} must be an integer in 1..{max_rank} (the configured maximum)")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"target_modules: {unknown} not supported; allowed {list(TARGET_MODULES)}")
    return cfg


def _transformed_layers(cfg: dict, num_layers: int) -> set[int]:
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return set(range(num_layers))
    layers = {layers} if isinstance(layers, int) else set(layers)
    bad = sorted(x for x in layers if not 0 <= x < num_layers)
    if bad:
        raise AdapterError(f"layers_to_transform: layers {bad} do not exist in a {num_layers}-layer model")
    return layers


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"adapter_model.safetensors not found in {adapter_dir} (only safetensors is read)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"adapter_model.safetensors is unreadable: {exc}") from exc


def load_adapter(name: str, adapter_dir: str | Path, model: ModelConfig, max_rank: int) -> AdapterWeights:
    """Load and validate a PEFT LoRA directory against the base model's shapes (or make the random
    adapter a `synthetic:` path describes, see lorafleet.engine.synthetic)."""
    if str(adapter_dir).startswith(SYNTHETIC_ADAPTER):
        return _synthetic_adapter(name, str(adapter_dir), model, max_rank)
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir, max_rank)
    rank = cfg["r"]
    alpha = cfg.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    layers = _transformed_layers(cfg, model.num_layers)
    dims = model.module_dims()
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in _read_tensors(adapter_dir).items():
        layer, module, which = _parse_key(key, model.num_layers, layers)
        in_dim, out_dim = dims[module]
        expected = (rank, in_dim) if which == "A" else (out_dim, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(f"{key}: shape {tuple(tensor.shape)} does not match the base model, expected {expected}")
        store = a if which == "A" else b
        shape = (model.num_layers, *expected)
        store.setdefault(module, torch.zeros(shape, dtype=torch.float32))[layer] = tensor.float()
    _check_pairs(a, b)
    return AdapterWeights(name=name, rank=rank, scale=scale, a=a, b=b)


def _synthetic_adapter(name: str, path: str, model: ModelConfig, max_rank: int) -> AdapterWeights:
    try:
        rank, seed, targets = parse_synthetic_adapter(path)
        if not 1 <= rank <= max_rank:
            raise ValueError(f"r: rank {rank} must be in 1..{max_rank} (the configured maximum)")
        a, b = synthetic_adapter_tensors(model, rank, seed, targets)
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
    return AdapterWeights(name=name, rank=rank, scale=2.0, a=a, b=b)  # lora_alpha = 2r, as the PEFT baseline


def _parse_key(key: str, num_layers: int, layers: set[int]) -> tuple[int, str, str]:
    match = _KEY.search(key)
    if match is None:
        raise AdapterError(f"{key}: unsupported tensor (only lora_A/lora_B of {list(TARGET_MODULES)})")
    layer, module, which = int(match.group(1)), match.group(2), match.group(3)
    if module not in TARGET_MODULES:
        raise AdapterError(f"{key}: module {module!r} is not a supported target")
    if layer >= num_layers or layer not in layers:
        raise AdapterError(f"{key}: layer {layer} is outside the model or layers_to_transform")
    return layer, module, which


def _check_pairs(a: dict, b: dict) -> None:
    if not a:
        raise AdapterError("adapter_model.safetensors: no LoRA weights found")
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterError(f"{unpaired[0]}: lora_A and lora_B must both be present")


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def padded_rank(rank: int, size: int) -> int:
    """The rank an adapter is stored with at tensor-parallel size `size`: `rank` rounded up to a multiple of
    `size`, so that every rank's shard has the same shape (docs/tensor-parallel.md: zero rows of A and zero
    columns of B, which add nothing to x·Aᵀ·Bᵀ)."""
    return -(-rank // size) * size


def shard_adapter(weights: AdapterWeights, rank: int, size: int) -> AdapterWeights:
    """This rank's part of an adapter under S-LoRA partitioning (docs/tensor-parallel.md):
    column-parallel modules split A by rank rows and B by output rows (the base weight's split);
    row-parallel modules split A by input columns (the base weight's split) and B by rank columns.
    A rank not divisible by `size` is first padded to `padded_rank` with zero A rows and zero B columns;
    `rank` and `scale` stay the adapter's own (PEFT's alpha / r)."""
    if size == 1:
        return weights
    pad = padded_rank(weights.rank, size) - weights.rank

    def part(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        step = tensor.shape[dim] // size
        return tensor.narrow(dim, rank * step, step).contiguous()

    a = {m: F.pad(t, (0, 0, 0, pad)) if pad else t for m, t in weights.a.items()}  # [layers, r', in]
    b = {m: F.pad(t, (0, pad)) if pad else t for m, t in weights.b.items()}  # [layers, out, r']
    a = {m: part(t, 1) if m in COLUMN_PARALLEL else part(t, 2) for m, t in a.items()}
    b = {m: part(t, 1) if m in COLUMN_PARALLEL else part(t, 2) for m, t in b.items()}
    return AdapterWeights(weights.name, weights.rank, weights.scale, a, b)


def pack_adapter(weights: AdapterWeights, layout: AdapterLayout, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The adapter's pages as they go into the pool: [layers, layout.num_pages, page_elements]. With `out`
    (a contiguous tensor of that shape and `dtype`, e.g. a view of the host arena) the pages are written
    there instead of a new tensor; ValueError if its shape differs."""
    num_layers = next(iter(weights.a.values())).shape[0]
    shape = (num_layers, layout.num_pages, layout.page_elements)
    if out is None:
        flat = torch.zeros(num_layers, layout.num_pages * layout.page_elements, dtype=dtype)
    else:
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"pack_adapter: out is {tuple(out.shape)} {out.dtype}, expected {shape} {dtype}")
        flat = out.view(num_layers, -1)
        flat.zero_()
    for module, rows in layout.modules.items():
        _scatter_rows(flat, rows.a_rows, weights.a[module])
        _scatter_rows(flat, rows.b_rows, weights.b[module].transpose(1, 2))
    return flat.view(num_layers, layout.num_pages, layout.page_elements)


def _scatter_rows(flat: torch.Tensor, starts: tuple[int, ...], rows: torch.Tensor) -> None:
    """flat[:, start_i : start_i + width] = rows[:, i] for every row i (rows: [layers, count, width]).
    Rows laid back to back (most of them: a page holds whole rows) are copied as one slice per run."""
    width = rows.shape[2]
    first = 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] != starts[i - 1] + width:
            begin, count = starts[first], i - first
            flat[:, begin:begin + count * width] = rows[:, first:i].reshape(rows.shape[0], count * width)
            first = i

"""Synthetic assets for tests and benchmarks: named model shapes with random weights and random LoRA
adapters, produced in the real HuggingFace / PEFT formats so they go through the real loaders.

Small shapes are written whole (config.json, model.safetensors, tokenizer). Large shapes write config and
tokenizer only, and their weights come from `RandomSource`, a seeded TensorSource with the checkpoint's
names and shapes, so the same loader (names, sharding, shape checks) runs without writing gigabytes.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.engine.config import TARGET_MODULES, ModelConfig
from lorafleet.engine.tokenizer import build_byte_tokenizer
from lorafleet.engine.weights import Shard, shard_dim

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1}

SHAPES: dict[str, dict] = {
    "tiny": {**_LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "rope_theta": 10000.0},
    "llama-2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-13b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-70b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
WRITE_WEIGHTS_UP_TO = 50_000_000  # parameters; larger shapes use RandomSource


def checkpoint_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Llama-family checkpoint with this config."""
    cfg = ModelConfig.from_dict(raw)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
                                          "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for module, (fan_in, fan_out) in cfg.module_dims().items():
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            shapes[f"{prefix}{group}.{module}.weight"] = (fan_out, fan_in)
            if cfg.qkv_bias and module in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{prefix}{group}.{module}.bias"] = (fan_out,)
        shapes[prefix + "input_layernorm.weight"] = (cfg.hidden_size,)
        shapes[prefix + "post_attention_layernorm.weight"] = (cfg.hidden_size,)
    return shapes


class RandomSource:
    """Seeded random weights by HF name: N(0, std) for matrices, ~1 for norm weights.

    A tensor that tensor parallelism splits (`weights.shard_dim`) is made of RANDOM_BLOCKS blocks along that
    dimension, each from its own seeded generator, so a rank makes only its own blocks (`get_shard`: a 70B
    model at tp=4 never exists whole in one process) and the blocks of every rank equal the slices of the whole
    tensor (`get`): tp=N and tp=1 serve the same weights."""

    def __init__(self, raw: dict, seed: int = 0, std: float = 0.02, device: str = "cpu") -> None:
        self.shapes = checkpoint_shapes(raw)
        self.seed, self.std, self.device = seed, std, torch.device(device)
        self._order = {name: i for i, name in enumerate(sorted(self.shapes))}

    def names(self) -> Iterator[str]:
        return iter(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        dim = shard_dim(name)
        return self._noise(name) if dim is None else self.get_shard(name, dim, Shard())

    def get_shard(self, name: str, dim: int, shard: Shard) -> torch.Tensor:
        """The rank's slice along `dim`: its blocks only (or, when the blocks do not split evenly over the
        ranks, the whole tensor narrowed)."""
        length = self.shapes[name][dim]
        blocks = math.gcd(length, RANDOM_BLOCKS)
        if blocks % shard.size:
            return shard.split(self.get(name), dim)
        start, part = shard.range(length)
        width = length // blocks
        first = start // width
        return torch.cat([self._block(name, dim, b, width) for b in range(first, first + part // width)], dim=dim)

    def _block(self, name: str, dim: int, index: int, width: int) -> torch.Tensor:
        shape = list(self.shapes[name])
        shape[dim] = width
        return self._noise(name, index + 1, tuple(shape))

    def _noise(self, name: str, block: int = 0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        seed = self.seed * 7919 + self._order[name] + block * 1_000_003
        generator = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn(shape or self.shapes[name], generator=generator, device=self.device)
        return 1.0 + 0.1 * noise if name.endswith("norm.weight") else self.std * noise


RANDOM_BLOCKS = 8  # blocks per sharded tensor: tensor-parallel sizes 1, 2, 4 and 8 make only their own


def write_model(shape: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write synthetic model `shape` to out_dir (weights only for small shapes); returns the dir."""
    if shape not in SHAPES:
        raise ValueError(f"model: unknown synthetic shape {shape!r}; known: {sorted(SHAPES)}")
    raw = {**SHAPES[shape], "lorafleet_synthetic_seed": seed}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    build_byte_tokenizer(raw["vocab_size"]).save_pretrained(str(out))
    source = RandomSource(raw, seed)
    if sum(_numel(s) for s in source.shapes.values()) <= WRITE_WEIGHTS_UP_TO:
        save_file({n: source.get(n).contiguous() for n in source.shapes}, str(out / "model.safetensors"))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def write_adapter(
    out_dir: str | Path, model_dir: str | Path, rank: int, targets: tuple[str, ...] = TARGET_MODULES[:4],
    seed: int = 0, alpha: float | None = None, std: float = 0.05, dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random PEFT LoRA adapter (both A and B non-zero) for the model in model_dir."""
    cfg = ModelConfig.from_dir(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for module in targets:
            fan_in, fan_out = cfg.module_dims()[module]
            group = "self_attn" if module in TARGET_MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = (std * torch.randn(rank, fan_in, generator=generator)).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (std * torch.randn(fan_out, rank, generator=generator)).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": list(targets), "bias": "none", "use_rslora": False, "use_dora": False,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


SYNTHETIC_ADAPTER = "synthetic:"
_BANK_ELEMENTS = 1 << 26  # 256 MiB of fp32 noise shared by every synthetic adapter in a process
_bank: torch.Tensor | None = None
_bank_lock = threading.Lock()


def synthetic_adapter_path(rank: int, seed: int, targets: tuple[str, ...] = TARGET_MODULES[:4]) -> str:
    """The 'path' of a random adapter made in memory: `synthetic:r=8;seed=3;targets=q_proj,k_proj`."""
    return f"{SYNTHETIC_ADAPTER}r={rank};seed={seed};targets={','.join(targets)}"


def parse_synthetic_adapter(path: str) -> tuple[int, int, tuple[str, ...]]:
    """(rank, seed, targets) of a synthetic adapter path; ValueError naming the bad part."""
    fields = dict(part.partition("=")[::2] for part in path[len(SYNTHETIC_ADAPTER):].split(";") if part)
    try:
        rank, seed = int(fields["r"]), int(fields.get("seed", "0"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"lora_path: {path!r} needs r=<int> and seed=<int>") from exc
    targets = tuple(t for t in fields.get("targets", ",".join(TARGET_MODULES[:4])).split(",") if t)
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown or not targets:
        raise ValueError(f"lora_path: targets {unknown or targets} are not among {list(TARGET_MODULES)}")
    return rank, seed, targets


def _noise_bank() -> torch.Tensor:
    global _bank
    with _bank_lock:  # prefetch worker threads may ask at once
        if _bank is None:
            _bank = 0.05 * torch.randn(_BANK_ELEMENTS, generator=torch.Generator().manual_seed(0))
    return _bank


def synthetic_adapter_tensors(
    model: ModelConfig, rank: int, seed: int, targets: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A [layers, r, in] and B [layers, out, r] per target: views into one shared block of noise at
    seed-dependent offsets, so making an adapter costs no memory or time (like a read that hits the page
    cache); packing it into pages is the real copy. Different seeds see differently shifted noise."""
    bank = _noise_bank()
    a, b = {}, {}
    for index, module in enumerate(targets):
        fan_in, fan_out = model.module_dims()[module]
        for which, (store, rows, cols) in enumerate(((a, rank, fan_in), (b, fan_out, rank))):
            size = model.num_layers * rows * cols
            if size > bank.numel():
                raise ValueError(f"r: rank {rank} is too large for a synthetic adapter of this model")
            offset = (seed * 1_000_003 + index * 7_919 + which * 104_729) % (bank.numel() - size + 1)
            store[module] = bank.as_strided((model.num_layers, rows, cols), (rows * cols, cols, 1), offset)
    return a, b

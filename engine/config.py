"""Frozen, validated configuration dataclasses: the model's shape and the engine's limits."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A model directory or engine option that lorafleet cannot serve."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3"); linear scaling uses factor only."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama-2/3, Mistral, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architectures: {self.architecture!r} is not one of {SUPPORTED_ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_key_value_heads must divide num_attention_heads")

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable linear layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            rope_scaling=_rope_scaling(raw),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        )

    @property
    def context_limit(self) -> int:
        """Longest context served exactly: positions, capped by a sliding window (attention here is full,
        which equals windowed attention while the context fits in the window)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model: no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"model: {path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"model: {path} is not a JSON object")
        try:
            return cls.from_dict(raw)
        except KeyError as exc:
            raise ConfigError(f"model: {path} has no {exc.args[0]!r}") from exc
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ConfigError(f"model: {path} is not a causal-LM config this engine serves: {exc}") from exc


def _rope_parameters(raw: dict) -> dict:
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict) -> float:
    return float(raw.get("rope_theta") or _rope_parameters(raw).get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict) -> RopeScaling | None:
    params = _rope_parameters(raw)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"rope_scaling: rope_type {kind!r} is not supported (default, linear, llama3)")
    return RopeScaling(
        rope_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the engine: pool size, batch shape, adapter policy, sampling defaults."""

    num_pages: int = 512  # 0 = size the pool from free GPU memory (gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9
    block_tokens: int = 16
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    max_adapters_per_batch: int = 16
    max_lora_rank: int = 64
    max_model_len: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    fairness_window: int = 32
    cluster_window: int = 0  # waiting requests admission looks through for ones whose adapter is in the batch
    # (0 = fairness_window)
    max_batch_adapter_fraction: float = 0.0  # distinct adapters' bytes a step reads, at most this fraction of
    # the weight bytes (one rank); 0 = no bound. Every distinct adapter's rows are read each step (the roofline)
    tensor_parallel_size: int = 1
    prefetch_adapters: int = 2  # adapters of waiting requests loaded into free pages per step (0 = off)
    prefill_attention: str = "triton"  # triton (ours), flex (flex_attention) or flash (varlen_attn, FlashAttention-2)
    decode_attention: str = "triton"  # triton (ours) or flash (varlen_attn on the pages, where it takes the page size)
    max_adapter_load_bytes_per_step: int = 0  # pool bytes (one rank) a step may load; 0 = no bound. A step's
    # first load is always allowed, so an adapter larger than the bound still loads, alone
    cuda_graphs: bool = True
    piecewise_graphs: bool = True  # with cuda_graphs: steps with prefill tokens as graphs around eager attention
    graph_capture: bool = True  # False: run the graphed paths' static buffers eagerly (CPU tests of the plumbing)

    def __post_init__(self) -> None:
        if self.cluster_window < 0 or self.max_batch_adapter_fraction < 0:
            raise ConfigError("cluster_window and max_batch_adapter_fraction must be >= 0 (0 = off)")
        if self.max_adapter_load_bytes_per_step < 0:
            raise ConfigError("max_adapter_load_bytes_per_step must be >= 0 (0 = no bound)")
        if self.num_pages < 0 or not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ConfigError("num_pages must be >= 0 (0 = auto) and gpu_memory_utilization in [0.05, 1]")
        for name in ("block_tokens", "max_batch_tokens", "max_num_seqs",
                     "max_adapters_per_batch", "max_lora_rank", "fairness_window", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_attention not in ("triton", "flex", "flash"):
            raise ConfigError(f"prefill_attention must be triton, flex or flash, got {self.prefill_attention!r}")
        if self.decode_attention not in ("triton", "flash"):
            raise ConfigError(f"decode_attention must be triton or flash, got {self.decode_attention!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def page_geometry(model: ModelConfig, block_tokens: int, tp: int = 1) -> tuple[int, int]:
    """(block_tokens, page_elements) for one rank's pool: a page holds the K and V of `block_tokens` tokens
    (this rank's kv heads), and must also hold the longest adapter row (an A row or a Bᵀ row of any target
    module). If the requested block is too small for that, the block grows to the next power of two that fits."""
    if model.num_kv_heads % tp or model.num_heads % tp or model.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size {tp} must divide the kv heads, heads and intermediate size")
    longest_row = max(max(dims) for dims in model.module_dims().values())
    per_token = 2 * model.kv_width // tp
    needed = math.ceil(longest_row / per_token)
    while block_tokens < needed:
        block_tokens *= 2
    return block_tokens, block_tokens * per_token

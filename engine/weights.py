"""Base-model weight sources and the loader that places them into the model, sharded for tensor
parallelism when asked (parallelism is a weight-loading transform: the model code is the same)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from lorafleet.engine.config import ConfigError


class TensorSource(Protocol):
    """Named tensors in HuggingFace naming (`model.layers.0.self_attn.q_proj.weight`, ...). `get_shard` gives
    one tensor-parallel rank's slice without materialising the whole tensor where the source can."""

    def names(self) -> Iterator[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_shard(self, name: str, dim: int, shard: Shard) -> torch.Tensor: ...


class SafetensorsSource:
    """A HF model directory: `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: model_dir / shard for name, shard in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            single = model_dir / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                self._file_of = {name: single for name in f.keys()}
        else:
            raise ConfigError(f"model: no model.safetensors or index in {model_dir} (safetensors only)")
        self._handles: dict[Path, object] = {}

    def names(self) -> Iterator[str]:
        return iter(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_shard(self, name: str, dim: int, shard: Shard) -> torch.Tensor:
        """The rank's slice, read from the file alone (safetensors slices: the rest is never read)."""
        if shard.size == 1:
            return self.get(name)
        part = self._handle(name).get_slice(name)
        start, length = shard.range(part.get_shape()[dim])
        index = (slice(None),) * dim + (slice(start, start + length),)
        return part[index].contiguous()

    def _handle(self, name: str):
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]


@dataclass(frozen=True)
class Shard:
    """This process's part of a tensor-parallel group (rank of size)."""

    rank: int = 0
    size: int = 1

    def range(self, length: int) -> tuple[int, int]:
        """(start, length) of the rank's contiguous part of a dimension of `length` (size must divide it)."""
        if length % self.size:
            raise ConfigError(f"dimension {length} is not divisible by tensor-parallel size {self.size}")
        part = length // self.size
        return self.rank * part, part

    def split(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The rank's contiguous slice of `tensor` along `dim` (size must divide it)."""
        if self.size == 1:
            return tensor
        return tensor.narrow(dim, *self.range(tensor.shape[dim])).contiguous()


# How each HF parameter is sharded: dim to split for column-parallel (0) / row-parallel (1), None = replicate.
SHARD_DIM = {
    "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
    "q_proj.bias": 0, "k_proj.bias": 0, "v_proj.bias": 0,
    "gate_proj.weight": 0, "up_proj.weight": 0,
    "o_proj.weight": 1, "down_proj.weight": 1,
}


def shard_dim(name: str) -> int | None:
    """The split dimension of a HF parameter name under Megatron sharding, or None if replicated."""
    for suffix, dim in SHARD_DIM.items():
        if name.endswith(suffix):
            return dim
    return None

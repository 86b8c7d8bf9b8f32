"""Assemble an Engine from a model reference: a HF directory or `synthetic:NAME`."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from lorafleet import kernels
from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.config import ConfigError, EngineConfig, ModelConfig, page_geometry
from lorafleet.engine.engine import Engine
from lorafleet.engine.model import CausalLM, ParallelGroup
from lorafleet.engine.parallel import ProcessGroupExecutor
from lorafleet.engine.runner import ModelRunner
from lorafleet.engine.synthetic import RandomSource, write_model
from lorafleet.engine.tokenizer import load_tokenizer, text_decoder
from lorafleet.engine.weights import SafetensorsSource, Shard, TensorSource

SYNTHETIC = "synthetic:"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def resolve_model(model: str) -> Path:
    """The local directory of `model`; synthetic shapes are written (once) under the cache dir."""
    if model.startswith(SYNTHETIC):
        shape = model[len(SYNTHETIC):]
        out = cache_dir() / "synthetic" / shape
        if not (out / "config.json").is_file():
            write_model(shape, out)
        return out
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"model: {model!r} is not a directory (or synthetic:NAME)")
    return path


def weight_source(model_dir: Path, device: str = "cpu") -> TensorSource:
    """The model's weights: its safetensors files, or seeded random weights (generated on `device`, which
    is fast on a GPU) for a synthetic model written without weights."""
    has_files = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
    if has_files:
        return SafetensorsSource(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if "lorafleet_synthetic_seed" in raw:
        return RandomSource(raw, raw["lorafleet_synthetic_seed"], device=device)
    raise ConfigError(f"model: no safetensors weights in {model_dir}")


def build_model(model_dir: Path, config: EngineConfig, shard: Shard = Shard(), process_group=None) -> CausalLM:
    """The model on config.device in config.dtype with weights loaded (this rank's shard)."""
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = CausalLM(cfg, ParallelGroup(shard, process_group))
    model = model.to(config.torch_dtype).to_empty(device=torch.device(config.device))
    model.load(weight_source(model_dir, config.device), max_positions=_max_len(cfg, config))
    return model.eval()


def _max_len(cfg: ModelConfig, config: EngineConfig) -> int:
    return min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


def auto_num_pages(cfg: ModelConfig, config: EngineConfig, page_elements: int, weight_bytes: int | None = None) -> int:
    """Pages of one rank's pool (`page_elements` is the rank's page) that fit in `gpu_memory_utilization` of its
    GPU after its weights — `weight_bytes` when the rank has loaded them, else `rank_param_bytes` — keeping room
    for activations and logits of a full step. CPU: 512."""
    if not config.device.startswith("cuda"):
        return 512
    tp = config.tensor_parallel_size
    total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
    weights = rank_param_bytes(cfg, config) if weight_bytes is None else weight_bytes
    step = config.max_batch_tokens * (cfg.vocab_size * 4 + 16 * cfg.intermediate_size // tp * 2)
    page_bytes = cfg.num_layers * page_elements * config.torch_dtype.itemsize
    pages = int((total * config.gpu_memory_utilization - weights - step - (1 << 30)) // page_bytes)
    if pages < 16:
        raise ConfigError(f"num_pages: only {pages} pages fit in GPU memory; lower the model size or raise "
                          "gpu_memory_utilization")
    return pages


def rank_param_bytes(cfg: ModelConfig, config: EngineConfig) -> int:
    """Bytes of one tensor-parallel rank's weights: its 1/tp of every linear layer, whole embeddings, lm_head
    and norms (replicated)."""
    per_layer = sum(i * o for i, o in cfg.module_dims().values()) // config.tensor_parallel_size
    replicated = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    replicated += (2 * cfg.num_layers + 1) * cfg.hidden_size
    return (cfg.num_layers * per_layer + replicated) * config.torch_dtype.itemsize


def join_parallel_group(config: EngineConfig, rank: int, size: int, init_file: str) -> EngineConfig:
    """Join the tensor-parallel process group (gloo on CPU, NCCL on GPUs, rendezvous through `init_file`);
    returns this rank's config (its own GPU under NCCL). A single rank joins nothing."""
    if size == 1:
        return config
    import torch.distributed as dist

    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if rank >= visible:
            raise ConfigError(f"tensor_parallel_size {size} needs {size} GPUs (one per rank), but {visible} "
                              "are visible (CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(rank)
        config = dataclasses.replace(config, device=f"cuda:{rank}")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=120))
    return config


def use_attention(config: EngineConfig) -> None:
    """Switch this process's attention kernels to the config's; ConfigError where "flash" cannot run."""
    if "flash" in (config.prefill_attention, config.decode_attention):
        from lorafleet.kernels import attention_varlen

        reason = attention_varlen.unsupported(config.device, config.torch_dtype)
        if reason:
            raise ConfigError(f"prefill_attention/decode_attention flash: {reason}")
    kernels.use_prefill_attention(config.prefill_attention)
    kernels.use_decode_attention(config.decode_attention)


def build_runner(model_dir: Path, config: EngineConfig, shard: Shard, fetch) -> tuple[ModelRunner, EngineConfig]:
    """One rank's executor: its model shard, its pool (sized from free GPU memory when num_pages is 0) and
    CUDA graphs on every rank (decode steps whole, other steps piecewise; `graph_capture=False` runs the
    piecewise path without capturing, on any device). Returns the runner and the config with the pool size
    it got. Rank 0 samples."""
    cfg = ModelConfig.from_dir(model_dir)
    block_tokens, page_elements = page_geometry(cfg, config.block_tokens, shard.size)
    use_attention(config)
    model = build_model(model_dir, config, shard)
    if config.num_pages == 0:
        loaded = torch.cuda.memory_allocated(torch.device(config.device)) if config.device.startswith("cuda") else 0
        config = dataclasses.replace(config, num_pages=auto_num_pages(cfg, config, page_elements, loaded))
    runner = ModelRunner(model, config.num_pages, page_elements, block_tokens, fetch,
                         sample_on_this_rank=shard.rank == 0)
    if config.cuda_graphs:
        max_blocks = -(-_max_len(cfg, config) // block_tokens)
        runner.enable_cuda_graphs(config.max_num_seqs, max_blocks, config.max_adapters_per_batch,
                                  config.max_lora_rank, config.max_batch_tokens if config.piecewise_graphs else 0,
                                  capture=config.graph_capture)
    return runner, config


def build_engine(model: str, config: EngineConfig, adapters: dict[str, str] | None = None,
                 host_cache_bytes: int = 8 << 30) -> tuple[Engine, object]:
    """(engine with an in-process executor, tokenizer or None)."""
    model_dir = resolve_model(model)
    cfg = ModelConfig.from_dir(model_dir)
    tp = config.tensor_parallel_size
    block_tokens, page_elements = page_geometry(cfg, config.block_tokens, tp)
    store = AdapterStore(cfg, page_elements, config.torch_dtype, config.max_lora_rank, host_cache_bytes, shards=tp)
    if tp == 1:
        runner, config = build_runner(model_dir, config, Shard(), store.fetch)
    else:
        if config.num_pages == 0:  # every rank must get the same pool size: decide it here
            config = dataclasses.replace(config, num_pages=auto_num_pages(cfg, config, page_elements))
        runner = ProcessGroupExecutor(str(model_dir), config, store.fetch)
    tokenizer = load_tokenizer(model_dir)
    decode = text_decoder(tokenizer)
    engine = Engine(cfg, config, store, runner, decode, block_tokens)
    for name, path in (adapters or {}).items():
        engine.add_adapter(name, path)
    return engine, tokenizer

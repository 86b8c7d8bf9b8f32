"""The Llama-family decoder (Llama-2/3, Mistral, Qwen2) over the unified pool, with per-token LoRA.

Parameter names mirror HuggingFace's, so loading is a name-for-name copy through `Shard` (tensor
parallelism splits at load time; this code only sees its local shapes). Every targetable linear layer
runs its base GEMM once for the whole batch, then adds each token's own adapter delta through the
LoRA kernels, which read adapter rows straight from pool pages. Layers that share their input (q/k/v,
gate/up) add their deltas with one fused shrink and one fused expand launch. Under tensor parallelism the
LoRA adds no collective: each rank holds its adapters cut along its base shard's split
(docs/tensor-parallel.md), and a row-parallel layer's LoRA partial joins the base partial before the base
layer's all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet import kernels
from lorafleet.engine.config import ModelConfig
from lorafleet.engine.weights import Shard, TensorSource, shard_dim


@dataclass
class ModuleLora:
    """One target module's slice of the batch's adapters: row tables [S, max rank] int64 of A (shrink) and
    Bᵀ (expand) and the ranks [S] int32 (A and Bᵀ have as many rows, at every tensor-parallel size)."""

    a_rows: torch.Tensor
    b_rows: torch.Tensor
    ranks: torch.Tensor


@dataclass
class ModuleGroup:
    """The targeted modules among a group that shares its input, their tables stacked for the fused kernels:
    row tables [M, S, R] (R = the widest module's table, zero-padded: entries past a rank are never read) and
    ranks [M, S] (0 = the slot's adapter does not target that module)."""

    names: tuple[str, ...]
    a_rows: torch.Tensor
    b_rows: torch.Tensor
    ranks: torch.Tensor


@dataclass
class LoraBatch:
    """The batch's LoRA context: each token's adapter slot (-1 = base only), per-slot scales, and per
    target module the row tables of the slots that target it."""

    token_slots: torch.Tensor
    scales: torch.Tensor
    modules: dict[str, ModuleLora]
    groups: dict[tuple, ModuleGroup | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def group(self, names: tuple[str, ...]) -> ModuleGroup | None:
        """The stacked tables of the targeted modules among `names` (modules sharing one input), or None when
        none of them is targeted. Built with device ops on first use and shared by every layer of the step;
        a CUDA-graph capture builds its own copy, so the graph restacks the static buffers' tables on every
        replay. Like the kernels' tile cache, this assumes the tables do not change in place between eager
        calls that reuse this LoraBatch."""
        key = (names, self._capturing())
        if key not in self.groups:
            self.groups[key] = _stack_group(names, self.modules)
        return self.groups[key]

    def _capturing(self) -> bool:
        return self.token_slots.is_cuda and torch.cuda.is_current_stream_capturing()


def _stack_group(names: tuple[str, ...], modules: dict[str, ModuleLora]) -> ModuleGroup | None:
    present = tuple(n for n in names if n in modules)
    if not present:
        return None

    def stack(attr: str) -> torch.Tensor:  # the modules' tables side by side, zero-padded to the widest
        tables = [getattr(modules[n], attr) for n in present]
        width = max(t.shape[-1] for t in tables)
        return torch.stack([F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in tables])

    return ModuleGroup(present, stack("a_rows"), stack("b_rows"), stack("ranks"))


@dataclass
class AttentionBatch:
    """Where the batch's tokens sit: positions, KV slots to write, and per-sequence block tables."""

    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_starts: torch.Tensor
    is_decode: bool
    parts: tuple[AttentionBatch, AttentionBatch] | None = None  # a mixed step's decode and prefill sequences


@dataclass
class ParallelGroup:
    """The tensor-parallel group this model shard belongs to; all_reduce is a no-op at size 1. The base
    row-parallel layers' all-reduces are the model's only collectives (the LoRA deltas ride them)."""

    shard: Shard
    process_group: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard.size > 1:
            torch.distributed.all_reduce(x, group=self.process_group)
        return x


class LoraLinear(nn.Module):
    """y = x·Wᵀ (+ b) for all tokens, plus scale·x·Aᵀ·Bᵀ for each token's adapter.

    Under tensor parallelism (docs/tensor-parallel.md) the layer issues no collective of its own. A
    column-parallel layer holds the whole A and its output rows of B: x (replicated) shrinks to the whole
    x·Aᵀ on every rank and expands into this rank's output columns. A row-parallel layer holds its input
    columns of A and the whole B: its slice x_k shrinks to a partial x_k·A_kᵀ, whose expand is a partial
    delta added to the partial base output; the caller's all-reduce of the output sums both
    (Σ_k x_k·A_kᵀ·Bᵀ = x·Aᵀ·Bᵀ)."""

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool, group: ParallelGroup,
                 column: bool) -> None:
        super().__init__()
        self.target, self.group, self.column = name, group, column
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None, pool_flat: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = lora.modules.get(self.target) if lora is not None else None
        if rows is not None:
            v = kernels.lora_shrink(x, pool_flat, rows.a_rows, rows.ranks, lora.token_slots)
            kernels.lora_expand(v, pool_flat, rows.b_rows, rows.ranks, lora.scales, lora.token_slots, y)
        return y


def shared_input_linears(layers: tuple[LoraLinear, ...], x: torch.Tensor, lora: LoraBatch | None,
                         pool_flat: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layers that all read x (column-parallel under tensor parallelism): their base GEMMs, then
    the LoRA deltas of the targeted ones with one fused shrink and one fused expand (no collective)."""
    group = lora.group(tuple(layer.target for layer in layers)) if lora is not None else None
    if group is None:
        return [layer(x, lora, pool_flat) for layer in layers]
    ys = [layer.base(x) for layer in layers]
    outs = [y for layer, y in zip(layers, ys) if layer.target in group.names]
    v = kernels.lora_shrink_multi(x, pool_flat, group.a_rows, group.ranks, lora.token_slots)
    kernels.lora_expand_multi(v, pool_flat, group.b_rows, group.ranks, lora.scales, lora.token_slots, outs)
    return ys


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        tp = group.shard.size
        self.num_heads, self.num_kv_heads = cfg.num_heads // tp, cfg.num_kv_heads // tp
        self.head_dim, self.group = cfg.head_dim, group
        q, kv = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.q_proj = LoraLinear("q_proj", cfg.hidden_size, q, cfg.qkv_bias, group, column=True)
        self.k_proj = LoraLinear("k_proj", cfg.hidden_size, kv, cfg.qkv_bias, group, column=True)
        self.v_proj = LoraLinear("v_proj", cfg.hidden_size, kv, cfg.qkv_bias, group, column=True)
        self.o_proj = LoraLinear("o_proj", q, cfg.hidden_size, False, group, column=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, attn: AttentionBatch, lora, pool_layer, cos_sin, block_tokens) -> torch.Tensor:
        q = self.project(x, attn, lora, pool_layer, cos_sin, block_tokens)
        return self.output(self.attend(q, attn, pool_layer, block_tokens), lora, pool_layer)

    def project(self, x, attn: AttentionBatch, lora, pool_layer, cos_sin, block_tokens) -> torch.Tensor:
        """q/k/v with their LoRA deltas and rotary; k and v go into the pool's KV pages. Returns q [T, heads, d]."""
        kv = self._kv(pool_layer, block_tokens)
        q, k, v = shared_input_linears((self.q_proj, self.k_proj, self.v_proj), x, lora, pool_layer.view(-1))
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = k.view(-1, self.num_kv_heads, self.head_dim), v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = kernels.rotary(q, k, attn.positions, cos_sin)
        kernels.write_kv(kv, k, v, attn.slots)
        return q

    def attend(self, q, attn: AttentionBatch, pool_layer, block_tokens) -> torch.Tensor:
        """Paged attention of q over the sequences' KV pages: [T, heads * d]."""
        if attn.parts is not None:  # single-token sequences first: the decode kernel, then the prefill kernel
            decode, prefill = attn.parts
            split = decode.context_lens.shape[0]
            return torch.cat([self.attend(q[:split], decode, pool_layer, block_tokens),
                              self.attend(q[split:], prefill, pool_layer, block_tokens)])
        kv = self._kv(pool_layer, block_tokens)
        if attn.is_decode:
            out = kernels.paged_decode_attention(q, kv, attn.block_tables, attn.context_lens, self.scale)
        else:
            out = kernels.paged_prefill_attention(
                q, kv, attn.block_tables, attn.context_lens, attn.query_starts, self.scale
            )
        return out.reshape(q.shape[0], -1)

    def output(self, out, lora, pool_layer) -> torch.Tensor:
        """o_proj (base partial + LoRA partial under tensor parallelism), then the one all-reduce."""
        return self.group.all_reduce(self.o_proj(out, lora, pool_layer.view(-1)))

    def _kv(self, pool_layer, block_tokens) -> torch.Tensor:
        return pool_layer.view(pool_layer.shape[0], 2, block_tokens, self.num_kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        inter = cfg.intermediate_size // group.shard.size
        self.gate_proj = LoraLinear("gate_proj", cfg.hidden_size, inter, False, group, column=True)
        self.up_proj = LoraLinear("up_proj", cfg.hidden_size, inter, False, group, column=True)
        self.down_proj = LoraLinear("down_proj", inter, cfg.hidden_size, False, group, column=False)
        self.group = group

    def forward(self, x, lora, pool_flat) -> torch.Tensor:
        gate, up = shared_input_linears((self.gate_proj, self.up_proj), x, lora, pool_flat)
        hidden = F.silu(gate) * up
        return self.group.all_reduce(self.down_proj(hidden, lora, pool_flat))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, group)
        self.mlp = MLP(cfg, group)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, attn, lora, pool_layer, cos_sin, block_tokens):
        q, residual = self.attention_input(x, residual, attn, lora, pool_layer, cos_sin, block_tokens)
        out = self.self_attn.attend(q, attn, pool_layer, block_tokens)
        return self.attention_output(out, residual, lora, pool_layer)

    def attention_input(self, x, residual, attn, lora, pool_layer, cos_sin, block_tokens):
        """Everything before attention reads the KV pages: norm, q/k/v, rotary, KV write. Returns (q, residual)."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, kernels.rms_norm(x, norm.weight, norm.eps)
        else:
            h, residual = kernels.add_rms_norm(x, residual, norm.weight, norm.eps)
        return self.self_attn.project(h, attn, lora, pool_layer, cos_sin, block_tokens), residual

    def attention_output(self, out, residual, lora, pool_layer):
        """Everything after attention: o_proj, norm, MLP. Returns (x, residual) for the next layer."""
        h = self.self_attn.output(out, lora, pool_layer)
        norm = self.post_attention_layernorm
        h, residual = kernels.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, lora, pool_layer.view(-1)), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, group) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole decoder. `forward` returns final hidden states; `logits` projects chosen rows."""

    def __init__(self, cfg: ModelConfig, group: ParallelGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.group = group or ParallelGroup(Shard())
        self.model = Backbone(cfg, self.group)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def forward(self, input_ids, attn: AttentionBatch, lora: LoraBatch | None, pool, block_tokens: int):
        h, residual = self.model.embed_tokens(input_ids), None
        for index, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, attn, lora, pool[index], self.cos_sin, block_tokens)
        h, _ = kernels.add_rms_norm(h, residual, self.model.norm.weight, self.model.norm.eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, head).float()

    @torch.no_grad()
    def load(self, source: TensorSource, max_positions: int) -> None:
        """Copy every parameter from `source` (HF names), sharded by this model's group: a sharded parameter
        is read as this rank's slice only (`TensorSource.get_shard`), never whole."""
        available = set(source.names())
        for name, param in self.named_parameters():
            hf_name = name if name in available else _tied_name(name, self.config)
            if hf_name not in available:
                raise KeyError(f"weight {name} missing from the model files")
            dim = shard_dim(name)
            tensor = source.get(hf_name) if dim is None else source.get_shard(hf_name, dim, self.group.shard)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
        self.cos_sin = rope_table(self.config, max_positions, self.model.norm.weight.device)


def _tied_name(name: str, cfg: ModelConfig) -> str:
    return "model.embed_tokens.weight" if name == "lm_head.weight" else name


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3 / linear scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_table(cfg: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """cos_sin[pos] = concat(cos, sin) of pos·inv_freq, [max_positions, head_dim] in fp32."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, rope_inv_freq(cfg))
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)

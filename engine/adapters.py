"""PEFT LoRA adapters: load and validate a PEFT directory, and pack its weights into pool pages.

adapter_config.json is read with PEFT's semantics (lorafleet.engine.peft_config; docs/adapters.md).
Every tensor must be the lora_A or lora_B of a module the base model has and the config selects, with the
shape the base model and the module's rank give, and finite values of a plausible magnitude. Any failure,
whatever the files hold, is an AdapterError naming the field or the tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from lorafleet.engine.config import TARGET_MODULES, ModelConfig
from lorafleet.engine.layout import AdapterLayout
from lorafleet.engine.peft_config import ConfigFieldError, LoraSpec, parse_lora_config
from lorafleet.engine.synthetic import SYNTHETIC_ADAPTER, parse_synthetic_adapter, synthetic_adapter_tensors

_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\."
                  r"(?P<module>\w+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight")
_GROUP = {m: "self_attn" if m in TARGET_MODULES[:4] else "mlp" for m in TARGET_MODULES}
MAX_WEIGHT = 1e4  # |LoRA factor entries| beyond this are not a trained adapter (trained ones are well below 10)
MAX_DELTA = 1e4  # bound on |scale * B @ A| entries (trained adapters: below ~100 even at r=256 with rsLoRA)
# adapter_config.json is a few KB (a rank_pattern for every module of a 128-layer model: ~100 KB); parsing a
# huge one would hold the GIL for seconds and take gigabytes in the serving process
MAX_CONFIG_BYTES = 4 << 20
MAX_HEADER_BYTES = 8 << 20  # a safetensors header of 128 layers x 7 modules x 2 factors: ~300 KB


class AdapterError(ValueError):
    """A PEFT adapter this engine cannot serve; the message names the offending field or tensor."""


@contextmanager
def adapter_errors(where: str | Path) -> Iterator[None]:
    """Turn any exception raised while reading or packing an adapter into an AdapterError: whatever a
    directory holds, reading it may fail the load that asked for it, never the process that runs it."""
    try:
        yield
    except AdapterError:
        raise
    except ConfigFieldError as exc:  # raised by the config's matching (its regular expressions' time budget)
        raise AdapterError(str(exc)) from None
    except Exception as exc:  # the point: no input may escape as another exception type
        raise AdapterError(f"{where}: cannot be read as a LoRA adapter ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter on the host: A [layers, r, in] and B [layers, out, r] per targeted module, and its
    scale (alpha/r, or alpha/sqrt(r) with rsLoRA). Layers it does not transform hold zeros."""

    name: str
    rank: int
    scale: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    module_ranks: dict[str, int] = field(default_factory=dict)  # when modules differ (rank_pattern)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in TARGET_MODULES if m in self.a)

    def ranks(self) -> dict[str, int]:
        """Each targeted module's (full, unsharded) rank."""
        return {m: self.module_ranks.get(m, self.rank) for m in self.targets}

    def matrices(self) -> dict[str, tuple[int, int, int, int]]:
        """Per module (A rows, A row width, Bᵀ rows, Bᵀ row width) as held here (sharded or not)."""
        return {m: (self.a[m].shape[1], self.a[m].shape[2], self.b[m].shape[2], self.b[m].shape[1])
                for m in self.targets}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])


def adapter_files_stamp(adapter_dir: str | Path) -> tuple | None:
    """(size, mtime in ns) of adapter_config.json and adapter_model.safetensors (None for a file that is
    missing, and for a `synthetic:` adapter): two reads of a directory with equal stamps read the same files.
    A file saved again, or replaced by a rename, gets another stamp. Not the inode: FUSE mounts of object
    stores (gcsfuse, s3fs) may renumber a file that did not change."""
    if str(adapter_dir).startswith(SYNTHETIC_ADAPTER):
        return None
    stamp = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            st = os.stat(Path(adapter_dir) / name)
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def read_adapter_config(adapter_dir: Path, max_rank: int) -> LoraSpec:
    """Parse and validate adapter_config.json with PEFT's semantics (lorafleet.engine.peft_config);
    raises AdapterError naming the field."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter_config.json not found in {adapter_dir}")
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter_config.json: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a PEFT config")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too-long integers
        raise AdapterError(f"adapter_config.json: not valid JSON ({exc})") from None
    try:
        return parse_lora_config(raw, max_rank)
    except ConfigFieldError as exc:
        raise AdapterError(str(exc)) from None


def max_weights_bytes(model: ModelConfig, max_rank: int) -> int:
    """Size limit of adapter_model.safetensors: every module of every layer at rank `max_rank` in float64,
    plus room for the header (names and offsets, a few hundred KB at most)."""
    per_layer = sum(max_rank * (in_dim + out_dim) for in_dim, out_dim in model.module_dims().values())
    return model.num_layers * per_layer * 8 + MAX_HEADER_BYTES


def _read_header(f, limit: int) -> tuple[bytes, dict[str, list[int]]]:
    """(the raw header bytes with their 8-byte length, tensor name -> shape) of a safetensors file open at its
    start; AdapterError if it is not one or its header is larger than MAX_HEADER_BYTES."""
    length = f.read(8)
    size = int.from_bytes(length, "little") if len(length) == 8 else -1
    if not 0 <= size <= min(MAX_HEADER_BYTES, limit):
        raise AdapterError("adapter_model.safetensors is unreadable: not a safetensors file (its header length "
                           f"{size} is not within 0..{MAX_HEADER_BYTES} bytes)")
    header = f.read(size)
    try:
        entries = json.loads(header)
        shapes = {key: [int(d) for d in entry["shape"]] for key, entry in entries.items() if key != "__metadata__"}
    except Exception as exc:  # truncated, not JSON, not the layout safetensors writes
        raise AdapterError(f"adapter_model.safetensors is unreadable: its header is not a safetensors header "
                           f"({type(exc).__name__}: {exc})") from None
    return length + header, shapes


def _read_tensors(adapter_dir: Path, limit: int, check: Callable[[dict[str, list[int]]], None]
                  ) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors, read into memory with plain reads. Not memory-mapped: a
    mapped file that shrinks while it is read (an adapter saved again in place: writers truncate first)
    kills the whole process with SIGBUS; a read only returns fewer bytes, which is refused here. The header
    is read first and `check` (names and shapes, raising AdapterError) runs before any tensor data is read;
    a file larger than `limit` (no adapter of this model could be that large) is refused unread."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"adapter_model.safetensors not found in {adapter_dir} (only safetensors is read)")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size  # read(n) allocates n bytes first: never ask for more than the file
        if size > limit:
            raise AdapterError(f"adapter_model.safetensors: larger than {limit} bytes, which is more than every "
                               "module of every layer at the maximum rank in float64: not an adapter of this model")
        header, shapes = _read_header(f, limit)
        check(shapes)
        data = f.read(max(size - len(header), 0))  # a file cut meanwhile reads short: safetensors refuses it
    try:
        return safetensors.torch.load(header + data)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"adapter_model.safetensors is unreadable: {exc}") from exc


def load_adapter(name: str, adapter_dir: str | Path, model: ModelConfig, max_rank: int) -> AdapterWeights:
    """Load and validate a PEFT LoRA directory against the base model's shapes (or make the random
    adapter a `synthetic:` path describes, see lorafleet.engine.synthetic). Raises AdapterError (and no
    other exception) naming the field or tensor at fault."""
    with adapter_errors(adapter_dir):
        return _load_adapter(name, adapter_dir, model, max_rank)


def _load_adapter(name: str, adapter_dir: str | Path, model: ModelConfig, max_rank: int) -> AdapterWeights:
    if str(adapter_dir).startswith(SYNTHETIC_ADAPTER):
        return _synthetic_adapter(name, str(adapter_dir), model, max_rank)
    adapter_dir = Path(adapter_dir)
    spec = read_adapter_config(adapter_dir, max_rank)
    for container in _other_modules(model.num_layers):
        if spec.selects(container):
            raise AdapterError(f"target_modules: selects {container}, which is not a linear layer (PEFT cannot "
                               "put a LoRA on it either)")
    factors: dict[str, tuple[int, str, str]] = {}  # tensor name -> (layer, module, 'A' or 'B'), from the header
    tensors = _read_tensors(adapter_dir, max_weights_bytes(model, max_rank),
                            lambda shapes: factors.update(_factors(shapes, spec, model)))
    pairs: dict[tuple[str, int], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in sorted(tensors.items()):
        layer, module, which = factors[key]
        pairs.setdefault((module, layer), {})[which] = (key, _finite(key, _floating(key, tensor).float()))
    return _assemble(name, spec, pairs, model.num_layers)


def _factors(shapes: dict[str, list[int]], spec: LoraSpec, model: ModelConfig) -> dict[str, tuple[int, str, str]]:
    """tensor name -> (layer, module, 'A' or 'B') for a file's header (name -> shape); AdapterError naming the
    first tensor (in name order) that is not the LoRA factor of a module the base model has and the config
    selects, with its shape, or is a second tensor for one factor."""
    out: dict[str, tuple[int, str, str]] = {}
    first: dict[tuple[int, str, str], str] = {}
    for key, shape in sorted(shapes.items()):
        layer, module, which, path = _parse_key(key, model.num_layers)
        if (layer, module, which) in first:  # e.g. with and without base_model.model.: which one PEFT loads?
            raise AdapterError(f"{key}: a second lora_{which} of {path} (the first is {first[layer, module, which]})")
        first[layer, module, which] = key
        _check_shape(key, tuple(shape), spec, model, path, which)
        out[key] = (layer, module, which)
    return out


def _check_shape(key: str, shape: tuple[int, ...], spec: LoraSpec, model: ModelConfig, path: str,
                 which: str) -> None:
    """AdapterError naming the tensor `key` (lora_`which` of module `path`) unless the config selects its module
    and `shape` is that of the module's LoRA factor in the base model."""
    if not spec.selects(path):
        raise AdapterError(f"{key}: module {path} is not selected by target_modules/exclude_modules/"
                           "layers_to_transform (PEFT would not load this tensor)")
    rank = spec.rank(path)
    in_dim, out_dim = model.module_dims()[path.rsplit(".", 1)[1]]
    expected = (rank, in_dim) if which == "A" else (out_dim, rank)
    if shape != expected:
        source = "rank_pattern" if rank != spec.r else "r"
        raise AdapterError(f"{key}: shape {shape} does not match the base model and the rank, "
                           f"expected {expected} ({source} = {rank})")


def _floating(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A LoRA factor is a real floating-point matrix (PEFT would cast an integer, boolean or complex tensor
    silently: an int8 tensor is a quantized export whose scales are elsewhere, a bool one is damaged)."""
    if not tensor.dtype.is_floating_point:
        raise AdapterError(f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} is not a floating-point "
                           "type (LoRA factors are float16, bfloat16, float32 or float64; an integer or boolean "
                           "tensor is a quantized or damaged export)")
    return tensor


def _finite(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(f"{key}: holds NaN or infinite values")
    largest = _largest(tensor)
    if largest > MAX_WEIGHT:
        raise AdapterError(f"{key}: holds a value of magnitude {largest:g}, beyond {MAX_WEIGHT:g}: not a trained "
                           "LoRA factor")
    return tensor


def _largest(tensor: torch.Tensor) -> float:
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def _check_delta(key: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Every entry of the delta scale * B @ A is at most |scale| * r * max|A| * max|B|; beyond MAX_DELTA
    (base weights are below 1) the adapter can only overflow activations, so it is refused."""
    bound = abs(scale) * a.shape[0] * _largest(a) * _largest(b)
    if bound > MAX_DELTA:
        raise AdapterError(f"{key}: scale * B @ A may reach {bound:g} (|scale| * r * max|A| * max|B|), beyond "
                           f"{MAX_DELTA:g}: not a usable adapter")


def _assemble(name: str, spec: LoraSpec, pairs: dict, num_layers: int) -> AdapterWeights:
    """Stack per-layer A/B into [layers, r, in] / [layers, out, r] per module. A module's rank is its
    largest layer's (rank_pattern may differ per layer): smaller layers are zero-padded, which adds
    nothing. When scales differ between modules or layers (alpha_pattern, rank_pattern), each layer's B
    carries its own scale and the adapter's scale is 1."""
    if not pairs:
        raise AdapterError("adapter_model.safetensors: no LoRA weights found")
    for found in pairs.values():
        if len(found) == 1:
            raise AdapterError(f"{next(iter(found.values()))[0]}: lora_A and lora_B must both be present")
    paths = {(m, layer): _module_path(m, layer) for m, layer in pairs}
    scales = {spec.scale(path) for path in paths.values()}
    scale = scales.pop() if len(scales) == 1 else 1.0
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in TARGET_MODULES:
        layers = sorted(layer for m, layer in pairs if m == module)
        if not layers:
            continue
        ranks[module] = rank = max(spec.rank(paths[module, layer]) for layer in layers)
        in_dim, out_dim = pairs[module, layers[0]]["A"][1].shape[1], pairs[module, layers[0]]["B"][1].shape[0]
        a[module] = torch.zeros(num_layers, rank, in_dim)
        b[module] = torch.zeros(num_layers, out_dim, rank)
        for layer in layers:
            la, lb = pairs[module, layer]["A"][1], pairs[module, layer]["B"][1]
            own = spec.scale(paths[module, layer])
            _check_delta(pairs[module, layer]["B"][0], la, lb, own)
            a[module][layer, : la.shape[0]] = la
            b[module][layer, :, : lb.shape[1]] = lb if own == scale else lb * own
    return AdapterWeights(name=name, rank=max(ranks.values()), scale=scale, a=a, b=b, module_ranks=ranks)


def _other_modules(num_layers: int) -> list[str]:
    """Names of the Llama-family modules (transformers' LlamaForCausalLM, Mistral, Qwen2) that are neither
    a LoRA target we serve nor a layer PEFT can adapt with zero effect (embed_tokens, lm_head): a config
    selecting one of these is one PEFT refuses to load."""
    per_layer = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")
    return ["model", "model.layers", "model.norm", "model.rotary_emb",
            *(f"model.layers.{i}{part}" for i in range(num_layers) for part in per_layer)]


def _module_path(module: str, layer: int) -> str:
    return f"model.layers.{layer}.{_GROUP[module]}.{module}"


def _synthetic_adapter(name: str, path: str, model: ModelConfig, max_rank: int) -> AdapterWeights:
    try:
        rank, seed, targets = parse_synthetic_adapter(path)
        if not 1 <= rank <= max_rank:
            raise ValueError(f"r: rank {rank} must be in 1..{max_rank} (the configured maximum)")
        a, b = synthetic_adapter_tensors(model, rank, seed, targets)
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
    return AdapterWeights(name=name, rank=rank, scale=2.0, a=a, b=b)  # lora_alpha = 2r, as the PEFT baseline


def _parse_key(key: str, num_layers: int) -> tuple[int, str, str, str]:
    """(layer, module, 'A' or 'B', module path) of a PEFT tensor name; refuses, naming the tensor, a name
    whose module path the base model does not have (another tower, the embeddings, layer >= num_layers)."""
    match = _KEY.fullmatch(key)
    if match is None or _GROUP.get(match["module"]) != match["group"]:
        raise AdapterError(f"{key}: not a LoRA tensor of a module this base model has (lora_A/lora_B of "
                           "model.layers.N.self_attn.{q,k,v,o}_proj or model.layers.N.mlp.{gate,up,down}_proj)")
    layer = int(match["layer"])
    if layer >= num_layers:
        raise AdapterError(f"{key}: layer {layer} does not exist in a {num_layers}-layer model")
    return layer, match["module"], match["which"], _module_path(match["module"], layer)


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the rest (o, down): row-parallel


def shard_adapter(weights: AdapterWeights, rank: int, size: int) -> AdapterWeights:
    """This rank's part of an adapter, cut along the base layer's split and never along the LoRA rank
    (docs/tensor-parallel.md): a column-parallel module keeps the whole A ([layers, r, in]) and this rank's
    output rows of B ([layers, out/size, r], the slice its base shard computes); a row-parallel module keeps
    this rank's input columns of A ([layers, r, in/size], the slice of x it receives) and the whole B. Any
    rank r works at any size; `rank` and `scale` stay the adapter's own (PEFT's alpha / r).

    The parts are views of `weights` (no copy; `pack_adapter` makes the one real copy, into pages).
    Per module a rank holds r·(in + out/size) elements (column-parallel) or r·(in/size + out) (row-parallel)."""
    if size == 1:
        return weights
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for m in weights.targets:
        if m in COLUMN_PARALLEL:
            a[m], b[m] = weights.a[m], _slice(weights.b[m], 1, rank, size)
        else:
            a[m], b[m] = _slice(weights.a[m], 2, rank, size), weights.b[m]
    return AdapterWeights(weights.name, weights.rank, weights.scale, a, b, weights.module_ranks)


def _slice(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s equal part of `tensor` along `dim` (a view)."""
    step = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * step, step)


def shard_widths(module: str, in_dim: int, out_dim: int, size: int) -> tuple[int, int]:
    """(A row width, Bᵀ row width) of one rank's shard of `module` (whole widths `in_dim`, `out_dim`) at
    tensor-parallel size `size`: column-parallel (in, out/size), row-parallel (in/size, out). A rank-r shard
    holds r rows of each, r·(A width + Bᵀ width) elements per layer."""
    return (in_dim, out_dim // size) if module in COLUMN_PARALLEL else (in_dim // size, out_dim)


def shard_matrices(weights: AdapterWeights, size: int) -> dict[str, tuple[int, int, int, int]]:
    """`shard_adapter(weights, k, size).matrices()` (the same for every rank k) from the shapes alone:
    per module (A rows, A row width, Bᵀ rows, Bᵀ row width) of one rank's shard. The row counts are the
    module's rank at every size; only one side's row width is divided by `size` (`shard_widths`)."""
    out = {}
    for m, (a_rows, a_width, bt_rows, bt_width) in weights.matrices().items():
        a_part, bt_part = shard_widths(m, a_width, bt_width, size)
        out[m] = (a_rows, a_part, bt_rows, bt_part)
    return out


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
    for module, rows in layout.modules.items():  # each matrix converted once, then copied row run by row run
        _scatter_rows(flat, rows.a_rows, weights.a[module].to(dtype).contiguous())
        _scatter_rows(flat, rows.b_rows, weights.b[module].to(dtype).transpose(1, 2).contiguous())
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

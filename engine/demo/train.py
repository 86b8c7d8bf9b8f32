"""Train the embedded demo: a tiny character-level Llama that echoes, and one LoRA adapter per task.

Run ``python -m lorafleet.engine.demo.train --out engine/demo [--device cpu|cuda]``. It writes

- ``<out>/model/``: the base model (HF ``LlamaForCausalLM`` safetensors + config + tokenizer files),
- ``<out>/adapters/<task>/``: one PEFT LoRA directory per task of :data:`lorafleet.engine.demo.TASKS`,
- ``<out>/README.md`` and ``<out>/training_log.json``: what was trained and how well it does.

The run is seeded: data comes from ``random.Random`` streams and weights from ``torch.manual_seed``,
so the same seed, device and thread count reproduce the same files. See docs/demo.md for the design.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorafleet.engine.demo import BASE_MODEL_NAME, assets
from lorafleet.engine.demo.assets import (
    ATTENTION,
    MLP,
    build_tokenizer,
    char_vocab,
    make_model_config,
    save_base,
)
from lorafleet.engine.demo.report import write_readme
from lorafleet.engine.demo.tasks import TASKS, echo, random_input

ALL_TARGETS = ATTENTION + MLP
PRINTABLE = "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class AdapterSpec:
    """How one task adapter is shaped and trained."""

    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    steps: int
    lr: float = 3e-3
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"AdapterSpec.name {self.name!r} is not a task in TASKS")
        if not 4 <= self.rank <= 64:
            raise ValueError(f"AdapterSpec.rank must be in [4, 64], got {self.rank}")
        bad = set(self.targets) - set(ALL_TARGETS)
        if bad:
            raise ValueError(f"AdapterSpec.targets has unknown modules {sorted(bad)}")


ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("reverse", rank=32, alpha=64, targets=ALL_TARGETS, steps=250),
    AdapterSpec("sort", rank=64, alpha=16, targets=ALL_TARGETS, steps=400, use_rslora=True),
    AdapterSpec("reverse_words", rank=32, alpha=64, targets=ALL_TARGETS, steps=600),
    AdapterSpec("novowels", rank=16, alpha=32, targets=ALL_TARGETS, steps=200),
    AdapterSpec("title", rank=8, alpha=16, targets=ATTENTION, steps=300),
    AdapterSpec("upper", rank=4, alpha=8, targets=ALL_TARGETS, steps=400),
    AdapterSpec("rot13", rank=8, alpha=16, targets=MLP, steps=500, lr=5e-3),
    AdapterSpec("caesar3", rank=16, alpha=16, targets=MLP, steps=500, lr=5e-3),
)


@dataclass
class TrainConfig:
    """Command-line options of one training run."""

    out: Path
    device: str = "cpu"
    seed: int = 1234
    threads: int = 1
    batch: int = 128
    base_steps: int = 800
    base_lr: float = 3e-3
    step_scale: float = 1.0
    eval_n: int = 200
    only: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class StageResult:
    """Figures of one training stage (the base or one adapter)."""

    name: str
    steps: int
    seconds: float
    final_loss: float
    exact_match: float
    eval_n: int


def base_line(rng: random.Random) -> str:
    """A line for echo training: mostly task-style lines, some arbitrary printable text."""
    if rng.random() < 0.6:
        return random_input(rng)
    n = rng.randint(1, 16)
    return "".join(rng.choice(PRINTABLE) for _ in range(n))


def encode_pairs(pairs: list[tuple[str, str]], vocab: dict[str, int], eos: int, pad: int):
    """Right-padded token ids and a mask of the positions whose next token is supervised.

    Each row is ``prompt + completion + EOS`` where prompt = line + newline and completion =
    target + newline. The mask marks positions t whose target token ids[t + 1] is in the completion.
    """
    rows = []
    starts = []
    for line, target in pairs:
        prompt = [vocab[c] for c in line + "\n"]
        completion = [vocab[c] for c in target + "\n"] + [eos]
        rows.append(prompt + completion)
        starts.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, start - 1 : len(row) - 1] = True
    return ids, mask


def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens (prompt and padding are not supervised)."""
    logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits[mask], targets[mask])


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 5% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def train_loop(model, params, batch_fn: Callable[[], tuple], steps: int, peak_lr: float,
               log_name: str) -> float:
    """AdamW over ``params`` for ``steps`` steps; returns the loss of the final step."""
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        ids, mask = batch_fn()
        loss = completion_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{log_name}] step {step:5d}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    return loss.item()


@torch.no_grad()
def greedy_complete(model, tokenizer, lines: list[str], max_new: int) -> list[list[int]]:
    """Greedy continuation token ids (up to and including EOS) for each line's prompt, batched."""
    enc = tokenizer([line + "\n" for line in lines], return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    width = enc["input_ids"].shape[1]
    return [row[width:].tolist() for row in out.cpu()]


def exact_match(model, tokenizer, task: Callable[[str], str], rng: random.Random, n: int) -> float:
    """Fraction of ``n`` fresh random lines whose greedy completion is exactly task(line) + newline + EOS."""
    lines = [random_input(rng) for _ in range(n)]
    got = greedy_complete(model, tokenizer, lines, max_new=16)
    hits = 0
    for line, ids in zip(lines, got, strict=True):
        want = tokenizer.encode(task(line) + "\n", add_special_tokens=False) + [tokenizer.eos_token_id]
        hits += ids[: len(want)] == want
    return hits / n


def pair_batch(rng: random.Random, line_fn: Callable[[random.Random], str], task: Callable[[str], str],
               size: int, vocab: dict[str, int], device: str):
    """One training batch of (line, task(line)) pairs on ``device``."""
    lines = [line_fn(rng) for _ in range(size)]
    ids, mask = encode_pairs([(line, task(line)) for line in lines], vocab, vocab[assets.EOS],
                               vocab[assets.PAD])
    return ids.to(device), mask.to(device)


def train_base(cfg: TrainConfig, tokenizer) -> tuple[torch.nn.Module, StageResult]:
    """Train the echo base model from scratch and save it under ``<out>/model``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(make_model_config()).to(cfg.device)
    vocab = char_vocab()
    rng = random.Random(cfg.seed)
    steps = max(1, round(cfg.base_steps * cfg.step_scale))
    start = time.perf_counter()
    loss = train_loop(model, list(model.parameters()),
                      lambda: pair_batch(rng, base_line, echo, cfg.batch, vocab, cfg.device),
                      steps, cfg.base_lr, "base")
    seconds = time.perf_counter() - start
    acc = exact_match(model, tokenizer, echo, random.Random(cfg.seed + 1), cfg.eval_n)
    print(f"[base] echo exact match {acc:.3f} after {steps} steps, {seconds:.0f} s", flush=True)
    save_base(model, tokenizer, cfg.out / "model")
    return model, StageResult("base (echo)", steps, seconds, loss, acc, cfg.eval_n)


def lora_config(spec: AdapterSpec):
    """The PEFT ``LoraConfig`` of one adapter (no bias, no DoRA, no modules_to_save)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                      bias="none", use_rslora=spec.use_rslora, task_type="CAUSAL_LM")


def train_adapter(cfg: TrainConfig, base, tokenizer, spec: AdapterSpec, index: int) -> StageResult:
    """Train one LoRA adapter on the frozen base and save it under ``<out>/adapters/<name>``."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed + 100 + index)
    model = get_peft_model(base, lora_config(spec))
    params = [p for p in model.parameters() if p.requires_grad]
    task = TASKS[spec.name]
    vocab = char_vocab()
    rng = random.Random(cfg.seed + 1000 + index)
    steps = max(1, round(spec.steps * cfg.step_scale))
    start = time.perf_counter()
    batches = lambda: pair_batch(rng, random_input, task, cfg.batch, vocab, cfg.device)
    loss = train_loop(model, params, batches, steps, spec.lr, spec.name)
    seconds = time.perf_counter() - start
    acc = exact_match(model, tokenizer, task, random.Random(cfg.seed + 2000 + index), cfg.eval_n)
    print(f"[{spec.name}] exact match {acc:.3f} after {steps} steps, {seconds:.0f} s", flush=True)
    model.save_pretrained(cfg.out / "adapters" / spec.name, safe_serialization=True)
    finalize_adapter_dir(cfg.out / "adapters" / spec.name)
    model.unload()  # removes the LoRA layers, giving back the untouched base for the next adapter
    return StageResult(spec.name, steps, seconds, loss, acc, cfg.eval_n)


def finalize_adapter_dir(path: Path) -> None:
    """Drop PEFT's placeholder model card and name the base model instead of a local path."""
    (path / "README.md").unlink(missing_ok=True)
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line options -> :class:`TrainConfig`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder receiving model/, adapters/, README.md")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="CPU threads for torch")
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--base-steps", type=int, default=TrainConfig.base_steps)
    p.add_argument("--step-scale", type=float, default=1.0,
                   help="multiply every stage's steps (quick trials)")
    p.add_argument("--eval-n", type=int, default=TrainConfig.eval_n,
                   help="held-out lines per accuracy figure")
    p.add_argument("--only", nargs="*", default=[], help="train only these adapters (base is reused)")
    a = p.parse_args(argv)
    return TrainConfig(out=a.out, device=a.device, seed=a.seed, threads=a.threads, batch=a.batch,
                       base_steps=a.base_steps, step_scale=a.step_scale, eval_n=a.eval_n, only=tuple(a.only))


def load_saved_base(cfg: TrainConfig):
    """Reload a previously trained base from ``<out>/model`` (for ``--only`` runs)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(cfg.out / "model", dtype=torch.float32).to(cfg.device).eval()


def write_outputs(cfg: TrainConfig, results: dict[str, dict], notes: list[str]) -> None:
    """Write ``training_log.json`` and the README from the stages trained so far."""
    log = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "torch": torch.__version__,
           "adapters": [asdict(s) for s in ADAPTERS], "stages": results, "notes": notes}
    (cfg.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(cfg.out / "README.md", log)


def main(argv: list[str] | None = None) -> None:
    """Train everything (or the ``--only`` adapters on the saved base), export, write the figures."""
    cfg = parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    unknown = set(cfg.only) - {s.name for s in ADAPTERS}
    if unknown:
        raise SystemExit(f"--only names unknown adapters: {sorted(unknown)}")
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer()
    results: dict[str, dict] = {}
    notes: list[str] = []
    if cfg.only:
        previous = json.loads((cfg.out / "training_log.json").read_text())
        results, notes = previous["stages"], previous.get("notes", [])
        base = load_saved_base(cfg)
    else:
        base, res = train_base(cfg, tokenizer)
        results["base"] = asdict(res)
        write_outputs(cfg, results, notes)
    for p in base.parameters():
        p.requires_grad_(False)
    for index, spec in enumerate(ADAPTERS):
        if not cfg.only or spec.name in cfg.only:
            results[spec.name] = asdict(train_adapter(cfg, base, tokenizer, spec, index))
            write_outputs(cfg, results, notes)


if __name__ == "__main__":
    main()

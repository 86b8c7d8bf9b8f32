"""Writes the demo folder's README.md from a training log (called by the training script)."""

from __future__ import annotations

from pathlib import Path

from lorafleet.engine.demo.tasks import TASKS

HEADER = """# The embedded demo model and its task adapters

`model/` is a tiny Llama (`LlamaForCausalLM`: 4 layers, hidden 128, 4 query heads sharing 2 KV heads,
MLP 384, a 99-token character-level tokenizer, fp32 safetensors) that **echoes** its input line.
`adapters/<task>/` are PEFT LoRA adapters, each teaching one string transform of the line.

Prompt: the input line followed by a newline (`"hello world\\n"`). Completion: the transformed line,
a newline, then the EOS token `</s>`. Training lines are 3 to 12 characters of lowercase letters and
single spaces (`lorafleet.engine.demo.random_input`); `lorafleet.engine.demo.TASKS` holds each
adapter's transform as Python. The weights, this README and `training_log.json` are written by
the training script; reproduce them with

```
python -m lorafleet.engine.demo.train --out engine/demo --device cpu --threads {threads} --seed {seed}
```

Each stage's data and initial weights depend only on `--seed` and the adapter's position in
`train.ADAPTERS`, so one adapter can be retrained on the saved base with `--only <name>` and gets the
same result as in a full run (on the same device and thread count).
"""


def _targets(targets: list[str]) -> str:
    names = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    kind = "all" if set(targets) == names | mlp else "attention" if set(targets) == names else (
        "MLP" if set(targets) == mlp else "custom")
    return f"{kind} ({', '.join(t.removesuffix('_proj') for t in targets)})"


def _adapter_rows(log: dict) -> list[str]:
    rows = [
        "| adapter | task | rank | alpha | rsLoRA | targets | steps | peak lr | train time | held-out exact match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in log["adapters"]:
        stage = log["stages"].get(spec["name"])
        if stage is None:
            continue
        doc = (TASKS[spec["name"]].__doc__ or "").strip().replace("|", "\\|").replace("``", "`")
        rslora = "yes" if spec["use_rslora"] else "no"
        rows.append(
            f"| `{spec['name']}` | {doc} | {spec['rank']} | {spec['alpha']} | {rslora}"
            f" | {_targets(spec['targets'])} | {stage['steps']} | {spec['lr']:g} | {stage['seconds']:.0f} s"
            f" | {stage['exact_match'] * 100:.1f}% of {stage['eval_n']} |"
        )
    return rows


def write_readme(path: Path, log: dict) -> None:
    """Render README.md: how to reproduce, the base's figures and one table row per adapter."""
    cfg = log["config"]
    base = log["stages"].get("base")
    lines = [HEADER.format(threads=cfg["threads"], seed=cfg["seed"]).rstrip(), ""]
    lines.append(f"Training: batch {cfg['batch']}, AdamW, warm-up then cosine learning rate, device "
                 f"`{cfg['device']}`, {cfg['threads']} CPU thread(s), torch {log['torch']}. "
                 "Accuracy is exact match of the greedy completion (text, newline and EOS) on "
                 "fresh random lines never seen in training.")
    lines.append("")
    if base is not None:
        lines.append(f"Base model: {base['steps']} steps, {base['seconds']:.0f} s, final loss "
                     f"{base['final_loss']:.4f}, echo exact match {base['exact_match'] * 100:.1f}% "
                     f"of {base['eval_n']}.")
        lines.append("")
    lines.extend(_adapter_rows(log))
    total = sum(stage["seconds"] for stage in log["stages"].values())
    lines += ["", f"Total training time (sum of the stages): {total / 60:.1f} min.", ""]
    if log.get("notes"):
        lines += ["## Notes on this run", ""] + [f"- {note}" for note in log["notes"]] + [""]
    path.write_text("\n".join(lines))

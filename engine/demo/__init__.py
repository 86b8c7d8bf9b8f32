"""The embedded demo: a tiny character-level Llama that echoes its input line, and task adapters.

The assets (``model/`` and ``adapters/<task>/``) are produced by ``python -m lorafleet.engine.demo.train``
and ship as package data. This module stays light: it imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.engine.demo.tasks import TASKS, echo, prompt_for, random_input

__all__ = ["TASKS", "demo_adapter_dirs", "demo_model_dir", "echo", "prompt_for", "random_input"]

DEMO_ROOT = Path(__file__).resolve().parent
BASE_MODEL_NAME = "lorafleet-demo"


def demo_model_dir() -> Path:
    """The directory of the demo base model (HF ``config.json``, safetensors, tokenizer files)."""
    return DEMO_ROOT / "model"


def demo_adapter_dirs() -> dict[str, Path]:
    """Adapter name -> its PEFT directory, for every task in :data:`TASKS` (in that order)."""
    root = DEMO_ROOT / "adapters"
    return {name: root / name for name in TASKS}

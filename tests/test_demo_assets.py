"""The shipped demo assets, checked with HF transformers + PEFT alone (none of our engine code).

Truth is the pure-Python transform in ``TASKS``: every adapter must reproduce it exactly on fresh
random inputs, and the base model must echo.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.engine.demo import TASKS, demo_adapter_dirs, demo_model_dir, echo, random_input
from lorafleet.engine.demo.tasks import MAX_LINE_CHARS, MIN_LINE_CHARS

HELD_OUT_PER_TASK = 40
MIN_ACCURACY = 0.95
MAX_NEW_TOKENS = MAX_LINE_CHARS + 3
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_dir())


def load_demo_peft() -> PeftModel:
    """The demo base with every task adapter loaded into one PeftModel (named by task), in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    dirs = demo_adapter_dirs()
    first, *rest = dirs
    peft_model = PeftModel.from_pretrained(base, dirs[first], adapter_name=first)
    for name in rest:
        peft_model.load_adapter(dirs[name], adapter_name=name)
    return peft_model.eval()


@pytest.fixture(scope="module")
def model():
    return load_demo_peft()


def fresh_lines(seed: int, n: int = HELD_OUT_PER_TASK) -> list[str]:
    rng = random.Random(seed)
    return [random_input(rng) for _ in range(n)]


@torch.no_grad()
def generate(model, tokenizer, lines: list[str], adapter_names: list[str] | None = None) -> list[list[int]]:
    """Greedy continuation ids of each line's prompt (left-padded batch), cut after the first EOS."""
    tokenizer.padding_side = "left"
    enc = tokenizer([line + "\n" for line in lines], return_tensors="pt", padding=True)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    cut = []
    for row in rows:
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        cut.append(row[:end])
    return cut


def expected_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(ch) for ch in text + "\n"] + [tokenizer.eos_token_id]


def accuracy(tokenizer, lines: list[str], got: list[list[int]], task) -> float:
    return sum(ids == expected_ids(tokenizer, task(line)) for line, ids in zip(lines, got, strict=True)) / len(lines)


def test_task_transforms_on_known_examples():
    examples = {
        "reverse": ("ab cd", "dc ba"), "upper": ("ab cd", "AB CD"), "rot13": ("hello z", "uryyb m"),
        "caesar3": ("ab xyz", "de abc"), "sort": ("dc ab a", "aabcd"), "title": ("ab cd e", "Ab Cd E"),
        "novowels": ("hello you", "hll y"), "reverse_words": ("ab cd ef", "ef cd ab"),
    }
    assert set(examples) == set(TASKS)
    for name, (line, want) in examples.items():
        assert TASKS[name](line) == want, name


def test_random_input_shape():
    rng = random.Random(3)
    allowed = set(string.ascii_lowercase + " ")
    for _ in range(500):
        line = random_input(rng)
        assert MIN_LINE_CHARS <= len(line) <= MAX_LINE_CHARS
        assert set(line) <= allowed and line[0] != " " and line[-1] != " " and "  " not in line


def test_tokenizer_round_trips_characters(tokenizer):
    rng = random.Random(11)
    alphabet = string.printable[:95] + "\n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)  # one token per character, no BOS/EOS added
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("a b") + [tokenizer.eos_token_id], skip_special_tokens=True) == "a b"
    config = json.loads((demo_model_dir() / "config.json").read_text())
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert len(tokenizer) == config["vocab_size"]


def test_adapter_configs_are_servable():
    dirs = demo_adapter_dirs()
    assert list(dirs) == list(TASKS)
    ranks, target_sets = set(), set()
    for name, path in dirs.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert (path / "adapter_model.safetensors").is_file(), name
        assert cfg["bias"] == "none" and not cfg.get("use_dora") and not cfg.get("modules_to_save"), name
        ranks.add(cfg["r"])
        target_sets.add(frozenset(cfg["target_modules"]))
    assert min(ranks) == 4 and max(ranks) == 64
    attention = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
    mlp = frozenset({"gate_proj", "up_proj", "down_proj"})
    assert {attention, mlp, attention | mlp} <= target_sets


def test_assets_are_small():
    root = demo_model_dir().parent
    total = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert total < 12 * 2**20


def test_base_model_echoes(model, tokenizer):
    lines = fresh_lines(seed=777)
    with model.disable_adapter():
        got = generate(model, tokenizer, lines)
    assert accuracy(tokenizer, lines, got, echo) >= MIN_ACCURACY


@pytest.mark.parametrize("name", list(TASKS))
def test_adapter_solves_its_task(model, tokenizer, name):
    lines = fresh_lines(seed=1000 + list(TASKS).index(name))
    model.set_adapter(name)
    got = generate(model, tokenizer, lines)
    acc = accuracy(tokenizer, lines, got, TASKS[name])
    assert acc >= MIN_ACCURACY, f"{name}: {acc:.3f} exact match on held-out inputs"


def test_mixed_adapter_batch(model, tokenizer):
    """One PEFT batch mixing every adapter and the base: each row follows its own adapter."""
    names = [*TASKS, BASE] * 4
    lines = fresh_lines(seed=4242, n=len(names))
    got = generate(model, tokenizer, lines, adapter_names=names)
    tasks = {**TASKS, BASE: echo}
    hits = sum(ids == expected_ids(tokenizer, tasks[n](line)) for n, line, ids in zip(names, lines, got, strict=True))
    assert hits / len(names) >= MIN_ACCURACY


def test_training_batches_supervise_exactly_the_completion(tokenizer):
    """The training script's batches: prompt/pad tokens unsupervised, completion + EOS supervised."""
    from lorafleet.engine.demo.assets import char_vocab
    from lorafleet.engine.demo.train import encode_pairs

    vocab = char_vocab()
    assert vocab == tokenizer.get_vocab()
    pairs = [("ab c", "c ba"), ("hello", "HELLO")]
    ids, mask = encode_pairs(pairs, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for row, row_mask, (line, target) in zip(ids, mask, pairs, strict=True):
        assert tokenizer.decode(row[: len(line) + 1].tolist()) == line + "\n"
        supervised = row[1:][row_mask].tolist()  # the tokens predicted at masked positions
        assert supervised == expected_ids(tokenizer, target)

"""Shared test fixtures: tiny HF models and PEFT adapters built locally (no hub), and a HF+PEFT oracle."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter without CUDA; the flag must be set before anything imports
    # triton (peft and transformers may, while pytest collects the test modules)
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Property tests check properties, not speed: on a loaded 2-core CI machine one example can take longer than
# hypothesis's default 200 ms deadline, or the first examples longer than its too_slow health check allows, and
# either failed a test whose property held. Explicit @settings still set their own example counts.
settings.register_profile("lorafleet", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("lorafleet")

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(kind: str):
    """Tiny configs: 'mha' Llama, 'gqa' Llama-3 style (rope scaling, tied embeddings), 'qwen2' (QKV bias)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
                  rms_norm_eps=1e-5)
    if kind == "mha":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4)
    if kind == "gqa":
        return LlamaConfig(**common, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen2":
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    raise ValueError(kind)


def make_hf_model(kind, out_dir: Path, seed: int = 0) -> Path:
    """Write a random tiny HF model of `kind` (a name of hf_config, or a transformers config) plus a locally
    built byte tokenizer to out_dir."""
    from transformers import AutoModelForCausalLM

    from lorafleet.engine.tokenizer import build_byte_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind) if isinstance(kind, str) else kind,
                                             dtype=torch.float32)
    model.save_pretrained(str(out_dir))
    build_byte_tokenizer(300).save_pretrained(str(out_dir))
    return out_dir


def make_peft_adapter(base_dir: Path, out_dir: Path, rank: int, targets=ALL_TARGETS, seed: int = 0,
                      alpha: int | None = None, **lora_options) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=False, **lora_options)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@dataclass
class PeftOracle:
    """HF transformers + PEFT, each adapter run alone (or none), by full forward passes."""

    base_dir: Path
    adapters: dict[str, Path]
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(self.base_dir), dtype=self.dtype).to(self.device)
        names = list(self.adapters)
        self.model = PeftModel.from_pretrained(base, str(self.adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(self.adapters[name]), adapter_name=name)
        self.model.eval()

    @torch.no_grad()
    def last_logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        """fp32 logits of the token after `ids`."""
        batch = torch.tensor([ids], device=self.device)
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(input_ids=batch).logits[0, -1].float()
        self.model.set_adapter(adapter)
        return self.model(input_ids=batch).logits[0, -1].float()

    def greedy(self, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        out: list[int] = []
        for _ in range(max_tokens):
            out.append(int(torch.argmax(self.last_logits(prompt + out, adapter))))
        return out


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same torch, numpy and `random` state, whatever ran before it: a test drawing
    unseeded random inputs (torch.randn with no generator) checks the same inputs in every run and under any
    selection of tests. LORAFLEET_TEST_SEED picks another state (to look for inputs a tolerance does not hold)."""
    import random

    import numpy as np

    seed = int(os.environ.get("LORAFLEET_TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_hf_model("mha", tmp_path_factory.mktemp("tiny-llama"))


@dataclass
class OverlapRun:
    tokens: dict[str, list[int]]
    reasons: dict[str, str]
    plans_with_pending: int  # plans that named a token the step before had not returned yet
    logprobs: dict[str, list[float]] = field(default_factory=dict)  # the sampled tokens' logprobs, when asked


def run_overlapped(engine, cancel_after: dict[str, int] | None = None) -> OverlapRun:
    """Drive an Engine as the serving scheduler does: step n+1 is planned and handed to the executor before
    step n completes (the in-process runner executes a plan when it is handed over, in order). Cancels a
    request once it has `cancel_after[id]` tokens, while its next step is in flight."""
    from collections import deque

    from lorafleet.engine.request import PENDING_TOKEN

    run = OverlapRun({}, {}, 0)
    queued = deque()
    while engine.has_unfinished() or queued:
        planned = engine.plan_step()
        if planned is not None:
            schedule, plan = planned
            run.plans_with_pending += any(PENDING_TOKEN in s.token_ids for s in plan.seqs)
            queued.append((schedule, engine.executor.execute(plan)))
        elif not queued:
            raise AssertionError("unfinished requests but nothing planned or in flight")
        if planned is None or len(queued) == 2:
            for out in engine.complete_step(*queued.popleft()):
                got = run.tokens.setdefault(out.request_id, [])
                got += out.new_token_ids
                run.logprobs.setdefault(out.request_id, []).extend(lp.logprob for lp in out.logprobs)
                if out.finished:
                    run.reasons[out.request_id] = out.finish_reason
                elif cancel_after and len(got) >= cancel_after.get(out.request_id, 1 << 30):
                    engine.abort(out.request_id)
                    run.reasons[out.request_id] = "cancelled"
    return run

"""Helpers shared by the loadgen tests (not a conftest: imported explicitly): a tiny Llama with PEFT
adapters built locally, free loopback ports, waiting for a server subprocess to become healthy."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ADAPTERS = (
    ("sql", 4, ["q_proj", "v_proj"]),
    ("chat", 8, ["q_proj", "k_proj", "o_proj"]),
    ("code", 2, ["gate_proj", "down_proj"]),
)


def build_tiny_model(root: Path) -> tuple[Path, dict[str, Path]]:
    """A 2-layer Llama with a word-level tokenizer, and PEFT adapters of different ranks and targets."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"w{i}": 4 + i for i in range(60)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        max_position_embeddings=256,
    )
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    fast.save_pretrained(base)
    adapters = {}
    for name, rank, targets in ADAPTERS:
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        get_peft_model(LlamaForCausalLM.from_pretrained(base), lora).save_pretrained(root / name)
        adapters[name] = root / name
    return base, adapters


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


@contextmanager
def server_subprocess(cmd: list[str], adapters: dict[str, Path], port: int, log: Path,
                      stop_timeout: float) -> Iterator[str]:
    """Run `cmd --adapter name=dir ...` (a server listening on `port`), yield its URL once healthy, and
    stop it afterwards (terminate, then kill after `stop_timeout` s); a failed start shows the log's tail."""
    cmd = [*cmd, *(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}"))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}: {log.read_text()[-3000:]}") from exc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""The operator's first minutes with the command line, over real processes and sockets: `lorafleet --help`
and `--version`, `serve --help` (every flag has help, defaults shown), vLLM's flag spellings mapping to
ours, a positional model, and start-up failures that end in one line and exit 2 (a busy port before the
model loads, an executor that cannot start)."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import aiohttp
import pytest

from lorafleet.actors.serve import build_parser, parse_args
from lorafleet.actors.startup import thread_policy
from lorafleet.cli import COMMANDS

LORAFLEET = [sys.executable, "-m", "lorafleet"]


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAFLEET, *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_command_and_version_is_the_installed_one():
    for flag in ("--help", "-h"):
        proc = run_cli(flag)
        assert proc.returncode == 0, proc.stderr
        listed = [line.split()[0] for line in proc.stdout.split("commands:")[1].strip().splitlines()[:len(COMMANDS)]]
        assert listed == [c.name for c in COMMANDS]
        for command in COMMANDS:
            assert command.help in proc.stdout
    proc = run_cli("--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"lorafleet {version('lorafleet')}")
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    for command in COMMANDS:  # each subcommand answers --help itself
        sub = run_cli(command.name, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: lorafleet {command.name}"), sub.stderr


def test_serve_help_documents_every_flag_with_its_default():
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
        for option in action.option_strings:
            assert option in text
        default = action.default
        if not (default is None or default is False or default == [] or default is argparse.SUPPRESS):
            assert f"(default: {default})" in text, action.option_strings
    assert "without one those routes answer 403" in text  # the admin key's consequence is stated
    assert "LORAFLEET_API_KEY" in text and "LORAFLEET_ADMIN_KEY" in text


def test_vllm_spellings_mean_our_flags(monkeypatch):
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.delenv("LORAFLEET_ADMIN_KEY", raising=False)
    ours = parse_args(["--adapter", "a=/x", "--adapter", "b=/y", "--max-adapters-per-batch", "3",
                       "--max-batch-tokens", "128", "--block-tokens", "32", "--no-cuda-graphs", "--dtype", "float16",
                       "--tensor-parallel-size", "2", "MODEL"])
    vllm = parse_args(["MODEL", "--enable-lora", "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}',
                       "--max-loras", "3", "--max-num-batched-tokens", "128", "--block-size", "32",
                       "--enforce-eager", "--dtype", "half", "-tp", "2"])
    for key in ("max_adapters_per_batch", "max_batch_tokens", "block_tokens", "no_cuda_graphs", "dtype",
                "tensor_parallel_size", "model"):
        assert getattr(ours, key) == getattr(vllm, key), key
    from lorafleet.actors.serve import adapter_spec

    assert [adapter_spec(s) for s in vllm.adapter] == [adapter_spec(s) for s in ours.adapter] == \
        [("a", "/x"), ("b", "/y")]
    with pytest.raises(ValueError, match="lora-modules"):
        adapter_spec('{"name": "b"}')
    proc = run_cli("serve", "A", "--model", "B")
    assert proc.returncode == 2 and "the model is given twice" in proc.stderr


@pytest.mark.parametrize("cores,executors,want", [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 3), (16, 1, 15),
                                                  (16, 2, 7), (64, 8, 7)])
def test_thread_policy_keeps_a_core_for_the_server_and_splits_the_rest(cores, executors, want):
    policy = thread_policy(0, executors, cores)
    assert policy.executor_threads == want and policy.frontend_threads == 1
    assert executors * policy.executor_threads + policy.frontend_threads <= max(cores, executors + 1)
    assert thread_policy(5, executors, cores).executor_threads == 5  # --torch-threads wins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busy_port_fails_in_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # a model that would take long to build (7B shape) shows the check runs before any loading
        proc = run_cli("serve", "synthetic:llama-2-7b", "--port", str(port), timeout=60)
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s: the port was checked after loading"


@pytest.mark.parametrize("argv, names", [
    (["--port", "70000"], "--port"), (["--port", "-5"], "--port"), (["--port", "http"], "--port"),
    (["--max-model-len", "0"], "--max-model-len"), (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--num-pages", "-1"], "--num-pages"), (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--executor-restarts", "-1"], "--executor-restarts"), (["--no-such-flag"], "--no-such-flag"),
    (["--api-key", ""], "--api-key"), (["--admin-key", " "], "--admin-key"),  # "$UNSET" would open the routes
    (["--dashboard-key", ""], "--dashboard-key"),
])
def test_bad_flag_values_fail_in_one_line_while_parsing(argv, names):
    """Out-of-range numbers are refused by the parser (a port of 70000 used to wrap to 4464 and serve)."""
    started = time.monotonic()
    proc = run_cli("serve", *argv, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert names in line and "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - started < 30, "parsed after loading"


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_commands_usage_error_is_one_line_and_exit_2(command):
    proc = run_cli(command, "--no-such-flag", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"lorafleet {command}: error:") and "--no-such-flag" in line, proc.stderr


@pytest.mark.parametrize("argv, says", [
    (["--adapter", "upper={upper}", "--lora-modules", "upper={rot13}"], "given twice"),
    (["--served-model-name", "upper"], "--served-model-name 'upper' is also an adapter's name"),
    (["--adapter", "synthetic-0={upper}", "--synthetic-adapters", "1"], "synthetic"),
])
def test_clashing_adapter_names_fail_in_one_line(argv, says):
    """Two adapters of one name used to keep the last silently (`upper` then served rot13's weights)."""
    from lorafleet.engine import demo

    dirs = demo.demo_adapter_dirs()
    argv = [a.format(upper=dirs["upper"], rot13=dirs["rot13"]) for a in argv]
    proc = run_cli("serve", *argv, "--port", "0", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert says in line, line


def _broken_model(tmp_path, kind: str):
    from lorafleet.engine import demo

    model = tmp_path / kind
    shutil.copytree(demo.demo_model_dir(), model)
    if kind == "missing-key":
        config = json.loads((model / "config.json").read_text())
        del config["num_attention_heads"]
        (model / "config.json").write_text(json.dumps(config))
    elif kind == "bad-json":
        (model / "config.json").write_text("{not json")
    elif kind == "bad-tokenizer":
        (model / "tokenizer.json").write_text("{not json")
    return model


@pytest.mark.parametrize("kind, says", [("missing-key", "num_attention_heads"), ("bad-json", "not valid JSON"),
                                        ("bad-tokenizer", "tokenizer")])
def test_broken_model_dir_fails_in_one_line_and_exit_2(tmp_path, kind, says):
    """A model directory whose config.json or tokenizer cannot be read: one line naming the file, exit 2."""
    model = _broken_model(tmp_path, kind)
    proc = run_cli("serve", str(model), "--port", "0", "--torch-threads", "1", "--log-format", "json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and says in record["msg"], record


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_executor_start_failure_is_one_line_and_exit_2(tmp_path):
    from lorafleet.engine.synthetic import write_model

    model = write_model("tiny", tmp_path / "model")
    proc = run_cli("serve", str(model), "--device", "cuda", "--port", "0", "--torch-threads", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "start-up failed" in lines[0] and "CUDA" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = run_cli("serve", str(tmp_path / "missing"), "--port", "0", "--log-format", "json")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "is not a directory" in record["msg"]


async def test_positional_model_and_vllm_flags_on_a_real_server(tmp_path):
    from test_serve_support import start_server, stop_server

    from lorafleet.engine.synthetic import write_adapter, write_model

    model = write_model("tiny", tmp_path / "model")
    a = write_adapter(tmp_path / "ad" / "a", model, 4, seed=1)
    b = write_adapter(tmp_path / "ad" / "b", model, 8, seed=2)
    server = start_server([str(model), "--lora-modules", f"a={a}", json.dumps({"name": "b", "path": str(b)}),
                           "--max-loras", "2", "--max-num-batched-tokens", "64", "--block-size", "32",
                           "--enforce-eager", "--enable-lora", "--served-model-name", "tiny"])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/v1/models") as resp:
                data = (await resp.json())["data"]
            async with session.get(server.url + "/metrics") as resp:
                metrics = await resp.text()
        assert {m["id"] for m in data} == {"tiny", "a", "b"}  # start-up adapters are read at start: paths held
        assert 'max_lora="2"' in metrics
    finally:
        assert stop_server(server) == 0, server.output()
    banner = server.output()  # each vLLM spelling shows in the banner as the value it set
    assert "pages of 32 tokens" in banner and "max_num_batched_tokens 64, max_loras 2;" in banner, banner
    assert "CUDA graphs off" in banner


def test_license_is_the_apache_2_0_text_pyproject_names():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    text = (root / "LICENSE").read_text()
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert " ".join(text.split()[:5]) == "Apache License Version 2.0, January"
    sections = ["1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                "9. Accepting Warranty or Additional Liability."]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions) and "END OF TERMS AND CONDITIONS" in text

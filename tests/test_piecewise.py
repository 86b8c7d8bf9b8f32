"""Piecewise steps (graphs around an eager attention, engine/cuda_graphs.py) without the graphs: on CPU the
same segments, static buffers, bucket padding and LoRA tables run eagerly, and must give the plain engine's
tokens for steps that mix prefill chunks, decodes, adapters and base-only requests — and HF+PEFT's. (The captured graphs
are compared with eager steps on CUDA in test_gpu_engine.py.)"""

from __future__ import annotations

from conftest import PeftOracle, make_peft_adapter
from lorafleet.engine import LLM

PROMPTS = [[5, 9, 33, 71, 12, 200, 17, 3, 99, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7, 8], [250, 3, 4, 9],
           [60, 61, 62, 63, 64, 65, 66, 67, 68], [11] * 30, [290 - i for i in range(13)]]


def test_piecewise_steps_equal_plain_steps(tiny_llama, tmp_path):
    adapters = {"r4": str(make_peft_adapter(tiny_llama, tmp_path / "r4", rank=4, seed=1)),
                "r16": str(make_peft_adapter(tiny_llama, tmp_path / "r16", rank=16, seed=2))}
    names = ["r16", None, "r4", "r4", None, "r16"]
    outputs = []
    for piecewise in (False, True):
        llm = LLM(str(tiny_llama), adapters=adapters, num_pages=128, max_batch_tokens=24, max_num_seqs=4)
        runner = llm.engine.executor
        if piecewise:
            runner.enable_cuda_graphs(4, 8, 16, 64, max_tokens=24, capture=False)
        outs = llm.generate(PROMPTS, adapters=names, max_tokens=7, ignore_eos=True)
        outputs.append([o.token_ids for o in outs])
        steps = (runner.piecewise_steps, runner.decode_graph_steps)  # decode steps: the decode graphs' buffers
    assert outputs[0] == outputs[1]
    oracle = PeftOracle(tiny_llama, adapters)  # mixed steps attend in two parts (decode kernel, prefill kernel)
    assert outputs[0] == [oracle.greedy(p, a, 7) for p, a in zip(PROMPTS, names)]
    assert steps[0] >= 5 and steps[1] > 0, "the workload was meant to run many steps piecewise, some as decodes"

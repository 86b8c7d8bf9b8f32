"""The model's fused LoRA path for layers that share their input (q/k/v, gate/up): the stacked tables that
LoraBatch.group builds, and the fused outputs against one LoraLinear call per layer (CPU references)."""

from __future__ import annotations

import torch
from kernel_cases import make_multi_lora_case

from lorafleet.engine.model import LoraBatch, LoraLinear, ModuleLora, ParallelGroup, shared_input_linears
from lorafleet.engine.weights import Shard

NAMES = ("q_proj", "k_proj", "v_proj")
SLOTS = [2, -1, 0, 1, 1, 2, -1]


def _module(case, m: int, width: int | None = None) -> ModuleLora:
    """Module m of the case as the runner hands it over, its tables cut to `width` columns."""
    module = case.modules[m]
    width = width or module.a_rows.shape[1]
    return ModuleLora(module.a_rows[:, :width], module.b_rows[:, :width], module.ranks)


def test_group_stacks_the_targeted_modules_padded_to_the_widest():
    case = make_multi_lora_case([[8, 3, 0], [2, 3, 1]], SLOTS, in_dim=16, out_dims=[24, 8], page_elements=96)
    lora = LoraBatch(case.token_slots, case.scales, {"q_proj": _module(case, 0), "v_proj": _module(case, 1, 3)})
    group = lora.group(NAMES)
    assert group.names == ("q_proj", "v_proj"), "k_proj is not targeted: it is left out, not given rank 0"
    assert group.a_rows.shape == group.b_rows.shape == (2, 3, 8) and group.ranks.shape == (2, 3)
    assert torch.equal(group.a_rows[1, :, :3], case.modules[1].a_rows[:, :3])
    assert torch.count_nonzero(group.a_rows[1, :, 3:]) == 0
    assert torch.equal(group.ranks, case.ranks)
    assert lora.group(NAMES) is group, "built once per batch, shared by every layer"
    assert lora.group(("gate_proj", "up_proj")) is None


def test_shared_input_linears_equal_one_call_per_layer():
    dims = [24, 8, 8]
    case = make_multi_lora_case(
        [[8, 3, 0], [8, 3, 5], [8, 1, 5]], SLOTS, in_dim=16, out_dims=dims, page_elements=96, seed=4
    )
    group = ParallelGroup(Shard())
    gen = torch.Generator().manual_seed(1)
    layers = []
    for name, out_dim in zip(NAMES, dims):
        layer = LoraLinear(name, 16, out_dim, bias=True, group=group, column=True)
        layer.weight.data = torch.randn(out_dim, 16, generator=gen)
        layer.bias.data = torch.randn(out_dim, generator=gen)
        layers.append(layer)
    modules = {name: _module(case, m) for m, name in enumerate(NAMES)}
    fused = shared_input_linears(
        tuple(layers), case.x, LoraBatch(case.token_slots, case.scales, modules), case.pool_flat
    )
    one_by_one = LoraBatch(case.token_slots, case.scales, modules)
    for layer, got in zip(layers, fused):
        torch.testing.assert_close(got, layer(case.x, one_by_one, case.pool_flat))

"""adapter_config.json read as PEFT reads it, checked against PEFT itself.

- Random documents (every JSON type in every LoraConfig field, missing fields, unknown fields, documents
  that are not objects) never raise anything but AdapterError.
- Random plausible LoRA configs: PEFT builds its model from the directory (LoraConfig.from_pretrained +
  get_peft_model on a tiny HF Llama, random A and B saved with PEFT's own state-dict function); whenever
  PEFT puts a LoRA anywhere, lorafleet must load the same directory, and every linear layer's
  scale * B @ A (targets, layers, per-module ranks and scales at once) must equal PEFT's; whenever PEFT
  refuses the config, lorafleet refuses it too.
- A sample of those forms generates greedily token for token as HF + PEFT.
- One test per adapter fault users reported, with the right value as the expectation.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from adapter_faults import SERVE_FAULTS, Fault, apply_fault
from safetensors.torch import load_file, save_file

from conftest import PeftOracle
from lorafleet.engine.adapters import AdapterError, load_adapter, read_adapter_config
from lorafleet.engine.config import TARGET_MODULES, ModelConfig

peft = pytest.importorskip("peft")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_RANK = 64
LAYERS = 2  # the tiny Llama of conftest
GROUP = {m: "self_attn" if m in TARGET_MODULES[:4] else "mlp" for m in TARGET_MODULES}
LINEAR = [f"model.layers.{i}.{GROUP[m]}.{m}" for i in range(LAYERS) for m in TARGET_MODULES]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def base(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)


@pytest.fixture(scope="module")
def model_cfg(tiny_llama) -> ModelConfig:
    return ModelConfig.from_dir(tiny_llama)


@pytest.fixture(scope="module")
def full_tensors(tiny_llama, tmp_path_factory) -> dict[str, torch.Tensor]:
    """A rank-4 adapter's tensors on all seven modules of both layers."""
    from lorafleet.engine.synthetic import write_adapter

    out = write_adapter(tmp_path_factory.mktemp("full") / "a", tiny_llama, 4, targets=TARGET_MODULES, seed=1)
    return load_file(str(out / "adapter_model.safetensors"))


class Dirs:
    """Fresh directories inside one module-scoped temporary folder (hypothesis runs many examples)."""

    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0

    def new(self) -> Path:
        self.count += 1
        path = self.root / f"d{self.count}"
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Dirs:
    return Dirs(tmp_path_factory.mktemp("configs"))


def _write_config(path: Path, doc: object) -> None:
    (path / "adapter_config.json").write_text(json.dumps(doc))


# strategies -------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _lora_fields() -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(peft.LoraConfig)]


FIELD_EXAMPLES = {  # values of the right kind, so that documents get past the first field now and then
    "r": st.integers(min_value=-2, max_value=80),
    "lora_alpha": st.one_of(st.integers(-4, 64), st.floats(allow_nan=True, allow_infinity=True)),
    "target_modules": st.one_of(st.just("all-linear"), st.lists(st.sampled_from(TARGET_MODULES), max_size=7),
                                st.sampled_from([".*proj", "q_proj", r".*\.(q|v)_proj", "(", ".*"])),
    "layers_to_transform": st.one_of(st.integers(-1, 3), st.lists(st.integers(-1, 3), max_size=3)),
    "peft_type": st.sampled_from(["LORA", "lora", "IA3"]),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "(", "mlp.down_proj"]), st.integers(0, 9),
                                    max_size=2),
}


@st.composite
def documents(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)  # any JSON document, objects or not
    fields = _lora_fields() + ["unknown_field"]
    doc = {}
    for name in draw(st.lists(st.sampled_from(fields), max_size=8, unique=True)):
        doc[name] = draw(FIELD_EXAMPLES[name] if name in FIELD_EXAMPLES and draw(st.booleans()) else JSON)
    return doc


SUFFIX_FORMS = [
    ["q_proj", "v_proj"], ["self_attn.q_proj", "mlp.down_proj"], list(TARGET_MODULES), ["o_proj", "gate_proj"],
    ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj", "up_proj"],
    [f"model.layers.{i}.{GROUP[m]}.{m}" for i in range(LAYERS) for m in TARGET_MODULES],  # all-linear as saved
]
REGEX_FORMS = [r".*\.(q|v)_proj", r"model\.layers\.1\..*_proj", r".*proj", r".*mlp\.(up|down)_proj", "ALL-LINEAR",
               "all-linear"]


@st.composite
def lora_configs(draw) -> dict:
    """adapter_config.json documents of the forms PEFT writes (each field present or not)."""
    doc: dict = {"peft_type": "LORA", "task_type": "CAUSAL_LM"}
    optional = {
        "r": st.integers(1, 8),
        "lora_alpha": st.one_of(st.integers(-8, 32), st.floats(0.5, 64.0)),
        "use_rslora": st.booleans(),
        "target_modules": st.one_of(st.sampled_from(SUFFIX_FORMS), st.sampled_from(REGEX_FORMS)),
        "exclude_modules": st.one_of(st.sampled_from([["k_proj"], ["model.layers.0.mlp.up_proj"]]),
                                     st.just(r".*layers\.0\.self_attn\.q_proj")),
        "layers_to_transform": st.one_of(st.integers(0, 2), st.lists(st.integers(0, 3), max_size=2, unique=True)),
        "layers_pattern": st.sampled_from(["layers", ["layers"], "blocks", ""]),
        "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "mlp.down_proj", r"layers\.1\.self_attn\.k_proj"]),
                                        st.integers(1, 8), max_size=2),
        "alpha_pattern": st.dictionaries(st.sampled_from(["v_proj", "up_proj", r"layers\.0\..*"]),
                                         st.integers(1, 32), max_size=2),
        "lora_dropout": st.sampled_from([0.0, 0.1]),
        "fan_in_fan_out": st.booleans(),
        "init_lora_weights": st.sampled_from([True, False, "gaussian"]),
        "bias": st.just("none"),
        "unknown_field": JSON,  # a field from a newer PEFT: PEFT warns and ignores it
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            doc[name] = draw(strategy)
    return doc


# PEFT as the oracle -----------------------------------------------------------------------------------
def _peft_model(base, adapter_dir: Path):
    """PEFT's model for the directory's config, with random (non-zero) A and B everywhere it puts a LoRA."""
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    config.init_lora_weights = False
    torch.manual_seed(0)
    return peft.get_peft_model(copy.deepcopy(base), config)


def _peft_layers(model) -> dict[str, tuple[int, float, torch.Tensor]]:
    """module name -> (r, scaling, scaling * B @ A) for every LoRA layer PEFT made."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            scaling = module.scaling["default"]
            out[name.removeprefix("base_model.model.")] = (module.r["default"], scaling, (scaling * b @ a).detach())
    return out


def _our_deltas(weights) -> dict[str, torch.Tensor]:
    out = {}
    for module in weights.targets:
        for layer in range(LAYERS):
            delta = weights.scale * weights.b[module][layer] @ weights.a[module][layer]
            out[f"model.layers.{layer}.{GROUP[module]}.{module}"] = delta
    return out


def _refuses(path: Path, model_cfg: ModelConfig) -> bool:
    try:
        load_adapter("x", path, model_cfg, MAX_RANK)
    except AdapterError:
        return True
    return False


# property tests ---------------------------------------------------------------------------------------
@settings(max_examples=150, **SETTINGS)
@given(doc=documents())
def test_any_document_gives_an_adapter_or_an_adapter_error(doc, dirs, model_cfg, full_tensors):
    path = dirs.new()
    _write_config(path, doc)
    save_file(full_tensors, str(path / "adapter_model.safetensors"))
    try:
        weights = load_adapter("x", path, model_cfg, MAX_RANK)
    except AdapterError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        hypothesis.event(f"refused at {message.split(':')[0][:30]}")
        return
    hypothesis.event("accepted")
    assert math.isfinite(weights.scale) and abs(weights.scale) <= 1e4


@settings(max_examples=80, **SETTINGS)
@given(doc=lora_configs())
def test_accepted_configs_mean_what_peft_builds(doc, dirs, base, model_cfg):
    path = dirs.new()
    _write_config(path, doc)
    try:
        model = _peft_model(base, path)
    except (ValueError, TypeError) as exc:  # PEFT refuses the config (or finds no module to adapt)
        hypothesis.event("PEFT refuses")
        with pytest.raises(AdapterError):
            save_file({}, str(path / "adapter_model.safetensors"))
            load_adapter("x", path, model_cfg, MAX_RANK)
        assert str(exc)
        return
    layers = _peft_layers(model)
    hypothesis.event(f"PEFT adapts {len(layers)} of {len(LINEAR)} layers")
    save_file(peft.get_peft_model_state_dict(model), str(path / "adapter_model.safetensors"))
    _write_config(path, doc)  # the document under test, not PEFT's rewrite of it
    weights = load_adapter("x", path, model_cfg, MAX_RANK)
    spec = read_adapter_config(path, MAX_RANK)
    ours = _our_deltas(weights)
    assert {n for n in LINEAR if spec.selects(n)} == set(layers), "targets and layers differ from PEFT's"
    for name in LINEAR:
        if name in layers:
            r, scaling, delta = layers[name]
            assert (spec.rank(name), spec.scale(name)) == (r, pytest.approx(scaling, rel=1e-12)), name
            assert torch.allclose(ours[name], delta, rtol=1e-5, atol=1e-6), name
        elif name in ours:
            assert torch.count_nonzero(ours[name]) == 0, name


# greedy equality on a sample of the forms --------------------------------------------------------------
SAMPLE = {
    "no-alpha": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "suffix": {"r": 4, "lora_alpha": 16, "target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
    "dotted": {"r": 2, "lora_alpha": 4, "target_modules": [
        f"model.layers.{i}.{GROUP[m]}.{m}" for i in range(LAYERS) for m in TARGET_MODULES]},
    "regex-patterns": {"r": 4, "lora_alpha": 8, "target_modules": r".*\.(q|k|v|o|up)_proj",
                       "rank_pattern": {"q_proj": 8}, "alpha_pattern": {r"layers\.1\..*": 32}},
    "layers": {"r": 3, "lora_alpha": 6, "target_modules": "all-linear", "exclude_modules": ["gate_proj"],
               "use_rslora": True},
    "one-layer": {"r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "up_proj"], "layers_to_transform": [1],
                  "layers_pattern": "layers"},
}


def test_greedy_outputs_equal_hf_peft_on_a_sample(tiny_llama, base, tmp_path):
    from lorafleet.engine import LLM

    adapters = {}
    for i, (name, doc) in enumerate(SAMPLE.items()):
        path = tmp_path / name
        path.mkdir()
        full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **doc}
        _write_config(path, full)
        torch.manual_seed(i)
        model = _peft_model(base, path)
        with torch.no_grad():  # B of this scale so that every adapter changes the greedy tokens
            for p_name, param in model.named_parameters():
                if "lora_B" in p_name:
                    param.mul_(3.0)
        save_file(peft.get_peft_model_state_dict(model), str(path / "adapter_model.safetensors"))
        _write_config(path, full)
        adapters[name] = path
    oracle = PeftOracle(tiny_llama, adapters)
    prompts = [[5, 17, 90, 33], [200, 7, 7, 41, 12, 3]]
    work = [(p, a) for a in [*adapters, None] for p in prompts]
    llm = LLM(str(tiny_llama), adapters={k: str(v) for k, v in adapters.items()})
    got = llm.generate([p for p, _ in work], adapters=[a for _, a in work], max_tokens=8, ignore_eos=True)
    base_tokens = {tuple(p): oracle.greedy(p, None, 8) for p in prompts}
    for (prompt, adapter), out in zip(work, got):
        want = oracle.greedy(prompt, adapter, 8)
        assert out.token_ids == want, (adapter, prompt)
    changed = {a for (p, a), out in zip(work, got) if a and out.token_ids != base_tokens[tuple(p)]}
    assert changed == set(adapters), "every sampled adapter must change some greedy output"


# one test per reported fault --------------------------------------------------------------------------
def _adapter(tmp_path: Path, tiny_llama: Path, fault: Fault | None = None, name: str = "a", **write) -> Path:
    from lorafleet.engine.synthetic import write_adapter

    out = write_adapter(tmp_path / name, tiny_llama, write.pop("rank", 4), seed=write.pop("seed", 3), **write)
    if fault is not None:
        apply_fault(out, fault)
    return out


def test_missing_lora_alpha_is_peft_default_8_not_r(tiny_llama, model_cfg, tmp_path):
    from adapter_faults import DROP

    path = _adapter(tmp_path, tiny_llama, Fault("", {"lora_alpha": DROP}), rank=4)
    assert load_adapter("a", path, model_cfg, MAX_RANK).scale == 8 / 4
    assert peft.LoraConfig.from_pretrained(str(path)).lora_alpha == 8  # the oracle agrees
    rs = _adapter(tmp_path, tiny_llama, Fault("", {"lora_alpha": DROP, "use_rslora": True}), name="rs", rank=16)
    assert load_adapter("rs", rs, model_cfg, MAX_RANK).scale == 8 / math.sqrt(16)


def test_missing_r_is_peft_default_8(tiny_llama, model_cfg, tmp_path):
    from adapter_faults import DROP

    path = _adapter(tmp_path, tiny_llama, Fault("", {"r": DROP, "lora_alpha": 16}), rank=8)
    weights = load_adapter("a", path, model_cfg, MAX_RANK)
    assert (weights.rank, weights.scale) == (8, 2.0)
    wrong = _adapter(tmp_path, tiny_llama, Fault("", {"r": DROP}), name="r4", rank=4)
    with pytest.raises(AdapterError, match=r"expected \(8, 64\) \(r = 8\)"):
        load_adapter("b", wrong, model_cfg, MAX_RANK)


@pytest.mark.parametrize("name", sorted(SERVE_FAULTS))
def test_each_reported_fault_is_refused_naming_its_field_or_tensor(tiny_llama, model_cfg, tmp_path, name):
    path = _adapter(tmp_path, tiny_llama, SERVE_FAULTS[name])
    with pytest.raises(AdapterError, match=re.escape(SERVE_FAULTS[name].names)):
        load_adapter("a", path, model_cfg, MAX_RANK)


REFUSED_FIELDS = [
    ("use_dora", True), ("lora_bias", True), ("modules_to_save", ["lm_head"]), ("bias", "lora_only"),
    ("alora_invocation_tokens", []), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("trainable_token_indices", [1, 2]), ("layer_replication", [[0, 1], [0, 1]]), ("use_qalora", True),
    ("arrow_config", {"top_k": 2}), ("use_bdlora", {"nblocks": 2}), ("kasa_config", {}),
    ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"), ("init_lora_weights", "loftq"),
    ("peft_type", "IA3"), ("r", 65), ("r", 0), ("r", 4.0), ("r", True), ("lora_alpha", True),
    ("use_rslora", "yes"), ("target_modules", 7), ("target_modules", ["q_proj", 3]), ("target_modules", "("),
    ("target_modules", []), ("exclude_modules", {"a": 1}), ("layers_to_transform", [0, "1"]),
    ("layers_to_transform", 1.0), ("layers_pattern", 5), ("rank_pattern", []), ("rank_pattern", {"q_proj": 0}),
    ("rank_pattern", {"(": 4}), ("alpha_pattern", {"q_proj": None}), ("alpha_pattern", {"q_proj": 1e300}),
    ("init_lora_weights", 3), ("init_lora_weights", "weird"), ("init_lora_weights", "Eva"),
    ("target_modules", "q_proj|" * 10000), ("exclude_modules", "k" * 70000),
    ("rank_pattern", {f"layers.{i}.q_proj": 4 for i in range(5000)}),
]


@pytest.mark.parametrize(("field", "value"), REFUSED_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in REFUSED_FIELDS])
def test_refused_values_name_the_field(tiny_llama, model_cfg, tmp_path, field, value):
    path = _adapter(tmp_path, tiny_llama, Fault("", {field: value}))
    with pytest.raises(AdapterError, match=f"^{re.escape(field)}"):
        load_adapter("a", path, model_cfg, MAX_RANK)


@pytest.mark.parametrize("doc", [[], "LORA", 4, None, True, [{"r": 4}]], ids=repr)
def test_a_document_that_is_not_an_object_is_refused(tiny_llama, model_cfg, tmp_path, doc):
    path = _adapter(tmp_path, tiny_llama, Fault("", doc, whole=True))
    with pytest.raises(AdapterError, match="adapter_config.json: must be a JSON object"):
        load_adapter("a", path, model_cfg, MAX_RANK)


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b'{"r": ' + b"9" * 5000 + b"}", b"[" * 100000])
def test_unparseable_json_is_refused(tiny_llama, model_cfg, tmp_path, raw):
    path = _adapter(tmp_path, tiny_llama)
    (path / "adapter_config.json").write_bytes(raw)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter("a", path, model_cfg, MAX_RANK)


def test_a_huge_config_is_refused_before_it_is_parsed(tiny_llama, model_cfg, tmp_path):
    """A 200 MB adapter_config.json took 10 s (holding the GIL) and 400 MB in the serving process to parse."""
    from lorafleet.engine.adapters import MAX_CONFIG_BYTES

    path = _adapter(tmp_path, tiny_llama)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "pad": "x" * MAX_CONFIG_BYTES}))
    with pytest.raises(AdapterError, match="^adapter_config.json: larger than 4 MiB"):
        load_adapter("a", path, model_cfg, MAX_RANK)
    (path / "adapter_config.json").write_text(json.dumps({**config, "pad": "x" * (MAX_CONFIG_BYTES - 4096)}))
    assert load_adapter("a", path, model_cfg, MAX_RANK).rank == 4  # below the bound: read as before


def test_full_dotted_and_suffix_target_modules_are_accepted(tiny_llama, model_cfg, tmp_path):
    dotted = [f"model.layers.{i}.{GROUP[m]}.{m}" for i in range(LAYERS) for m in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")]
    for name, targets in (("dotted", dotted), ("suffix", ["self_attn.q_proj", "self_attn.k_proj", "v_proj",
                                                          "self_attn.o_proj"])):
        path = _adapter(tmp_path, tiny_llama, Fault("", {"target_modules": targets}), name=name)
        weights = load_adapter(name, path, model_cfg, MAX_RANK)
        assert weights.targets == ("q_proj", "k_proj", "v_proj", "o_proj") and weights.scale == 2.0


def test_tensors_outside_the_config_or_the_model_are_refused_naming_the_tensor(tiny_llama, model_cfg, tmp_path):
    only_q = _adapter(tmp_path, tiny_llama, Fault("", {"target_modules": ["q_proj"]}), name="q")
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.k_proj\.lora_A\.weight: module .* not selected"):
        load_adapter("q", only_q, model_cfg, MAX_RANK)
    extra_layer = _adapter(tmp_path, tiny_llama, name="l5", fault=Fault("", tensors=lambda t: {
        **t, "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}))
    with pytest.raises(AdapterError, match=r"layers\.5\.self_attn\.q_proj\.lora_A\.weight: layer 5 does not exist"):
        load_adapter("l5", extra_layer, model_cfg, MAX_RANK)
    swapped = _adapter(tmp_path, tiny_llama, name="sw", fault=Fault("", tensors=lambda t: {
        k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in t.items()}))
    with pytest.raises(AdapterError, match=r"mlp\.q_proj\.lora_A\.weight: not a LoRA tensor of a module"):
        load_adapter("sw", swapped, model_cfg, MAX_RANK)


def test_selecting_a_module_that_is_not_linear_is_refused(tiny_llama, model_cfg, tmp_path):
    path = _adapter(tmp_path, tiny_llama, Fault("", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "mlp"]}))
    with pytest.raises(AdapterError, match=r"^target_modules: selects model\.layers\.0\.mlp"):
        load_adapter("a", path, model_cfg, MAX_RANK)


def test_huge_weights_are_refused_naming_the_tensor(tiny_llama, model_cfg, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    path = _adapter(tmp_path, tiny_llama, Fault("", tensors=lambda t: {**t, key: t[key] * 1e8}))
    with pytest.raises(AdapterError, match=re.escape(key) + ": holds a value of magnitude"):
        load_adapter("a", path, model_cfg, MAX_RANK)


def test_fan_in_fan_out_and_dropout_are_ignored_as_peft_does_for_linear(tiny_llama, model_cfg, tmp_path):
    plain = load_adapter("p", _adapter(tmp_path, tiny_llama, name="p"), model_cfg, MAX_RANK)
    odd = _adapter(tmp_path, tiny_llama, Fault("", {"fan_in_fan_out": True, "lora_dropout": 0.5}), name="o")
    weights = load_adapter("o", odd, model_cfg, MAX_RANK)
    assert weights.scale == plain.scale and all(torch.equal(weights.a[m], plain.a[m]) for m in plain.a)


def test_an_empty_layers_pattern_means_any_layer_as_in_peft(tiny_llama, base, model_cfg, tmp_path):
    """PEFT reads `"layers_pattern": ""` as no pattern (the layer index is the first numbered component);
    it was read as a pattern that matches nothing, so the adapter was refused or lost its layers."""
    path = _adapter(tmp_path, tiny_llama, Fault("", {"layers_pattern": "", "layers_to_transform": [1]},
                                                tensors=lambda t: {k: v for k, v in t.items() if ".layers.1." in k}))
    peft_layers = set(_peft_layers(_peft_model(base, path)))
    spec = read_adapter_config(path, MAX_RANK)
    assert {n for n in LINEAR if spec.selects(n)} == peft_layers and peft_layers
    weights = load_adapter("a", path, model_cfg, MAX_RANK)
    assert all(torch.count_nonzero(weights.a[m][0]) == 0 and torch.count_nonzero(weights.a[m][1]) for m in weights.a)


def test_two_tensors_for_one_factor_are_refused_naming_both(tiny_llama, model_cfg, tmp_path):
    """A factor saved twice (with and without PEFT's `base_model.model.` prefix, or with an adapter name) was
    accepted, the later name in sorted order silently replacing the other."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for i, other in enumerate([key.removeprefix("base_model.model."), key.replace("lora_A.", "lora_A.default.")]):
        path = _adapter(tmp_path, tiny_llama, Fault("", tensors=lambda t, o=other: {**t, o: torch.ones_like(t[key])}),
                        name=f"d{i}")
        with pytest.raises(AdapterError, match="a second lora_A of model.layers.0.self_attn.q_proj"):
            load_adapter("a", path, model_cfg, MAX_RANK)


def test_a_weights_file_larger_than_any_adapter_is_refused_before_it_is_read(tiny_llama, model_cfg, tmp_path):
    """Bytes beyond what any adapter of this model can hold (every module at the maximum rank in float64) are
    never read: the file is refused at the bound (a wrong tensor is refused from the header, see below)."""
    import os

    from lorafleet.engine.adapters import max_weights_bytes

    limit = max_weights_bytes(model_cfg, MAX_RANK)
    path = _adapter(tmp_path, tiny_llama)
    weights = path / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size + limit)  # a valid header, then more bytes than any adapter has
    with pytest.raises(AdapterError, match=f"^adapter_model.safetensors: larger than {limit} bytes"):
        load_adapter("a", path, model_cfg, MAX_RANK)
    full = _adapter(tmp_path, tiny_llama, name="full", rank=MAX_RANK, targets=TARGET_MODULES, dtype=torch.float64,
                    std=0.001)
    assert load_adapter("full", full, model_cfg, MAX_RANK).rank == MAX_RANK  # the largest valid one is read


def test_the_size_bound_is_never_allocated(tiny_llama, tmp_path):
    """The bound for a large model at a large --max-lora-rank is tens of GB (70B, rank 256: 26 GB); the file
    was read with f.read(bound + 1), which allocates that many bytes first: MemoryError, every adapter
    refused, on a host with less memory. Only the file's own size is read."""
    from lorafleet.engine.adapters import _read_tensors

    path = _adapter(tmp_path, tiny_llama)
    tensors = _read_tensors(path, 1 << 45, lambda shapes: None)  # a 32 TiB bound
    assert tensors.keys() == load_file(str(path / "adapter_model.safetensors")).keys()


def test_names_and_shapes_are_checked_from_the_header_before_any_tensor_data_is_read(tiny_llama, model_cfg,
                                                                                      tmp_path, monkeypatch):
    """A file of the wrong tensors (a merged model's, another model's adapter) is refused from its header: no
    tensor data is read, and the message names the tensor even when the data is cut short."""
    import safetensors.torch as st_torch

    key = "base_model.model.model.embed_tokens.weight"
    path = _adapter(tmp_path, tiny_llama, Fault("", tensors=lambda t: {**t, key: torch.zeros(300, 64)}))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # the data region is cut short too

    def no_data(_):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(st_torch, "load", no_data)
    with pytest.raises(AdapterError, match=f"^{re.escape(key)}: not a LoRA tensor"):
        load_adapter("a", path, model_cfg, MAX_RANK)
    wide = _adapter(tmp_path, tiny_llama, name="wide", fault=Fault("", tensors=lambda t: {
        k: torch.zeros(v.shape[0], 2 * v.shape[1]) if ".q_proj.lora_A" in k else v for k, v in t.items()}))
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \(4, 128\)"):
        load_adapter("w", wide, model_cfg, MAX_RANK)
    (wide / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(AdapterError, match="^adapter_model.safetensors is unreadable: not a safetensors file"):
        load_adapter("w", wide, model_cfg, MAX_RANK)


def test_a_weights_file_cut_short_while_it_is_read_is_refused_and_the_process_lives(tiny_llama, tmp_path):
    """Tensors were memory-mapped from adapter_model.safetensors: when the file was truncated while an
    adapter was read (a trainer saving it again in place) the next access killed the whole serving process
    with SIGBUS. Here the file is cut to 100 bytes as its first tensor's values are checked."""
    import subprocess
    import sys

    path = _adapter(tmp_path, tiny_llama, rank=16, targets=TARGET_MODULES)
    script = f"""
import os
from lorafleet.engine import adapters
from lorafleet.engine.config import ModelConfig
checked = adapters._finite
def cut(*args):
    os.truncate({str(path / "adapter_model.safetensors")!r}, 100)
    return checked(*args)
adapters._finite = cut
try:
    weights = adapters.load_adapter("a", {str(path)!r}, ModelConfig.from_dir({str(tiny_llama)!r}), 64)
    print("read", weights.rank)
except adapters.AdapterError as exc:
    print("refused", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("read 16")  # the bytes were read before the cut: the adapter is whole


def test_a_catastrophically_backtracking_regex_is_matched_in_bounded_time(tiny_llama, tmp_path):
    """`(.*.*)*z` against a module name took hours inside `re`, holding the GIL: one adapter_config.json froze
    the whole server (the health check included). Each regex field gets it; the load must end, refused."""
    import subprocess
    import sys

    slow = "(.*.*)*z"
    cases = {"target_modules": {"target_modules": slow}, "exclude_modules": {"exclude_modules": slow},
             "rank_pattern": {"rank_pattern": {slow: 2}}, "alpha_pattern": {"alpha_pattern": {slow: 2}},
             "layers_pattern": {"layers_pattern": slow, "layers_to_transform": [0]}}
    paths = {name: _adapter(tmp_path, tiny_llama, Fault("", doc), name=name) for name, doc in cases.items()}
    script = f"""
from lorafleet.engine.adapters import AdapterError, load_adapter
from lorafleet.engine.config import ModelConfig
model = ModelConfig.from_dir({str(tiny_llama)!r})
for name, path in {({k: str(v) for k, v in paths.items()})!r}.items():
    try:
        weights = load_adapter(name, path, model, 64)
        print(name, "read", weights.rank)
    except AdapterError as exc:
        print(name, "refused", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines.keys() == cases.keys()
    # the pattern selects nothing: the target regex or the layer pattern leaves the file's tensors unselected;
    # as an exclusion or a rank/alpha key it changes nothing
    assert lines["target_modules"].startswith("refused") and lines["layers_pattern"].startswith("refused")
    assert lines["exclude_modules"] == lines["rank_pattern"] == lines["alpha_pattern"] == "read 4"


REGEX_PIECES = [".*", ".*?", r"\.", ".", "q_proj", "_proj", "(q|v)", "(?:self_attn|mlp)", "layers", r"\d+", r"\d",
                "[a-z_]+", "[^.]*", "?", "+", "*", "{1,2}", "^", "$", "(?i)", "Q_PROJ", r"\w+", "(", ")", "|", "0", "1"]


@settings(max_examples=400, **SETTINGS)
@given(pattern=st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=7).map("".join))
def test_config_regexes_match_as_re_matches_them(pattern):
    """The config's regexes are matched with the `regex` module (a time limit, no GIL) but PEFT matches them
    with `re`: every pattern `re` accepts must select the same modules, rank_pattern keys included."""
    from lorafleet.engine.peft_config import ConfigFieldError, parse_lora_config

    try:
        re.compile(pattern)
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        hypothesis.event("re refuses it")
        return
    hypothesis.event("compared")
    try:
        spec = parse_lora_config({"target_modules": pattern, "rank_pattern": {pattern: 2}}, MAX_RANK)
    except ConfigFieldError as exc:  # only when `regex` refuses what `re` accepts: never seen, but say so
        pytest.fail(f"re accepts {pattern!r}, regex does not: {exc}")
    for module in [*LINEAR, "model.layers.0.mlp", "lm_head", "model.embed_tokens"]:
        assert spec.selects(module) == (re.fullmatch(pattern, module) is not None), (pattern, module)
        peft_key = re.match(rf"(.*\.)?({pattern})$", module) is not None
        assert spec.rank(module) == (2 if peft_key else spec.r), (pattern, module)


def test_regex_matching_past_its_time_budget_is_refused_naming_the_field(tiny_llama, model_cfg, tmp_path,
                                                                         monkeypatch):
    from lorafleet.engine import peft_config

    monkeypatch.setattr(peft_config, "MATCH_BUDGET_S", 0.0)
    for field, doc in (("target_modules", {"target_modules": r".*\.(q|k|v|o)_proj"}),
                       ("rank_pattern", {"rank_pattern": {r"self_attn\..*": 4}})):
        path = _adapter(tmp_path, tiny_llama, Fault("", doc), name=field)
        with pytest.raises(AdapterError, match=f"^{re.escape(field)}.*: matching module names .* takes more than"):
            load_adapter("a", path, model_cfg, MAX_RANK)


NAME_PARTS = st.sampled_from(["q_proj", "self_attn", "layers", "0", "1", "model", "", "x.q_proj", ".q_proj", "proj"])


@settings(max_examples=300, **SETTINGS)
@given(names=st.lists(st.builds(".".join, st.lists(NAME_PARTS, min_size=1, max_size=4)), max_size=6))
def test_the_suffix_rule_is_peft_s_endswith(names):
    """target_modules / exclude_modules as a list: PEFT selects a module when its name ends with "." + an
    entry; lorafleet looks the module's dot suffixes up in a set (a scan of a 400 000-name list per module
    took minutes of a worker's CPU)."""
    from lorafleet.engine.peft_config import _ends_with_any

    for module in [*LINEAR, "model.layers.0..q_proj", "q_proj", "model.layers.0.self_attn.q_proj."]:
        assert _ends_with_any(module, frozenset(names)) == any(module.endswith(f".{n}") for n in names), module


def test_huge_target_and_layer_lists_select_what_short_ones_do(tiny_llama, model_cfg, tmp_path):
    """A 4 MiB config may list hundreds of thousands of names or layer indexes; each module's check used to
    scan them (0.1 s per module, minutes for a large model). Same adapter as with the short lists."""
    short = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers_to_transform": [0, 1]}
    long = {"target_modules": [*short["target_modules"], *(f"m{i}" for i in range(200_000))],
            "layers_to_transform": list(range(-200_000, 2))}
    weights = [load_adapter(n, _adapter(tmp_path, tiny_llama, Fault("", doc), name=n), model_cfg, MAX_RANK)
               for n, doc in (("short", short), ("long", long))]
    assert weights[0].targets == weights[1].targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert all(torch.equal(weights[0].b[m], weights[1].b[m]) for m in weights[0].targets)

    class Unscannable(frozenset):
        def __iter__(self):
            raise AssertionError("the list was scanned for one module")

    import dataclasses

    spec = read_adapter_config(tmp_path / "long", MAX_RANK)
    spec = dataclasses.replace(spec, target_modules=Unscannable(spec.target_modules),
                               layers_to_transform=Unscannable(spec.layers_to_transform))
    assert [spec.selects(name) for name in LINEAR] == [name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                                       for name in LINEAR]


KEY_PARTS = {
    "prefix": ["base_model.model.", "", "base_model.model.model.vision_tower.", "x."],
    "layer": ["0", "1", "2", "99999999999999999999", "-1", "a"],
    "group": ["self_attn", "mlp", "attn", ""],
    "module": [*TARGET_MODULES, "lm_head", "embed_tokens", "q_proj.base_layer"],
    "which": ["lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A"],
    "suffix": [".weight", ".default.weight", ".bias", ""],
}
TINY_DIMS = {**dict.fromkeys(TARGET_MODULES[:4], (64, 64)), "gate_proj": (64, 128), "up_proj": (64, 128),
             "down_proj": (128, 64)}  # (in, out) of conftest's tiny Llama
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]


@st.composite
def tensor_files(draw) -> dict[str, torch.Tensor] | bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):  # a well-formed name, often with the right shape
            layer, module = draw(st.integers(0, 1)), draw(st.sampled_from(TARGET_MODULES))
            which = draw(st.sampled_from("AB"))
            key = f"base_model.model.model.layers.{layer}.{GROUP[module]}.{module}.lora_{which}.weight"
            fan_in, fan_out = TINY_DIMS[module]
            right = (4, fan_in) if which == "A" else (fan_out, 4)
        else:
            p = {k: draw(st.sampled_from(v)) for k, v in KEY_PARTS.items()}
            key = f"{p['prefix']}model.layers.{p['layer']}.{p['group']}.{p['module']}.{p['which']}{p['suffix']}"
            right = (4, 64)
        shape = draw(st.sampled_from([right, right, (64, 4), (16, 4), (4, 128), (4,), (0, 64), (2, 4, 64)]))
        tensor = torch.randn(shape).to(draw(st.sampled_from([torch.float32, *DTYPES])))
        if tensor.is_floating_point() and tensor.numel() and draw(st.booleans()):
            tensor.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30, -1e5]))
        out[key] = tensor
    return out


@settings(max_examples=80, **SETTINGS)
@given(tensors=tensor_files(), targets=st.sampled_from([list(TARGET_MODULES), "all-linear", ["q_proj"]]))
def test_any_tensor_file_gives_an_adapter_or_an_adapter_error(tensors, targets, dirs, model_cfg, full_tensors):
    path = dirs.new()
    _write_config(path, {"r": 4, "lora_alpha": 8, "target_modules": targets})
    weights_path = path / "adapter_model.safetensors"
    if isinstance(tensors, bytes):
        weights_path.write_bytes(tensors)
    else:
        save_file({**(full_tensors if tensors and tensors.keys() <= full_tensors.keys() else {}), **tensors},
                  str(weights_path))
    try:
        weights = load_adapter("x", path, model_cfg, MAX_RANK)
    except AdapterError as exc:
        hypothesis.event(f"refused: {str(exc).split(':')[-1][:25]}")
        return
    hypothesis.event("accepted")
    assert all(t.is_floating_point() for t in tensors.values())  # integer/bool factors are refused
    for module in weights.targets:
        assert torch.isfinite(weights.a[module]).all() and torch.isfinite(weights.b[module]).all()


def test_docs_table_covers_every_lora_config_field():
    """docs/adapters.md says for each field of the installed PEFT's LoraConfig whether it is honoured,
    refused or ignored: a field added by a newer PEFT fails this test until it is classified."""
    import dataclasses

    table = (Path(__file__).parent.parent / "docs" / "adapters.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    missing = [f.name for f in dataclasses.fields(peft.LoraConfig) if f.name not in named]
    assert not missing, f"docs/adapters.md does not classify {missing}"

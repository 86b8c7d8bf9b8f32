"""adapter_config.json read with PEFT's semantics (peft.LoraConfig), field by field, without importing peft.

Every LoraConfig field is either honoured as PEFT honours it when it loads an adapter onto a Llama-family
model (defaults included: a missing `lora_alpha` is 8, a missing `target_modules` is PEFT's default for
the model type), refused with an `AdapterError` naming the field (when it changes the math and this
engine cannot reproduce it), or ignored because it has no effect at inference. The table with the reason
for each field is docs/adapters.md. Types are checked: a value of the wrong JSON type is refused naming
the field, never passed on to fail later.

Source of the matching rules: peft.tuners.tuners_utils.check_target_module_exists (target_modules,
exclude_modules, layers_to_transform, layers_pattern), peft.utils.other.get_pattern_key (rank_pattern,
alpha_pattern) and peft.tuners.lora.layer.LoraLayer.update_layer (the scale: lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora), peft 0.21.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import regex

from lorafleet.engine.config import TARGET_MODULES

MAX_SCALE = 1e4  # |lora_alpha / r| beyond this is not a trained adapter (typical scales are 0.1..64)
DEFAULT_R = 8  # peft.LoraConfig defaults
DEFAULT_ALPHA = 8
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default target_modules for llama, mistral and qwen2
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear except the output layer
MATCH_BUDGET_S = 5.0  # regex matching time one adapter may take (trained configs: milliseconds)
MAX_PATTERN_CHARS = 64 << 10  # one regular expression (every module of a 128-layer model spelled out: ~40 KB)
MAX_PATTERN_KEYS = 4096  # rank_pattern / alpha_pattern keys (one per module of a 128-layer model: 896)
_PLAIN = re.compile(r"(?:\w|\\\.|\.)+")  # a module name (dots escaped or not): no quantifier, cannot backtrack

# fields whose non-default value changes the math in a way this engine does not reproduce: value -> why
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "lora_bias": "LoRA bias vectors (lora_B bias) are not supported",
    "alora_invocation_tokens": "Activated LoRA (aLoRA applies the adapter only after its invocation tokens) is not "
                               "supported",
    "target_parameters": "LoRA on nn.Parameter targets (e.g. MoE experts) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer replication changes the model's layer stack and is not supported",
    "modules_to_save": "fully trained modules (modules_to_save) are not supported",
    "use_qalora": "QA-LoRA (pooled inputs) is not supported",
    "arrow_config": "Arrow routing between LoRA experts is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA (singular-value adaptation) is not supported",
}
# values that mean "off" besides null (a sub-config such as kasa_config is on even when it is `{}`)
_UNSET = {"use_dora": (False,), "lora_bias": (False,), "use_qalora": (False,), "target_parameters": ([],),
          "trainable_token_indices": ([], {}), "layer_replication": ([],), "modules_to_save": ([],)}
# init_lora_weights values whose training changed the base model's weights (the adapter expects that base)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class ConfigFieldError(ValueError):
    """adapter_config.json is unusable; the message starts with the field's name."""


class _Regexes:
    """The config's regular expressions, each compiled once, matched under one time budget per adapter.

    A pattern with regex syntax is matched with the `regex` module: for patterns `re` accepts (they are
    checked with `re` first, as PEFT compiles them) it gives `re`'s results, but a match can time out and
    releases the GIL. With `re`, one catastrophically backtracking pattern (`(.*.*)*z` against a 31-character
    module name) held the GIL for hours and froze the whole server. A key that is a plain module name (word
    characters and dots, escaped or not: the usual rank_pattern/alpha_pattern key) cannot backtrack beyond its fixed
    prefix `(.*\\.)?` and is matched with `re`, compiled once: PEFT's `re.match` per module and key recompiled
    every pattern once `re`'s cache (512 entries) overflowed, 30 s for a per-module rank_pattern of a
    128-layer model."""

    def __init__(self) -> None:
        self.compiled: dict[str, Any] = {}
        self.keys: dict[tuple[str, str], str | None] = {}  # (field, module) -> matching pattern key
        self.left = MATCH_BUDGET_S

    def match(self, pattern: str, name: str, field: str, full: bool = False, literal: bool = False):
        """`fullmatch` (full) or `match` of `pattern` on `name` (a match object or None); ConfigFieldError
        naming `field` once this adapter's regex matching took MATCH_BUDGET_S."""
        compiled = self.compiled.get(pattern)
        if compiled is None:
            compiled = self.compiled[pattern] = (re if literal else regex).compile(pattern)
        method = compiled.fullmatch if full else compiled.match
        if literal:
            return method(name)
        started = time.perf_counter()
        try:
            found = method(name, timeout=max(self.left, 1e-3), concurrent=True)
        except TimeoutError:
            found, self.left = None, 0.0
        self.left -= time.perf_counter() - started
        if self.left <= 0:
            raise ConfigFieldError(f"{field}: matching module names against its regular expression takes more "
                                   f"than {MATCH_BUDGET_S:g} s (catastrophic backtracking): not usable")
        return found


def _ends_with_any(module: str, names: frozenset[str]) -> bool:
    """`any(module.endswith("." + name) for name in names)` (PEFT's suffix rule) in time independent of how
    many names there are: the strings `module` ends with after a dot are the parts after each of its dots."""
    return any(module[i + 1:] in names for i, char in enumerate(module) if char == ".")


@dataclass(frozen=True)
class LoraSpec:
    """The parts of a LoraConfig that decide which modules of which layers get a LoRA and its r and alpha.
    `selects`, `rank`, `alpha` and `scale` raise ConfigFieldError when the config's regular expressions
    take more than MATCH_BUDGET_S in all to match (catastrophic backtracking)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: str | frozenset[str]  # a regex (fullmatch on the module name), or names/suffixes
    exclude_modules: str | frozenset[str] | None
    layers_to_transform: int | frozenset[int] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    _regexes: _Regexes = dataclasses.field(default_factory=_Regexes, repr=False, compare=False)

    def selects(self, module: str) -> bool:
        """Whether PEFT puts a LoRA on the module named `module` (e.g. 'model.layers.0.self_attn.q_proj')."""
        if self._excluded(module):
            return False
        if isinstance(self.target_modules, str):
            return self._regexes.match(self.target_modules, module, "target_modules", full=True) is not None
        if module in self.target_modules:
            return True  # a full name selects its module whatever layers_to_transform says (as PEFT)
        if not _ends_with_any(module, self.target_modules):
            return False
        return self._in_layers(module)

    def _excluded(self, module: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return self._regexes.match(ex, module, "exclude_modules", full=True) is not None
        return module in ex or _ends_with_any(module, ex)

    def _in_layers(self, module: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or layers == frozenset():
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = self._regexes.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module, "layers_pattern")
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def rank(self, module: str) -> int:
        key = self._pattern_key(self.rank_pattern, module, "rank_pattern")
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = self._pattern_key(self.alpha_pattern, module, "alpha_pattern")
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale(self, module: str) -> float:
        """lora_alpha / r of this module (lora_alpha / sqrt(r) with use_rslora)."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def _pattern_key(self, patterns: dict[str, Any], module: str, field_name: str) -> str | None:
        """The first key of `patterns` that matches the end of `module` (peft.utils.other.get_pattern_key)."""
        memo = self._regexes.keys
        if (field_name, module) not in memo:
            memo[field_name, module] = next((key for key in patterns if self._regexes.match(
                rf"(.*\.)?({key})$", module, f"{field_name}[{key!r}]", literal=_PLAIN.fullmatch(key) is not None)
                is not None), None)
        return memo[field_name, module]


def parse_lora_config(raw: object, max_rank: int) -> LoraSpec:
    """Validate an adapter_config.json document (already parsed JSON) the way PEFT would read it.
    Raises ConfigFieldError naming the field for a wrong type, a refused feature or an unusable value."""
    if not isinstance(raw, dict):
        raise ConfigFieldError(f"adapter_config.json: must be a JSON object, got {_json_type(raw)}")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigFieldError(f"peft_type: {_short(peft_type)} is not LORA")
    _check_refused(raw)
    spec = LoraSpec(
        r=_rank(raw.get("r", DEFAULT_R), "r", max_rank),
        lora_alpha=_number(raw.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha"),
        use_rslora=_bool(raw, "use_rslora"),
        target_modules=_targets(raw.get("target_modules")),
        exclude_modules=_names_or_regex(raw.get("exclude_modules"), "exclude_modules"),
        layers_to_transform=_layers(raw.get("layers_to_transform")),
        layers_pattern=_layers_pattern(raw.get("layers_pattern")),
        rank_pattern=_pattern(raw.get("rank_pattern", {}), "rank_pattern", lambda v, f: _rank(v, f, max_rank)),
        alpha_pattern=_pattern(raw.get("alpha_pattern", {}), "alpha_pattern", _number),
    )
    _check_combinations(spec, isinstance(raw.get("target_modules"), str))
    _check_scale(spec)
    return spec


def _check_refused(raw: dict) -> None:
    for name in ("use_dora", "lora_bias", "use_qalora", "fan_in_fan_out", "inference_mode"):
        _bool(raw, name)
    for name, why in _REFUSED.items():
        value = raw.get(name)
        if value is not None and value not in _UNSET.get(name, ()):
            raise ConfigFieldError(f"{name}: {why} (got {_short(value)})")
    dropout = _number(raw.get("lora_dropout", 0.0), "lora_dropout")
    if not 0.0 <= dropout <= 1.0:  # torch.nn.Dropout refuses it when PEFT builds the layer
        raise ConfigFieldError(f"lora_dropout: {dropout:g} is not a probability in 0..1")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise ConfigFieldError(f"bias: {_short(bias)} is not supported, only 'none' (bias vectors are trained)")
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise ConfigFieldError(f"init_lora_weights: must be a boolean or a string, got {_json_type(init)}")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ConfigFieldError(f"init_lora_weights: {init!r} trains against modified base weights; convert the "
                               "adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")
    if isinstance(init, str) and not _known_init(init):
        raise ConfigFieldError(f"init_lora_weights: unknown initialization {_short(init)} (PEFT refuses to load it)")


def _known_init(init: str) -> bool:
    """The init_lora_weights strings PEFT's LoraLayer.update_layer accepts (others raise there)."""
    return init.lower() in ("gaussian", "olora", "mica") or init in ("eva", "orthogonal", "loftq", "lora_ga") \
        or init.startswith(("pissa", "corda"))


def _check_combinations(spec: LoraSpec, targets_string: bool) -> None:
    """LoraConfig.__post_init__'s refusals (a string target_modules, 'all-linear' included, excludes layers)."""
    if targets_string and spec.layers_to_transform is not None:
        raise ConfigFieldError("layers_to_transform: cannot be used when target_modules is a string")
    if targets_string and spec.layers_pattern is not None:
        raise ConfigFieldError("layers_pattern: cannot be used when target_modules is a string")
    if spec.layers_pattern and spec.layers_to_transform is None:
        raise ConfigFieldError("layers_pattern: needs layers_to_transform")


def _check_scale(spec: LoraSpec) -> None:
    """Every scale the adapter can produce must be finite and within ±MAX_SCALE."""
    cases = [("lora_alpha", spec.lora_alpha, spec.r)]
    cases += [(f"alpha_pattern[{k!r}]", a, spec.r) for k, a in spec.alpha_pattern.items()]
    cases += [(f"rank_pattern[{k!r}]", a, r) for k, r in spec.rank_pattern.items()
              for a in (spec.lora_alpha, *spec.alpha_pattern.values())]
    divisor = "sqrt(r)" if spec.use_rslora else "r"
    for field, alpha, r in cases:
        scale = alpha / (math.sqrt(r) if spec.use_rslora else r)
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise ConfigFieldError(f"{field}: gives the scale {scale:g} (lora_alpha/{divisor}), beyond "
                                   f"±{MAX_SCALE:g}: not a usable adapter")


# typed readers ------------------------------------------------------------------------------------
def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bool(raw: dict, name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ConfigFieldError(f"{name}: must be true or false, got {_json_type(value)} {_short(value)}")
    return value


def _rank(value: object, field: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigFieldError(f"{field}: rank must be an integer, got {_json_type(value)} {_short(value)}")
    if not 1 <= value <= max_rank:
        raise ConfigFieldError(f"{field}: rank {value} must be an integer in 1..{max_rank} (the configured maximum)")
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigFieldError(f"{field}: must be a number, got {_json_type(value)} {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigFieldError(f"{field}: must be finite, got {_short(value)}")
    return number


def _strings(value: list, field: str) -> frozenset[str]:
    if not all(isinstance(v, str) for v in value):
        raise ConfigFieldError(f"{field}: must be a string or a list of strings")
    return frozenset(value)


def _regex(value: str, field: str, template: str = "{}") -> str:
    """`value`, if it compiles as a regular expression inside `template` (where PEFT embeds it), with `re` (as
    PEFT) and with `regex` (which matches it here), and is at most MAX_PATTERN_CHARS long."""
    if len(value) > MAX_PATTERN_CHARS:
        raise ConfigFieldError(f"{field}: a regular expression of {len(value)} characters, more than "
                               f"{MAX_PATTERN_CHARS} (list the module names instead)")
    try:
        re.compile(template.replace("{}", value))
        if _PLAIN.fullmatch(value) is None:
            regex.compile(template.replace("{}", value))
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ConfigFieldError(f"{field}: {_short(value)} is not a valid regular expression ({exc})") from None
    return value


def _names_or_regex(value: object, field: str) -> str | frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _regex(value, field)
    if isinstance(value, list):
        return _strings(value, field)
    raise ConfigFieldError(f"{field}: must be a string or a list of strings, got {_json_type(value)}")


def _targets(value: object) -> str | frozenset[str]:
    if value is None:
        return frozenset(DEFAULT_TARGETS)
    if isinstance(value, str) and value.lower() == ALL_LINEAR:
        return frozenset(TARGET_MODULES)  # every Linear of a Llama decoder layer; lm_head is the output layer
    targets = _names_or_regex(value, "target_modules")
    if not targets:
        raise ConfigFieldError("target_modules: selects no module (empty)")
    return targets


def _layers(value: object) -> int | frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)  # a set: PEFT's `index in layers_to_transform`, without a scan per module
    raise ConfigFieldError(f"layers_to_transform: must be an integer or a list of integers, got {_json_type(value)} "
                           f"{_short(value)}")


def _layers_pattern(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if value == "":
        return ()  # PEFT: an empty layers_pattern means "any layer pattern" (not None: still refused with a regex)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigFieldError(f"layers_pattern: must be a string or a list of strings, got {_json_type(value)}")
    if len(items) > MAX_PATTERN_KEYS:
        raise ConfigFieldError(f"layers_pattern: {len(items)} patterns, more than {MAX_PATTERN_KEYS}")
    return tuple(_regex(v, "layers_pattern", r"(?:^|.*?\.){}\.(?P<idx>\d+)\.") for v in items)


def _pattern(value: object, field: str, read) -> dict:
    if not isinstance(value, dict):
        raise ConfigFieldError(f"{field}: must be an object (module pattern -> value), got {_json_type(value)}")
    if len(value) > MAX_PATTERN_KEYS:
        raise ConfigFieldError(f"{field}: {len(value)} patterns, more than {MAX_PATTERN_KEYS} (one per module of "
                               "a 128-layer model is 896)")
    return {_regex(key, field, r"(.*\.)?({})$"): read(v, f"{field}[{key!r}]") for key, v in value.items()}

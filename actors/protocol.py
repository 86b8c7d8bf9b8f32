"""Client-facing request parsing: WS `generate` frames and OpenAI completions/chat bodies become one
validated `GenerationSpec`, or an `ApiError` with a stable code, the HTTP status and the bad parameter.

The error codes are documented in docs/protocol.md; keep that table in sync with `ApiError` uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lorafleet.engine.request import ParamError, SamplingParams

MAX_STOP = 16
MAX_STOP_LENGTH = 256
MAX_ID_LENGTH = 256
_UNSUPPORTED = ("echo", "logprobs", "suffix", "top_logprobs", "logit_bias", "tools", "functions")
_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI `{"error": {...}}` or a WS error event."""

    status: int
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, code, f"{param}: {message}", param)


@dataclass
class ParseContext:
    """What parsing needs to know about the served model (read-only)."""

    base_name: str
    adapters: set[str]
    max_model_len: int
    vocab_size: int
    tokenizer: Any = None
    default_slo_ttft_ms: float | None = None


@dataclass
class GenerationSpec:
    """A validated generation request, whichever API it came through."""

    model: str
    adapter: str | None
    prompt_ids: list[int]
    params: dict[str, Any]
    slo_ttft_ms: float | None = None
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


# field helpers ------------------------------------------------------------------------------------
def _opt(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise bad(name, f"must be {what}, got a boolean")
    if not isinstance(value, kinds):
        raise bad(name, f"must be {what}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(name, f"must be a finite {what}")
    return value


def _stop_list(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(items)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in items):
        raise bad("stop", f"stop strings must have 1..{MAX_STOP_LENGTH} characters")
    return tuple(items)


def _int_list(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise bad(name, "must be a list of integers")
    return tuple(value)


def resolve_model(body: dict, ctx: ParseContext) -> tuple[str, str | None]:
    """(model name echoed back, adapter name or None for the base model)."""
    model = body.get("model")
    if model is None or model == "" or model == ctx.base_name:
        return ctx.base_name, None
    if not isinstance(model, str):
        raise bad("model", f"must be a string, got {type(model).__name__}")
    if model not in ctx.adapters:
        raise ApiError(404, "model_not_found", f"model: {model!r} is neither the base model nor a loaded adapter",
                       "model")
    return model, model


def sampling_params(body: dict, default_temperature: float = 1.0) -> dict[str, Any]:
    """Validated SamplingParams fields (as a plain dict) from an OpenAI-style body."""
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise bad(name, "is not supported by this server", "unsupported_parameter")
    n = _opt(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise bad("n", f"only n=1 is supported, got {n}", "unsupported_parameter")
    best_of = _opt(body, "best_of", (int,), 1, "an integer")
    if best_of != 1:
        raise bad("best_of", f"only best_of=1 is supported, got {best_of}", "unsupported_parameter")
    max_tokens = _opt(body, "max_tokens", (int,), None, "an integer")
    if max_tokens is None:
        max_tokens = _opt(body, "max_completion_tokens", (int,), 16, "an integer")
    fields = {
        "max_tokens": max_tokens,
        "temperature": float(_opt(body, "temperature", (int, float), default_temperature, "a number")),
        "top_p": float(_opt(body, "top_p", (int, float), 1.0, "a number")),
        "top_k": _opt(body, "top_k", (int,), 0, "an integer"),
        "seed": _opt(body, "seed", (int,), None, "an integer"),
        "stop": _stop_list(body),
        "stop_token_ids": _int_list(body, "stop_token_ids"),
        "ignore_eos": _opt(body, "ignore_eos", (bool,), False, "a boolean"),
    }
    try:
        SamplingParams(**fields)
    except ParamError as exc:
        raise bad(exc.field, str(exc).split(": ", 1)[-1]) from exc
    return fields


def params_from_wire(params: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the dict carried by a Submit message."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    return SamplingParams(**values)


# prompts ------------------------------------------------------------------------------------------
def encode_prompt(prompt: Any, ctx: ParseContext) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "must not be empty")
        if ctx.tokenizer is None:
            raise bad("prompt", "this model has no tokenizer: send token ids")
        return list(ctx.tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < ctx.vocab_size for t in prompt):
            raise bad("prompt", f"token ids must be in [0, {ctx.vocab_size})")
        return list(prompt)
    raise bad("prompt", "must be a non-empty string or a non-empty list of token ids (one prompt per request)")


def render_chat(messages: Any, ctx: ParseContext) -> list[int]:
    """Token ids of a chat conversation through the tokenizer's chat template (or a plain fallback)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad(f"messages[{i}]", f"must be an object with role in {list(_ROLES)}")
        clean.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    if ctx.tokenizer is None:
        raise bad("messages", "this model has no tokenizer")
    if getattr(ctx.tokenizer, "chat_template", None):
        ids = ctx.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
    return list(ctx.tokenizer.encode(text))


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise bad(f"messages[{index}].content", "must be a string or a list of text parts")


def check_context(prompt_ids: list[int], params: dict[str, Any], ctx: ParseContext) -> None:
    if len(prompt_ids) >= ctx.max_model_len:
        raise ApiError(400, "context_length_exceeded", f"prompt: {len(prompt_ids)} tokens; the context length is "
                       f"{ctx.max_model_len}", "prompt")
    if len(prompt_ids) + params["max_tokens"] > ctx.max_model_len:
        raise ApiError(400, "context_length_exceeded", f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens "
                       f"({params['max_tokens']}) exceeds the context length {ctx.max_model_len}", "max_tokens")


def _slo(body: dict, ctx: ParseContext) -> float | None:
    value = _opt(body, "slo_ttft_ms", (int, float), None, "a number")
    if value is not None and value <= 0:
        raise bad("slo_ttft_ms", "must be > 0")
    return float(value) if value is not None else ctx.default_slo_ttft_ms


# the three request kinds ----------------------------------------------------------------------------
def parse_generation(body: Any, ctx: ParseContext, chat: bool, default_temperature: float = 1.0) -> GenerationSpec:
    """Validate an OpenAI completions (chat=False) or chat completions body, or a WS generate frame."""
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object")
    model, adapter = resolve_model(body, ctx)
    params = sampling_params(body, default_temperature)
    prompt_ids = render_chat(body.get("messages"), ctx) if chat else encode_prompt(body.get("prompt"), ctx)
    check_context(prompt_ids, params, ctx)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return GenerationSpec(
        model=model, adapter=adapter, prompt_ids=prompt_ids, params=params, slo_ttft_ms=_slo(body, ctx),
        stream=_opt(body, "stream", (bool,), False, "a boolean"),
        include_usage=bool(_opt(options or {}, "include_usage", (bool,), False, "a boolean")),
        return_token_ids=_opt(body, "return_token_ids", (bool,), False, "a boolean"),
    )


def parse_ws_generate(frame: dict, ctx: ParseContext) -> GenerationSpec:
    """A WS generate frame: `prompt` or `messages`; sampling fields as OpenAI completions."""
    chat = frame.get("messages") is not None
    if chat and frame.get("prompt") is not None:
        raise bad("prompt", "send either prompt or messages, not both")
    return parse_generation(frame, ctx, chat)


def client_id(frame: dict) -> str:
    value = frame.get("id")
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise bad("id", f"must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    return value

"""Client-facing request parsing: WS `generate` frames and OpenAI completions/chat bodies become one
validated `GenerationSpec`, or an `ApiError` with a stable code, the HTTP status and the bad parameter.

One path for both APIs: `parse_generation` checks the whole document (actors/fields.py: depth, text,
types), then every field through the tables below (one `Param` per field: its rule, bounds and default),
then the prompt or messages. To accept a new field, add a `Param` to `SAMPLING_PARAMS` (it then reaches
`SamplingParams` under its name) or to `REQUEST_PARAMS` (read into `GenerationSpec.extras`).

The error codes and every field's bounds are documented in docs/protocol.md; keep it in sync.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.actors.fields import (
    ApiError,
    Bool,
    Float,
    Int,
    IntList,
    Object,
    Only,
    Param,
    Text,
    TextList,
    Unsupported,
    bad,
    check_document,
    kind,
    read_params,
    show,
)
from lorafleet.engine.adapter_index import find_adapter_dir
from lorafleet.engine.request import ParamError, SamplingParams

__all__ = ["ApiError", "GenerationSpec", "ParseContext", "bad", "client_id", "parse_generation", "parse_ws_generate"]

MAX_STOP = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_ID_LENGTH = 256
MAX_MODEL_NAME = 1024
MAX_MESSAGES = 4096
MAX_SLO_TTFT_MS = 86_400_000.0  # one day
_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class ParseContext:
    """What parsing needs to know about the served model (read-only)."""

    base_name: str
    adapters: set[str]
    max_model_len: int
    vocab_size: int
    tokenizer: Any = None
    default_slo_ttft_ms: float | None = None
    adapter_root: Path | None = None  # names not loaded that resolve to a directory under it are read on first use


def _vocab(ctx: ParseContext) -> int:
    return ctx.vocab_size


def _last_token(ctx: ParseContext) -> int:
    return ctx.vocab_size - 1


# the fields: one line each ------------------------------------------------------------------------------
SAMPLING_PARAMS: tuple[Param, ...] = (  # -> SamplingParams(**values)
    Param("max_tokens", Int(1), 16, aliases=("max_completion_tokens",)),
    Param("temperature", Float(0.0, 100.0), 1.0),
    Param("top_p", Float(0.0, 1.0, lo_open=True), 1.0),
    Param("top_k", Int(-1, _vocab), 0),
    Param("seed", Int(), None),  # signed 64-bit, as vLLM's OpenAI server
    Param("stop", TextList(MAX_STOP, MAX_STOP_LENGTH), ()),
    Param("stop_token_ids", IntList(MAX_STOP_TOKEN_IDS, 0, _last_token), ()),
    Param("ignore_eos", Bool(), False),
)
REQUEST_PARAMS: tuple[Param, ...] = (  # -> GenerationSpec.extras (and the named GenerationSpec fields)
    Param("stream", Bool(), False),
    Param("stream_options", Object(), None),
    Param("return_token_ids", Bool(), False),
    Param("slo_ttft_ms", Float(0.0, MAX_SLO_TTFT_MS, lo_open=True), None),
    Param("n", Only(1), 1),
    Param("best_of", Only(1), 1),
    *(Param(name, Unsupported()) for name in ("echo", "logprobs", "suffix", "top_logprobs", "logit_bias", "tools",
                                               "functions")),
)
STREAM_OPTIONS: tuple[Param, ...] = (Param("include_usage", Bool(), False),)
ID = Text(MAX_ID_LENGTH)
MODEL = Text(MAX_MODEL_NAME, min_chars=0)


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


def resolve_model(body: dict, ctx: ParseContext) -> tuple[str, str | None]:
    """(model name echoed back, adapter name or None for the base model)."""
    model = body.get("model")
    if model is None or model == "" or model == ctx.base_name:
        return ctx.base_name, None
    MODEL.check("model", model, ctx)
    if model not in ctx.adapters and (ctx.adapter_root is None or find_adapter_dir(ctx.adapter_root, model) is None):
        raise ApiError(404, "model_not_found", f"model: {show(model)} is neither the base model nor a loaded "
                       "adapter", "model")
    return model, model


def sampling_params(body: dict, ctx: ParseContext, default_temperature: float = 1.0) -> dict[str, Any]:
    """Validated SamplingParams fields (as a plain dict) from an OpenAI-style body."""
    fields = read_params(body, SAMPLING_PARAMS, ctx)
    if body.get("temperature") is None:
        fields["temperature"] = default_temperature
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
    """Token ids of a completions `prompt`: a non-empty string, or a non-empty list of token ids (a list of
    one such prompt is taken as that prompt)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "must not be empty")
        if ctx.tokenizer is None:
            raise bad("prompt", "this model has no tokenizer: send token ids")
        return list(ctx.tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return list(IntList(ctx.max_model_len, 0, _last_token).check("prompt", prompt, ctx))
    raise bad("prompt", "must be a non-empty string or a non-empty list of token ids (one prompt per request), "
              f"got {kind(prompt)}")


def render_chat(messages: Any, ctx: ParseContext) -> list[int]:
    """Token ids of a chat conversation through the tokenizer's chat template (or a plain fallback). A
    template that raises (e.g. roles that do not alternate) is the client's error: 400 naming `messages`."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"must be a non-empty list, got {kind(messages)}")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad(f"messages[{i}]", f"must be an object with role in {list(_ROLES)}")
        clean.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    if ctx.tokenizer is None:
        raise bad("messages", "this model has no tokenizer")
    if getattr(ctx.tokenizer, "chat_template", None):
        return _apply_template(ctx.tokenizer, clean)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
    return list(ctx.tokenizer.encode(text))


def _apply_template(tokenizer: Any, messages: list[dict]) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # the template's own error (jinja2 `raise_exception`, a bad field it reads)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise bad("messages", f"the chat template refused the conversation: {reason}") from exc
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text", ""), str) for p in content):
        return "".join(p.get("text", "") for p in content)
    raise bad(f"messages[{index}].content", "must be a string or a list of text parts")


def check_context(prompt_ids: list[int], params: dict[str, Any], ctx: ParseContext) -> None:
    if len(prompt_ids) >= ctx.max_model_len:
        raise ApiError(400, "context_length_exceeded", f"prompt: {len(prompt_ids)} tokens; the context length is "
                       f"{ctx.max_model_len}", "prompt")
    if len(prompt_ids) + params["max_tokens"] > ctx.max_model_len:
        raise ApiError(400, "context_length_exceeded", f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens "
                       f"({params['max_tokens']}) exceeds the context length {ctx.max_model_len}", "max_tokens")


# the request kinds ----------------------------------------------------------------------------------
def parse_generation(body: Any, ctx: ParseContext, chat: bool, default_temperature: float = 1.0) -> GenerationSpec:
    """Validate an OpenAI completions (chat=False) or chat completions body, or a WS generate frame."""
    if not isinstance(body, dict):
        raise bad("body", f"must be a JSON object, got {kind(body)}")
    check_document(body)
    model, adapter = resolve_model(body, ctx)
    params = sampling_params(body, ctx, default_temperature)
    extras = read_params(body, REQUEST_PARAMS, ctx)
    options = read_params(extras.pop("stream_options") or {}, STREAM_OPTIONS, ctx)
    prompt_ids = render_chat(body.get("messages"), ctx) if chat else encode_prompt(body.get("prompt"), ctx)
    check_context(prompt_ids, params, ctx)
    slo = extras.pop("slo_ttft_ms")
    return GenerationSpec(
        model=model, adapter=adapter, prompt_ids=prompt_ids, params=params,
        slo_ttft_ms=slo if slo is not None else ctx.default_slo_ttft_ms,
        stream=extras.pop("stream"), include_usage=options["include_usage"],
        return_token_ids=extras.pop("return_token_ids"), extras=extras,
    )


def parse_ws_generate(frame: dict, ctx: ParseContext) -> GenerationSpec:
    """A WS generate frame: `prompt` or `messages`; sampling fields as OpenAI completions."""
    chat = frame.get("messages") is not None
    if chat and frame.get("prompt") is not None:
        raise bad("prompt", "send either prompt or messages, not both")
    return parse_generation(frame, ctx, chat)


def client_id(frame: dict) -> str:
    """The WS frame's `id`: a string of 1..MAX_ID_LENGTH characters of valid Unicode text."""
    value = frame.get("id")
    if value is None:
        raise bad("id", "is required")
    return ID.check("id", value, None)

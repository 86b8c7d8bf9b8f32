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
import functools
import inspect
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
from lorafleet.engine.sampling import MAX_LOGPROBS

__all__ = ["ApiError", "GenerationSpec", "ParseContext", "bad", "client_id", "parse_generation", "parse_ws_generate"]

MAX_STOP = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_ID_LENGTH = 256
MAX_MODEL_NAME = 1024
MAX_MESSAGES = 4096
MAX_SLO_TTFT_MS = 86_400_000.0  # one day
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 256  # prompts in one completions request
MAX_CHOICES = 256  # prompts x n: generations one request (or one WS id) may start
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_ROLE_CHARS = 64
_REFUSED = ("tools", "functions", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort",
            "metadata", "service_tier", "modalities", "store")
_WS_FIELDS = ("type", "id", "prompt", "messages")


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
    max_prompt_chars: int | None = None  # longer text cannot fit max_model_len tokens (prompt_char_bound)


def prompt_char_bound(tokenizer: Any, max_model_len: int) -> int | None:
    """Characters that `max_model_len` tokens can spell at most: max_model_len x the longest vocabulary entry
    (a token never decodes to more characters than its vocabulary string: byte-level BPE maps one byte to one
    character, SentencePiece one character to one). Text longer than this can never fit, so it is refused
    before tokenizing, which runs on the event loop and costs time proportional to the text (a 100 KB prompt
    held every other socket for about a second). None without a tokenizer or vocabulary."""
    vocab = getattr(tokenizer, "get_vocab", None)
    entries = vocab() if vocab is not None else None
    if not entries:
        return None
    return max_model_len * max(1, max(len(t) for t in entries))


def _check_chars(chars: int, ctx: ParseContext, name: str, what: str | None = None) -> None:
    """400 context_length_exceeded for text that cannot fit max_model_len tokens, before tokenizing it (`what`
    describes the text in the message; by default the field `name`)."""
    if ctx.max_prompt_chars is not None and chars > ctx.max_prompt_chars:
        field = name.split("[")[0]
        raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is {ctx.max_model_len} "
                       f"tokens. However, the {what or field} has {chars} characters, more than "
                       f"{ctx.max_model_len} tokens can hold (at most {ctx.max_prompt_chars}). Please reduce the "
                       f"length of the {field}.", name)


def refuse_unknown_keys(name: str, value: dict, known: tuple[str, ...]) -> None:
    """400 `unknown_parameter` naming `name.key` for a key of the object `value` outside `known` (OpenAI refuses
    unknown nested fields as it does top-level ones: nothing sent is silently ignored)."""
    unknown = next((key for key in value if key not in known), None)
    if unknown is not None:
        raise bad(f"{name}.{unknown}", f"unrecognized field of {name} (fields: {', '.join(known)})",
                  "unknown_parameter")


def _vocab(ctx: ParseContext) -> int:
    return ctx.vocab_size


def _last_token(ctx: ParseContext) -> int:
    return ctx.vocab_size - 1


@dataclass(frozen=True)
class LogitBias:
    """OpenAI's `logit_bias`: an object mapping token ids (JSON keys are strings: "50256") to a bias in
    [-100, 100] added to that token's logit; a tuple of (token id, bias) pairs sorted by token id."""

    def check(self, name: str, value: Any, ctx: ParseContext) -> tuple[tuple[int, float], ...]:
        Object().check(name, value, ctx)
        if len(value) > MAX_LOGIT_BIAS:
            raise bad(name, f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        pairs = []
        for key, bias in value.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12 else -1
            if not 0 <= token < ctx.vocab_size:
                raise bad(name, f"keys must be token ids in [0, {ctx.vocab_size}), got {show(key)}")
            pairs.append((token, Float(-100.0, 100.0).check(f"{name}.{key}", bias, ctx)))
        return tuple(sorted(pairs))


@dataclass(frozen=True)
class ResponseFormat:
    """`response_format`: only `{"type": "text"}` (the default) is served; JSON mode and schemas are refused."""

    def check(self, name: str, value: Any, ctx: ParseContext) -> None:
        Object().check(name, value, ctx)
        if value.get("type") != "text":
            raise bad(name, f"only {{\"type\": \"text\"}} is supported, got type {show(value.get('type'))}",
                      "unsupported_parameter")
        refuse_unknown_keys(name, value, ("type",))
        return None


@dataclass(frozen=True)
class ToolChoice:
    """`tool_choice`: tools are not served, so only "none" (asks for nothing) is accepted."""

    def check(self, name: str, value: Any, ctx: ParseContext) -> None:
        if value != "none":
            raise bad(name, "tools are not supported by this server (only \"none\")", "unsupported_parameter")
        return None


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
    Param("min_p", Float(0.0, 1.0), 0.0),
    Param("presence_penalty", Float(-2.0, 2.0), 0.0),
    Param("frequency_penalty", Float(-2.0, 2.0), 0.0),
    Param("repetition_penalty", Float(0.0, 100.0, lo_open=True), 1.0),
    Param("min_tokens", Int(0), 0),
    Param("logit_bias", LogitBias(), ()),
    Param("prompt_logprobs", Int(0, MAX_LOGPROBS), None),
)
COMPLETION_LOGPROBS = Param("logprobs", Int(0, MAX_LOGPROBS), None)  # completions and WS: top-N
CHAT_LOGPROBS = (Param("logprobs", Bool(), False), Param("top_logprobs", Int(0, MAX_LOGPROBS), None))
REQUEST_PARAMS: tuple[Param, ...] = (  # -> GenerationSpec.extras (and the named GenerationSpec fields)
    Param("stream", Bool(), False),
    Param("stream_options", Object(), None),
    Param("return_token_ids", Bool(), False),
    Param("slo_ttft_ms", Float(0.0, MAX_SLO_TTFT_MS, lo_open=True), None),
    Param("n", Int(1, MAX_N), 1),
    Param("user", Text(MAX_ID_LENGTH), None),  # an end-user id (OpenAI: abuse monitoring): accepted, no effect
    Param("parallel_tool_calls", Bool(), None),  # only means something with tools, which are refused
    Param("response_format", ResponseFormat(), None),
    Param("tool_choice", ToolChoice(), None),
    *(Param(name, Unsupported()) for name in _REFUSED),
)
COMPLETION_PARAMS = (Param("echo", Bool(), False), Param("best_of", Int(1, MAX_N), None),
                     Param("suffix", Unsupported()))
STREAM_OPTIONS: tuple[Param, ...] = (  # stream_options' own fields (any other is refused naming it)
    Param("include_usage", Bool(), False),
    Param("include_obfuscation", Bool(), None),  # OpenAI's padding against size side channels: never added here
    Param("continuous_usage_stats", Unsupported()),  # vLLM: usage in every chunk (not served)
)
ID = Text(MAX_ID_LENGTH)
MODEL = Text(MAX_MODEL_NAME, min_chars=0)


@dataclass
class GenerationSpec:
    """A validated generation request, whichever API it came through. A completions request may carry
    several prompts (`prompts`) and ask for `n` choices of each: `choices()` splits it into one spec per
    choice; `prompt_ids` is the first prompt (the one of a single-choice spec)."""

    model: str
    adapter: str | None
    prompt_ids: list[int]
    params: dict[str, Any]
    slo_ttft_ms: float | None = None
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    index: int = 0  # this spec's choice index (a spec from `choices()`)
    chat: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [self.prompt_ids]

    def choices(self) -> list[GenerationSpec]:
        """One spec per choice, numbered as OpenAI does: index = prompt index * n + sample index. Sample j of a
        seeded request gets seed + j (wrapped to signed 64 bits), as vLLM derives its n samples' seeds: so
        the n samples equal n single requests with seeds seed, seed + 1, ...; unseeded samples are random."""
        out = []
        for p, prompt in enumerate(self.prompts):
            for j in range(self.n):
                params = dict(self.params)
                if params.get("seed") is not None:
                    params["seed"] = (params["seed"] + j + 2**63) % 2**64 - 2**63
                out.append(dataclasses.replace(self, prompt_ids=prompt, prompts=[prompt], params=params, n=1,
                                               index=p * self.n + j))
        return out


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


def sampling_params(body: dict, ctx: ParseContext, chat: bool = False, default_temperature: float = 1.0,
                    prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """Validated SamplingParams fields (as a plain dict) from an OpenAI-style body. Chat without `max_tokens`
    gets the rest of the context after the longest prompt (OpenAI and vLLM); completions get 16 (OpenAI)."""
    fields = read_params(body, SAMPLING_PARAMS, ctx)
    if body.get("temperature") is None:
        fields["temperature"] = default_temperature
    if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is None and prompts:
        fields["max_tokens"] = max(1, ctx.max_model_len - max(len(p) for p in prompts))
    fields["logprobs"] = _logprobs(body, ctx, chat)
    try:
        SamplingParams(**fields)
    except ParamError as exc:
        name = _max_tokens_key(body) if exc.field == "max_tokens" else exc.field
        raise bad(name, str(exc).split(": ", 1)[-1]) from exc
    return fields


def _logprobs(body: dict, ctx: ParseContext, chat: bool) -> int | None:
    """Top-N logprobs asked for: completions' `logprobs: N`, or chat's `logprobs: true` + `top_logprobs: N`."""
    if not chat:
        return COMPLETION_LOGPROBS.read(body, ctx)
    wanted, top = (p.read(body, ctx) for p in CHAT_LOGPROBS)
    if top is not None and not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _max_tokens_key(body: dict) -> str:
    """The name the client sent the completion limit under (errors name it)."""
    return "max_completion_tokens" if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None \
        else "max_tokens"


def params_from_wire(params: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the dict carried by a Submit message."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    return SamplingParams(**values)


# prompts ------------------------------------------------------------------------------------------
def encode_prompts(prompt: Any, ctx: ParseContext) -> list[list[int]]:
    """Token ids of each prompt of a completions `prompt`: a string, a list of token ids, a list of strings or
    a list of token-id lists (OpenAI's four forms; at most MAX_PROMPTS prompts)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        return [encode_prompt(prompt, ctx)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return [encode_prompt(p, ctx, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise bad("prompt", "must be a non-empty string, a non-empty list of token ids, or a list of those, "
              f"got {kind(prompt)}")


def encode_prompt(prompt: Any, ctx: ParseContext, name: str = "prompt") -> list[int]:
    """Token ids of one prompt: a non-empty string or a non-empty list of token ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise bad(name, "must not be empty")
        if ctx.tokenizer is None:
            raise bad(name, "this model has no tokenizer: send token ids")
        _check_chars(len(prompt), ctx, name)
        ids = list(ctx.tokenizer.encode(prompt))
        if not ids:  # e.g. whitespace only, under a tokenizer whose normalizer strips it
            raise bad(name, f"the text ({len(prompt)} characters) tokenizes to no tokens; send text the model's "
                      "tokenizer keeps, or token ids")
        return ids
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return list(IntList(ctx.max_model_len, 0, _last_token).check(name, prompt, ctx))
    raise bad(name, f"must be a non-empty string or a non-empty list of token ids, got {kind(prompt)}")


def render_chat(messages: Any, ctx: ParseContext) -> list[int]:
    """Token ids of a chat conversation through the tokenizer's chat template (or a plain fallback). A
    template that raises (e.g. roles that do not alternate) is the client's error: 400 naming `messages`."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"must be a non-empty list, got {kind(messages)}")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    clean = [_message(m, i) for i, m in enumerate(messages)]
    if ctx.tokenizer is None:
        raise bad("messages", "this model has no tokenizer")
    _check_chars(sum(len(m.get("content") or "") for m in clean), ctx, "messages")
    if getattr(ctx.tokenizer, "chat_template", None):
        text = _apply_template(ctx.tokenizer, clean)
        _check_chars(len(text), ctx, "messages", "conversation as the chat template renders it")
        ids = _template_ids(ctx.tokenizer, clean, text)
    else:
        text = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in clean) + "assistant:"
        _check_chars(len(text), ctx, "messages", "conversation as rendered")
        plain = {"split_special_tokens": True} if hasattr(ctx.tokenizer, "all_special_tokens") else {}
        ids = list(ctx.tokenizer.encode(text, **plain))  # a control token's text in a message is text
    if not ids:
        raise bad("messages", "the chat template rendered no tokens from this conversation (no user message?)")
    return ids


def _message(message: Any, index: int) -> dict:
    """One chat message for the template: any role string (the template decides what it accepts), content
    as text (or null, as in an assistant turn that only calls tools), every other field (`tool_calls`,
    `tool_call_id`, `name`) passed through as sent."""
    if not isinstance(message, dict):
        raise bad(f"messages[{index}]", f"must be an object, got {kind(message)}")
    Text(MAX_ROLE_CHARS).check(f"messages[{index}].role", message.get("role"), None)
    content = message.get("content")
    return {**message, "content": None if content is None else _content_text(content, index)}


def _apply_template(tokenizer: Any, messages: list[dict]) -> str:
    """The conversation's text through the chat template (not yet tokenized: its length is bounded first, since
    a template also renders fields other than `content`, e.g. tool calls' arguments)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template's own error (jinja2 `raise_exception`, a bad field it reads)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise bad("messages", f"the chat template refused the conversation: {reason}") from exc
    if not isinstance(text, str):
        raise bad("messages", f"the chat template rendered {kind(text)}, not text")
    return text


def _template_ids(tokenizer: Any, messages: list[dict], text: str) -> list[int]:
    """The conversation's token ids, with the control tokens only where the template writes them: a message's
    text that spells one (`</s>`, `<|eot_id|>`) is tokenized as text, as OpenAI treats what a client sends, so
    a client cannot end a turn or forge a system turn from inside its content (transformers'
    `sanitize_control_tokens`). A transformers without it encodes the rendered `text` as `tokenize=True` does."""
    if not _sanitizes(type(tokenizer)):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        sanitize_control_tokens=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@functools.cache
def _sanitizes(kind: type) -> bool:
    method = getattr(kind, "apply_chat_template", None)
    return method is not None and "sanitize_control_tokens" in inspect.signature(method).parameters


def _content_text(content: Any, index: int) -> str:
    """A message's text: a string, or its text parts (`{"type": "text", "text": ...}`) joined. A part of any other
    type (image_url, input_audio, file, ...) is 400 `unsupported_parameter` naming it: the models served read
    text only, and dropping the part would answer a question the client did not ask."""
    name = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(name, f"must be a string, a list of content parts or null, got {kind(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad(f"{name}[{j}]", f"must be a content part object, got {kind(part)}")
        if part.get("type") != "text":
            raise bad(f"{name}[{j}].type", f"only text content parts are supported (the served models read text "
                      f"only), got {show(part.get('type'))}", "unsupported_parameter")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{name}[{j}].text", f"a text part needs its text as a string, got {kind(text)}")
        texts.append(text)
    return "".join(texts)


def check_context(prompt_ids: list[int], params: dict[str, Any], ctx: ParseContext, prompt_name: str = "prompt",
                  max_name: str = "max_tokens") -> None:
    """400 `context_length_exceeded` in the wording OpenAI uses and client libraries (litellm, langchain) map to
    their context-window error: "This model's maximum context length is N tokens. However, you requested M
    tokens (P in the prompt, C in the completion)..."; `param` names the prompt when it alone does not fit."""
    prompt, completion = len(prompt_ids), params["max_tokens"]
    if prompt + completion <= ctx.max_model_len and prompt < ctx.max_model_len:
        return
    where = "messages" if prompt_name == "messages" else "prompt"
    raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is {ctx.max_model_len} "
                   f"tokens. However, you requested {prompt + completion} tokens ({prompt} in the {where}, "
                   f"{completion} in the completion). Please reduce the length of the {where} or of "
                   f"{max_name}.", prompt_name if prompt >= ctx.max_model_len else max_name)


# the request kinds ----------------------------------------------------------------------------------
def parse_generation(body: Any, ctx: ParseContext, chat: bool, default_temperature: float = 1.0,
                     ws: bool = False) -> GenerationSpec:
    """Validate an OpenAI completions (chat=False) or chat completions body, or a WS generate frame (`ws`:
    completions' fields, `prompt` or `messages`). A field no table knows is refused (400 `unknown_parameter`
    naming it), as OpenAI refuses unrecognized arguments: nothing sent is silently ignored."""
    if not isinstance(body, dict):
        raise bad("body", f"must be a JSON object, got {kind(body)}")
    check_document(body)
    _refuse_unknown(body, chat and not ws, ws)
    model, adapter = resolve_model(body, ctx)
    extras = read_params(body, REQUEST_PARAMS, ctx)
    extras.update(read_params(body, COMPLETION_PARAMS, ctx) if not chat or ws else {"echo": False, "best_of": None})
    stream_options = extras.pop("stream_options")
    if stream_options is not None and not extras["stream"]:
        raise bad("stream_options", "is only allowed with stream: true")
    if stream_options is not None:
        refuse_unknown_keys("stream_options", stream_options, tuple(p.name for p in STREAM_OPTIONS))
    options = {p.name: p.read(stream_options or {}, ctx, "stream_options.") for p in STREAM_OPTIONS}
    prompts = [render_chat(body.get("messages"), ctx)] if chat else encode_prompts(body.get("prompt"), ctx)
    params = sampling_params(body, ctx, chat and not ws, default_temperature, prompts)
    _check_best_of(extras.pop("best_of"), extras["n"])
    if len(prompts) * extras["n"] > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n={extras['n']} is more than {MAX_CHOICES} choices in one request")
    echo = extras.pop("echo")
    if echo and params["logprobs"] is not None:  # the prompt's logprobs come with the echoed prompt
        params["prompt_logprobs"] = max(params["prompt_logprobs"] or 0, params["logprobs"])
    raw = body.get("prompt")
    listed = not chat and isinstance(raw, list) and not all(type(t) is int for t in raw)  # a list of prompts
    for i, prompt in enumerate(prompts):
        name = "messages" if chat else f"prompt[{i}]" if listed else "prompt"
        check_context(prompt, params, ctx, name, _max_tokens_key(body))
    slo = extras.pop("slo_ttft_ms")
    return GenerationSpec(
        model=model, adapter=adapter, prompt_ids=prompts[0], params=params,
        slo_ttft_ms=slo if slo is not None else ctx.default_slo_ttft_ms,
        stream=extras.pop("stream"), include_usage=options["include_usage"],
        return_token_ids=extras.pop("return_token_ids"), prompts=prompts, n=extras.pop("n"), echo=echo, chat=chat,
        extras=extras,
    )


def _known_fields(chat: bool, ws: bool) -> set[str]:
    names = {"model"} | {n for p in SAMPLING_PARAMS + REQUEST_PARAMS for n in (p.name, *p.aliases)}
    if chat:
        return names | {"messages"} | {p.name for p in CHAT_LOGPROBS}
    names |= {"prompt", COMPLETION_LOGPROBS.name} | {p.name for p in COMPLETION_PARAMS}
    return names | set(_WS_FIELDS) if ws else names


_KNOWN = {(chat, ws): _known_fields(chat, ws) for chat in (False, True) for ws in (False, True)}


def _refuse_unknown(body: dict, chat: bool, ws: bool) -> None:
    unknown = [name for name in body if name not in _KNOWN[chat, ws]]
    if unknown:
        api = "WebSocket generate frames" if ws else "chat completions" if chat else "completions"
        raise bad(unknown[0], f"unrecognized request argument (not a field of {api} on this server)",
                  "unknown_parameter")


def _check_best_of(best_of: int | None, n: int) -> None:
    """best_of = n is the n samples; ranking more candidates than are returned is not implemented."""
    if best_of is None or best_of == n:
        return
    if best_of < n:
        raise bad("best_of", f"must be >= n ({n}), got {best_of}")
    raise bad("best_of", f"best_of > n (ranking candidates) is not supported; got best_of={best_of}, n={n}",
              "unsupported_parameter")


def parse_ws_generate(frame: dict, ctx: ParseContext) -> GenerationSpec:
    """A WS generate frame: `prompt` or `messages`; sampling fields as OpenAI completions."""
    chat = frame.get("messages") is not None
    if chat and frame.get("prompt") is not None:
        raise bad("prompt", "send either prompt or messages, not both")
    return parse_generation(frame, ctx, chat, ws=True)


def client_id(frame: dict) -> str:
    """The WS frame's `id`: a string of 1..MAX_ID_LENGTH characters of valid Unicode text."""
    value = frame.get("id")
    if value is None:
        raise bad("id", "is required")
    return ID.check("id", value, None)


def parse_tokenize(body: Any, ctx: ParseContext) -> list[int]:
    """POST /tokenize: `{"model", "prompt"}` (one prompt) or `{"model", "messages"}`: the token ids a completions
    or chat request would run on."""
    body = _tool_body(body, ("model", "prompt", "messages"))
    resolve_model(body, ctx)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise bad("prompt", "send either prompt or messages")
    if body.get("messages") is not None:
        return render_chat(body["messages"], ctx)
    return encode_prompt(body["prompt"], ctx)


def parse_detokenize(body: Any, ctx: ParseContext) -> list[int]:
    """POST /detokenize: `{"model", "tokens": [ids]}` with every id in the vocabulary."""
    body = _tool_body(body, ("model", "tokens"))
    resolve_model(body, ctx)
    if ctx.tokenizer is None:
        raise bad("tokens", "this model has no tokenizer")
    return list(IntList(1 << 16, 0, _last_token).check("tokens", body.get("tokens"), ctx))


def _tool_body(body: Any, fields: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise bad("body", f"must be a JSON object, got {kind(body)}")
    check_document(body)
    unknown = [name for name in body if name not in fields]
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument (fields: {', '.join(fields)})", "unknown_parameter")
    return body

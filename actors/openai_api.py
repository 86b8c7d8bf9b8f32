"""OpenAI-compatible HTTP: POST /v1/completions and /v1/chat/completions (JSON or SSE), GET /v1/models.

Extensions: `return_token_ids` (choices carry `token_ids`, the response `prompt_token_ids`), `ignore_eos`,
`top_k`, `stop_token_ids`, `slo_ttft_ms`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from lorafleet.actors.fields import show, unique_keys
from lorafleet.actors.frontend import Frontend, Generation, Merged, admit_all, internal_error, item_error
from lorafleet.actors.logprobs import CompletionLogprobs, chat_logprobs, prompt_logprobs
from lorafleet.actors.protocol import ApiError, GenerationSpec, bad, parse_detokenize, parse_generation, parse_tokenize
from lorafleet.actors.schema import DeltaItem

_json_event = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(data, separators=...), minus its set-up
_json_string = json.encoder.encode_basestring_ascii  # what that encoder writes for a str (ensure_ascii)
log = logging.getLogger("lorafleet.openai")


def error_response(exc: ApiError) -> web.Response:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _require_json_type(request: web.Request) -> None:
    """JSON bodies only under a JSON Content-Type (415 otherwise): a browser sends text/plain and form bodies
    cross-site without asking, application/json only after a CORS preflight this server never grants."""
    kind = request.content_type
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    got = repr(request.headers["Content-Type"]) if "Content-Type" in request.headers else "none"
    raise ApiError(415, "unsupported_media_type", f"Content-Type: must be application/json, got {got}",
                   "Content-Type")


async def read_json(request: web.Request, frontend: Frontend) -> object:
    if request.content_length is not None and request.content_length > frontend.max_body_bytes:
        raise ApiError(413, "body_too_large", f"body: {request.content_length} bytes, at most "
                       f"{frontend.max_body_bytes}", "body")
    _require_json_type(request)
    try:
        async with asyncio.timeout(frontend.limits.body_timeout):
            raw = await request.read()
    except TimeoutError as exc:
        raise ApiError(408, "request_timeout", f"body: not received within {frontend.limits.body_timeout:g} s",
                       "body") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "body_too_large", f"body: larger than {frontend.max_body_bytes} bytes", "body") from exc
    except web.RequestPayloadError as exc:  # the body's framing or Content-Encoding is broken (the client's fault)
        raise bad("body", f"could not be read: {_payload_reason(exc)}", "invalid_body") from exc
    try:
        return json.loads(raw, object_pairs_hook=unique_keys)
    except RecursionError as exc:
        raise bad("body", "is nested too deeply to parse", "invalid_json") from exc
    except ValueError as exc:
        raise bad("body", f"is not valid JSON: {exc}", "invalid_json") from exc


def _payload_reason(exc: web.RequestPayloadError) -> str:
    """aiohttp's reason for a body it could not read (e.g. "Can not decode content-encoding: deflate"), one line."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return " ".join(str(getattr(cause, "message", "") or cause).split())[:200]


@dataclass
class ChoiceState:
    """One choice's output so far (its spec is the choice's own: prompt, seed, index)."""

    spec: GenerationSpec
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    chat_logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None
    started: bool = False


@dataclass
class Piece:
    """What one item adds to a choice: the chunk's share of text, ids and logprobs."""

    text: str
    token_ids: list[int]
    first: bool
    logprobs: CompletionLogprobs | None = None
    chat_logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None


@dataclass
class Completion:
    """Accumulates a request's choices for a response or a stream of chunks."""

    chat: bool
    spec: GenerationSpec
    id: str
    tokenizer: Any
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    prefixes: dict[int, str] = field(default_factory=dict, repr=False)  # choice index -> its chunks' JSON start

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict:
        """Prompt tokens count once per prompt (not per sample), completion tokens over all choices."""
        prompt = sum(len(p) for p in self.spec.prompts)
        completion = sum(c.completion_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def update(self, spec: GenerationSpec, item: DeltaItem) -> Piece:
        """Take one item of choice `spec.index`; returns its share for a streamed chunk."""
        state = self.choices.setdefault(spec.index, ChoiceState(spec))
        piece = Piece(item.text, list(item.token_ids), not state.started)
        state.started = True
        ids, rows, prompt = list(item.token_ids), list(item.logprobs), 0
        if piece.first and spec.echo:
            piece.text = self.tokenizer.decode(spec.prompt_ids, skip_special_tokens=True) + piece.text \
                if self.tokenizer is not None else piece.text
            ids, rows = spec.prompt_ids + ids, (item.prompt_logprobs or [None] * len(spec.prompt_ids)) + rows
            prompt = len(spec.prompt_ids)
        if spec.params.get("logprobs") is not None:
            if self.chat:
                piece.chat_logprobs = chat_logprobs(rows, self.tokenizer)
                state.chat_logprobs += piece.chat_logprobs
            else:
                piece.logprobs = state.logprobs.add(ids, rows, self.tokenizer, prompt, item.finished)
        if item.prompt_logprobs is not None:
            piece.prompt_logprobs = state.prompt_logprobs = prompt_logprobs(item.prompt_logprobs, self.tokenizer)
        state.text += piece.text
        state.token_ids += piece.token_ids
        if item.finished:
            state.finish_reason, state.completion_tokens = item.finish_reason, item.completion_tokens
        return piece

    def chunk_choice(self, spec: GenerationSpec, piece: Piece, finish: str | None) -> dict:
        choice: dict = {"index": spec.index}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": piece.text} if piece.first else {"content": piece.text}
            choice["logprobs"] = {"content": piece.chat_logprobs} if spec.params.get("logprobs") is not None else None
        else:
            choice["text"] = piece.text
            choice["logprobs"] = piece.logprobs.body() if piece.logprobs is not None else None
        choice["finish_reason"] = finish
        self._extensions(choice, spec, piece.token_ids, piece.first, piece.prompt_logprobs)
        return choice

    def chunk_json(self, spec: GenerationSpec, piece: Piece, finish: str | None) -> str:
        """One streamed chunk's JSON (`envelope([chunk_choice(...)])`). A plain piece — no logprobs, token ids
        or prompt rows asked — is assembled from the choice's encoded prefix plus its text and finish reason:
        the same text the dict's encoding gives, without building and walking the dicts per token."""
        plain = spec.params.get("logprobs") is None and not spec.return_token_ids and piece.logprobs is None \
            and piece.prompt_logprobs is None and type(piece.text) is str and (finish is None or type(finish) is str)
        if not plain:
            return _json_event(self.envelope([self.chunk_choice(spec, piece, finish)], stream=True))
        prefix = self.prefixes.get(spec.index)
        if prefix is None:
            kind = self.object + (".chunk" if self.chat else "")
            prefix = self.prefixes[spec.index] = (
                f'{{"id":{_json_event(self.id)},"object":{_json_event(kind)},"created":{_json_event(self.created)},'
                f'"model":{_json_event(self.spec.model)},"choices":[{{"index":{_json_event(spec.index)},')
        if self.chat:
            body = ('"delta":{"role":"assistant","content":' if piece.first else '"delta":{"content":') + \
                _json_string(piece.text) + "}"
        else:
            body = '"text":' + _json_string(piece.text)
        return prefix + body + ',"logprobs":null,"finish_reason":' + \
            ("null" if finish is None else _json_string(finish)) + ('}],"usage":null}' if self.spec.include_usage
                                                                    else "}]}")

    def final_choice(self, state: ChoiceState) -> dict:
        spec = state.spec
        choice: dict = {"index": spec.index}
        wants = spec.params.get("logprobs") is not None
        if self.chat:
            choice["message"] = {"role": "assistant", "content": state.text}
            choice["logprobs"] = {"content": state.chat_logprobs} if wants else None
        else:
            choice["text"] = state.text
            choice["logprobs"] = state.logprobs.body() if wants else None
        choice["finish_reason"] = state.finish_reason
        self._extensions(choice, spec, state.token_ids, True, state.prompt_logprobs)
        return choice

    @staticmethod
    def _extensions(choice: dict, spec: GenerationSpec, token_ids: list[int], first: bool,
                    prompt_rows: list | None) -> None:
        """vLLM's extensions on a choice: `token_ids`, and `prompt_token_ids` / `prompt_logprobs` with the
        choice's first chunk (or its whole response)."""
        if spec.return_token_ids:
            choice["token_ids"] = token_ids
            if first:
                choice["prompt_token_ids"] = spec.prompt_ids
        if prompt_rows is not None:
            choice["prompt_logprobs"] = prompt_rows

    def envelope(self, choices: list[dict], stream: bool) -> dict:
        """The response's (or a chunk's) outer object; a chunk of a stream that asked for `include_usage` carries
        `"usage": null` (OpenAI: every chunk but the last, which has the totals)."""
        kind = self.object + (".chunk" if stream and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.spec.model, "choices": choices}
        if stream and self.spec.include_usage:
            body["usage"] = None
        return body

    def response(self) -> dict:
        body = self.envelope([self.final_choice(self.choices[i]) for i in sorted(self.choices)], False)
        body["usage"] = self.usage()
        return body


async def _response_json(out: Completion) -> str:
    """`json.dumps(out.response())`, encoded choice by choice with the event loop free in between: a response
    of many choices with logprobs runs to tens of MB (256 choices of 200 tokens at top 20: 30 MB), and one
    dumps of it held every other stream for about a second."""
    body = out.response()
    choices, body["choices"] = body["choices"], []
    head, _, tail = json.dumps(body).partition('"choices": []')
    parts = []
    for choice in choices:
        parts.append(json.dumps(choice))
        await asyncio.sleep(0)
    return head + '"choices": [' + ", ".join(parts) + "]" + tail


async def _collect(merged: Merged, out: Completion) -> None:
    while (got := await merged.next()) is not None:
        generation, item = got
        if item.error_code is not None:
            raise item_error(item)
        out.update(generation.spec, item)


def _sse(data: object) -> bytes:
    """One server-sent event: `data: <JSON or [DONE]>` and a blank line."""
    payload = data if isinstance(data, str) else _json_event(data)
    return f"data: {payload}\n\n".encode()


class SseStream:
    """One streamed response: its choices' items become SSE events as they arrive, and the handler writes them.

    The Router hands each item to `receive` (on the loop, never awaiting), which encodes the choice's chunk into
    the response's outbox at once; the handler (`run`) writes whatever the outbox holds in one write per wake-up,
    so a step's chunks for one response go out together. The handler's write waits while the client reads slowly,
    but the items do not: their chunks accumulate in the outbox. What is encoded but not yet sent — the outbox
    plus the connection's transport buffer, in bytes — is bounded by `--sse-max-send-buffer-mb`, the WebSocket
    bound's twin: past it the client reads slower than its generations produce, the connection is dropped
    (counted `sse_closed_slow_reader`) and its generations are cancelled. The events are those of OpenAI's
    stream: one chunk per item that carries text, token ids or a finish (and chat's first, role-only delta),
    an error event in place of the rest when a choice fails, the usage chunk (`include_usage`), then `[DONE]`."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, generations: list[Generation],
                 out: Completion) -> None:
        self.frontend: Frontend = request.app["frontend"]
        self.transport, self.resp, self.out = request.transport, resp, out
        self.generations = generations
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        self.open = len(generations)
        self.ended: set[str] = set()
        self.done = self.dropped = False
        self.limit = self.frontend.limits.sse_send_buffer
        self.waiter: asyncio.Future[None] | None = None  # the handler waiting for events
        router = self.frontend.router
        for generation in generations:
            while not generation.queue.empty():  # items that came between its admission and now
                self.receive(generation, generation.queue.get_nowait())
            router.attach(generation.request_id, partial(self.receive, generation))

    def receive(self, generation: Generation, item: object) -> None:
        """The Router's callback for one of the response's choices."""
        if self.done or generation.request_id in self.ended:
            return  # nothing follows the stream's end, or a choice's last item
        try:
            self._item(generation, item)
        except Exception as exc:  # a bug ends the stream with an error event; the router and the others go on
            ref = self.frontend.new_id("err")
            log.exception("SSE stream %s failed (%s)", self.out.id, ref)
            self._end(_sse(internal_error(ref, exc).body()))
        if not self.dropped and self.unsent() > self.limit:
            self.drop(f"over {self.limit} bytes of events waiting (--sse-max-send-buffer-mb)")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _item(self, generation: Generation, item: object) -> None:
        assert isinstance(item, DeltaItem), f"unexpected message {item!r}"
        generation.finished = generation.finished or item.finished
        if item.error_code is not None:
            self._end(_sse(item_error(item).body()))
            return
        out = self.out
        piece = out.update(generation.spec, item)
        if piece.text or piece.token_ids or item.finished or (piece.first and out.chat):
            self._post(_sse(out.chunk_json(generation.spec, piece, item.finish_reason if item.finished else None)))
        if item.finished:
            self.ended.add(generation.request_id)
            self.open -= 1
            if self.open == 0:
                usage = _sse({**out.envelope([], stream=True), "usage": out.usage()}) if out.spec.include_usage \
                    else b""
                self._end(usage)

    def _post(self, event: bytes) -> None:
        self.outbox.append(event)
        self.outbox_bytes += len(event)

    def _end(self, last: bytes) -> None:
        """The stream's last events: `last` (an error, or the usage chunk), then `[DONE]`."""
        if last:
            self._post(last)
        self._post(_sse("[DONE]"))
        self.done = True

    def unsent(self) -> int:
        """Bytes of events encoded and not yet sent: the outbox and the connection's transport buffer."""
        return self.outbox_bytes + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def drop(self, why: str) -> None:
        """The client reads slower than its generations produce (`why`: which bound it passed): drop the
        connection, cancel its generations. Counted sse_closed_slow_reader."""
        self.dropped = self.done = True
        self.outbox, self.outbox_bytes = [], 0
        self.frontend.hub.count("sse_closed_slow_reader")
        log.warning("dropping an SSE stream whose client does not read: %s; its %d generation(s) are cancelled",
                    why, len(self.generations))
        for generation in self.generations:
            generation.close()
        if self.transport is not None:
            self.transport.abort()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)  # the handler ends

    async def run(self) -> None:
        """Write the outbox as it fills, until the stream has ended (then end the response) or was dropped."""
        loop = asyncio.get_running_loop()
        while not self.dropped:
            if self.outbox:
                events, self.outbox, self.outbox_bytes = self.outbox, [], 0
                await self.resp.write(b"".join(events))  # waits while the client reads slowly; events pile up
            elif self.done:
                await self.resp.write_eof()
                return
            else:
                self.waiter = loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None


async def _stream(request: web.Request, generations: list[Generation], out: Completion) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    stream = SseStream(request, resp, generations, out)
    streams = request.app["frontend"].sse_streams
    streams.add(stream)  # counted by the bound on all connections' unsent bytes (frontend.shed_slow_readers)
    try:
        await stream.run()
    except ConnectionResetError:  # the client went away mid-stream; the caller cancels its generations
        pass
    finally:
        streams.discard(stream)
    return resp


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    frontend: Frontend = request.app["frontend"]
    try:
        body = await read_json(request, frontend)
        spec = parse_generation(body, frontend.ctx, chat)
    except ApiError as exc:
        frontend.refused(exc)
        return error_response(exc)
    generations = frontend.start_choices(spec)
    out = Completion(chat, spec, ("chatcmpl-" if chat else "cmpl-") + generations[0].request_id,
                     frontend.ctx.tokenizer)
    try:
        await admit_all(generations)
        if spec.stream:
            return await _stream(request, generations, out)
        await _collect(Merged(generations), out)
    except ApiError as exc:
        return error_response(exc)
    finally:
        for generation in generations:
            generation.close()
    return web.Response(text=await _response_json(out), content_type="application/json")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: lora-2 before lora-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _model_cards(frontend: Frontend) -> list[dict]:
    hub = frontend.hub
    base = frontend.ctx.base_name
    created = int(hub.info.get("started", time.time()))
    # "root" names the model, never a server path (a client has no use for one and should not learn it)
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "lorafleet", "root": base,
              "parent": None, "max_model_len": frontend.ctx.max_model_len, "vocab_size": frontend.ctx.vocab_size}]
    for name in sorted(hub.adapters, key=natural_key):
        cards.append({"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "root": name,
                      "parent": base, "max_model_len": frontend.ctx.max_model_len})
    return cards


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _model_cards(request.app["frontend"])})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model card (OpenAI `models.retrieve`), 404 `model_not_found` in OpenAI's shape."""
    name = request.match_info["model"]
    card = next((c for c in _model_cards(request.app["frontend"]) if c["id"] == name), None)
    if card is None:
        return error_response(ApiError(404, "model_not_found", f"model: {show(name)} is neither the base model "
                                       "nor a loaded adapter", "model"))
    return web.json_response(card)


async def version(request: web.Request) -> web.Response:
    """GET /version (vLLM): the server's package version."""
    try:
        value = importlib.metadata.version("lorafleet")
    except importlib.metadata.PackageNotFoundError:
        value = "unknown"
    return web.json_response({"version": value})


async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize (vLLM's shape): `{"model", "prompt"}` or `{"model", "messages"}` → `{"count",
    "max_model_len", "tokens"}` (the ids a completions / chat request with that input would run on)."""
    frontend: Frontend = request.app["frontend"]
    try:
        body = await read_json(request, frontend)
        ids = parse_tokenize(body, frontend.ctx)
    except ApiError as exc:
        return error_response(exc)
    return web.json_response({"count": len(ids), "max_model_len": frontend.ctx.max_model_len, "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    """POST /detokenize (vLLM's shape): `{"model", "tokens": [ids]}` → `{"prompt": text}`."""
    frontend: Frontend = request.app["frontend"]
    try:
        body = await read_json(request, frontend)
        ids = parse_detokenize(body, frontend.ctx)
    except ApiError as exc:
        return error_response(exc)
    return web.json_response({"prompt": frontend.ctx.tokenizer.decode(ids)})


_REQUEST_ID = "X-Request-Id"


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries `X-Request-Id`: the client's (printable, at most 256
    characters) or a generated one."""
    given = request.headers.get(_REQUEST_ID, "")
    if not (0 < len(given) <= 256 and given.isprintable() and given.isascii()):
        given = request.setdefault("request_id", uuid.uuid4().hex)
    response.headers[_REQUEST_ID] = given

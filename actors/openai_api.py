"""OpenAI-compatible HTTP: POST /v1/completions and /v1/chat/completions (JSON or SSE), GET /v1/models.

Extensions: `return_token_ids` (choices carry `token_ids`, the response `prompt_token_ids`), `ignore_eos`,
`top_k`, `stop_token_ids`, `slo_ttft_ms`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from lorafleet.actors.frontend import Frontend, Generation, item_error
from lorafleet.actors.protocol import ApiError, GenerationSpec, bad, parse_generation


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
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise bad("body", "is nested too deeply to parse", "invalid_json") from exc
    except ValueError as exc:
        raise bad("body", f"is not valid JSON: {exc}", "invalid_json") from exc


@dataclass
class Completion:
    """Accumulates one generation's output for a response."""

    chat: bool
    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def choice(self, text: str, token_ids: list[int], finish: str | None, spec: GenerationSpec,
               first: bool = False, stream: bool = True) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish}
        if self.chat and stream:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if spec.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def envelope(self, choices: list[dict], stream: bool) -> dict:
        kind = self.object + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}


async def _collect(generation: Generation, out: Completion) -> None:
    while True:
        item = await generation.next()
        out.text += item.text
        out.token_ids += item.token_ids
        if item.error_code is not None:
            raise item_error(item)
        if item.finished:
            out.finish_reason = item.finish_reason
            out.prompt_tokens, out.completion_tokens = item.prompt_tokens, item.completion_tokens
            return


async def _sse(resp: web.StreamResponse, data: object) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await resp.write(f"data: {payload}\n\n".encode())


async def _stream(request: web.Request, generation: Generation, out: Completion) -> web.StreamResponse:
    spec = generation.spec
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    first = True
    while True:
        item = await generation.next()
        if item.error_code is not None:
            await _sse(resp, item_error(item).body())
            break
        if item.text or item.token_ids or item.finished or (first and out.chat):
            choice = out.choice(item.text, item.token_ids, item.finish_reason if item.finished else None, spec, first)
            await _sse(resp, out.envelope([choice], stream=True))
            first = False
        if item.finished:
            out.prompt_tokens, out.completion_tokens = item.prompt_tokens, item.completion_tokens
            if spec.include_usage:
                await _sse(resp, {**out.envelope([], stream=True), "usage": out.usage()})
            break
    await _sse(resp, "[DONE]")
    await resp.write_eof()
    return resp


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    frontend: Frontend = request.app["frontend"]
    try:
        body = await read_json(request, frontend)
        spec = parse_generation(body, frontend.ctx, chat)
    except ApiError as exc:
        frontend.refused(exc)
        return error_response(exc)
    generation = frontend.start(spec)
    out = Completion(chat, spec.model, ("chatcmpl-" if chat else "cmpl-") + generation.request_id)
    try:
        await generation.admitted()
        if spec.stream:
            return await _stream(request, generation, out)
        await _collect(generation, out)
    except ApiError as exc:
        return error_response(exc)
    finally:
        generation.close()
    response = out.envelope([out.choice(out.text, out.token_ids, out.finish_reason, spec, stream=False)], False)
    response["usage"] = out.usage()
    if spec.return_token_ids:
        response["prompt_token_ids"] = spec.prompt_ids
    return web.json_response(response)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: lora-2 before lora-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


async def models(request: web.Request) -> web.Response:
    frontend: Frontend = request.app["frontend"]
    hub = frontend.hub
    base = frontend.ctx.base_name
    created = int(hub.info.get("started", time.time()))
    # "root" names the model, never a server path (a client has no use for one and should not learn it)
    data = [{"id": base, "object": "model", "created": created, "owned_by": "lorafleet", "root": base,
             "parent": None, "max_model_len": frontend.ctx.max_model_len, "vocab_size": frontend.ctx.vocab_size}]
    for name in sorted(hub.adapters, key=natural_key):
        data.append({"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "root": name,
                     "parent": base})
    return web.json_response({"object": "list", "data": data})

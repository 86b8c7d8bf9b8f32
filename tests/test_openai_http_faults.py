"""HTTP-level faults a client (or a hostile one) can send the OpenAI routes, over a real socket: bodies whose
Content-Encoding does not decode (plain or chunked) are the client's error (400 `invalid_body`, JSON error shape),
never a 500, and the server goes on serving; a key header that is not UTF-8 is a wrong key (401), never a 500.
The real aiohttp app and Router serve on a loopback socket; the step source of tests/test_ws_delivery.py stands
in for the scheduler (no model)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import zlib

import pytest
from test_ws_delivery import MODEL, _serve, _stop

BODY = json.dumps({"model": MODEL, "prompt": [5], "max_tokens": 3}).encode()


def _exchange(port: int, head: bytes, body: bytes) -> tuple[int, dict]:
    """Send one POST /v1/completions (`head`: extra header lines) and read its whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n" + head + b"\r\n" + body)
        raw = bytearray()
        while data := sock.recv(1 << 16):
            raw += data
    status_line, _, rest = bytes(raw).partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _chunked(body: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def _length(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


CUT = gzip.compress(BODY)[:20]  # a gzip stream cut short decodes to the start of the JSON: invalid JSON
CASES = {  # name: (header lines, body, expected error code or None for 200)
    "gzip": (b"Content-Encoding: gzip\r\n" + _length(gzip.compress(BODY)), gzip.compress(BODY), None),
    "deflate": (b"Content-Encoding: deflate\r\n" + _length(zlib.compress(BODY)), zlib.compress(BODY), None),
    "chunked": (b"Transfer-Encoding: chunked\r\n", _chunked(BODY), None),
    "deflate, not compressed": (b"Content-Encoding: deflate\r\n" + _length(BODY), BODY, "invalid_body"),
    "gzip, chunked, corrupt": (b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                               _chunked(b"\x1f\x8b\x08\x00" + b"\xff" * 40), "invalid_body"),
    "gzip, cut short": (b"Content-Encoding: gzip\r\n" + _length(CUT), CUT, "invalid_json"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_body_that_cannot_be_read_is_400_invalid_body_and_the_server_goes_on(name):
    head, body, expected = CASES[name]
    frontend, runner, tasks, url, source = await _serve()
    port = int(url.rsplit(":", 1)[1])
    try:
        status, got = await asyncio.to_thread(_exchange, port, head, body)
        assert status == (200 if expected is None else 400), got
        if expected is not None:
            error = got["error"]
            assert (error["code"], error["param"], error["type"]) == (expected, "body", "invalid_request_error")
        else:
            assert got["choices"][0]["finish_reason"] == "length"
        status, after = await asyncio.to_thread(_exchange, port, _length(BODY), BODY)
        assert status == 200 and after["usage"]["completion_tokens"] == 3
    finally:
        await _stop(runner, tasks)


def _get(port: int, head: bytes, path: bytes = b"/v1/models") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n")
        raw = bytearray()
        while data := sock.recv(1 << 16):
            raw += data
    status_line, _, rest = bytes(raw).partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


KEY_HEADERS = [b"Authorization: Bearer \xff\xfe\r\n", b"X-API-Key: \xe9t\xe9\r\n", b"Authorization: Bearer \x80\r\n",
               b"Cookie: lorafleet_dashboard=\xff\r\n"]


@pytest.mark.parametrize("head", KEY_HEADERS)
async def test_a_key_that_is_not_utf8_is_a_wrong_key_not_a_500(head):
    """With --api-key set, a key header holding bytes that are not UTF-8 (kept by aiohttp as surrogates) is
    401 invalid_api_key in OpenAI's error shape, for the API and the dashboard; the right key still opens both."""
    frontend, runner, tasks, url, source = await _serve()
    frontend.api_key = "sekret"
    port = int(url.rsplit(":", 1)[1])
    try:
        for path in (b"/v1/models", b"/dashboard"):
            status, body = await asyncio.to_thread(_get, port, head, path)
            assert status == 401, body
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
        status, body = await asyncio.to_thread(_get, port, b"Authorization: Bearer sekret\r\n")
        assert status == 200 and json.loads(body)["data"][0]["id"] == MODEL
    finally:
        await _stop(runner, tasks)


async def test_the_openai_client_gets_nested_fields_refused_by_their_path():
    """What the `openai` client sends for a stream option, a response format key or an image part this server
    does not serve, or two different completion limits: 400 BadRequestError naming the (nested) field
    (`error.param`), never a silent drop."""
    openai = pytest.importorskip("openai")
    frontend, runner, tasks, url, source = await _serve()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    calls = [
        (client.completions.create(model=MODEL, prompt=[5], stream=True,
                                   stream_options={"include_usage": True, "include_extra": True}),
         "stream_options.include_extra", "unknown_parameter"),
        (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
         "messages[0].content[1].type", "unsupported_parameter"),
        (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        response_format={"type": "text", "schema": {}}),
         "response_format.schema", "unknown_parameter"),
        (client.completions.create(model=MODEL, prompt=[5], max_tokens=2, extra_body={"max_completion_tokens": 6}),
         "max_completion_tokens", "invalid_parameter"),
    ]
    try:
        for call, param, code in calls:
            with pytest.raises(openai.BadRequestError) as info:
                await call
            assert (info.value.body["param"], info.value.body["code"]) == (param, code)
        stream = await client.completions.create(model=MODEL, prompt=[5], max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage.completion_tokens == 2
    finally:
        await client.close()
        await _stop(runner, tasks)


async def test_a_model_card_is_found_by_a_name_with_a_slash():
    """Adapters under --adapter-root are named by their relative path (`team-a/sql`): GET /v1/models/team-a/sql
    (a raw client) and the `openai` client's models.retrieve find the card; an unknown nested name is 404
    model_not_found naming `model`."""
    openai = pytest.importorskip("openai")
    frontend, runner, tasks, url, source = await _serve()
    frontend.hub.adapters["team-a/sql"] = "adapters/team-a/sql"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    port = int(url.rsplit(":", 1)[1])
    try:
        status, body = await asyncio.to_thread(_get, port, b"", b"/v1/models/team-a/sql")
        assert status == 200 and json.loads(body)["id"] == "team-a/sql"
        assert (await client.models.retrieve("team-a/sql")).parent == MODEL
        status, body = await asyncio.to_thread(_get, port, b"", b"/v1/models/team-a/none")
        assert status == 404 and json.loads(body)["error"]["param"] == "model"
    finally:
        await client.close()
        await _stop(runner, tasks)

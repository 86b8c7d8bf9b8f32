"""Per-connection limits and slow clients, over real sockets: a WebSocket's generations in flight are capped,
a socket flooding invalid frames is closed (1008) after a handful while another socket's generation goes on,
slow-header and slow-body connections are timed out, an SSE client that stops reading is dropped at
--sse-max-send-buffer-mb, and abrupt disconnects leave no unretrieved task errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import aiohttp
import pytest
from test_serve_support import WsClient, start_server, stop_server
from test_serve_support import write_assets as _write_assets

from lorafleet.actors import frontend
from lorafleet.actors.frontend import FrameBucket


def test_frame_bucket(monkeypatch):
    # a clock of our own: on the real one a pause of 0.1 s anywhere here (a loaded machine) refills a token
    clock = [1000.0]
    monkeypatch.setattr(frontend, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    bucket = FrameBucket(rate=10.0, burst=5.0)
    assert all(bucket.take() for _ in range(5))
    assert not bucket.take()
    clock[0] += 1.0  # a second later: 10 tokens back, capped at 5
    assert bucket.take(5.0) and not bucket.take()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = _write_assets(tmp_path_factory.mktemp("connections"))[0]
    proc = start_server(["--model", str(model), "--ws-max-generations", "2", "--ws-frame-rate", "50",
                         "--header-timeout", "1", "--body-timeout", "1", "--sse-max-send-buffer-mb", "0.25"])
    yield proc
    assert stop_server(proc) == 0, proc.output()


async def test_generations_per_socket_are_capped_and_the_socket_stays_usable(server):
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        for i in range(3):
            await client.send({"type": "generate", "id": f"g{i}", "prompt": "cap", "max_tokens": 800,
                               "ignore_eos": True})
        third = await asyncio.wait_for(client.expect("g2"), 60)
        await client.send({"type": "cancel", "id": "g0"})
        await asyncio.wait_for(client.expect("g0"), 60)
        await client.send({"type": "generate", "id": "g3", "prompt": "after", "max_tokens": 3,
                           "ignore_eos": True})
        after = await asyncio.wait_for(client.expect("g3"), 60)
        await client.send({"type": "cancel", "id": "g1"})
        await asyncio.wait_for(client.expect("g1"), 60)
        await ws.close()
        await reader
    assert third["type"] == "error" and third["error"]["code"] == "too_many_generations", third
    assert after["type"] == "done" and after["usage"]["completion_tokens"] == 3, after


async def test_refusals_for_capacity_are_not_invalid_frames(server):
    """A client sending well-formed generates faster than its generations end gets too_many_generations (429)
    for the extra ones; those refusals cost the frame budget like any frame, not like an invalid one, so the
    socket and its running generations survive (30 refusals x the invalid cost 10 would empty the burst 100)."""
    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        client = WsClient(ws)
        reader = asyncio.create_task(client.read_loop())
        for i in range(2):
            await client.send({"type": "generate", "id": f"r{i}", "prompt": "busy", "max_tokens": 800,
                               "ignore_eos": True})
        for i in range(30):
            await client.send({"type": "generate", "id": f"x{i}", "prompt": "more", "max_tokens": 3})
        refused = [await asyncio.wait_for(client.expect(f"x{i}"), 30) for i in range(30)]
        for i in range(2):
            await client.send({"type": "cancel", "id": f"r{i}"})
        ended = [await asyncio.wait_for(client.expect(f"r{i}"), 30) for i in range(2)]
        await ws.close()
        await reader
    assert {r["error"]["code"] for r in refused} == {"too_many_generations"}, refused
    assert [e["finish_reason"] for e in ended] == ["cancelled", "cancelled"], ended


async def test_a_socket_flooding_invalid_frames_is_closed_and_others_go_on(server):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.ws_url) as good:
            client = WsClient(good)
            reader = asyncio.create_task(client.read_loop())
            await client.send({"type": "generate", "id": "v", "prompt": "victim", "max_tokens": 40,
                               "ignore_eos": True})
            async with session.ws_connect(server.ws_url) as flood:
                sent = 0
                try:
                    while sent < 50_000:
                        await flood.send_str("{not json")
                        sent += 1
                except ConnectionError:
                    pass  # the server closed it while we were still sending
                errors = 0
                while (msg := await flood.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT:
                    errors += 1
                close_code = flood.close_code
            victim = await asyncio.wait_for(client.expect("v"), 120)
            await good.close()
            await reader
    assert close_code == aiohttp.WSCloseCode.POLICY_VIOLATION, (msg, close_code)
    assert errors < 200, f"the server answered {errors} of {sent} invalid frames before closing the socket"
    assert victim["type"] == "done" and victim["usage"]["completion_tokens"] == 40


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it stays open `seconds`."""
    data = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_slow_header_and_slow_body_connections_are_closed(server):
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a header line now and then, never the blank line that ends them
        await asyncio.sleep(0.3)
        writer.write(b"X-Slow: 1\r\n")
    slow_header = await _closed_within(reader, 15)
    writer.close()
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    slow_body = await reader.read(65536)
    answered = time.monotonic()
    slow_body += await _closed_within(reader, 15)
    lingered = time.monotonic() - answered
    writer.close()
    # after the 408 the connection closes (aiohttp's default lingering kept it open 10 s more, reading the body)
    assert lingered < 7, f"the slow-body connection stayed open {lingered:.1f} s after its 408"
    assert b" 200 " not in slow_header
    assert slow_body.startswith(b"HTTP/1.1 408"), slow_body[:200]
    assert b"request_timeout" in slow_body


async def test_an_sse_client_that_stops_reading_is_dropped_at_the_flag_bound(server):
    """`lorafleet serve --sse-max-send-buffer-mb 0.25`: a client that asks for 16 long streamed choices with
    logprobs (megabytes of events) and reads nothing is dropped once its unsent events pass 0.25 MB (counted in
    /metrics), its generations are cancelled, and the server goes on serving; the client never sees [DONE]."""
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "slow", "n": 16, "max_tokens": 1000, "logprobs": 20, "ignore_eos": True,
                       "stream": True}).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    counter = 'lorafleet:events_total{event="sse_closed_slow_reader"'
    async with aiohttp.ClientSession() as session:
        deadline, dropped = time.monotonic() + 60, False
        while not dropped and time.monotonic() < deadline:
            async with session.get(server.url + "/metrics") as resp:
                dropped = any(line.startswith(counter) and line.endswith(" 1.0")
                              for line in (await resp.text()).splitlines())
            await asyncio.sleep(0.2)
        assert dropped, "the silent SSE client was not dropped"
        # ignore_eos: the tiny model samples at temperature 1 and can draw EOS within 2 tokens (1 in ~400)
        async with session.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2,
                                                                      "ignore_eos": True}) as resp:
            assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 2
    slow.settimeout(10)
    received = bytearray()
    try:
        while data := await asyncio.to_thread(slow.recv, 1 << 20):
            received += data
    except ConnectionResetError:
        pass
    slow.close()
    assert b"data: [DONE]" not in received and b"finish_reason" in received
    assert "dropping an SSE stream whose client does not read" in server.output()


async def test_abrupt_disconnects_leave_no_task_errors(tmp_path):
    """Clients vanish mid-stream with several generations on their socket, or from an SSE stream; the server's
    whole output, read after it has exited (when any unretrieved task exception is reported at the latest), has
    no trace."""
    model = _write_assets(tmp_path)[0]
    server = start_server(["--model", str(model)])
    try:
        for _ in range(6):
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(server.ws_url)
            for j in range(4):
                await ws.send_json({"type": "generate", "id": f"d{j}", "prompt": "drop", "max_tokens": 300,
                                    "ignore_eos": True})
            while (await ws.receive_json(timeout=60))["type"] != "delta":
                pass
            ws._response.connection.transport.abort()  # vanish mid-stream, no close frame
            await session.close()
        for _ in range(6):  # the same over OpenAI SSE streams
            async with aiohttp.ClientSession() as session:
                resp = await session.post(server.url + "/v1/completions", json={
                    "prompt": "drop", "max_tokens": 300, "ignore_eos": True, "stream": True, "n": 2})
                await resp.content.readline()
                resp.connection.transport.abort()
        async with aiohttp.ClientSession() as session:  # still serving
            async with session.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}) as resp:
                assert resp.status == 200
    finally:
        code = stop_server(server)
    assert code == 0
    assert "Task exception was never retrieved" not in server.output()
    assert "Traceback" not in server.output(), server.output()[-3000:]


async def test_keyless_server_refuses_rebound_and_malformed_origins(server):
    """With no key, a page on a DNS name rebound to this server is same-origin by Host; it is refused (403),
    as is an Origin that is not one serialized origin; an IP-literal same origin and localhost pass."""
    port = server.url.rsplit(":", 1)[1]
    body = {"prompt": "o", "max_tokens": 1}
    cases = [({"Host": f"rebind.evil.example:{port}", "Origin": f"http://rebind.evil.example:{port}"}, 403),
             ({"Origin": f"{server.url}, http://evil.example"}, 403),
             ({"Origin": server.url}, 200), ({"Origin": "http://localhost:5173"}, 200)]
    # a new connection per request: this server closes keep-alive connections idle for 1 s (--header-timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for headers, status in cases:
            async with session.post(server.url + "/v1/completions", json=body, headers=headers) as resp:
                got = resp.status, await resp.json()
            assert got[0] == status, (headers, got)
            if status == 403:
                assert got[1]["error"]["code"] == "forbidden_origin"


class _SpyTokenizer:
    """A real tokenizer that records the length of every text it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.encoded = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, **kw):
        self.encoded.append(len(text))
        return self.inner.encode(text, **kw)

    def __call__(self, text, **kw):
        self.encoded.append(len(text))
        return self.inner(text, **kw)


def test_an_impossibly_long_prompt_is_refused_before_tokenizing(tmp_path):
    """Tokenizing runs on the event loop (a 100 KB prompt took ~1 s with the demo tokenizer, stalling every
    other socket): a prompt longer than max_model_len tokens of the vocabulary's longest token can never fit,
    and is refused with context_length_exceeded without being tokenized; one that may fit is tokenized."""
    from transformers import AutoTokenizer

    from lorafleet.actors.protocol import ApiError, ParseContext, encode_prompt, prompt_char_bound, render_chat
    from lorafleet.engine.synthetic import write_model

    tokenizer = _SpyTokenizer(AutoTokenizer.from_pretrained(str(write_model("tiny", tmp_path / "m"))))
    bound = prompt_char_bound(tokenizer, 64)
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert bound == 64 * longest
    ctx = ParseContext("m", set(), 64, tokenizer.vocab_size, tokenizer, max_prompt_chars=bound)
    with pytest.raises(ApiError) as refused:
        encode_prompt("a" * (bound + 1), ctx)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"
    with pytest.raises(ApiError) as refused_chat:
        render_chat([{"role": "user", "content": "b" * (bound + 1)}], ctx)
    assert refused_chat.value.param == "messages"
    assert tokenizer.encoded == []  # refused without tokenizing
    assert len(encode_prompt("hello", ctx)) > 0 and tokenizer.encoded == [5]


TOOL_TEMPLATE = ("{%- for m in messages -%}{{ m['role'] }}: {{ m['content'] or '' }}"
                 "{%- for c in m.get('tool_calls') or [] -%}"
                 "{{ c['function']['name'] }}({{ c['function']['arguments'] }}){%- endfor -%}{{ '\\n' }}"
                 "{%- endfor -%}{%- if add_generation_prompt -%}assistant: {%- endif -%}")


def test_a_conversation_is_bounded_as_it_is_rendered_before_tokenizing(tmp_path):
    """A chat template renders more than `content` (tool calls' arguments here, as Llama-3.1's and Qwen2's do), and
    the plain rendering of a model without one writes every role: the rendered conversation is what must fit, so
    one that cannot is refused (context_length_exceeded naming messages) without being tokenized, whichever field
    made it long; one that fits gets HF apply_chat_template's token ids."""
    from transformers import AutoTokenizer

    from lorafleet.actors.protocol import ApiError, ParseContext, prompt_char_bound, render_chat
    from lorafleet.engine.synthetic import write_model

    tokenizer = _SpyTokenizer(AutoTokenizer.from_pretrained(str(write_model("tiny", tmp_path / "m"))))
    bound = prompt_char_bound(tokenizer, 64)
    ctx = ParseContext("m", set(), 64, tokenizer.vocab_size, tokenizer, max_prompt_chars=bound)
    many_roles = [{"role": "r" * 64, "content": ""}] * (bound // 60)  # no template: "role: content" per message
    tokenizer.inner.chat_template = TOOL_TEMPLATE
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "x" * (bound + 1)}}]
    long_call = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "user", "content": "ok"}]
    for convo, template in ((long_call, TOOL_TEMPLATE), (many_roles, None)):
        tokenizer.inner.chat_template = template
        with pytest.raises(ApiError) as refused:
            render_chat(convo, ctx)
        assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")
        assert tokenizer.encoded == []  # refused without tokenizing
    tokenizer.inner.chat_template = TOOL_TEMPLATE
    calls[0]["function"]["arguments"] = '{"q": "fits"}'
    truth = tokenizer.inner.apply_chat_template(long_call, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert render_chat(long_call, ctx) == list(truth) and len(truth) > 10

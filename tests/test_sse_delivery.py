"""How OpenAI SSE streams reach their clients (actors/openai_api.py: Router → SseStream → the response): the
`openai` client reads every choice's chunks, the usage chunk and the end of the stream over a real socket; a
client that reads slowly gets the whole stream, in order, once it reads; a client that stops reading has its
events wait in its own outbox only up to --sse-max-send-buffer-mb, then its connection is dropped and its
generations cancelled while other streams go on. The real aiohttp app and Router serve on a loopback socket; the
step source of tests/test_ws_delivery.py stands in for the scheduler (no model)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_ws_delivery import MODEL, _serve, _silent_client, _stop, _text

from lorafleet.actors.frontend import ConnectionLimits
from lorafleet.actors.openai_api import Completion, _response_json
from lorafleet.actors.protocol import GenerationSpec
from lorafleet.actors.schema import DeltaItem

openai = pytest.importorskip("openai")


def _silent_stream(port: int, body: dict) -> socket.socket:
    """A raw HTTP client with a small receive buffer that asks for a stream and reads nothing (yet)."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return slow


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server ends the response (a chunked body's last chunk) or the connection."""
    sock.settimeout(20)
    got = bytearray()
    try:
        while not got.endswith(b"\r\n0\r\n\r\n") and (data := sock.recv(1 << 20)):
            got += data
    except ConnectionResetError:
        pass
    return bytes(got)


def _events(raw: bytes) -> list[str]:
    """The `data:` payloads of a chunked SSE response, in order."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    text = bytearray()
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        text += rest[:n]
        body = rest[n + 2:]
    return [e.removeprefix("data: ") for e in text.decode().split("\n\n") if e]


async def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


async def _openai_stream(url: str, **extra) -> list:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        stream = await client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=6, stream=True,
                                                 extra_body={"ignore_eos": True}, **extra)
        return [chunk async for chunk in stream]
    finally:
        await client.close()


async def test_the_openai_client_reads_every_choice_the_usage_and_the_end():
    frontend, runner, tasks, url, source = await _serve()
    try:
        chunks = await _openai_stream(url, n=2, stream_options={"include_usage": True})
    finally:
        await _stop(runner, tasks)
    *deltas, last = chunks
    assert all(c.usage is None and "usage" in c.model_fields_set for c in deltas)  # "usage": null, as OpenAI
    for index in range(2):
        mine = [c.choices[0] for c in deltas if c.choices[0].index == index]
        assert [c.text for c in mine] == [_text(k, 12) for k in range(1, 7)]
        assert [c.finish_reason for c in mine] == [None] * 5 + ["length"]
    assert len(deltas) == 12
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 12)
    assert not frontend.router.receivers


async def test_a_slow_reader_under_the_bound_gets_the_whole_stream_in_order():
    """A client that reads nothing while ~2 MB of events are produced (more than the kernel's socket buffers
    hold), then reads: every chunk, in order, the finish and [DONE]."""
    frontend, runner, tasks, url, source = await _serve(text_bytes=4096, step_s=0.002,
                                                        limits=ConnectionLimits(sse_send_buffer=64 << 20))
    try:
        slow = _silent_stream(int(url.rsplit(":", 1)[1]), {"model": MODEL, "prompt": [5], "max_tokens": 500,
                                                           "ignore_eos": True, "stream": True})
        assert await _until(lambda: source.step > 0 and not source.running and source.later == [])
        events = _events(await asyncio.to_thread(_read_all, slow))
        slow.close()
    finally:
        await _stop(runner, tasks)
    assert events.pop() == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events]
    assert len(choices) == 500 and [len(c["text"]) for c in choices] == [4096] * 500
    assert [c["finish_reason"] for c in choices] == [None] * 499 + ["length"]
    assert frontend.hub.counters.get("sse_closed_slow_reader") is None


async def test_a_client_that_stops_reading_is_dropped_at_its_bound_and_others_go_on():
    """Over 1 MB of unsent events the silent client's connection is dropped (counted) and its generations are
    cancelled; a stream started meanwhile and one after it are whole."""
    limit = 1 << 20
    frontend, runner, tasks, url, source = await _serve(text_bytes=4096, step_s=0.002,
                                                        limits=ConnectionLimits(sse_send_buffer=limit))
    try:
        slow = _silent_stream(int(url.rsplit(":", 1)[1]), {"model": MODEL, "prompt": [5], "max_tokens": 60000,
                                                           "n": 4, "ignore_eos": True, "stream": True})
        during = asyncio.create_task(_openai_stream(url))
        assert await _until(lambda: frontend.hub.counters.get("sse_closed_slow_reader") == 1), \
            "the silent client's stream was not dropped"
        assert await _until(lambda: len(source.cancelled) == 4 and not source.running)
        after = await _openai_stream(url)
        for chunks in (await during, after):  # 6 tokens of 4 KB of random text each, then the finish
            assert [len(c.choices[0].text) for c in chunks] == [4096] * 6
            assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["length"]
        assert await _until(lambda: not frontend.router.receivers)
        received = await asyncio.to_thread(_read_all, slow)  # what the kernel held, then the end
        slow.close()
        assert b"[DONE]" not in received and len(received) < 8 * limit
    finally:
        await _stop(runner, tasks)


async def test_many_silent_clients_each_under_its_own_bound_are_dropped_at_the_total_bound():
    """Slow readers on WebSockets and SSE streams, each far under its own 64 MB bound: once what they hold
    together passes --max-send-buffer-total-mb (3 MB here) the ones holding the most are dropped (counted,
    their generations cancelled) until the rest fit, while a reading client's stream is whole; the total
    stays near the bound (one sweep's growth over it at most)."""
    limit = 3 << 20
    frontend, runner, tasks, url, source = await _serve(
        text_bytes=4096, step_s=0.002,
        limits=ConnectionLimits(ws_send_buffer=64 << 20, sse_send_buffer=64 << 20, send_buffer_total=limit))
    port = int(url.rsplit(":", 1)[1])
    silent = [_silent_client(port, 4) for _ in range(2)]
    silent += [_silent_stream(port, {"model": MODEL, "prompt": [5], "max_tokens": 60000, "n": 2, "ignore_eos": True,
                                     "stream": True}) for _ in range(2)]
    held: list[int] = []

    def dropped() -> int:
        held.append(sum(c.unsent() for c in (*frontend.sockets, *frontend.sse_streams) if not c.dropped))
        counters = frontend.hub.counters
        return counters.get("ws_closed_slow_reader", 0) + counters.get("sse_closed_slow_reader", 0)

    try:
        during = asyncio.create_task(_openai_stream(url))
        assert await _until(lambda: dropped() == 4, timeout=60), \
            f"{dropped()} of the 4 silent clients dropped; held at most {max(held)} bytes"
        assert frontend.hub.counters.get("ws_closed_slow_reader") == 2
        assert frontend.hub.counters.get("sse_closed_slow_reader") == 1 + 1
        assert max(held) < 2 * limit, f"the connections held {max(held)} bytes together"
        chunks = await during
        assert [len(c.choices[0].text) for c in chunks] == [4096] * 6
        assert await _until(lambda: not source.running and not frontend.router.receivers)
    finally:
        for sock in silent:
            sock.close()
        await _stop(runner, tasks)


@given(chat=st.booleans(), model=st.text(max_size=12), texts=st.lists(st.text(max_size=20), min_size=1, max_size=5),
       finish=st.sampled_from(["stop", "length"]))
def test_a_response_encoded_choice_by_choice_is_the_dumps_of_the_whole(chat, model, texts, finish):
    """A non-streamed response is encoded one choice at a time (the loop runs between them): the same text as
    `json.dumps` of the whole response, which is what aiohttp's json_response wrote."""
    spec = GenerationSpec(model, None, [1, 2], {}, chat=chat, n=len(texts))
    out = Completion(chat, spec, "cmpl-x", None)
    for index, text in enumerate(texts):
        choice = dataclasses.replace(spec, index=index, n=1)
        out.update(choice, DeltaItem(f"r{index}", [7, 8], text, True, finish, 2, 2))
    assert asyncio.run(_response_json(out)) == json.dumps(out.response())

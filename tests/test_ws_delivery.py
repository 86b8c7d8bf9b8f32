"""How a step's deltas reach WebSocket clients (actors/frontend.py: Router → WsStream → the socket's outbox):
the frames built here are byte for byte what aiohttp's own writer sends; every client sees the same frames in
the same order whether the socket is plain JSON, permessage-deflate or msgpack; a socket whose client stops
reading never holds up the others (its frames wait in its own buffer); OpenAI SSE chunks from the fast path are
the envelope's JSON. The real aiohttp app and Router serve on
a loopback socket; a step source stands in for the scheduler (no model), so the tests are fast and exact."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time

import aiohttp
import msgpack
import pytest
from aiohttp import web
from aiohttp._websocket.writer import WebSocketWriter
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.actors.app import build_app
from lorafleet.actors.channels import LocalChannel
from lorafleet.actors.frontend import MSGPACK_PROTOCOL, ConnectionLimits, Frontend, Router, WsConnection, ws_frame
from lorafleet.actors.hub import ServeHub
from lorafleet.actors.openai_api import Completion, Piece, _json_event
from lorafleet.actors.protocol import GenerationSpec, ParseContext
from lorafleet.actors.schema import Admitted, Cancel, DeltaItem, Rejected, StepDeltas, Submit

MODEL = "base"


class _Transport:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


class _Protocol:
    _paused = False


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("binary", [False, True])
async def test_ws_frame_bytes_match_aiohttp_writer(size, binary):
    payload = bytes((i * 7) % 251 for i in range(size))
    transport = _Transport()
    writer = WebSocketWriter(_Protocol(), transport)
    await writer.send_frame(payload, aiohttp.WSMsgType.BINARY if binary else aiohttp.WSMsgType.TEXT)
    assert ws_frame(payload, binary) == bytes(transport.data)


def _text(k: int, size: int) -> str:
    return (f"<{k}é\n\"\u2028>" * size)[:size]


class _Ws:
    closed, compress = False, 0

    def __init__(self, binary: bool) -> None:
        self.ws_protocol = MSGPACK_PROTOCOL if binary else None


@given(binary=st.booleans(), cid=st.text(max_size=20), index=st.integers(0, 10_000), text=st.text(max_size=40),
       token_ids=st.lists(st.integers(0, (1 << 64) - 1), max_size=4))
def test_a_delta_frame_from_its_prefix_is_the_encoded_dict(binary, cid, index, text, token_ids):
    """The fast path of delta frames (prefix + text + ids) writes exactly what encoding the frame's dict does."""
    frontend = Frontend(ParseContext(MODEL, set(), 1 << 16, 32000), LocalChannel(), LocalChannel(),
                        Router(LocalChannel()), ServeHub())
    conn = WsConnection(frontend, _Ws(binary), None)
    sent: list = []
    conn._queue = sent.append
    frame = {"type": "delta", "id": cid, "index": index, "text": text, "token_ids": token_ids}
    try:
        expected = conn._encode(frame)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a lone surrogate in msgpack: both refuse it
        with pytest.raises(type(exc)):
            conn.post_delta(conn.delta_prefix(cid, index), text, token_ids)
        return
    conn.post_delta(conn.delta_prefix(cid, index), text, token_ids)
    assert sent == [expected]


@given(chat=st.booleans(), cid=st.text(max_size=12), model=st.text(max_size=12), created=st.integers(0, 1 << 40),
       index=st.integers(0, 99), text=st.text(max_size=30), first=st.booleans(),
       finish=st.sampled_from([None, "stop", "length", "cancelled"]), include_usage=st.booleans())
def test_an_sse_chunk_from_its_prefix_is_the_encoded_envelope(chat, cid, model, created, index, text, first, finish,
                                                              include_usage):
    """OpenAI SSE's fast path (Completion.chunk_json for a plain piece) writes exactly the envelope's JSON."""
    spec = GenerationSpec(model, None, [1, 2], {}, index=index, chat=chat, include_usage=include_usage)
    out = Completion(chat, spec, cid, None, created=created)
    piece = Piece(text, [7], first)
    expected = _json_event(out.envelope([out.chunk_choice(spec, piece, finish)], stream=True))
    assert out.chunk_json(spec, piece, finish) == expected
    assert out.chunk_json(spec, piece, finish) == expected  # again, from the cached prefix


class StepSource:
    """The scheduler's stand-in: admits every Submit whose max_tokens is not 13 and whose seed is not 13 (those
    are refused: `queue_full`), a seeded one `seed % 3` steps late; then each step gives every running request
    one token whose text is `text_bytes` long (random from 1 KB on); the last one finishes."""

    def __init__(self, admission: LocalChannel, router_box: LocalChannel, text_bytes: int = 12) -> None:
        self.admission, self.router_box, self.text_bytes = admission, router_box, text_bytes
        self.running: dict[str, list[int]] = {}
        self.later: list[tuple[int, Submit]] = []
        self.cancelled: set[str] = set()
        self.step = 0

    def _mailbox(self) -> None:
        while (msg := self.admission.poll()) is not None:
            if isinstance(msg, Submit):
                seed = msg.params.get("seed")
                self.later.append((self.step + (seed % 3 if seed is not None else 0), msg))
            elif isinstance(msg, Cancel):
                self.cancelled.add(msg.request_id)
                if msg.request_id in self.running:
                    state = self.running.pop(msg.request_id)
                    self.router_box.send(StepDeltas(self.step, [DeltaItem(
                        msg.request_id, [], "", True, "cancelled", state[2], state[0])]))
        due = [msg for step, msg in self.later if step <= self.step]
        self.later = [(step, msg) for step, msg in self.later if step > self.step]
        for msg in due:
            if 13 in (msg.params.get("max_tokens"), msg.params.get("seed")):
                self.router_box.send(Rejected(msg.request_id, "queue_full", "full", 429, None, 1.0))
            else:
                self.running[msg.request_id] = [0, int(msg.params["max_tokens"]), len(msg.prompt_ids)]
                self.router_box.send(Admitted(msg.request_id))

    def _items(self) -> list[DeltaItem]:
        items = []
        for rid, state in list(self.running.items()):
            state[0] += 1
            token = 3 + state[0]
            text = _text(state[0], self.text_bytes) if self.text_bytes < 1024 else \
                base64.b64encode(os.urandom(self.text_bytes)).decode()[: self.text_bytes]  # incompressible
            if state[0] >= state[1]:
                del self.running[rid]
                items.append(DeltaItem(rid, [token], text, True, "length", state[2], state[0], queue_ms=1.0,
                                       ttft_ms=2.0, e2e_ms=3.0))
            else:
                items.append(DeltaItem(rid, [token], text))
        return items

    async def run(self, step_s: float) -> None:
        while True:
            await asyncio.sleep(step_s)
            self._mailbox()
            self.step += 1
            self.router_box.send(StepDeltas(self.step, self._items()))


async def _serve(text_bytes: int = 12, step_s: float = 0.002, limits: ConnectionLimits | None = None):
    admission, scheduler, router_box = LocalChannel(), LocalChannel(), LocalChannel()
    router = Router(router_box)
    frontend = Frontend(ParseContext(MODEL, set(), 1 << 16, 32000), admission, scheduler, router, ServeHub(),
                        limits=limits or ConnectionLimits())
    runner = web.AppRunner(build_app(frontend), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    source = StepSource(admission, router_box, text_bytes)
    tasks = [asyncio.create_task(router.run()), asyncio.create_task(source.run(step_s))]
    return frontend, runner, tasks, f"http://127.0.0.1:{sock.getsockname()[1]}", source


async def _stop(runner, tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()


def _expected(cid: str, max_tokens: int, prompt: int, text_bytes: int = 12) -> list[dict]:
    """What the protocol says a generation of `max_tokens` one-token steps shows (docs/protocol.md)."""
    frames: list[dict] = [{"type": "accepted", "id": cid}]
    frames += [{"type": "delta", "id": cid, "index": 0, "text": _text(k, text_bytes), "token_ids": [3 + k]}
               for k in range(1, max_tokens + 1)]
    frames.append({"type": "done", "id": cid, "index": 0, "remaining": 0, "finish_reason": "length",
                   "usage": {"prompt_tokens": prompt, "completion_tokens": max_tokens},
                   "timing": {"queue_ms": 1.0, "ttft_ms": 2.0, "e2e_ms": 3.0}})
    return frames


async def _run_client(url: str, compress: int, binary: bool, ids: int) -> dict[str, list[dict]]:
    frames: dict[str, list[dict]] = {}
    protocols = (MSGPACK_PROTOCOL,) if binary else ()
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url + "/v1/stream", compress=compress, protocols=protocols) as ws:
        assert ws.compress == compress and (ws.protocol == MSGPACK_PROTOCOL) == binary
        for i in range(ids):
            frame = {"type": "generate", "id": f"c{i}", "model": MODEL, "prompt": [5] * (i + 1),
                     "max_tokens": 13 if i == 3 else 5 + i % 7, "ignore_eos": True}
            await (ws.send_bytes(msgpack.packb(frame)) if binary else ws.send_str(json.dumps(frame)))
        await ws.send_str(json.dumps({"type": "bogus", "id": "x"}))
        done = 0
        while done < ids:
            msg = await asyncio.wait_for(ws.receive(), 30)
            frame = msgpack.unpackb(msg.data) if binary else json.loads(msg.data)
            frames.setdefault(str(frame["id"]), []).append(frame)
            done += frame["type"] == "done" or (frame["type"] == "error" and frame["id"] is not None)
    return frames


@pytest.mark.parametrize(("compress", "binary"), [(0, False), (15, False), (0, True), (15, True)])
async def test_every_socket_kind_gets_the_same_frames_in_order(compress, binary):
    frontend, runner, tasks, url, source = await _serve()
    try:
        got = await _run_client(url, compress, binary, 24)
    finally:
        await _stop(runner, tasks)
    assert got.pop("None") == [{"type": "error", "id": None, "error": {
        "code": "unknown_type", "message": "type: unknown frame type 'bogus' (generate, cancel)", "param": "type"}}]
    assert got.pop("c3") == [{"type": "error", "id": "c3", "error": {"code": "queue_full", "message": "full",
                                                                       "param": None}}]
    for i in range(24):
        if i == 3:
            continue
        assert got[f"c{i}"] == _expected(f"c{i}", 5 + i % 7, i + 1), f"c{i}"


def _silent_client(port: int, ids: int, deflate: bool = False) -> socket.socket:
    """A raw WebSocket client with a small receive buffer that asks for `ids` long generations and never reads
    (with `deflate`, over permessage-deflate)."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extension = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    slow.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n".encode())
    for i in range(ids):
        payload = json.dumps({"type": "generate", "id": f"s{i}", "model": MODEL, "prompt": [5],
                              "max_tokens": 60000, "ignore_eos": True}).encode()
        mask = os.urandom(4)
        slow.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[k % 4] for k, b in enumerate(payload)))
    return slow


async def _backlog_reaches(frontend: Frontend, size: int) -> int:
    deadline, backlog = time.monotonic() + 30, 0
    while time.monotonic() < deadline and backlog <= size:
        backlog = max((c.transport.get_write_buffer_size() for c in frontend.sockets), default=0)
        await asyncio.sleep(0.02)
    return backlog


async def _all_ended(frontend: Frontend) -> bool:
    deadline = time.monotonic() + 10
    while (frontend.sockets or frontend.router.receivers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not frontend.sockets and not frontend.router.receivers


async def test_a_socket_whose_client_stops_reading_does_not_hold_the_others():
    """A client that never reads: its frames of 4 KB tokens back up into its own socket's buffer (megabytes)
    while another socket's generations go on at the step rate; its ids are cancelled when it disconnects."""
    frontend, runner, tasks, url, source = await _serve(text_bytes=4096, step_s=0.005)
    try:
        slow = _silent_client(int(url.rsplit(":", 1)[1]), 16)
        backlog = await _backlog_reaches(frontend, 4 << 20)
        assert backlog > 4 << 20, f"the slow socket's backlog only reached {backlog} bytes"
        started = time.monotonic()
        got = await _run_client(url, 0, False, 8)
        elapsed = time.monotonic() - started
        assert all(got[f"c{i}"][-1]["type"] == "done" for i in range(8) if i != 3)
        # 11 steps at 5 ms make the longest of them: allow for a loaded machine, not for a stalled loop
        assert elapsed < 10, f"the other socket's generations took {elapsed:.1f} s"
        slow.close()
        assert await _all_ended(frontend)
    finally:
        await _stop(runner, tasks)


@pytest.mark.parametrize("deflate", [False, True])
async def test_a_socket_over_its_send_buffer_is_dropped_and_its_generations_cancelled(deflate):
    frontend, runner, tasks, url, source = await _serve(text_bytes=4096, step_s=0.005,
                                                limits=ConnectionLimits(ws_send_buffer=1 << 20))
    try:
        slow = _silent_client(int(url.rsplit(":", 1)[1]), 16, deflate)
        deadline = time.monotonic() + 10
        while not frontend.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [c.compressed for c in frontend.sockets] == [deflate]
        assert await _all_ended(frontend), "the silent client's socket was not dropped"
        assert frontend.hub.counters.get("ws_closed_slow_reader") == 1
        got = await _run_client(url, 0, False, 8)  # the server goes on serving
        assert all(got[f"c{i}"][-1]["type"] == "done" for i in range(8) if i != 3)
        slow.settimeout(10)  # the connection ends: what the kernel still held, then its end (EOF or reset)
        try:
            while slow.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        slow.close()
    finally:
        await _stop(runner, tasks)


async def _frames(url: str, frame: dict) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/v1/stream") as ws:
        await ws.send_json(frame)
        frames = []
        while not frames or not (frames[-1]["type"] == "error" or frames[-1].get("remaining") == 0):
            frames.append(json.loads((await asyncio.wait_for(ws.receive(), 30)).data))
        await ws.send_json({"type": "generate", "id": "after", "model": MODEL, "prompt": [1], "max_tokens": 1})
        frames.append(json.loads((await asyncio.wait_for(ws.receive(), 30)).data))
    return frames


async def test_choices_admitted_at_different_steps_stream_after_one_accepted():
    """n = 3 choices admitted one step apart: the first ones' tokens are held until all are admitted, then
    `accepted`, every choice's deltas in order and one done each (`remaining` 2, 1, 0); nothing after."""
    frontend, runner, tasks, url, source = await _serve()
    try:
        frames = await _frames(url, {"type": "generate", "id": "c", "model": MODEL, "prompt": [5, 6], "n": 3,
                                     "seed": 100, "max_tokens": 4, "ignore_eos": True})
    finally:
        await _stop(runner, tasks)
    assert frames.pop() == {"type": "accepted", "id": "after"}
    assert frames[0] == {"type": "accepted", "id": "c"}
    assert [f["remaining"] for f in frames if f["type"] == "done"] == [2, 1, 0]
    for index in range(3):
        mine = [f for f in frames[1:] if f["index"] == index]
        assert [f["token_ids"] for f in mine[:-1]] == [[4], [5], [6], [7]]
        assert [f["text"] for f in mine[:-1]] == [_text(k, 12) for k in range(1, 5)]
        assert mine[-1]["type"] == "done" and mine[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4}
    assert len(frames) == 1 + 3 * 5


async def test_one_refused_choice_ends_the_id_with_one_error_and_cancels_the_others():
    frontend, runner, tasks, url, source = await _serve()
    try:
        frames = await _frames(url, {"type": "generate", "id": "c", "model": MODEL, "prompt": [5], "n": 3,
                                     "seed": 11, "max_tokens": 50, "ignore_eos": True})
    finally:
        await _stop(runner, tasks)
    assert frames == [{"type": "error", "id": "c", "error": {"code": "queue_full", "message": "full", "param": None}},
                      {"type": "accepted", "id": "after"}]
    assert len(source.cancelled) == 2 and not source.running.keys() & source.cancelled
    assert not frontend.router.receivers


@pytest.mark.parametrize("compress", [0, 15])
async def test_a_socket_closed_for_its_frame_rate_gets_every_answer_before_the_close(compress):
    """Burst 10, an invalid frame costs 10: the first invalid frame is answered, the second is answered and
    closes the socket (1008); both error frames arrive before the close frame, deflate or not."""
    limits = ConnectionLimits(ws_frame_rate=5.0, ws_frame_burst=10.0)
    frontend, runner, tasks, url, source = await _serve(limits=limits)
    try:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(url + "/v1/stream", compress=compress) as ws:
            await ws.send_str("not json")
            await ws.send_str("[1]")
            got = [await asyncio.wait_for(ws.receive(), 10) for _ in range(3)]
    finally:
        await _stop(runner, tasks)
    assert [json.loads(m.data)["error"]["code"] for m in got[:2]] == ["invalid_json", "invalid_json"]
    assert got[2].type == aiohttp.WSMsgType.CLOSE and got[2].data == 1008


async def test_shutdown_closes_every_socket_with_1001():
    frontend, runner, tasks, url, source = await _serve()
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(url + "/v1/stream", compress=c) for c in (0, 15)]
        for ws in sockets:
            await ws.send_json({"type": "generate", "id": "g", "model": MODEL, "prompt": [1], "max_tokens": 60000})
            assert (await asyncio.wait_for(ws.receive(), 10)).json()["type"] == "accepted"
        cleanup = asyncio.create_task(runner.cleanup())
        for ws in sockets:
            while (msg := await asyncio.wait_for(ws.receive(), 10)).type == aiohttp.WSMsgType.TEXT:
                assert msg.json()["type"] == "delta"
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
            await ws.close()
        await asyncio.wait_for(cleanup, 10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not frontend.sockets and not frontend.router.receivers


async def test_a_client_gone_before_its_response_starts_is_not_logged_as_a_server_failure(caplog):
    """A WebSocket upgrade half-closed at once (aiohttp closes it before the 101 goes out) and an SSE request
    whose client leaves while it waits for admission: nothing to answer, no ERROR traceback of a server bug;
    the SSE generation is cancelled and the server goes on serving."""
    frontend, runner, tasks, url, source = await _serve(step_s=0.2)
    port = int(url.rsplit(":", 1)[1])
    try:
        with caplog.at_level(logging.INFO, logger="lorafleet"):
            upgrade = socket.create_connection(("127.0.0.1", port))
            upgrade.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            upgrade.shutdown(socket.SHUT_WR)
            body = json.dumps({"model": MODEL, "prompt": [5], "max_tokens": 50, "seed": 2, "stream": True}).encode()
            sse = socket.create_connection(("127.0.0.1", port))
            sse.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await asyncio.sleep(0.1)
            sse.close()  # gone before its admission (2 steps of 0.2 s)
            upgrade.settimeout(5)
            assert await asyncio.to_thread(upgrade.recv, 4096) == b""
            upgrade.close()
            deadline = time.monotonic() + 10
            while not source.cancelled and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            got = await _run_client(url, 0, False, 2)
        assert len(source.cancelled) == 1
        assert got["c1"][-1]["type"] == "done"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await _stop(runner, tasks)

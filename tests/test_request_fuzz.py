"""A live `lorafleet serve` on the embedded demo model, attacked with the request faults of issue #16 one by
one and then with seeded random bodies and frames (HTTP JSON, WS JSON and msgpack: every field, every JSON
type, extreme and tiny numbers, huge strings and lists, deep nesting, lone surrogates, non-UTF-8 bytes,
msgpack extension types) while a canary generation stream on another socket must keep giving the same
text: no server, actor or executor death, no 5xx, every error names a field, no traceback or path."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time

import aiohttp
import msgpack
import pytest
from test_request_validation import ALTERNATING_TEMPLATE
from test_serve_support import get_json, start_server, stop_server

FUZZ_SECONDS = 40.0
ADMIN = "fuzz-admin"
LOAD_ERRORS = ("queue_full", "too_many_generations")  # refusals for load, not for a field: they name none
CANARY = {"model": "upper", "prompt": "canary line\n", "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lorafleet.engine.demo import demo_adapter_dirs, demo_model_dir

    root = tmp_path_factory.mktemp("fuzz")
    model = shutil.copytree(demo_model_dir(), root / "model")
    (model / "chat_template.jinja").write_text(ALTERNATING_TEMPLATE)  # raises on non-alternating roles
    adapters = demo_adapter_dirs()
    shutil.copytree(adapters["reverse"], root / "adapters" / "rev")
    proc = start_server(["--model", str(model), "--served-model-name", "demo", "--adapter",
                         f"upper={adapters['upper']}", "--adapter-root", str(root / "adapters"),
                         "--admin-key", ADMIN, "--ws-frame-rate", "1000000"])  # the flood limit has its own test
    yield proc
    assert stop_server(proc) == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()[-5000:]  # no internal error was even logged


async def _post(session, url: str, body=None, data: bytes | None = None, headers=None) -> tuple[int, str]:
    kwargs = {"data": data, "headers": {"Content-Type": "application/json", **(headers or {})}} \
        if data is not None else {"json": body, "headers": headers}
    async with session.post(url, **kwargs) as resp:
        return resp.status, await resp.text()


def _check_text(text: str) -> None:
    """No traceback, no server path and no server-side failure in anything a client receives."""
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert "internal_error" not in text and "executor_failed" not in text, text[:500]
    assert "/site-packages/" not in text and "/tmp/" not in text and ".py" not in text, text[:500]


def _check_error(status: int, text: str) -> dict:
    _check_text(text)
    assert status < 500, (status, text[:500])
    error = json.loads(text)["error"]
    assert error["param"] or error["code"] in LOAD_ERRORS, error  # every error names a field
    return error


class Socket:
    """A WS connection that collects frames per id (`None` for frames not tied to a generation)."""

    def __init__(self, ws, binary: bool) -> None:
        self.ws, self.binary = ws, binary
        self.frames: dict = {}
        self.violations: list[str] = []
        self.ended: dict[str, asyncio.Future] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                frame = msgpack.unpackb(msg.data, raw=False)
            else:
                break
            try:
                _check_text(json.dumps(frame))
                assert frame["type"] != "error" or frame["error"]["param"] or frame["error"]["code"] in LOAD_ERRORS, \
                    "an error naming no field"
            except AssertionError as exc:
                self.violations.append(f"{exc}: {frame}")
            self.frames.setdefault(frame.get("id"), []).append(frame)
            if frame.get("id") is not None and frame["type"] in ("done", "error"):
                self.end(frame["id"]).done() or self.end(frame["id"]).set_result(frame)
        self.closed.set_result(self.ws.close_code)

    def end(self, cid: str) -> asyncio.Future:
        return self.ended.setdefault(cid, asyncio.get_running_loop().create_future())

    async def send(self, payload) -> None:
        if isinstance(payload, bytes):
            await self.ws.send_bytes(payload)
        elif isinstance(payload, str):
            await self.ws.send_str(payload)
        elif self.binary:
            await self.ws.send_bytes(_pack(payload))
        else:
            await self.ws.send_str(json.dumps(payload))

    async def generate(self, cid: str, body: dict, timeout: float = 60.0) -> dict:
        await self.send({"type": "generate", "id": cid, **body})
        return await self.wait(cid, timeout)

    async def wait(self, cid: str, timeout: float = 60.0) -> dict:
        end = await asyncio.wait_for(self.end(cid), timeout)
        assert not self.violations, self.violations[:3]
        text = "".join(f.get("text", "") for f in self.frames.get(cid, []) if f["type"] == "delta")
        return {"end": end, "text": text, "types": [f["type"] for f in self.frames.get(cid, [])]}

    def assert_open(self) -> None:
        assert not self.closed.done(), f"the socket closed ({self.ws.close_code})"


def _pack(value) -> bytes:
    """msgpack bytes; a lone surrogate goes out as its (invalid) UTF-8 bytes inside a str."""
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


async def _socket(session, url: str, binary: bool) -> Socket:
    ws = await session.ws_connect(url, protocols=("lorafleet.msgpack",) if binary else (), max_msg_size=0)
    return Socket(ws, binary)


# one test per fault of the issue -------------------------------------------------------------------------
async def test_seed_and_top_k_beyond_64_bits_are_400_naming_them(server):
    async with aiohttp.ClientSession() as session:
        url = server.url + "/v1/completions"
        for field, value in (("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 2**63), ("top_k", 2**64)):
            status, text = await _post(session, url, {"prompt": "abc\n", field: value, "max_tokens": 2})
            assert status == 400 and _check_error(status, text)["param"] == field
        for binary in (False, True):
            sock = await _socket(session, server.ws_url, binary)
            got = await sock.generate("s", {"prompt": "abc\n", "seed": 2**64 if not binary else 2**64 - 1})
            assert got["end"]["error"]["param"] == "seed" and got["types"] == ["error"]
            assert (await sock.generate("ok", {"prompt": "abc\n", "seed": 2**63 - 1, "max_tokens": 3}))["end"][
                "type"] == "done"
            await sock.ws.close()
        assert (await get_json(session, server.url + "/health"))[0] == 200


async def test_tiny_temperature_and_top_p_give_the_greedy_output(server):
    async with aiohttp.ClientSession() as session:
        url = server.url + "/v1/completions"
        body = {"model": "upper", "prompt": "tiny values\n", "max_tokens": 14, "seed": 3}
        texts = {}
        for name, extra in (("greedy", {"temperature": 0}), ("t", {"temperature": 1e-300}),
                            ("p", {"temperature": 1.0, "top_p": 1e-300}), ("both", {"temperature": 5e-324,
                                                                                     "top_p": 5e-324})):
            status, text = await _post(session, url, {**body, **extra})
            assert status == 200, text
            texts[name] = json.loads(text)["choices"][0]["text"]
        assert texts["greedy"] == "TINY VALUES\n"
        assert texts == dict.fromkeys(texts, texts["greedy"])
        assert (await get_json(session, server.url + "/health"))[0] == 200


@pytest.mark.parametrize("binary", [False, True])
async def test_surrogate_in_ws_id_gets_an_error_frame_and_the_socket_goes_on(server, binary):
    async with aiohttp.ClientSession() as session:
        sock = await _socket(session, server.ws_url, binary)
        await sock.send('{"type": "generate", "id": "\\ud800", "prompt": "abc\\n"}')  # JSON, even on msgpack
        if binary:  # the same id as a msgpack frame: a str with the surrogate's (invalid) UTF-8 bytes
            await sock.send(_pack({"type": "generate", "id": "\ud800", "prompt": "abc\n"}))
        ok = await sock.generate("after", {"prompt": "abc\n", "model": "upper", "max_tokens": 8, "temperature": 0})
        assert ok["end"]["type"] == "done" and ok["text"] == "ABC\n"
        unnamed = sock.frames.get(None, [])
        assert len(unnamed) == 1 + binary and all(f["type"] == "error" for f in unnamed), unnamed
        assert unnamed[0]["error"]["param"] == "id"
        sock.assert_open()
        await sock.ws.close()


async def test_chat_template_error_is_400_naming_messages_and_the_socket_goes_on(server):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        status, text = await _post(session, server.url + "/v1/chat/completions", bad)
        error = _check_error(status, text)
        assert (status, error["code"], error["param"]) == (400, "invalid_parameter", "messages")
        assert "roles must alternate" in error["message"]
        sock = await _socket(session, server.ws_url, False)
        await sock.send({"type": "generate", "id": "long", "model": "upper", "prompt": "keep going\n",
                         "max_tokens": 40, "ignore_eos": True, "temperature": 0})
        failed = await sock.generate("chat", bad)
        assert failed["types"] == ["error"] and failed["end"]["error"]["param"] == "messages"
        long = await sock.wait("long")
        assert long["end"]["type"] == "done" and long["text"].startswith("KEEP GOING\n")
        sock.assert_open()
        await sock.ws.close()


async def test_two_stop_strings_completed_by_one_token_earliest_wins(server):
    async with aiohttp.ClientSession() as session:
        url = server.url + "/v1/completions"
        body = {"model": "upper", "prompt": "abcdef\n", "max_tokens": 10, "temperature": 0,
                "return_token_ids": True}
        free = json.loads((await _post(session, url, body))[1])["choices"][0]
        assert free["text"] == "ABCDEF\n" and len(free["token_ids"]) >= 7  # one character per token
        for stops in (["BCD", "CD"], ["CD", "BCD"]):  # both end with the token "D"
            for stream in (False, True):
                status, text = await _post(session, url, {**body, "stop": stops, "stream": stream})
                assert status == 200
                if stream:
                    chunks = [json.loads(line[6:]) for line in text.splitlines()
                              if line.startswith("data: {")]
                    out = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
                else:
                    out = json.loads(text)["choices"][0]["text"]
                assert out == "A", (stops, stream, out)


async def test_lora_path_with_nul_or_over_4096_bytes_is_400(server):
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as session:
        url = server.url + "/v1/load_lora_adapter"
        for path in ("rev\x00x", "a/" * 2100, "\ud800"):
            status, text = await _post(session, url, {"lora_name": "x", "lora_path": path}, headers=headers)
            assert status == 400 and _check_error(status, text)["param"] == "lora_path"
        status, text = await _post(session, url, {"lora_name": "\udc00", "lora_path": "rev"}, headers=headers)
        assert status == 400 and _check_error(status, text)["param"] == "lora_name"


async def test_the_issues_500s_are_400s_naming_the_field_over_http_and_ws(server):
    """Issue #16: these gave HTTP 500 text/plain, and over WS a closed socket (1006) whose other generations
    never got their `done`."""
    cases = [  # (raw JSON body, the param named)
        (b'{"prompt": "abc\\n", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
        (b'{"prompt": "ab\\ud800c"}', "prompt"),
        (b'{"prompt": "abc", "seed": -9223372036854775809}', "seed"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
    ]
    chat = (b'{"messages": [{"role": "user", "content": "x\\udfffy"}]}', "messages[0].content")
    async with aiohttp.ClientSession() as session:
        for data, param in cases:
            status, text = await _post(session, server.url + "/v1/completions", data=data)
            assert status == 400 and _check_error(status, text)["param"] == param, (data[:60], text[:300])
        status, text = await _post(session, server.url + "/v1/chat/completions", data=chat[0])
        assert status == 400 and _check_error(status, text)["param"] == chat[1]
        for binary in (False, True):
            sock = await _socket(session, server.ws_url, binary)
            await sock.send({"type": "generate", "id": "long", "model": "upper", "prompt": "still here\n",
                             "max_tokens": 30, "ignore_eos": True, "temperature": 0})
            for i, (data, param) in enumerate([*cases, chat]):
                frame = data.replace(b"{", b'{"type": "generate", "id": "e%d", ' % i, 1) if data[:1] == b"{" \
                    else data
                await sock.send(frame.decode())
                if data[:1] == b"{" and param != "body":
                    got = await sock.wait(f"e{i}")
                    assert got["types"] == ["error"] and got["end"]["error"]["param"] == param, got
            if binary:
                await sock.send(b"\x91" * 100_000 + b"\xc0")  # msgpack nested 100 000 deep
                await sock.send(_pack({"type": "generate", "id": "x", "prompt": "a", "seed": msgpack.ExtType(1, b"")}))
                assert (await sock.wait("x"))["end"]["error"]["param"] == "seed"
            long = await sock.wait("long")
            assert long["end"]["type"] == "done" and long["text"].startswith("STILL HERE\n")
            assert [f["error"]["param"] for f in sock.frames.get(None, [])] == ["body"] * (2 + binary)
            sock.assert_open()
            await sock.ws.close()


# the fuzz ----------------------------------------------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "ignore_eos", "slo_ttft_ms", "stream", "stream_options",
          "return_token_ids", "n", "best_of", "logprobs", "echo", "id", "type", "min_tokens", "presence_penalty",
          "logit_bias", "user"]
SPECIAL_NUMBERS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**400, -(10**400),
                   1e-300, 5e-324, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), 0.5, 100, 101, 256, 255]


def _value(rng: random.Random, depth: int = 0, binary: bool = False):
    roll = rng.random()
    if roll < 0.25:
        number = rng.choice(SPECIAL_NUMBERS)
        if binary and isinstance(number, int) and not -(2**63) <= number < 2**64:
            return 2**64 - 1
        return number
    if roll < 0.45:
        return rng.choice(["", "a", "abc\n", "\ud800", "x\udfff", "é😀", "\x00", "x" * rng.choice([300, 5000, 200_000]),
                           "upper", "demo", "rev", "user", "generate"])
    if roll < 0.55:
        return rng.choice([None, True, False])
    if roll < 0.65 and binary:
        return rng.choice([b"\xff\xfe", msgpack.ExtType(rng.randint(0, 127), b"x"), msgpack.Timestamp(1, 2)])
    if depth > 3:
        return rng.randint(-5, 300)
    if roll < 0.8:
        size = rng.choice([0, 1, 2, 5, 3000])
        return [rng.randint(-1, 400) if size > 100 else _value(rng, depth + 1, binary) for _ in range(size)]
    return {rng.choice(FIELDS + ["role", "content", "text", "\ud800"]): _value(rng, depth + 1, binary)
            for _ in range(rng.randint(0, 4))}


def _body(rng: random.Random, binary: bool = False) -> dict:
    body = {rng.choice(FIELDS): _value(rng, binary=binary) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.6:
        body.setdefault("prompt", rng.choice(["abc\n", [5, 6, 7], "hello\n"]))
    if rng.random() < 0.3:
        body["messages"] = [{"role": rng.choice(["user", "assistant", "system", "x"]),
                             "content": _value(rng, 2, binary)} for _ in range(rng.randint(1, 3))]
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 8) if body["max_tokens"] > 0 else body["max_tokens"]
    body.setdefault("max_tokens", rng.randint(1, 8))
    return body


def _raw_json(rng: random.Random) -> bytes:
    """Bodies json.dumps cannot make: deep nesting, invalid UTF-8, broken syntax, huge literals."""
    return rng.choice([b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000, b'{"prompt": "\xff\xfe"}',
                       b'{"prompt": "abc", "seed": 1' + b"0" * 5000 + b"}", b'{"prompt": "a", "temperature": 1'
                       + b"0" * 400 + b"}", b"\x00\x01", b'{"prompt": "a", "top_p": NaN}', b"[]", b"null",
                       b'{"a": ' * 50_000])


def _raw_msgpack(rng: random.Random) -> bytes:
    return rng.choice([b"\x91" * 100_000 + b"\xc0", b"\x81\xa4type\xa3\xff\xfe\xfd", b"\xc1", b"\xd4\x05x",
                       b"\x81\xa2id\xd7\xff" + b"\x00" * 8, b"\x81\xcf" + b"\xff" * 8 + b"\xc0", b"\x82"])


async def _canary(session, url: str, want: str, stop: asyncio.Event) -> int:
    """Generate the canary again and again on its own socket; every answer must equal `want`."""
    sock, count = await _socket(session, url, False), 0
    while not stop.is_set() or count == 0:
        got = await sock.generate(f"canary-{count}", CANARY)
        assert got["end"]["type"] == "done" and got["text"] == want, got
        count += 1
    await sock.ws.close()
    return count


async def _fuzz_http(session, server, rng: random.Random, deadline: float) -> int:
    sent = 0
    while time.monotonic() < deadline:
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        if rng.random() < 0.2:
            status, text = await _post(session, server.url + path, data=_raw_json(rng))
        else:
            data = json.dumps(_body(rng)).encode()  # ensure_ascii: surrogates travel as \\ud800 escapes
            status, text = await _post(session, server.url + path, data=data)
        sent += 1
        if status >= 400:
            _check_error(status, text)
        else:
            _check_text(text)
    return sent


async def _fuzz_ws(session, server, rng: random.Random, deadline: float, binary: bool) -> int:
    sock, sent = await _socket(session, server.ws_url, binary), 0
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.15:
            await sock.send(_raw_msgpack(rng) if binary else _raw_json(rng).decode("utf-8", "replace"))
        elif roll < 0.3:  # a JSON text frame, also on a msgpack socket
            await sock.send(json.dumps({"type": "generate", "id": rng.choice(["\ud800", f"j{sent}"]), **_body(rng)}))
        else:
            body = {"type": rng.choice(["generate"] * 8 + ["cancel", "bogus", None]), **_body(rng, binary)}
            body.setdefault("id", rng.choice([f"f{sent}", "\ud800", "", 5, None, "x" * 300]))
            data = _pack(body) if binary else json.dumps(body)
            await sock.send(data)
        sent += 1
        if sent % 10 == 0:  # the socket still answers, in order, and is open
            ping = await sock.generate(f"ping{sent}", {"prompt": "ok\n", "max_tokens": 2})
            assert ping["end"]["type"] == "done", ping
            sock.assert_open()
    await sock.ws.close()
    return sent


async def test_fuzz_live_server_keeps_serving_and_the_canary_keeps_its_answer(server):
    async with aiohttp.ClientSession() as session:
        _, health = await get_json(session, server.url + "/health")
        pids = [e["pid"] for e in health["executors"]]
        status, text = await _post(session, server.url + "/v1/completions", CANARY)
        want = json.loads(text)["choices"][0]["text"]
        assert status == 200 and want == "CANARY LINE\n"
        stop = asyncio.Event()
        canary = asyncio.create_task(_canary(session, server.ws_url, want, stop))
        deadline = time.monotonic() + FUZZ_SECONDS
        counts = await asyncio.gather(
            _fuzz_http(session, server, random.Random(1), deadline),
            _fuzz_ws(session, server, random.Random(2), deadline, binary=False),
            _fuzz_ws(session, server, random.Random(3), deadline, binary=True))
        stop.set()
        canaries = await asyncio.wait_for(canary, 120)
        status, health = await get_json(session, server.url + "/health")
        assert status == 200 and [e["pid"] for e in health["executors"]] == pids and all(
            e["alive"] for e in health["executors"]), health
        status, text = await _post(session, server.url + "/v1/completions", CANARY)
        assert json.loads(text)["choices"][0]["text"] == want
    print(f"fuzz requests http/ws-json/ws-msgpack: {counts}, canary generations: {canaries}")
    assert min(counts) > 20 and canaries > 3, (counts, canaries)
    assert server.proc.poll() is None


async def test_a_key_twice_in_one_object_is_refused_naming_it(server):
    """{"max_tokens": 2, "max_tokens": 9} used to run with 9 (the parser kept the last value and silently
    dropped the other), over HTTP and WS, JSON and msgpack alike."""
    body = b'{"model": "upper", "prompt": "abc\\n", "max_tokens": 2, "temperature": 0, "max_tokens": 9}'
    nested = b'{"messages": [{"role": "user", "content": "a", "content": "b"}], "max_tokens": 2}'
    async with aiohttp.ClientSession() as session:
        status, text = await _post(session, server.url + "/v1/completions", data=body)
        error = _check_error(status, text)
        assert (status, error["code"], error["param"]) == (400, "invalid_json", "max_tokens"), text
        status, text = await _post(session, server.url + "/v1/chat/completions", data=nested)
        assert (status, _check_error(status, text)["param"]) == (400, "content"), text
        for binary in (False, True):
            sock = await _socket(session, server.ws_url, binary)
            frame = body.replace(b"{", b'{"type": "generate", "id": "d", ', 1)
            if binary:  # msgpack map with the key twice: fixmap of 7 pairs written by hand
                pairs = [("type", "generate"), ("id", "d"), ("model", "upper"), ("prompt", "abc\n"),
                         ("max_tokens", 2), ("temperature", 0), ("max_tokens", 9)]
                frame = bytes([0x80 | len(pairs)]) + b"".join(_pack(k) + _pack(v) for k, v in pairs)
                await sock.ws.send_bytes(frame)
            else:
                await sock.ws.send_str(frame.decode())
            ok = await sock.generate("ok", {"model": "upper", "prompt": "abc\n", "max_tokens": 3, "temperature": 0})
            assert ok["end"]["type"] == "done" and ok["text"] == "ABC"
            unnamed = sock.frames.get(None, [])
            assert [(f["error"]["code"], f["error"]["param"]) for f in unnamed] == [("invalid_json", "max_tokens")]
            assert "d" not in sock.frames
            sock.assert_open()
            await sock.ws.close()
        assert (await get_json(session, server.url + "/health"))[0] == 200

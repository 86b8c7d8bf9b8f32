"""Security posture over real sockets: the dashboard feed needs its key, browser WebSockets/POSTs from a
foreign Origin are refused, JSON only under a JSON Content-Type (415), adapter files linking out of the root
are never served or loaded, and no response carries an absolute server path."""

from __future__ import annotations

import json
import shutil

import aiohttp
import pytest
from test_serve_support import start_server, stop_server
from test_serve_support import write_assets as _write_assets

from lorafleet.actors.security import files_inside, origin_allowed

API, ADMIN, DASH = "api-k", "admin-k", "dash-k"


def test_origin_rule():
    allowed = frozenset({"https://ok.example"})
    assert origin_allowed(None, "h:1", allowed)  # not a browser
    assert origin_allowed("http://h:1", "h:1", allowed, keyed=True)  # same origin
    assert origin_allowed("http://localhost:5173", "h:1", allowed)
    assert origin_allowed("https://ok.example", "h:1", allowed)
    assert not origin_allowed("https://evil.example", "h:1", allowed)
    assert not origin_allowed("null", "h:1", allowed)
    assert origin_allowed("https://evil.example", "h:1", frozenset({"*"}))


def test_origin_rule_is_strict_and_resists_dns_rebinding():
    none = frozenset()
    # an Origin is one serialized origin: lists, paths, user info and stray text are not origins
    for odd in ("http://127.0.0.1:8000, http://evil.example", "http://localhost/x", "http://u@localhost",
                "http://localhost:99999", "http://localhost?x", "http://local host", "http:/localhost"):
        assert not origin_allowed(odd, "127.0.0.1:8000", none, keyed=True), odd
    assert origin_allowed(" HTTP://LocalHost:3000/ ", "127.0.0.1:8000", none)
    # keyless: a page whose DNS name was rebound to this server is "same origin" by Host; only IP literals
    # and localhost names count as the server's own then (the page would otherwise drive it freely)
    assert not origin_allowed("http://rebind.evil.example:8000", "rebind.evil.example:8000", none)
    assert origin_allowed("http://10.0.0.5:8000", "10.0.0.5:8000", none)
    assert origin_allowed("http://[fe80::1]:8000", "[fe80::1]:8000", none)
    assert origin_allowed("http://gpu-box:8000", "gpu-box:8000", none, keyed=True)  # a key guards it anyway
    assert origin_allowed("http://gpu-box:8000", "gpu-box:8000", frozenset({"http://gpu-box:8000"}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    model, adapter_root, adapters = _write_assets(root)
    served = root / "served"
    outside = root / "outside"
    outside.mkdir()
    source = next(iter(adapters.values()))
    shutil.copytree(source, served / "good")
    shutil.copytree(source, served / "linked")
    (served / "broken").mkdir()
    (served / "broken" / "adapter_config.json").write_text("{not json")
    secret = outside / "secret.safetensors"
    shutil.copy(source / "adapter_model.safetensors", secret)
    (served / "linked" / "adapter_model.safetensors").unlink()
    (served / "linked" / "adapter_model.safetensors").symlink_to(secret)
    (served / "broken").rename(root / "broken-later")  # loaded at runtime, after start-up
    server = start_server(["--model", str(model), "--adapter-root", str(served), "--api-key", API, "--admin-key",
                           ADMIN, "--dashboard-key", DASH, "--allowed-origin", "https://ok.example"])
    (root / "broken-later").rename(served / "broken")
    yield server, root
    stop_server(server)


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_dashboard_needs_its_key_and_the_cookie_opens_the_feed(setup):
    server, _ = setup
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:  # cookies for an IP
        async with session.get(server.url + "/dashboard") as resp:
            assert resp.status == 401
        async with session.get(server.url + "/dashboard", headers=_bearer(API)) as resp:
            assert resp.status == 401  # the dashboard has its own key here
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(server.url + "/ws/dashboard")
        assert refused.value.status == 401
        async with session.get(server.url + f"/dashboard?api_key={DASH}") as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            assert DASH not in resp.headers.get("Set-Cookie", "")  # the cookie holds a token, not the key
        async with session.ws_connect(server.url + "/ws/dashboard") as ws:  # the session's cookie
            first = await ws.receive_json(timeout=30)
        assert isinstance(first, dict)
    async with aiohttp.ClientSession() as session:  # admin key opens it too
        async with session.get(server.url + "/dashboard", headers=_bearer(ADMIN)) as resp:
            assert resp.status == 200


async def test_foreign_origin_websockets_and_posts_are_refused(setup):
    server, _ = setup
    ws_url = server.ws_url
    async with aiohttp.ClientSession(headers=_bearer(API)) as session:
        for origin in ("https://evil.example", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url, headers={"Origin": origin})
            assert refused.value.status == 403
        for origin in ("https://ok.example", "http://localhost:3000", server.url, None):
            headers = {"Origin": origin} if origin else {}
            async with session.ws_connect(ws_url, headers=headers) as ws:
                await ws.send_json({"type": "generate", "id": "o", "prompt": "hi", "max_tokens": 2})
                frames = [await ws.receive_json(timeout=60) for _ in range(2)]
            assert frames[0]["type"] == "accepted", frames
        async with session.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                headers={"Origin": "https://evil.example"}) as resp:
            body = await resp.json()
        assert resp.status == 403 and body["error"]["code"] == "forbidden_origin"


async def test_json_only_under_a_json_content_type(setup):
    server, _ = setup
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    url = server.url + "/v1/completions"
    async with aiohttp.ClientSession(headers=_bearer(API)) as session:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", None):
            headers = {"Content-Type": kind} if kind else {}
            async with session.post(url, data=body.encode(), headers=headers, skip_auto_headers=["Content-Type"]) \
                    as resp:
                got = resp.status, await resp.json()
            assert got[0] == 415 and got[1]["error"]["code"] == "unsupported_media_type", (kind, got)
            assert got[1]["error"]["param"] == "Content-Type"
        async with session.post(url, data=body, headers={"Content-Type": "application/json; charset=utf-8"}) as resp:
            assert resp.status == 200


async def test_links_out_of_the_root_are_never_served_and_no_path_leaks(setup):
    server, root = setup
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v1/models", headers=_bearer(API)) as resp:
            models = (await resp.json())["data"]
        load = server.url + "/v1/load_lora_adapter"
        async with session.post(load, json={"lora_name": "l2", "lora_path": "linked"}, headers=_bearer(ADMIN)) as resp:
            linked = resp.status, await resp.json()
        async with session.post(load, json={"lora_name": "b", "lora_path": "broken"}, headers=_bearer(ADMIN)) as resp:
            broken = resp.status, await resp.json()
        async with session.post(load, json={"lora_name": "g", "lora_path": "good"}, headers=_bearer(ADMIN)) as resp:
            again = resp.status, await resp.json()
    names = {m["id"] for m in models}
    assert "good" in names and "linked" not in names
    assert "links" in server.output() and "outside --adapter-root" in server.output()
    assert linked[0] == 403 and linked[1]["error"]["code"] == "forbidden_path"
    assert broken[0] == 400 and broken[1]["error"]["code"] == "adapter_invalid", broken
    assert again[0] == 200, again
    for text in (json.dumps(models), json.dumps(linked), json.dumps(broken)):
        assert str(root) not in text and "/tmp" not in text, text
    assert all(not m["root"].startswith("/") for m in models)


def test_files_inside(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x").write_text("x")
    (tmp_path / "out").write_text("o")
    assert files_inside(root, root / "a") is None
    (root / "a" / "y").symlink_to(tmp_path / "out")  # never read: not looked at (a directory may hold many files)
    assert files_inside(root, root / "a") is None
    (root / "a" / "adapter_model.safetensors").symlink_to(tmp_path / "out")
    assert files_inside(root, root / "a") == "adapter_model.safetensors"
    (root / "b").symlink_to(tmp_path, target_is_directory=True)
    assert files_inside(root, root / "b") == "b"

"""The replica deployment: one Ray Serve replica owns one `lorafleet serve` child and proxies to it.

Calls (from the ingress, through `AdapterAffinityRouter`):
- `http(method, path, body, headers)`: a stream whose first item is {"replica", "status", "headers"} and
  whose further items are the child's response bytes;
- `stream(frame)`: the child's WebSocket frames for one `generate` frame (the `accepted` frame gains
  `replica`); cancelling the Ray call sends the child a `cancel`;
- `admin(op, body, headers)`: one load/unload on this replica (the ingress broadcasts it to all).

Failures the ingress may retry elsewhere raise `ReplicaDown` before the first item: the child is gone, the
connection is refused, or the child answered 503 for a dead executor or a drain. After the first item a
failure becomes an error frame (WebSocket) or an SSE error event. `check_health` fails once the child has
exited, so Ray replaces the replica (and its child); the new one replays runtime-loaded adapters.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from ray import serve
from ray.serve.handle import DeploymentHandle

from lorafleet.actors.fleet.child import REPLICA_FAILED, ChildSocket, ReplicaDown, ServerChild, server_keys

RETRYABLE = {REPLICA_FAILED, "executor_failed", "server_shutting_down"}
FORWARDED = ("authorization", "x-api-key", "content-type")
REPORT_PERIOD_S = 0.5


class LoraReplicaBase:
    """The replica's behaviour; `replica_deployment()` wraps it with `serve.multiplexed` and `serve.deployment`."""

    async def __init__(self, server_args: list[str], state: DeploymentHandle, start_timeout: float = 600.0) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state = state
        self.child = ServerChild(server_args)
        await asyncio.to_thread(self.child.start, start_timeout)
        api_key, admin_key = server_keys(server_args)
        key = admin_key or api_key
        self.own_headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self.socket = ChildSocket(self.session, self.child.url.replace("http", "ws", 1) + "/v1/stream",
                                  self.own_headers)
        self.routing: dict[str, Any] = {"healthy": True, "running": 0, "waiting": 0}
        self.served = 0
        await self._replay_runtime_adapters()
        self.reporter = asyncio.create_task(self._report_loop(), name="lorafleet-replica-report")

    async def _replay_runtime_adapters(self) -> None:
        """Adapters loaded at run time through the fleet (recorded by FleetState) are loaded here too."""
        for name, path in (await self.state.runtime_adapters.remote()).items():
            async with self.session.post(self.child.url + "/v1/load_lora_adapter", headers=self.own_headers,
                                         json={"lora_name": name, "lora_path": path}) as resp:
                await resp.read()

    # reporting -------------------------------------------------------------------------------------
    async def _report_loop(self) -> None:
        while True:
            try:
                report = await self._collect()
                self.routing = {k: report[k] for k in ("healthy", "running", "waiting")}
                await self.state.report.remote(self.replica_id, report)
            except Exception as exc:  # a report must never stop the loop; the next one retries
                self.routing = {**self.routing, "healthy": self.child.alive(), "error": repr(exc)}
            await asyncio.sleep(REPORT_PERIOD_S)

    async def _collect(self) -> dict[str, Any]:
        report: dict[str, Any] = {"pid": self.child.pid, "actor_pid": os.getpid(), "url": self.child.url,
                                  "served": self.served,
                                  "healthy": False, "running": 0, "waiting": 0, "at": time.time()}
        if not self.child.alive():
            return {**report, "reason": f"server {self.child.exit_reason()}"}
        get = self.session.get
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with get(self.child.url + "/health", timeout=timeout) as resp:
                health = await resp.json()
                report.update(healthy=resp.status == 200, reason=health.get("reason", health.get("status")))
            async with get(self.child.url + "/metrics", timeout=timeout) as resp:
                report["metrics"] = await resp.text()
            async with get(self.child.url + "/v1/models", headers=self.own_headers, timeout=timeout) as resp:
                report["models"] = (await resp.json()).get("data", [])
            async with get(self.child.url + "/v1/debug/state", headers=self.own_headers, timeout=timeout) as resp:
                snapshot = (await resp.json()).get("snapshot") or {}
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            return {**report, "healthy": False, "reason": f"server unreachable: {exc!r}"}
        report.update(running=len(snapshot.get("running", [])), waiting=len(snapshot.get("waiting", [])),
                      resident=sorted(snapshot.get("resident_adapters", [])))
        return report

    def record_routing_stats(self) -> dict[str, Any]:
        return {**self.routing, "healthy": self.routing.get("healthy", True) and self.child.alive()}

    def check_health(self) -> None:
        if not self.child.alive():
            raise RuntimeError(f"the replica's lorafleet serve {self.child.exit_reason()}")

    # requests --------------------------------------------------------------------------------------
    def _down(self, reason: str) -> ReplicaDown:
        return ReplicaDown(self.replica_id, reason)

    async def _enter(self) -> None:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.get_model(adapter)
        if not self.child.alive():
            raise self._down(f"server {self.child.exit_reason()}")
        self.served += 1

    async def http(self, method: str, path: str, body: bytes, headers: dict[str, str],
                   route: dict | None = None) -> AsyncIterator[Any]:
        await self._enter()
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED}
        try:
            resp = await self.session.request(method, self.child.url + path, data=body, headers=sent)
        except (aiohttp.ClientError, OSError) as exc:
            raise self._down(f"connection failed: {exc!r}") from exc
        async with resp:
            if resp.status == 503:
                raw = await resp.read()
                if _error_code(raw) in RETRYABLE:
                    raise self._down(f"server answered 503: {raw[:200]!r}")
                yield self._meta(resp)
                yield raw
                return
            yield self._meta(resp)
            event_stream = resp.headers.get("Content-Type", "").startswith("text/event-stream")
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, OSError) as exc:
                if event_stream:
                    error = {"error": {"code": REPLICA_FAILED, "message": f"replica {self.replica_id} failed "
                                       f"mid-stream: {exc!r}", "param": None}}
                    yield f"data: {json.dumps(error)}\n\n".encode()

    def _meta(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        kept = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "retry-after", "cache-control")}
        return {"replica": self.replica_id, "status": resp.status, "headers": kept}

    async def stream(self, frame: dict[str, Any], route: dict | None = None) -> AsyncIterator[dict]:
        await self._enter()
        first = True
        async for reply in self.socket.generate(frame):
            if first:
                first = False
                code = (reply.get("error") or {}).get("code") if reply.get("type") == "error" else None
                if code in RETRYABLE:
                    raise self._down(f"server refused the generation: {code}")
                if reply.get("type") == "accepted":
                    reply = {**reply, "replica": self.replica_id}
            yield reply

    async def admin(self, op: str, body: dict, headers: dict[str, str]) -> dict:
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED}
        try:
            async with self.session.post(f"{self.child.url}/v1/{op}_lora_adapter", json=body, headers=sent) as resp:
                return {"replica": self.replica_id, "status": resp.status, "body": await resp.json()}
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return {"replica": self.replica_id, "status": 503,
                    "body": {"error": {"code": REPLICA_FAILED, "message": repr(exc), "param": None}}}

    async def __del__(self) -> None:
        if getattr(self, "reporter", None) is not None:
            self.reporter.cancel()
        if getattr(self, "socket", None) is not None:
            await self.socket.close()
        if getattr(self, "session", None) is not None:
            await self.session.close()
        if getattr(self, "child", None) is not None:
            await asyncio.to_thread(self.child.stop, 10.0)


def _error_code(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return (body.get("error") or {}).get("code") if isinstance(body, dict) else None


def replica_class(models_per_replica: int) -> type:
    """LoraReplicaBase with its multiplexed loader: `get_model(adapter)` marks the adapter as held by this
    replica (Ray reports the ids to the routers; the server itself loads the pages on demand), LRU-bounded
    by `models_per_replica`."""

    class LoraReplica(LoraReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def get_model(self, model_id: str) -> str:
            return model_id

    return LoraReplica

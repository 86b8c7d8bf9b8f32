"""The server's security posture, as plain functions the web app applies (docs/serving.md, "Security"):

* `origin_allowed`: browser requests (they carry `Origin`) are served only from the server's own origin,
  localhost, or origins added with `--allowed-origin` (`*` = any); clients without `Origin` are not
  browsers and pass. Applied to WebSocket upgrades and POSTs, so a page on another site cannot drive the
  server (together with the JSON-only rule: a cross-site JSON POST needs a CORS preflight, never granted).
* `files_inside` (engine/adapter_index.py's `outside_root`): an adapter directory's files must resolve
  (symlinks followed) inside the adapter root; start-up scans and name lookups apply it too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from lorafleet.engine.adapter_index import outside_root as files_inside

__all__ = ["LOCAL_HOSTS", "files_inside", "origin_allowed"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def origin_allowed(origin: str | None, host: str, allowed: frozenset[str]) -> bool:
    """Whether a request with this `Origin` header may be served. `host` is the request's Host header."""
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().rstrip("/")
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (sandboxed frames, file://) and anything odd
    return parts.netloc.lower() == host.lower() or parts.hostname in LOCAL_HOSTS

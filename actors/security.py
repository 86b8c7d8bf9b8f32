"""The server's security posture, as plain functions the web app applies (docs/serving.md, "Security"):

* `origin_allowed`: browser requests (they carry `Origin`) are served only from the server's own origin,
  localhost, or origins added with `--allowed-origin` (`*` = any); clients without `Origin` are not
  browsers and pass. Applied to WebSocket upgrades and POSTs, so a page on another site cannot drive the
  server (together with the JSON-only rule: a cross-site JSON POST needs a CORS preflight, never granted).
* `files_inside` (engine/adapter_index.py's `outside_root`): an adapter directory and the files read from it
  (adapter_config.json, adapter_model.safetensors) must resolve (symlinks followed) inside the adapter root;
  start-up scans, name lookups and host-cache refills apply it too.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from lorafleet.engine.adapter_index import outside_root as files_inside

__all__ = ["LOCAL_HOSTS", "files_inside", "origin_allowed"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def origin_allowed(origin: str | None, host: str, allowed: frozenset[str], keyed: bool = False) -> bool:
    """Whether a request with this `Origin` header may be served. `host` is the request's Host header;
    `keyed`: the server has an API key (a page still needs the key, so the Host header may be trusted).

    An Origin must be one serialized origin (`scheme://host[:port]`, RFC 6454): a list, a path, user info
    or stray text is refused. Same origin (`Origin` host:port = `Host`) counts without a key only when the
    host is an IP literal or a localhost name: a page whose DNS name was rebound to this server sends a
    matching Host and Origin (DNS rebinding), and a keyless server would otherwise let it drive everything."""
    if origin is None or "*" in allowed:
        return True
    parts = _serialized_origin(origin)
    if parts is None:
        return False  # "null" (sandboxed frames, file://) and anything odd
    serialized, hostname = parts
    if serialized in allowed or origin.strip().rstrip("/") in allowed:
        return True
    if hostname in LOCAL_HOSTS:
        return True
    return serialized.split("://", 1)[1] == host.strip().lower() and (keyed or _ip_literal(hostname))


def _serialized_origin(origin: str) -> tuple[str, str] | None:
    """(`scheme://host[:port]` lowercased, hostname) of an Origin value, or None if it is not one origin."""
    text = origin.strip().rstrip("/")
    if any(c.isspace() or c in ",\\" for c in text):
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        return None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query
            or parts.fragment or "@" in parts.netloc or text.count("://") != 1):
        return None
    return f"{parts.scheme}://{parts.netloc.lower()}", parts.hostname


def _ip_literal(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True

"""Field rules for client requests: every value is bounded here before it reaches an actor or a wire format.

A rule checks one field's value and returns it in the type the server uses, or raises `ApiError` 400 naming
the field. `check_document` walks a whole decoded body or frame first (iteratively: no recursion) and
refuses what no field may hold: nesting deeper than `MAX_DEPTH`, strings that are not valid Unicode text
(lone UTF-16 surrogates, e.g. JSON `"\\ud800"`), map keys that are not strings, binary data and msgpack
extension types. The request tables in actors/protocol.py name a rule per field; docs/protocol.md lists
the bounds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.request import INT64_MAX, INT64_MIN

MAX_DEPTH = 32  # a body, a message, its content parts, a part's fields: far below this
SHOWN_CHARS = 60  # of a bad value quoted in an error message


@dataclass
class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI `{"error": {...}}` or a WS error event."""

    status: int
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": redact(self.message), "type": self.type, "param": self.param,
                          "code": self.code}}


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+~-]+/)+[\w.@+~-]*")


_API_ROUTES = ("/v1/", "/ws/")  # the server's own URL paths: public, and what a message about a route names


def redact(message: str) -> str:
    """A client-facing message without the server's absolute file paths (`/srv/x/y.py` -> `<path>/y.py`);
    the server's own routes (`/v1/load_lora_adapter`) are kept."""
    return _ABSOLUTE_PATH.sub(_redact_match, message)


def _redact_match(match: re.Match) -> str:
    path = match.group(0)
    if path.startswith(_API_ROUTES):
        return path
    return "<path>/" + path.rstrip("/").rsplit("/", 1)[-1]


def bad(param: str, message: str, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, code, f"{param}: {message}", param)


def show(value: Any) -> str:
    """A short, printable quote of a client value for an error message (never the whole of a huge one)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * SHOWN_CHARS:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_text(value: str) -> bool:
    """True when `value` is valid Unicode text (encodes as UTF-8: no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# decoding ------------------------------------------------------------------------------------------------
def unique_keys(pairs: list[tuple[Any, Any]]) -> dict:
    """object_pairs_hook for json and msgpack: an object with one key twice is refused naming the key (both
    parsers would keep the last value and silently drop the other)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        param = key if isinstance(key, str) and is_text(key) and len(key) <= 120 else "body"
        raise ApiError(400, "invalid_json", f"{param}: the key {show(key)} appears twice in one object (one of "
                       "its values would be silently dropped)", param)
    return out


# the whole document --------------------------------------------------------------------------------------
_SCALARS = (str, int, float, bool, type(None))


def check_document(doc: Any, top: str = "body") -> None:
    """Refuse a decoded body/frame that no field rule could take (see the module docstring); the error's
    `param` is the path of the first bad value (`messages[0].content`), or `top` for the document itself."""
    stack: list[tuple[str, Any, int]] = [(top, doc, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(_short(path), f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if not is_text(value):
                raise bad(_short(path), "is not valid Unicode text (a lone UTF-16 surrogate)")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str) or not is_text(key):
                    raise bad(_short(path), f"object keys must be text strings, got {show(key)}")
                stack.append((f"{key}" if path == top else f"{path}.{key}", item, depth + 1))
        elif isinstance(value, list):
            if all(type(item) is int for item in value):
                continue  # token ids: nothing more to look at
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
        elif not isinstance(value, _SCALARS):
            raise bad(_short(path), f"{type(value).__name__} values are not accepted (JSON types only)")


def _short(path: str) -> str:
    """The path, cut short (a path hundreds of levels deep is no use in a message)."""
    return path if len(path) <= 120 else path[:120] + "…"


# field rules ---------------------------------------------------------------------------------------------
Bound = int | Callable[[Any], int]  # a number, or read from the ParseContext (e.g. the vocabulary size)


def _bound(bound: Bound, ctx: Any) -> int:
    return bound(ctx) if callable(bound) else bound


@dataclass(frozen=True)
class Int:
    """An integer (not a boolean, not a float) in [lo, hi]; both default to the signed 64-bit range."""

    lo: Bound = INT64_MIN
    hi: Bound = INT64_MAX

    def check(self, name: str, value: Any, ctx: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, f"must be an integer, got {kind(value)}")
        lo, hi = _bound(self.lo, ctx), _bound(self.hi, ctx)
        if not lo <= value <= hi:
            raise bad(name, f"must be an integer in [{lo}, {hi}], got {show(value)}")
        return value


@dataclass(frozen=True)
class Float:
    """A finite number in [lo, hi] (`(lo, hi]` with `lo_open`); integers are compared exactly, so an integer
    literal too large for a float is out of range, not an overflow."""

    lo: float
    hi: float
    lo_open: bool = False

    def check(self, name: str, value: Any, ctx: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, f"must be a number, got {kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(name, f"must be a finite number, got {value}")
        below = value <= self.lo if self.lo_open else value < self.lo
        if below or value > self.hi:
            interval = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
            raise bad(name, f"must be a number in {interval}, got {show(value)}")
        return float(value)


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, value: Any, ctx: Any) -> bool:
        if not isinstance(value, bool):
            raise bad(name, f"must be a boolean, got {kind(value)}")
        return value


@dataclass(frozen=True)
class Text:
    """A string of min_chars..max_chars characters (valid Unicode: `check_document` saw to that)."""

    max_chars: int
    min_chars: int = 1

    def check(self, name: str, value: Any, ctx: Any) -> str:
        if not isinstance(value, str):
            raise bad(name, f"must be a string, got {kind(value)}")
        if not self.min_chars <= len(value) <= self.max_chars:
            raise bad(name, f"must have {self.min_chars}..{self.max_chars} characters, got {len(value)}")
        if not is_text(value):
            raise bad(name, "is not valid Unicode text (a lone UTF-16 surrogate)")
        return value


@dataclass(frozen=True)
class TextList:
    """A string or a list of at most `max_items` strings, each of 1..max_chars characters; a tuple."""

    max_items: int
    max_chars: int

    def check(self, name: str, value: Any, ctx: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise bad(name, f"must be a string or a list of strings, got {kind(value)}")
        if len(items) > self.max_items:
            raise bad(name, f"at most {self.max_items} items, got {len(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, str) or not 1 <= len(item) <= self.max_chars or not is_text(item):
                raise bad(name, f"items must be text strings of 1..{self.max_chars} characters, got {show(item)} "
                          f"at [{i}]")
        return tuple(items)


@dataclass(frozen=True)
class IntList:
    """A list of at most `max_items` integers, each in [lo, hi]; a tuple."""

    max_items: Bound
    lo: Bound = 0
    hi: Bound = INT64_MAX

    def check(self, name: str, value: Any, ctx: Any) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise bad(name, f"must be a list of integers, got {kind(value)}")
        limit = _bound(self.max_items, ctx)
        if len(value) > limit:
            raise bad(name, f"at most {limit} items, got {len(value)}")
        lo, hi = _bound(self.lo, ctx), _bound(self.hi, ctx)
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not lo <= item <= hi:
                raise bad(name, f"items must be integers in [{lo}, {hi}], got {show(item)} at [{i}]")
        return tuple(value)


@dataclass(frozen=True)
class Unsupported:
    """A field this server does not implement: refused unless absent or a value that asks for nothing."""

    def check(self, name: str, value: Any, ctx: Any) -> None:
        idle = value is False or value in ([], {}, "") or (type(value) is int and value == 0)
        if not idle:
            raise bad(name, "is not supported by this server", "unsupported_parameter")
        return None


@dataclass(frozen=True)
class Only:
    """An integer field of which this server supports one value (`n`, `best_of`)."""

    value: int

    def check(self, name: str, value: Any, ctx: Any) -> int:
        got = Int().check(name, value, ctx)
        if got != self.value:
            raise bad(name, f"only {name}={self.value} is supported, got {got}", "unsupported_parameter")
        return got


@dataclass(frozen=True)
class Object:
    """A JSON object whose own fields are checked by the caller."""

    def check(self, name: str, value: Any, ctx: Any) -> dict:
        if not isinstance(value, dict):
            raise bad(name, f"must be an object, got {kind(value)}")
        return value


@dataclass(frozen=True)
class Param:
    """One request field: its name, its rule, the value an absent or null field takes, and other names
    it may be sent under (`max_completion_tokens` for `max_tokens`)."""

    name: str
    rule: Any
    default: Any = None
    aliases: tuple[str, ...] = ()

    def read(self, body: dict, ctx: Any, prefix: str = "") -> Any:
        """The checked value (errors name `prefix + key`, e.g. `stream_options.include_usage`) or the default. A
        field sent under two of its names with different values (`max_tokens: 5, max_completion_tokens: 500`)
        is 400 naming the second: one of them would be silently ignored."""
        if not self.aliases:
            value = body.get(self.name)
            return self.default if value is None else self.rule.check(prefix + self.name, value, ctx)
        given = [(key, body[key]) for key in (self.name, *self.aliases) if body.get(key) is not None]
        if not given:
            return self.default
        values = [self.rule.check(prefix + key, value, ctx) for key, value in given]
        for (key, _), value in zip(given[1:], values[1:], strict=True):
            if value != values[0]:
                raise bad(prefix + key, f"is {show(value)} but {prefix}{given[0][0]} is {show(values[0])}: they name "
                          "the same limit, send one of them")
        return values[0]


def read_params(body: dict, params: tuple[Param, ...], ctx: Any) -> dict[str, Any]:
    """{name: checked value or default} for every Param of the table."""
    return {p.name: p.read(body, ctx) for p in params}

"""Every message the serving actors and executor processes exchange, declared once, with a type tag.

A message is a dataclass registered with `@message("tag")`. Its wire form is a msgpack map
`{"type": tag, <field>: <value>, ...}`; `decode` rejects unknown tags, missing or unknown fields and
values of the wrong type with a `SchemaError` naming the field. Messages marked `wire=False` carry
in-process objects (e.g. a host tensor) and may only travel over in-process channels: encoding one raises.

Field types allowed on the wire: int, float, str, bool, None, list[T], dict[str, T], T | None and other
registered messages (nested as maps).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

from lorafleet.engine.plan import StepOutput


class SchemaError(ValueError):
    """A frame that is not a valid message; the message names the tag or field."""


_REGISTRY: dict[str, type] = {}
_TAG_OF: dict[type, str] = {}
_WIRE: dict[type, bool] = {}
_HINTS: dict[type, dict[str, Any]] = {}
_NAMES: dict[type, tuple[str, ...]] = {}


def message(tag: str, wire: bool = True):
    """Class decorator: register a dataclass as the message with type tag `tag`."""

    def register(cls: type) -> type:
        assert tag not in _REGISTRY, f"duplicate message tag {tag!r}"
        assert dataclasses.is_dataclass(cls), f"{cls.__name__} must be a dataclass"
        _REGISTRY[tag], _TAG_OF[cls], _WIRE[cls] = cls, tag, wire
        return cls

    return register


def tag_of(msg: object) -> str:
    return _TAG_OF[type(msg)]


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# encoding -------------------------------------------------------------------------------------------
def to_wire(msg: object) -> dict:
    """The message as a plain map (nested messages as maps), including its type tag."""
    out = _shallow(msg)
    for name, value in out.items():
        out[name] = _plain(value)
    return out


def _shallow(msg: object) -> dict:
    """The message's map with its field values as they are (nested messages not converted)."""
    cls = type(msg)
    if cls not in _TAG_OF:
        raise SchemaError(f"{cls.__name__} is not a registered message")
    if not _WIRE[cls]:
        raise SchemaError(f"{_TAG_OF[cls]}: this message is in-process only and has no wire form")
    out: dict[str, Any] = {"type": _TAG_OF[cls]}
    for name in _field_names(cls):
        out[name] = getattr(msg, name)
    return out


def _field_names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _nested(value: object) -> dict:
    """msgpack's hook for what it cannot pack itself: a nested registered message becomes its map; anything
    else is a TypeError (as msgpack raises it)."""
    if type(value) not in _TAG_OF:
        raise TypeError(f"can not serialize {type(value).__name__!r} object")
    return _shallow(value)


def _plain(value: Any) -> Any:
    if type(value) in _TAG_OF:
        return to_wire(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode(msg: object) -> bytes:
    """msgpack bytes of a registered wire message: the bytes of `to_wire(msg)`, but lists, tuples and maps
    are walked by msgpack itself, which calls back only for nested messages (a step plan's thousands of
    integers are not visited in Python)."""
    return msgpack.packb(_shallow(msg), default=_nested, use_bin_type=True)


# decoding -------------------------------------------------------------------------------------------
def decode(frame: bytes) -> object:
    """The message in a msgpack frame; SchemaError for anything malformed."""
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise SchemaError(f"frame is not valid msgpack: {exc}") from exc
    return from_wire(raw)


def from_wire(raw: object) -> object:
    """Build a message from its plain-map form, checking every field's type."""
    if not isinstance(raw, dict):
        raise SchemaError(f"a message must be a map, got {type(raw).__name__}")
    tag = raw.get("type")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None or not _WIRE[cls]:
        raise SchemaError(f"type: unknown message type {tag!r}")
    return _build(cls, raw, tag)


def _build(cls: type, raw: dict, path: str) -> object:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names - {"type"})
    if unknown:
        raise SchemaError(f"{path}.{unknown[0]}: unknown field")
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}"
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{where}: missing field")
            continue
        values[f.name] = _convert(raw[f.name], hints[f.name], where)
    return cls(**values)


def _convert(value: Any, hint: Any, where: str) -> Any:  # noqa: C901 - one small type switch
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0] if errors else f"{where}: must be null")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{where}: must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        exact = _EXACT.get(item)
        if exact is not None and all(type(v) in exact for v in value):  # a step's sampled ids: no walk per item
            return list(value) if item is not float else [float(v) for v in value]
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: must be a map, got {type(value).__name__}")
        key_type, item = typing.get_args(hint)
        return {_convert(k, key_type, where): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint in _TAG_OF:
        if not isinstance(value, dict) or value.get("type") != _TAG_OF[hint]:
            raise SchemaError(f"{where}: must be a {_TAG_OF[hint]!r} message")
        return _build(hint, value, where)
    return _scalar(value, hint, where)


_EXACT = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}  # list items `_scalar` takes as they are


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    else:
        raise SchemaError(f"{where}: unsupported field type {hint!r}")
    raise SchemaError(f"{where}: must be {hint.__name__}, got {type(value).__name__}")


# executor wire messages -----------------------------------------------------------------------------
@message("staged_adapter")
@dataclass(frozen=True)
class StagedAdapter:
    """An adapter's packed pages ([layers, n_pages, page_elements], or [ranks, layers, ...] under tensor
    parallelism) at `offset` bytes into shared memory segment `segment`, with its page layout
    (`modules[m] = [A row offsets, Bᵀ row offsets]`), rank, ranks per module and scale."""

    name: str
    segment: str
    offset: int
    shape: list[int]
    dtype: str
    scale: float
    rank: int
    ranks: dict[str, int]
    modules: dict[str, list[list[int]]]
    num_pages: int
    shards: int = 1


@message("run_step")
@dataclass(frozen=True)
class RunStep:
    """Execute one StepPlan (its `to_wire()` map); `staged` covers every adapter in plan.loads."""

    plan: dict[str, Any]
    staged: list[StagedAdapter] = field(default_factory=list)


@message("step_result")
@dataclass(frozen=True)
class StepResult:
    """Rank `rank` ran step `step`; rank 0 carries the sampled token ids in plan order, and the logprobs
    asked for (`StepOutput.to_wire()` rows). With `error` set the step failed and carries nothing: the
    scheduler fails that step's requests and goes on. `seconds` (the scheduler's `executor_s`): the time the
    step occupied the executor, from its launch (or the previous step's finish, if later) to its finish, so
    overlapped steps do not count the same time twice; the roofline line of `--log-steps` and the roofline
    metrics read it as the step's cost (admission reads the result-to-result step time)."""

    step: int
    rank: int
    sampled: list[int]
    seconds: float
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] = field(default_factory=list)
    error: str | None = None  # the step failed on this rank (one line; the traceback is in the executor's log)
    overlapped: bool = False  # launched while the step before it was still on the device (its host work hid)

    def output(self) -> StepOutput:
        return StepOutput.from_wire({"sampled": self.sampled, "logprobs": self.logprobs or [None] * len(self.sampled),
                                     "prompt_logprobs": self.prompt_logprobs})


@message("executor_ready")
@dataclass(frozen=True)
class ExecutorReady:
    """A rank has built its model and pool (`num_pages` pages: the auto-sized count when asked for 0)."""

    rank: int
    pid: int
    device: str
    num_pages: int = 0
    bandwidth: float = 0.0  # measured device copy bandwidth, bytes/s (read + write), for the step roofline
    matmul_flops: float = 0.0  # measured matmul throughput in the model dtype, FLOP/s
    torch_threads: int = 0  # the executor's torch intra-op threads (the thread policy's choice)


@message("executor_failed")
@dataclass(frozen=True)
class ExecutorFailed:
    """An executor could not start or run a step; it exits after sending this."""

    rank: int
    message: str


@message("shutdown")
@dataclass(frozen=True)
class Shutdown:
    """Ask an executor process to exit cleanly."""


# actor messages (in-process, but wire-encodable unless marked) ---------------------------------------
@message("submit")
@dataclass(frozen=True)
class Submit:
    """A validated generation entering admission. `params` are SamplingParams fields."""

    request_id: str
    prompt_ids: list[int]
    params: dict[str, Any]
    adapter: str | None
    slo_ttft_ms: float | None
    arrival: float
    seq: int = 0


@message("cancel")
@dataclass(frozen=True)
class Cancel:
    """Stop a request (client cancel or disconnect); its pages are freed before the next step."""

    request_id: str


@message("admitted")
@dataclass(frozen=True)
class Admitted:
    request_id: str


@message("rejected")
@dataclass(frozen=True)
class Rejected:
    """A request refused before it ran; `status` is the HTTP status, `code` the stable error code."""

    request_id: str
    code: str
    message: str
    status: int
    param: str | None = None
    retry_after: float | None = None


@message("delta_item")
@dataclass(slots=True)
class DeltaItem:
    """One request's news from one step: new tokens/text, and at the end its finish reason or error.
    Read-only by convention; slotted, not frozen: one is built per sequence and step (a frozen dataclass's
    initialiser costs ~4x more, ~1 ms per 256-sequence step on the dev CPU)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    logprobs: list[Any] = field(default_factory=list)  # per new token: TokenLogprobs.to_wire() rows
    prompt_logprobs: list[Any] | None = None  # with the first item, when asked: [None, rows...]


@message("step_deltas")
@dataclass(frozen=True)
class StepDeltas:
    """Everything one step produced, for every request, in one message."""

    step: int
    items: list[DeltaItem]


@message("scheduler_stats")
@dataclass(frozen=True)
class SchedulerStats:
    """What admission needs after each step: the last Submit seq the scheduler has seen, queue state and
    the smoothed step time."""

    step: int
    seen_seq: int
    num_waiting: int
    num_running: int
    waiting_tokens: int
    step_ms: float
    oldest_wait_ms: float = 0.0  # age of the oldest waiting request
    start_rate: float = 0.0  # requests started (first token) per second while the queue was never empty


@message("admin_op")
@dataclass(frozen=True)
class AdminOp:
    """Load (`path` set) or unload an adapter at runtime; answered by an AdminResult with the same id."""

    request_id: str
    op: str
    name: str
    path: str | None = None


@message("admin_result")
@dataclass(frozen=True)
class AdminResult:
    request_id: str
    ok: bool
    code: str | None = None
    message: str = ""


@message("prefetch", wire=False)
@dataclass(frozen=True)
class Prefetch:
    """Adapters (name -> PEFT dir) that waiting requests need and that are not in the host cache; with a host
    arena, `targets[name]` is the PackedAdapter view of the extent reserved for it (in-process only)."""

    adapters: dict[str, str]
    targets: dict[str, Any] = field(default_factory=dict)


@message("adapter_fetched", wire=False)
@dataclass(frozen=True)
class AdapterFetched:
    """A prefetched adapter, packed in page format (holds a host tensor: in-process only)."""

    name: str
    path: str
    packed: Any
    seconds: float


@message("adapter_fetch_failed", wire=False)
@dataclass(frozen=True)
class AdapterFetchFailed:
    """A prefetch could not read or pack the adapter; `target` is its reserved extent (or None)."""

    name: str
    path: str
    message: str
    target: Any = None


@message("executor_down")
@dataclass(frozen=True)
class ExecutorDown:
    """An executor process died or failed; every in-flight request must get an error."""

    rank: int
    message: str


@message("drain")
@dataclass(frozen=True)
class Drain:
    """Stop admitting; `cancel_all` aborts what is still running (the drain timeout passed)."""

    cancel_all: bool = False


@message("executor_up", wire=False)
@dataclass(frozen=True)
class ExecutorUp:
    """A restarted executor group (in-process only): the scheduler resets the pool's books and resumes."""

    group: Any

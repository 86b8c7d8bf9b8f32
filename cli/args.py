"""argparse pieces shared by the subcommands: a parser whose errors are one line, and value types that
reject out-of-range numbers while the command line is parsed (exit 2, before anything loads)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn
from urllib.parse import urlsplit


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (`PROG: error: MSG (PROG --help lists the
    flags)`) and exit 2, instead of the whole usage block before the message."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} ({self.prog} --help lists the flags)", file=sys.stderr)
        raise SystemExit(2)


def port(value: str) -> int:
    """A TCP port number, 0..65535 (0: the system picks a free one). ArgumentTypeError otherwise."""
    number = _number(value, int, "a port number")
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range (0..65535; 0 picks a free one)")
    return number


def positive_int(value: str) -> int:
    """An integer >= 1."""
    number = _number(value, int, "an integer")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """An integer >= 0."""
    number = _number(value, int, "an integer")
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def non_negative_float(value: str) -> float:
    """A finite float >= 0."""
    number = _number(value, float, "a number")
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """A finite float > 0."""
    number = _number(value, float, "a number")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def fraction(value: str) -> float:
    """A float in [0, 1]."""
    number = _number(value, float, "a number")
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {value}")
    return number


def http_url(value: str) -> str:
    """A server's base URL: http:// or https://, a host, and no query or fragment (a trailing / is dropped)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"expected the server's base URL, http(s)://HOST[:PORT], got {value!r}")
    return value.rstrip("/")


def _number(value: str, kind: type, what: str):
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None

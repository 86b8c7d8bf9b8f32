"""Incremental detokenization with stop strings.

`Detokenizer` turns the growing output ids into text a few tokens at a time; `TextStream` holds back
text that might still become the start of a stop string, or ends in an incomplete UTF-8 sequence,
until it is certain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TextStream:
    """The text of one request's output so far and how much of it the client has been sent."""

    stop: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = field(default=False)
    search_from: int = 0  # stop strings are looked for from here (min_tokens: not in the first tokens' text)

    def update(self, text: str, check_stop: bool = True) -> str:
        """Take the new full decoded text; returns the delta that is safe to send now. With `check_stop`
        False (fewer than min_tokens tokens so far, as vLLM) stop strings are not looked for in this text;
        later, only a stop string that ends after it counts."""
        if not check_stop:
            self.search_from = len(text)
        if not self.stop:  # the common case, without the stop-string search (the same result)
            self.text, end = text, len(text)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            delta = text[self.sent:end] if end > self.sent else ""
            self.sent = max(self.sent, end)
            return delta
        found = [at for stop in (self.stop if check_stop else ())
                 if (at := text.find(stop, max(0, self.search_from - len(stop) + 1))) != -1]
        self.text = text[:min(found)] if found else text  # the earliest occurrence, whatever the list order
        self.stopped = self.stopped or bool(found)
        safe = len(self.text) if self.stopped else self._safe_length()
        delta = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Everything not yet sent (at the end of the request)."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _safe_length(self) -> int:
        """The length of text that can be sent: before an incomplete UTF-8 ending, and before the earliest
        position from which the rest of the text is the start of some stop string."""
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        text, safe = self.text, end
        for stop in self.stop:
            for keep in range(min(len(stop) - 1, end), 0, -1):  # longest first: the earliest start
                if text.endswith(stop[:keep], 0, end):
                    safe = min(safe, end - keep)
                    break
        return safe


@dataclass
class Detokenizer:
    """The text of a growing list of token ids, decoding a short window per new token instead of the
    whole output (which costs O(length) per token: quadratic over a long generation).

    Tokens before `prefix` are in `text` for good; the window ids[prefix:read] was decoded last time and
    gives the context (e.g. a leading space) the next tokens are decoded with. The text grows only when
    the window's decode does not end in an incomplete UTF-8 sequence; `finish` takes the rest as is.

    `single` (shared by the requests of one tokenizer; `decode` must be a pure function) remembers the text of
    one-token windows, the usual known window once every token adds text: one decode per token instead of two.
    """

    decode: Callable[[list[int]], str]
    text: str = ""
    prefix: int = 0
    read: int = 0
    single: dict[int, str] | None = None

    def push(self, ids: list[int], final: bool = False) -> str:
        """The text of `ids` (the previous ids plus new ones); `final` also takes an incomplete ending."""
        prefix, read, single = self.prefix, self.read, self.single
        if single is not None and read - prefix == 1:
            known = single.get(ids[prefix])
            if known is None:
                known = single[ids[prefix]] = self.decode(ids[prefix:read])
        else:
            known = self.decode(ids[prefix:read])
        new = self.decode(ids[prefix:])
        if len(new) > len(known) and (final or not new.endswith("\ufffd")):
            self.text += new[len(known):]
            self.prefix, self.read = self.read, len(ids)
        return self.text

    def finish(self, ids: list[int]) -> str:
        return self.push(ids, final=True)

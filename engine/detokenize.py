"""Incremental detokenization with stop strings.

The full output is re-decoded each step (outputs are short relative to the model work); text that
might still become the start of a stop string, or ends in an incomplete UTF-8 sequence, is held back
until it is certain.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextStream:
    """The text of one request's output so far and how much of it the client has been sent."""

    stop: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = field(default=False)

    def update(self, text: str) -> str:
        """Take the new full decoded text; returns the delta that is safe to send now."""
        self.text = text
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                self.text = text[:at]
                self.stopped = True
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
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for keep in range(min(len(stop) - 1, end), 0, -1):
                if self.text[:end].endswith(stop[:keep]):
                    end -= keep
                    break
        return end

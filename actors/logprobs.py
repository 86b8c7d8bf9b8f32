"""Logprobs in the clients' shapes: OpenAI completions (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), OpenAI chat (`content: [{token, logprob, bytes, top_logprobs}]`), vLLM's `prompt_logprobs`
and the WebSocket frames' `logprobs`.

Input rows are `TokenLogprobs.to_wire()` rows `[token id, logprob, top ids, top logprobs]` (natural log, the
model's raw distribution: docs/protocol.md, "Logprobs"); a prompt's first position has no row (None). A
token's text is its own decode (`tokenizer.decode([id])`), as vLLM reports it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorafleet.engine.detokenize import Detokenizer
from lorafleet.engine.tokenizer import text_decoder, token_bytes

Row = list  # [token_id, logprob, top_ids, top_logprobs]


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's own text (`tokenizer.decode([id])`), cached per tokenizer: a logprobs request reads it for every
    top entry of every token of every choice (21 decodes a token at top 20), on the event loop."""
    if tokenizer is None:
        return str(token_id)
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = {}
    text = texts.get(token_id)
    if text is None:
        text = texts[token_id] = tokenizer.decode([token_id])
    return text


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {token id: its text}


@dataclass
class CompletionLogprobs:
    """OpenAI completions' `logprobs` object, built up as tokens arrive; `text_offset` counts characters of
    the choice's text (echoed prompt included) from 0.

    A token's entry in `tokens` is the text it adds to the choice's text in place: the growth of an incremental
    detokenization (engine/detokenize.py, the engine's own algorithm and decode) of the echoed prompt and,
    separately, of the output, as the choice's text is made. So `"".join(tokens)` is the text and `text_offset`
    indexes into it: a token that only starts a multi-byte character adds "" (the character comes with the token
    that completes it), and a SentencePiece word keeps the space its own decode would strip. In `top_logprobs`
    the token itself is keyed by that same text (a client checks "was the token the most likely?" by comparing
    the two, as lm-eval's loglikelihood does); the other candidates by their own decode."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0
    output_ids: list[int] = field(default_factory=list, repr=False)
    detokenizer: Detokenizer | None = field(default=None, repr=False)

    def add(self, token_ids: list[int], rows: list[Row | None], tokenizer: Any, prompt: int = 0,
            final: bool = False) -> CompletionLogprobs:
        """Append tokens with their rows (None: no logprob, the prompt's first token): the first `prompt` of them
        are the echoed prompt, the rest output; `final`: the output ends with them. Returns only what was added,
        as a new object (a streamed chunk's share)."""
        added = CompletionLogprobs(offset=self.offset)
        texts = self._texts(token_ids, prompt, tokenizer, final)
        for token_id, row, text in zip(token_ids, rows, texts):
            added.tokens.append(text)
            added.text_offset.append(added.offset)
            added.offset += len(text)
            added.token_logprobs.append(None if row is None else row[1])
            added.top_logprobs.append(None if row is None else  # the token itself under its `tokens` text
                                      {text if t == token_id else token_text(tokenizer, t): v
                                       for t, v in zip(row[2], row[3])})
        self.extend(added)
        return added

    def _texts(self, token_ids: list[int], prompt: int, tokenizer: Any, final: bool) -> list[str]:
        """What each token adds to the choice's text (see the class docstring)."""
        if tokenizer is None:
            return [str(t) for t in token_ids]
        decode = _decoder(tokenizer)
        texts = _growth(Detokenizer(decode), list(token_ids[:prompt]), [], True)
        if self.detokenizer is None:
            self.detokenizer = Detokenizer(decode)
        return texts + _growth(self.detokenizer, list(token_ids[prompt:]), self.output_ids, final)

    def extend(self, other: CompletionLogprobs) -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset
        self.offset = other.offset

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def _growth(detokenizer: Detokenizer, new_ids: list[int], ids: list[int], final: bool) -> list[str]:
    """The text each of `new_ids` adds when pushed one by one after `ids` (extended in place); with `final` the
    last one also takes an incomplete ending, as the engine's text does when the output ends."""
    out = []
    for i, token_id in enumerate(new_ids):
        ids.append(token_id)
        before = len(detokenizer.text)
        detokenizer.push(ids, final=final and i == len(new_ids) - 1)
        out.append(detokenizer.text[before:])
    return out


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> the engine's text decoder


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    decode = _DECODERS.get(tokenizer)
    if decode is None:
        decode = _DECODERS[tokenizer] = text_decoder(tokenizer)
    return decode


def chat_logprobs(rows: list[Row], tokenizer: Any) -> list[dict]:
    """OpenAI chat's `logprobs.content` entries of the sampled tokens."""
    return [{**_chat_entry(row[0], row[1], tokenizer),
             "top_logprobs": [_chat_entry(t, v, tokenizer) for t, v in zip(row[2], row[3])]} for row in rows]


def _chat_entry(token_id: int, logprob: float, tokenizer: Any) -> dict:
    """`bytes` are the token's own bytes (engine/tokenizer.py: token_bytes), not its text's: a token holding part
    of a multi-byte character has text U+FFFD but exact bytes, so the client can join them (OpenAI's meaning)."""
    return {"token": token_text(tokenizer, token_id), "logprob": logprob,
            "bytes": list(_token_bytes(tokenizer)(token_id))}


_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its token_bytes lookup
_NO_TOKENIZER = token_bytes(None)


def _token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    if tokenizer is None:
        return _NO_TOKENIZER
    lookup = _BYTES.get(tokenizer)
    if lookup is None:
        lookup = _BYTES[tokenizer] = token_bytes(tokenizer)
    return lookup


def prompt_logprobs(rows: list[Row | None], tokenizer: Any) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt position, {token id (string): {logprob, rank, decoded_token}} with
    the prompt's token and the top N (rank 1 = most likely; the prompt token's rank only when it is in the top
    N, else null); None at position 0."""
    out: list[dict | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": token_text(tokenizer, t)}
                 for r, (t, v) in enumerate(zip(row[2], row[3]))}
        if str(row[0]) not in entry:
            entry[str(row[0])] = {"logprob": row[1], "rank": None, "decoded_token": token_text(tokenizer, row[0])}
        out.append(entry)
    return out


def ws_logprobs(rows: list[Row | None], tokenizer: Any) -> list[dict | None]:
    """WebSocket frames' logprobs: per token {token_id, token, logprob, top_logprobs: [{token_id, token,
    logprob}]} (None for a prompt's first token)."""
    return [None if row is None else {
        "token_id": row[0], "token": token_text(tokenizer, row[0]), "logprob": row[1],
        "top_logprobs": [{"token_id": t, "token": token_text(tokenizer, t), "logprob": v}
                         for t, v in zip(row[2], row[3])]} for row in rows]

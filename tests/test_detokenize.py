"""Incremental detokenization: decoding a short window per token gives the text of decoding everything."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorafleet.engine.detokenize import Detokenizer, TextStream
from lorafleet.engine.tokenizer import build_byte_tokenizer, text_decoder

TEXTS = ["plain ascii words, spaced  twice", "naïve café — 東京 ünïcødé 🙂🚀 mixed", "  leading spaces\nand lines\t"]


def metaspace_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE (▁ for spaces, byte fallback) trained on the texts, like Llama's."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>", *bytes_])
    tok.train_from_iterator([t.replace("🙂", "") for t in texts] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(params=["bytes", "metaspace"])
def tokenizer(request):
    return build_byte_tokenizer(512) if request.param == "bytes" else metaspace_tokenizer(TEXTS)


@pytest.mark.parametrize("text", TEXTS)
def test_windowed_decode_equals_full_decode(tokenizer, text):
    decode = text_decoder(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(decode)
    for end in range(1, len(ids) + 1):
        full = decode(ids[:end])
        got = detok.push(ids[:end])
        assert full.startswith(got)  # never ahead of the truth, never different
        if not full.endswith("\ufffd"):
            assert got == full
    assert detok.finish(ids) == decode(ids)


def test_fast_decoder_equals_the_wrapper(tokenizer):
    decode = text_decoder(tokenizer)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 12))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_of_windowed_text_sends_every_character_once(tokenizer):
    decode = text_decoder(tokenizer)
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    detok, stream, sent = Detokenizer(decode), TextStream(("東京",)), ""
    for end in range(1, len(ids) + 1):
        sent += stream.update(detok.push(ids[:end]))
        if stream.stopped:
            break
    sent += stream.update(detok.finish(ids[:end])) + stream.flush()
    assert sent == TEXTS[1][: TEXTS[1].index("東京")]


class _ReferenceStream:
    """TextStream as it was before its no-stop fast path: the stop-string search and the safe-length scan
    run for every update (the independent truth the fast path is checked against)."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop, self.text, self.sent, self.stopped, self.search_from = stop, "", 0, False, 0

    def update(self, text: str, check_stop: bool = True) -> str:
        if not check_stop:
            self.search_from = len(text)
        found = [at for stop in (self.stop if check_stop else ())
                 if (at := text.find(stop, max(0, self.search_from - len(stop) + 1))) != -1]
        self.text = text[:min(found)] if found else text
        self.stopped = self.stopped or bool(found)
        safe = len(self.text) if self.stopped else self._safe_length()
        delta = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _safe_length(self) -> int:
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        text, safe = self.text[:end], end
        for stop in self.stop:
            for keep in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:keep]):
                    safe = min(safe, end - keep)
                    break
        return safe


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["ab", "a", "b", "\ufffd", " x", "xy", "ä"]), max_size=3),
       st.lists(st.tuples(st.text(alphabet="abxy \ufffdä", max_size=4), st.booleans()), max_size=12))
def test_text_stream_matches_the_reference(stops, pieces):
    """Every update's delta and the stream's state equal the reference's, with and without stop strings,
    incomplete UTF-8 endings (U+FFFD) that later resolve, and updates before min_tokens (check_stop False)."""
    stream, ref = TextStream(tuple(stops)), _ReferenceStream(tuple(stops))
    text = ""
    for piece, check_stop in pieces:
        text = text.rstrip("\ufffd") + piece  # a held-back incomplete ending is replaced by the full character
        assert stream.update(text, check_stop) == ref.update(text, check_stop)
        assert (stream.text, stream.sent, stream.stopped, stream.search_from) == (
            ref.text, ref.sent, ref.stopped, ref.search_from)
    assert stream.flush() == ref.flush()


@functools.cache
def _decoders() -> tuple:
    return tuple(text_decoder(t) for t in (build_byte_tokenizer(512), metaspace_tokenizer(TEXTS)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0, 1]), st.lists(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 399)), max_size=25),
                                        min_size=1, max_size=4))
def test_shared_one_token_memo_gives_the_same_text(which, sequences):
    """Detokenizers sharing the memo of one-token windows (as the engine's requests do) produce, push by push and
    at finish, exactly the text of detokenizers that decode every window (ids over both tokenizers' specials,
    bytes and merges)."""
    decode = _decoders()[which]
    memo: dict[int, str] = {}
    for ids in sequences:
        plain, shared = Detokenizer(decode), Detokenizer(decode, single=memo)
        for end in range(1, len(ids) + 1):
            assert shared.push(ids[:end]) == plain.push(ids[:end])
        assert shared.finish(ids) == plain.finish(ids)

"""Incremental detokenization: decoding a short window per token gives the text of decoding everything."""

from __future__ import annotations

import random

import pytest
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

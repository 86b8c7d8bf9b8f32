"""Tokenizer glue: load a model directory's tokenizer, or build a byte-level one for synthetic models."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIALS = ("<s>", "</s>", "<unk>")


NO_TOKENIZER_LIMIT = int(1e30)  # transformers' own "no limit" value


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer via AutoTokenizer, or None when it ships none (token-id prompts only).

    Its `model_max_length` is lifted: the engine checks prompt + max_tokens against max_model_len itself and
    answers `context_length_exceeded`; the tokenizer's own check would only log a warning per long prompt."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many kinds for an unreadable tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"tokenizer: cannot load the tokenizer in {model_dir}: {first}") from exc
    tokenizer.model_max_length = NO_TOKENIZER_LIMIT
    return tokenizer


def text_decoder(tokenizer: PreTrainedTokenizerBase | None) -> Callable[[list[int]], str] | None:
    """ids -> text without special tokens. A fast tokenizer's own decoder is called directly (the
    transformers wrapper converts the ids again on every call: most of the cost for a few ids) unless
    the tokenizer cleans up spaces, which only the wrapper does."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return functools.partial(backend.decode, skip_special_tokens=True)  # no Python frame per call
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def build_byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text round-trips) padded with filler tokens up to `vocab_size`.
    Ids: 0 <s>, 1 </s>, 2 <unk>, then the 256 byte symbols, then fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size: a byte tokenizer needs at least {len(SPECIALS) + 256}, got {vocab_size}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback piece


def token_bytes(tokenizer: PreTrainedTokenizerBase | None) -> Callable[[int], bytes]:
    """token id -> the bytes the token stands for, read from its vocabulary entry rather than from its decode.

    A byte-level BPE token (GPT-2, Llama-3, Qwen2) that holds part of a multi-byte character decodes on its own
    to U+FFFD, but its bytes are exact, so a sequence's token bytes joined are the sequence's UTF-8 text (what
    OpenAI chat logprobs' `bytes` is for). Byte-level vocabularies spell each byte with one printable character
    (GPT-2's table, `bytes_to_unicode`); SentencePiece byte-fallback vocabularies spell a byte `<0xNN>` and a
    space `▁`; added and special tokens are their own text. Any other vocabulary, and a piece the table does
    not spell, falls back to the token's decode encoded as UTF-8. Results are cached per id."""
    if tokenizer is None:
        return lambda token_id: str(token_id).encode()
    spell = _piece_speller(_decoder_types(tokenizer))
    added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())

    @functools.cache
    def lookup(token_id: int) -> bytes:
        if spell is not None and token_id not in added:
            piece = tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and (spelled := spell(piece)) is not None:
                return spelled
        return tokenizer.decode([token_id]).encode("utf-8", "surrogatepass")

    return lookup


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The `type`s of a fast tokenizer's decoder and of the decoders a Sequence holds (empty for others)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    return {d.get("type") for d in [state, *state.get("decoders", [])]}


def _piece_speller(decoders: set[str]) -> Callable[[str], bytes | None] | None:
    if "ByteLevel" in decoders:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        table = {char: byte for byte, char in bytes_to_unicode().items()}
        return lambda piece: bytes(table[c] for c in piece) if all(c in table for c in piece) else None
    if decoders & {"ByteFallback", "Metaspace"}:
        def spell(piece: str) -> bytes:
            byte = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
        return spell
    return None

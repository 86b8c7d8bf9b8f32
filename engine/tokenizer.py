"""Tokenizer glue: load a model directory's tokenizer, or build a byte-level one for synthetic models."""

from __future__ import annotations

import functools
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

"""OpenAI chat logprobs' `bytes` over a real socket with the `openai` client, on a model with a byte-level BPE
vocabulary (`synthetic:tiny`, GPT-2's scheme as Llama-3 and Qwen2 use): a token that holds part of a multi-byte
character has the text U+FFFD, but its `bytes` are its own bytes, so the bytes of a character's tokens, joined,
are that character's UTF-8 (the truth: Python's UTF-8 encoding, and HF's tokenization of the text into those
tokens). Each token is made the sampled one with `logit_bias` (logprobs are reported before the bias)."""

from __future__ import annotations

import pytest
from test_serve_support import start_server, stop_server

openai = pytest.importorskip("openai")

TEXT = "é€😀 ok"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    from lorafleet.engine.synthetic import write_model

    model = write_model("tiny", tmp_path_factory.mktemp("bytes") / "model")
    proc = start_server(["--model", str(model), "--served-model-name", "tiny"])
    client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
    yield client, AutoTokenizer.from_pretrained(str(model))
    client.close()
    assert stop_server(proc) == 0, proc.output()


def test_chat_logprob_bytes_are_the_tokens_own_bytes(served):
    client, tokenizer = served
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # the multi-byte characters are split into several tokens
    spelled = []
    for token_id in ids:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "say it"}], max_tokens=2, logprobs=True,
            top_logprobs=3, logit_bias={str(token_id): 100}, extra_body={"ignore_eos": True})
        entries = reply.choices[0].logprobs.content
        assert len(entries) == 2 and entries[0].bytes == entries[1].bytes
        assert all(e.token == tokenizer.decode([token_id]) for e in entries)  # U+FFFD for a partial character
        spelled.append(bytes(entries[0].bytes))
        for top in entries[0].top_logprobs:  # every entry's bytes spell its text when the text is whole
            assert "\ufffd" in top.token or bytes(top.bytes) == top.token.encode("utf-8")
    assert b"".join(spelled) == TEXT.encode("utf-8")
    assert any(b"\xef\xbf\xbd" not in s and s.decode("utf-8", "replace") == "\ufffd" for s in spelled)


def test_sentencepiece_byte_fallback_pieces_are_spelled_as_bytes():
    """Llama-2/Mistral vocabularies: `<0xNN>` is the byte NN, `▁` a space, a special token its own text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from lorafleet.engine.tokenizer import token_bytes

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "\u2581ok": 259, "é": 260}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    spell = token_bytes(tokenizer)
    assert tokenizer.decode([3 + 0xC3]) == "\ufffd"
    assert [spell(3 + 0xC3), spell(3 + 0xA9), spell(259), spell(260), spell(1)] == \
        [b"\xc3", b"\xa9", b" ok", "é".encode(), b"<s>"]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprob_tokens_spell_the_text_and_offsets_index_it(served, stream):
    """Completions logprobs with echo: each entry of `tokens` is what the token adds to the choice's `text` (a
    token that starts a multi-byte character adds "", the one that completes it the character), so the tokens
    joined are the text — the prompt's part is the prompt — and `text_offset` indexes into it; the greedy token is
    the most likely key of its `top_logprobs` (lm-eval's greedy check); streamed or not."""
    client, tokenizer = served
    prompt_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    reply = client.completions.create(model="tiny", prompt=TEXT, echo=True, logprobs=1, max_tokens=8, temperature=0,
                                      stream=stream, extra_body={"ignore_eos": True})
    choices = [chunk.choices[0] for chunk in reply] if stream else reply.choices
    text = "".join(c.text for c in choices)
    tokens = [t for c in choices for t in c.logprobs.tokens]
    offsets = [o for c in choices for o in c.logprobs.text_offset]
    assert len(tokens) == len(prompt_ids) + 8 and text.startswith(TEXT)
    assert "".join(tokens[:len(prompt_ids)]) == TEXT and "".join(tokens) == text
    assert all(text[at:at + len(token)] == token for at, token in zip(offsets, tokens, strict=True))
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    tops = [top for c in choices for top in c.logprobs.top_logprobs][len(prompt_ids):]  # temperature 0: greedy
    assert all(max(top, key=top.get) == token for top, token in zip(tops, tokens[len(prompt_ids):], strict=True))

"""Shapes of the demo model and its character-level tokenizer (used by the training script).

Imports of torch/transformers/tokenizers happen inside the functions, so importing this module
stays cheap.
"""

from __future__ import annotations

from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# Takes the last user message as the input line; the model has no notion of roles.
CHAT_TEMPLATE = (
    "{%- for message in messages if message['role'] == 'user' -%}"
    "{%- if loop.last -%}{{ message['content'] }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def char_vocab() -> dict[str, int]:
    """Token -> id: the special tokens, then newline, then printable ASCII (space to tilde)."""
    tokens = list(SPECIAL_TOKENS) + ["\n"] + [chr(c) for c in range(32, 127)]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character, exact round trips, no BOS.

    Every character is its own pre-token (a regex split), looked up in a word-level vocabulary;
    characters outside the vocabulary map to ``<unk>``. The ``Fuse`` decoder concatenates tokens
    without inserting spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_config():
    """The base model's ``LlamaConfig``: 4 layers, hidden 128, 4 query heads sharing 2 KV heads."""
    from transformers import LlamaConfig

    vocab = char_vocab()
    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        pad_token_id=vocab[PAD],
        eos_token_id=vocab[EOS],
        bos_token_id=None,
    )


def save_base(model, tokenizer, out_dir: Path) -> None:
    """Write the base model (fp32 safetensors), its generation config and tokenizer to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

"""The demo's string tasks: one pure-Python transform per adapter, plus the input generator.

Everything here is plain Python (no torch) so that tests, the load generator and the serving
layer's end-to-end checks can import it cheaply.

An input line is 3 to 12 characters of lowercase ASCII letters and single spaces, never starting or
ending with a space. The prompt the model sees is ``line + "\\n"``; the expected completion is
``TASKS[name](line) + "\\n"`` followed by the tokenizer's EOS token.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

MIN_LINE_CHARS = 3
MAX_LINE_CHARS = 12
LETTERS = string.ascii_lowercase
VOWELS = frozenset("aeiouAEIOU")
SPACE_PROBABILITY = 0.18


def _shift_letters(line: str, shift: int) -> str:
    """Rotate every ASCII letter by ``shift`` places, keeping its case; other characters stay."""
    out = []
    for ch in line:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - ord("a") + shift) % 26 + ord("a")))
        elif "A" <= ch <= "Z":
            out.append(chr((ord(ch) - ord("A") + shift) % 26 + ord("A")))
        else:
            out.append(ch)
    return "".join(out)


def reverse(line: str) -> str:
    """The characters in reverse order: ``"ab cd" -> "dc ba"``."""
    return line[::-1]


def upper(line: str) -> str:
    """Upper-case every letter: ``"ab cd" -> "AB CD"``."""
    return line.upper()


def rot13(line: str) -> str:
    """ROT13 on the letters: ``"ab cd" -> "no pq"``."""
    return _shift_letters(line, 13)


def caesar3(line: str) -> str:
    """Caesar shift by three on the letters: ``"ab xyz" -> "de abc"``."""
    return _shift_letters(line, 3)


def sort(line: str) -> str:
    """The letters sorted alphabetically, spaces dropped: ``"dc ab" -> "abcd"``."""
    return "".join(sorted(line.replace(" ", "")))


def title(line: str) -> str:
    """Capitalise the first letter of each word: ``"ab cd" -> "Ab Cd"``."""
    return " ".join(word[:1].upper() + word[1:] for word in line.split(" "))


def novowels(line: str) -> str:
    """Drop the vowels a, e, i, o, u (spaces stay): ``"hello you" -> "hll y"``."""
    return "".join(ch for ch in line if ch not in VOWELS)


def reverse_words(line: str) -> str:
    """The words in reverse order, each word unchanged: ``"ab cd ef" -> "ef cd ab"``."""
    return " ".join(reversed(line.split(" ")))


def echo(line: str) -> str:
    """The base model's behaviour: the line itself."""
    return line


TASKS: dict[str, Callable[[str], str]] = {
    "reverse": reverse,
    "upper": upper,
    "rot13": rot13,
    "caesar3": caesar3,
    "sort": sort,
    "title": title,
    "novowels": novowels,
    "reverse_words": reverse_words,
}
"""Adapter name -> the transform that adapter applies to an input line."""


def random_input(rng: random.Random, min_chars: int = MIN_LINE_CHARS, max_chars: int = MAX_LINE_CHARS) -> str:
    """A fresh input line in the training distribution, drawn from ``rng``.

    Lowercase letters and single spaces; the first and last characters are letters. Lengths are
    uniform in ``[min_chars, max_chars]``.
    """
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"min_chars, max_chars must satisfy 1 <= min_chars <= max_chars, "
                         f"got {min_chars}, {max_chars}")
    n = rng.randint(min_chars, max_chars)
    chars: list[str] = []
    for i in range(n):
        can_space = 0 < i < n - 1 and chars[-1] != " "
        if can_space and rng.random() < SPACE_PROBABILITY:
            chars.append(" ")
        else:
            chars.append(rng.choice(LETTERS))
    return "".join(chars)


def prompt_for(line: str) -> str:
    """The prompt text for an input line (the line and a newline)."""
    return line + "\n"

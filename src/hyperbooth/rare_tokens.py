"""Choosing the rare word that names a subject, as the two papers do.

- Custom Diffusion: count CLIP tokens over a caption corpus; keep the alphabetic ones seen
  between 5 and 10 times that are not a substring of another such token.
- DreamBooth: sample short strings (<= 3 characters) among the tokenizer's rarer ids
  (DreamBooth used ids 5,000-10,000 of its T5 vocabulary; CLIP's ids are ordered by merge
  frequency too).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

END_OF_WORD = "</w>"


def count_tokens(tokenizer, captions: Iterable[str]) -> Counter:
    """How often each whole-word CLIP token occurs in the captions."""
    counts: Counter = Counter()
    for text in captions:
        counts.update(tokenizer.tokenize(text.lower()))
    return counts


def custom_diffusion_tokens(
    tokenizer, captions: Iterable[str], low: int = 5, high: int = 10
) -> list[tuple[str, int]]:
    """(word, count) for alphabetic whole-word tokens seen low..high times, not inside another."""
    counts = count_tokens(tokenizer, captions)
    words = {
        token[: -len(END_OF_WORD)]: count
        for token, count in counts.items()
        if token.endswith(END_OF_WORD) and token[: -len(END_OF_WORD)].isalpha()
    }
    kept = {word: count for word, count in words.items() if low <= count <= high}
    alone = [
        (word, count)
        for word, count in kept.items()
        if not any(word != other and word in other for other in words)
    ]
    return sorted(alone, key=lambda item: (item[1], item[0]))


def dreambooth_tokens(
    tokenizer,
    count: int = 10,
    seed: int = 0,
    ids: tuple[int, int] = (5000, 10000),
    max_chars: int = 3,
) -> list[str]:
    """count short whole-word tokens drawn from the id range (a fixed seed gives a fixed list)."""
    vocabulary = {index: token for token, index in tokenizer.get_vocab().items()}
    candidates = []
    for index in range(*ids):
        token = vocabulary.get(index, "")
        word = token[: -len(END_OF_WORD)] if token.endswith(END_OF_WORD) else ""
        if word.isalpha() and len(word) <= max_chars:
            candidates.append(word)
    return random.Random(seed).sample(candidates, min(count, len(candidates)))

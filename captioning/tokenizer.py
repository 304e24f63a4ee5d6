"""Word-level tokenizer built from training captions.

Text is lower-cased and split by one regular expression into words (letters, digits and
underscores, with inner apostrophes kept: ``dog's``) and single punctuation marks, so the same
text always gives the same tokens. The vocabulary is the four special tokens followed by every
word seen at least ``min_count`` times, most frequent first, ties in alphabetical order.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

FORMAT = "pixquery-word-tokenizer/1"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3

#: words a finished caption should not end with ("a dog runs through the"): decoding never puts
#: ``<eos>`` right after one of them, and the SCST log counts the dev captions that do.
DANGLING_WORDS = frozenset("a an the of in on at with and to into through its his her their".split())

_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and punctuation marks.

    A special token written in a caption (``"<pad>"``) splits into ``<``, ``pad``, ``>``, so
    caption text can never produce a special id.
    """
    return _TOKEN_RE.findall(text.lower())


def clean_words(caption: str) -> list[str]:
    """Training (and scoring) text: lower-cased words without punctuation tokens (COCO metrics drop them too)."""
    return [w for w in split_words(caption) if any(ch.isalnum() for ch in w)]


class WordTokenizer:
    """Maps captions to id lists ``[<bos>, w1, ..., wn, <eos>]`` and back.

    ``<pad>`` is id 0 (so zero-padded batches and ``ignore_index=0`` losses work), then
    ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, itos: list[str]) -> None:
        """Build from the full id -> token list; it must start with the four special tokens."""
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(itos[:len(SPECIALS)])}")
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary has duplicate tokens")
        if not all(isinstance(tok, str) and tok for tok in itos):
            raise ValueError("vocabulary tokens must be non-empty strings")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {tok: i for i, tok in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "WordTokenizer":
        """Vocabulary of every word that occurs at least ``min_count`` times in ``captions``."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(split_words(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        """Vocabulary size, special tokens included."""
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[<bos>, words..., <eos>]``, at most ``max_len`` ids (bos and eos included; words are
        truncated, eos is always kept). Unknown words become ``<unk>``. No padding."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (room for <bos> and <eos>), got {max_len}")
        ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)][: max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def scoring_rows(self, texts: list[str], max_len: int) -> tuple[list[list[int]], list[bool]]:
        """What a scorer rates: each text cleaned like the training captions and encoded as ``<bos> words
        <eos>``, padded to the longest -> (rows, empty) where ``empty[i]``: text i has no words (scores 0)."""
        rows = [self.encode(" ".join(clean_words(t)[: max_len - 2]), max_len) for t in texts]
        width = max((len(r) for r in rows), default=0)
        return [r + [self.pad_id] * (width - len(r)) for r in rows], [len(r) <= 2 for r in rows]

    def ids_of(self, words: Iterable[str]) -> list[int]:
        """The ids of those ``words`` that are in the vocabulary, sorted."""
        return sorted({self.stoi[w] for w in words if w in self.stoi and w not in SPECIALS})

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by single spaces; stops at the first ``<eos>``, drops the special tokens."""
        words: list[str] = []
        for raw in ids:
            i = int(raw)
            if i == self.eos_id:
                break
            if i < len(SPECIALS):
                continue
            if i >= len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self.itos)}")
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """Plain str/list payload, safe inside a ``torch.save`` file loaded with ``weights_only=True``."""
        return {"format": FORMAT, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WordTokenizer":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} payload")
        itos = data.get("itos")
        if not isinstance(itos, list):
            raise ValueError("tokenizer payload has no 'itos' list")
        return cls(itos)

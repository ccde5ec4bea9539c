"""BERT's uncased WordPiece tokenizer (what CLIBD's text tower reads: prajjwal1/bert-small's `vocab.txt`, the
bert-base-uncased vocabulary), without `transformers`, for taxon-name queries.

As HF `BertTokenizer(do_lower_case=True)`: control characters dropped and whitespace normalised, spaces around
CJK characters, lower case and accents stripped, punctuation split off, then each word cut greedily into the
longest vocabulary pieces (`##` marks a continuation; a word that cannot be cut, or of over 100 characters, is
`[UNK]`). CLIBD encodes "order family genus species" as `[CLS] tokens [SEP]`, truncated and padded with
`[PAD]` to 20 tokens.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from core.errors import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return any(a <= code <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                           (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))  # fmt: skip


def basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer (lower case, accents stripped, punctuation split)."""
    cleaned = []
    for char in text:
        code = ord(char)
        if (
            code == 0
            or code == 0xFFFD
            or (unicodedata.category(char).startswith("C") and char not in "\t\n\r")
        ):
            continue
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            cleaned.append(" ")
        elif _is_cjk(code):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    words = []
    for word in "".join(cleaned).split():
        word = "".join(
            c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn"
        )
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(char)
            else:
                current.append(char)
        if current:
            words.append("".join(current))
    return words


class WordPieceTokenizer:
    """`encode(texts) -> (ids, mask)` of shape [n, max_len], as CLIBD's `tokenizer(..., padding="max_length",
    max_length=20, truncation=True)`."""

    def __init__(self, vocab: str | os.PathLike, max_len: int = 20):
        path = Path(vocab)
        try:
            tokens = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read the WordPiece vocabulary {path}: {err}") from None
        self.ids = {token.rstrip("\n"): i for i, token in enumerate(tokens)}
        missing = [s for s in SPECIALS if s not in self.ids]
        if missing:
            raise UserError(f"{path} is not a BERT vocab.txt (no {', '.join(missing)})")
        if max_len < 2:
            raise UserError(f"the text length must be at least 2 tokens, got {max_len}")
        self.max_len = max_len

    def pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else f"##{word[start:end]}"
                if piece in self.ids:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            out.append(piece)
            start = end
        return out

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), self.max_len), self.ids["[PAD]"], dtype=np.int64)
        mask = np.zeros((len(texts), self.max_len), dtype=bool)
        for i, text in enumerate(texts):
            tokens = [p for word in basic_tokens(text) for p in self.pieces(word)][: self.max_len - 2]
            row = [self.ids["[CLS]"], *(self.ids[t] for t in tokens), self.ids["[SEP]"]]
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

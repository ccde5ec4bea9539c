"""DNA barcodes as text: validation (A, C, G, T, N and gap `-`), FASTA files, and BarcodeBERT's k-mer tokens.

A barcode is upper-cased, stripped of whitespace and gaps, and checked: any other character is refused with
its position, or read as `N` when the caller asks for that (`--dna-unknown n`; data files use it for IUPAC
ambiguity codes). Tokens follow BarcodeBERT: right-pad with `N` or truncate to `max_len` nucleotides, cut into
k-mers every `stride`, vocabulary `<MASK>, <CLS>, <UNK>` then the 4^k k-mers in lexicographic order, and any
k-mer holding a non-ACGT base is `<UNK>`. Unlike the reference, a mask tells real tokens from the padding, and
no extra first token is prepended (BarcodeBERT was pretrained without one).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError

ALPHABET = "ACGTN-"
UNKNOWN_MODES = ("error", "n")
SPECIALS = ("<MASK>", "<CLS>", "<UNK>")
MASK_ID, CLS_ID, UNK_ID = 0, 1, 2
_CODES = np.full(256, 4, dtype=np.int64)  # A C G T -> 0..3, every other byte -> 4 (not a base)
for _i, _base in enumerate(b"ACGT"):
    _CODES[_base] = _i


def clean_dna(sequence: str, unknown: str = "error", source: str = "--dna") -> str:
    """Upper-case, without whitespace and gaps; characters outside ACGTN- refused (or N when unknown='n')."""
    if unknown not in UNKNOWN_MODES:
        raise UserError(f"--dna-unknown must be one of {', '.join(UNKNOWN_MODES)}, got {unknown!r}")
    text = "".join(sequence.split()).upper()
    bad = next(((i, c) for i, c in enumerate(text) if c not in ALPHABET), None)
    if bad is not None:
        if unknown == "error":
            position, char = bad
            raise UserError(
                f"{source}: character {char!r} at position {position + 1} is not one of A, C, G, T, N or -; "
                "fix the sequence or pass --dna-unknown n to read such characters as N"
            )
        text = "".join(c if c in ALPHABET else "N" for c in text)
    text = text.replace("-", "")
    if not text:
        raise UserError(f"{source}: the DNA sequence is empty")
    return text


def read_fasta(path: str | os.PathLike, unknown: str = "error") -> list[tuple[str, str]]:
    """(name, sequence) per record of a FASTA file; a file without a `>` header is one unnamed record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read FASTA file {path}: {err}") from None
    return parse_fasta(text, str(path), path.stem, unknown)


def parse_fasta(text: str, source: str, default_name: str, unknown: str = "error") -> list[tuple[str, str]]:
    """`read_fasta` of FASTA text (e.g. pasted); `source` names it in messages, `default_name` a headerless record."""
    lines = text.splitlines()
    records: list[tuple[str, list[str], int]] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            records.append((line[1:].strip() or f"record{len(records) + 1}", [], number))
        else:
            if not records:
                records.append((default_name, [], number))
            records[-1][1].append(line)
    if not records:
        raise UserError(f"{source} holds no FASTA sequence")
    out = []
    for name, parts, number in records:
        if not parts:
            raise UserError(f"{source}:{number}: record {name!r} has no sequence lines")
        out.append((name, clean_dna("".join(parts), unknown, source=f"{source} record {name!r}")))
    return out


@dataclass(frozen=True)
class KmerTokenizer:
    """BarcodeBERT's tokenizer with a padding mask: `encode(seqs) -> (ids, mask)`, both [n, tokens]."""

    k: int = 5
    stride: int = 5
    max_len: int = 660

    def __post_init__(self):
        if self.k < 1 or self.stride < 1 or self.max_len < self.k:
            raise UserError(f"DNA tokenizer needs k >= 1, stride >= 1 and max_len >= k, got {self.config}")

    @property
    def config(self) -> dict:
        return asdict(self)

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + 4**self.k

    @property
    def num_tokens(self) -> int:
        return (self.max_len - self.k) // self.stride + 1

    def token(self, kmer: str) -> int:
        """The id of one k-mer (what `encode` gives for it)."""
        codes = _CODES[np.frombuffer(kmer.encode("ascii"), dtype=np.uint8)]
        if len(kmer) != self.k or (codes > 3).any():
            return UNK_ID
        return len(SPECIALS) + int((codes * 4 ** np.arange(self.k - 1, -1, -1)).sum())

    def encode(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids and bool mask [n, num_tokens]; mask is True where a k-mer starts inside the sequence."""
        n, length = len(sequences), self.max_len
        raw = np.full((n, length), ord("N"), dtype=np.uint8)
        lengths = np.empty(n, dtype=np.int64)
        for i, seq in enumerate(sequences):
            data = seq.encode("ascii")[:length]
            raw[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
            lengths[i] = len(data)
        starts = np.arange(self.num_tokens) * self.stride
        windows = _CODES[raw][:, starts[:, None] + np.arange(self.k)]  # [n, tokens, k]
        weights = 4 ** np.arange(self.k - 1, -1, -1)
        ids = len(SPECIALS) + (np.minimum(windows, 3) * weights).sum(-1)
        ids[(windows > 3).any(-1)] = UNK_ID
        mask = starts[None, :] < lengths[:, None]
        return ids.astype(np.int64), mask

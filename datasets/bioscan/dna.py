"""DNA barcodes as text: validation (A, C, G, T, N and gap `-`), FASTA files read record by record, and
BarcodeBERT's k-mer tokens in each of its checkpoints' conventions.

A barcode is upper-cased and stripped of whitespace, then checked: any other character than ACGTN- is refused
with its position, or read as `N` when the caller asks for that (`--dna-unknown n`; data files use it for IUPAC
ambiguity codes). Gaps stay in place, as in the reference: a k-mer holding one is `<UNK>`, and the reading frame
of the k-mers after it is kept.

Tokens follow BarcodeBERT: right-pad with `N` or truncate to `max_len` nucleotides, cut into k-mers every
`stride`, specials first, then the 4^k k-mers in lexicographic order; a k-mer holding anything but ACGT is
`<UNK>`. The checkpoints differ in three ways, all fields of `KmerTokenizer`:
- `vocab`: v1 (`model_41.pth`, CLIBD) has the specials `<MASK> <CLS> <UNK>`; v2 has `[MASK] [UNK]`, so every
  k-mer id is one lower. v2's `tokenize_n_nucleotide` (`n_kmers`) gives the k-mers holding N ids of their own
  after the 4^k others (5^k k-mers in all).
- `attend_padding`: v1 was pretrained, and CLIBD trained, with no attention mask, so the N padding is attended
  to and pooled; v2 (and this project's own towers) mask it: the first `len // stride` tokens are real (v2's
  rule: a last partial k-mer is padding).
- `prefix`: CLIBD prepends token id 0 (which is `<MASK>` in v1's vocabulary) to every barcode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.errors import UserError

ALPHABET = "ACGTN-"
UNKNOWN_MODES = ("error", "n")
VOCABS = {"v1": ("<MASK>", "<CLS>", "<UNK>"), "v2": ("[MASK]", "[UNK]")}
_CODES = np.full(256, 5, dtype=np.int64)  # A C G T N -> 0..4, every other byte (gap, padding) -> 5
for _i, _base in enumerate(b"ACGTN"):
    _CODES[_base] = _i


def clean_dna(sequence: str, unknown: str = "error", source: str = "--dna") -> str:
    """Upper-case, without whitespace; characters outside ACGTN- refused (or N when unknown='n')."""
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
    if not text.strip("-"):
        raise UserError(f"{source}: the DNA sequence is empty")
    return text


def iter_fasta(path: str | os.PathLike, unknown: str = "error") -> Iterator[tuple[str, str]]:
    """(name, sequence) per record of a FASTA file, read line by line (memory holds one record); a file
    without a `>` header is one unnamed record."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            yield from fasta_records(handle, str(path), path.stem, unknown, f"FASTA file {path}")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read FASTA file {path}: {err}") from None


def parse_fasta(text: str, source: str, default_name: str, unknown: str = "error") -> list[tuple[str, str]]:
    """The records of FASTA text (e.g. pasted into a page); `source` names it in messages."""
    return list(fasta_records(text.splitlines(), source, default_name, unknown))


def fasta_records(lines, source: str, default_name: str, unknown: str = "error",
                  what: str | None = None) -> Iterator[tuple[str, str]]:  # fmt: skip
    """(name, sequence) per FASTA record of `lines` (a file or a text's lines), one record in memory at a time;
    `source` names the lines in messages (`source:LINE`), `default_name` a record without a `>` header."""
    name, parts, start, count = None, [], 0, 0

    def record() -> tuple[str, str]:
        if not parts:
            raise UserError(f"{source}:{start}: record {name!r} has no sequence lines")
        return name, clean_dna("".join(parts), unknown, source=f"{source} record {name!r}")

    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if name is not None:
                yield record()
            count += 1
            name, parts, start = line[1:].strip() or f"record{count}", [], number
        else:
            if name is None:
                count, name, start = 1, default_name, number
            parts.append(line)
    if name is None:
        raise UserError(f"{what or source} holds no sequence")
    yield record()


def read_fasta(path: str | os.PathLike, unknown: str = "error") -> list[tuple[str, str]]:
    """Every record of a FASTA file (`iter_fasta` as a list)."""
    return list(iter_fasta(path, unknown))


@lru_cache(maxsize=8)
def _kmer_table(k: int, specials: int, n_kmers: bool) -> np.ndarray:
    """Token id of every base-5 k-mer code (A C G T N = 0..4); k-mers with N are <UNK> unless `n_kmers`,
    which numbers them after the 4^k others in their lexicographic order (BarcodeBERT v2's `tokenize_n`)."""
    codes = np.arange(5**k)
    digits = (codes[:, None] // 5 ** np.arange(k - 1, -1, -1)) % 5
    pure = (digits < 4).all(1)
    table = np.full(len(codes), specials - 1, dtype=np.int64)
    table[pure] = specials + (digits[pure] * 4 ** np.arange(k - 1, -1, -1)).sum(1)
    if n_kmers:
        table[~pure] = specials + 4**k + np.arange(int((~pure).sum()))
    table.flags.writeable = False
    return table


@dataclass(frozen=True)
class KmerTokenizer:
    """BarcodeBERT's tokenizer with an attention mask: `encode(seqs) -> (ids, mask)`, both [n, tokens]."""

    k: int = 5
    stride: int = 5
    max_len: int = 660
    vocab: str = "v1"
    n_kmers: bool = False
    attend_padding: bool = False
    prefix: int | None = None

    def __post_init__(self):
        if self.k < 1 or self.stride < 1 or self.max_len < self.k:
            raise UserError(f"DNA tokenizer needs k >= 1, stride >= 1 and max_len >= k, got {self.config}")
        if self.k > 8:
            raise UserError(
                f"DNA tokenizer: k = {self.k} gives over 4^8 k-mers; BarcodeBERT uses k of 4 to 6"
            )
        if self.vocab not in VOCABS:
            raise UserError(f"DNA vocabulary must be one of {', '.join(VOCABS)}, got {self.vocab!r}")
        if self.prefix is not None and not 0 <= self.prefix < self.vocab_size:
            raise UserError(f"DNA prefix token {self.prefix} is outside the vocabulary of {self.vocab_size}")

    @property
    def config(self) -> dict:
        return asdict(self)

    @property
    def specials(self) -> tuple[str, ...]:
        return VOCABS[self.vocab]

    @property
    def unk_id(self) -> int:
        return len(self.specials) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + (5 if self.n_kmers else 4) ** self.k

    @property
    def num_kmers(self) -> int:
        return (self.max_len - self.k) // self.stride + 1

    @property
    def num_tokens(self) -> int:
        return self.num_kmers + (self.prefix is not None)

    def _table(self) -> np.ndarray:
        return _kmer_table(self.k, len(self.specials), self.n_kmers)

    def token(self, kmer: str) -> int:
        """The id of one k-mer (what `encode` gives for it)."""
        codes = _CODES[np.frombuffer(kmer.encode("ascii"), dtype=np.uint8)]
        if len(kmer) != self.k or (codes > 4).any():
            return self.unk_id
        return int(self._table()[(codes * 5 ** np.arange(self.k - 1, -1, -1)).sum()])

    def encode(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids and bool attention mask [n, num_tokens] (module docstring for which tokens are real)."""
        n, length = len(sequences), self.max_len
        raw = np.full((n, length), ord("N"), dtype=np.uint8)
        lengths = np.empty(n, dtype=np.int64)
        for i, seq in enumerate(sequences):
            data = seq.encode("ascii")[:length]
            raw[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
            lengths[i] = len(data)
        starts = np.arange(self.num_kmers) * self.stride
        windows = _CODES[raw][:, starts[:, None] + np.arange(self.k)]  # [n, kmers, k]
        code = (np.minimum(windows, 4) * 5 ** np.arange(self.k - 1, -1, -1)).sum(-1)
        ids = self._table()[code]
        ids[(windows > 4).any(-1)] = self.unk_id
        if self.attend_padding:
            mask = np.ones(ids.shape, dtype=bool)
        else:
            real = np.where(lengths >= length, self.num_kmers, lengths // self.stride)
            mask = np.arange(self.num_kmers)[None, :] < real[:, None]
        if self.prefix is not None:
            ids = np.concatenate([np.full((n, 1), self.prefix, dtype=np.int64), ids], 1)
            mask = np.concatenate([np.ones((n, 1), dtype=bool), mask], 1)
        return ids.astype(np.int64), mask

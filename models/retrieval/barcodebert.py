"""BarcodeBERT checkpoints (bioscan-ml/BarcodeBERT) as the DNA tower: which of its formats a file is, its BERT
weights and configuration, and the tokenisation it was pretrained with (so that it embeds as the reference).

- v1 (`model_41.pth`, the paper's; CLIBD's default): the bare state dict of a DDP-wrapped `BertForMaskedLM`
  (`module.bert.*`, `module.cls.*`). Vocabulary `<MASK> <CLS> <UNK>` + 4^k; the file says nothing else, so k
  follows from the vocabulary and the stride and maximum length are the pretraining's (k and 660) unless
  `--dna-stride`/`--dna-max-len` say otherwise. Pretrained with no attention mask: the N padding is attended
  to, and its embedding is the mean of the last hidden states over every token.
- v2 (the current releases): a dict {model, optimizer, scheduler, config, bert_config, epoch, ...} of a
  `BertForTokenClassification` (`classifier.*` dropped here). `config` is the argparse.Namespace of its
  pretraining run (k_mer, stride, max_len, tokenize_n_nucleotide), read as a plain dict by a reader that runs
  nothing (models/retrieval/torchfile.py); `bert_config` is the HF config. Vocabulary `[MASK] [UNK]` + 4^k
  (5^k with tokenize_n); padding masked; embedding the masked mean of the last hidden states.
- `.safetensors` (e.g. converted from the Hugging Face hub): a bare state dict; the vocabulary size tells v1
  from v2.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import UserError
from models.retrieval.bert import Bert, BertConfig, config_from_state

_DROPPED = ("cls.", "pooler.", "classifier.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
DEFAULT_MAX_LEN = 660


@dataclass
class BarcodeBert:
    kind: str  # "v1" or "v2"
    state: dict  # the `Bert` state dict (tensors, or TensorInfo when read without tensors)
    config: BertConfig
    tokens: dict  # KmerTokenizer fields

    def spec_fields(self) -> dict:
        """The RetrievalSpec fields that make the DNA tower this checkpoint's."""
        t = self.tokens
        return {"dna_k": t["k"], "dna_stride": t["stride"], "dna_max_len": t["max_len"], "dna_vocab": t["vocab"],
                "dna_n_kmers": t["n_kmers"], "dna_attend_padding": t["attend_padding"],
                "dna_bert": {k: v for k, v in asdict(self.config).items() if k != "vocab_size"}}  # fmt: skip


def bert_state(state: dict, source: str, drop=_DROPPED) -> dict:
    """The `Bert` part of a BERT state dict: `module.` and `bert.` prefixes stripped, heads, pooler and index
    buffers dropped."""
    out = {}
    for key, value in state.items():
        key = str(key).removeprefix("module.")
        if key.removeprefix("bert.").startswith(drop) or key.startswith(drop) or key.endswith(_BUFFERS):
            continue
        out[key.removeprefix("bert.")] = value
    if not any(k.startswith("encoder.layer.") for k in out):
        raise UserError(f"{source} holds no BERT encoder weights (no encoder.layer.* keys)")
    return out


def _kmer_size(vocab: int, specials: int, source: str) -> tuple[int, bool]:
    """(k, whether k-mers with N have ids) from a vocabulary size of `specials` + 4^k (or 5^k)."""
    for k in range(1, 9):
        if specials + 4**k == vocab:
            return k, False
        if specials + 5**k == vocab:
            return k, True
    raise UserError(f"{source}: a vocabulary of {vocab} tokens is not {specials} specials + 4^k k-mers")


def _pick(name: str, option, stored, source: str):
    if option is not None and stored is not None and option != stored:
        raise UserError(f"--dna-{name.replace('_', '-')} {option} differs from the {stored} that {source} was "
                        f"pretrained with; leave the option out")  # fmt: skip
    return stored if stored is not None else option


def _v2_config(raw: dict, source: str) -> tuple[dict, dict]:
    from models.retrieval.torchfile import find_opaque

    bert_cfg, run = raw.get("bert_config"), raw.get("config") or {}
    if not isinstance(bert_cfg, dict) or not isinstance(run, dict):
        raise UserError(
            f"{source}: bert_config and config must be a dict and a Namespace; is it BarcodeBERT v2?"
        )
    for part, value in (("bert_config", bert_cfg), ("config", run)):
        found = find_opaque(value, part)
        if found:
            raise UserError(f"{source}: {found}, where plain settings belong; refused (nothing was executed)")
    if bert_cfg.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: hidden_act {bert_cfg['hidden_act']!r} is not supported (only gelu)")
    if bert_cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"{source}: position_embedding_type {bert_cfg['position_embedding_type']!r} is not supported"
        )
    if run.get("tokenizer", "kmer") != "kmer":
        raise UserError(
            f"{source} was pretrained with the {run['tokenizer']!r} tokenizer; only k-mers are supported"
        )
    return bert_cfg, run


def read_barcodebert(path: str | os.PathLike, k: int | None = None, stride: int | None = None,
                     max_len: int | None = None, tensors: bool = True) -> BarcodeBert:  # fmt: skip
    """A BarcodeBERT checkpoint (v1 `.pth`, v2 `.pt`/`.pth` dict, or `.safetensors`) with its tokenisation;
    the options fill what the file does not say and may not contradict what it says."""
    from core.checkpoint import sniff_format

    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise UserError(f"BarcodeBERT checkpoint {path} does not exist")
    if sniff_format(path) == "safetensors":
        from core.checkpoint import load_foreign_state_dict

        raw = load_foreign_state_dict(path)
    else:
        from models.retrieval.torchfile import read_torch_file

        raw = read_torch_file(path, tensors=tensors)
    if not isinstance(raw, dict):
        raise UserError(f"{source} does not hold a state dict or a BarcodeBERT checkpoint dict")
    from models.retrieval.torchfile import find_opaque

    weights = raw["model"] if isinstance(raw.get("model"), dict) else raw.get("state_dict", raw)
    found = find_opaque(weights, "its weights")
    if found:
        raise UserError(f"{source}: {found}, where tensors belong; refused (nothing was executed)")
    if isinstance(raw.get("model"), dict) and "bert_config" in raw:
        kind = "v2"
        bert_cfg, run = _v2_config(raw, source)
        state = bert_state(raw["model"], source)
        fields = {f: bert_cfg[f] for f in asdict(BertConfig()) if f in bert_cfg}
        config = config_from_state(state, BertConfig(**fields))
        stored_k = run.get("k_mer")
        stored_stride = run.get("stride") or stored_k
        stored_len = run.get("max_len")
        n_kmers = bool(run.get("tokenize_n_nucleotide", False))
        vocab, attend = "v2", False
    else:
        state = bert_state(raw.get("state_dict", raw), source)
        config = config_from_state(state)
        v1 = any(config.vocab_size == 3 + 4**i for i in range(1, 9))
        kind, vocab, attend = ("v1", "v1", True) if v1 else ("v2", "v2", False)
        stored_k, stored_stride, stored_len, n_kmers = None, None, None, False
    file_k, file_n = _kmer_size(config.vocab_size, 3 if vocab == "v1" else 2, source)
    if stored_k is not None and (stored_k, bool(n_kmers)) != (file_k, file_n):
        raise UserError(
            f"{source}: its config says k_mer {stored_k} but its vocabulary has {config.vocab_size} tokens"
        )
    k = _pick("k", k, file_k, source)
    stride = _pick("stride", stride, stored_stride, source) or k
    max_len = _pick("max_len", max_len, stored_len, source) or DEFAULT_MAX_LEN
    tokens = {"k": k, "stride": stride, "max_len": max_len, "vocab": vocab, "n_kmers": file_n,
              "attend_padding": attend, "prefix": None}  # fmt: skip
    from datasets.bioscan.dna import KmerTokenizer

    needed = KmerTokenizer(**tokens).num_tokens
    if needed > config.max_position_embeddings:
        raise UserError(f"{source}: {needed} tokens of {k}-mers over {max_len} nt exceed its "
                        f"{config.max_position_embeddings} positions; lower --dna-max-len")  # fmt: skip
    return BarcodeBert(kind, state, config, tokens)


def load_barcodebert(bert: Bert, path: str | os.PathLike) -> None:
    """Load a BarcodeBERT checkpoint's weights into `bert` (whose configuration must match it)."""
    from core.checkpoint import load_state_dict_checked

    checkpoint = read_barcodebert(path)
    load_state_dict_checked(bert, checkpoint.state, f"BarcodeBERT weights {path}")

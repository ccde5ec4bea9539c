"""The CLIP-style retrieval model: image, DNA and (optional) taxonomy-text towers mapping into one
L2-normalised embedding space, and a learnable temperature (`logit_scale`, CLIBD's initialisation 1/0.07).

`RetrievalSpec` is everything that shapes the network and its inputs; it is stored in the weights' YAML
sidecar so that `load_retrieval_model` rebuilds the same model, and its `preprocessing` is recorded in every
embedding index built with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from datasets.bioscan.dna import KmerTokenizer
from datasets.bioscan.taxonomy import TaxonomyTokenizer
from models.retrieval.barcodebert import load_barcodebert
from models.retrieval.bert import Bert, BertConfig, masked_mean
from models.retrieval.image import ImageEncoder
from models.retrieval.text import BertTextEncoder, TextEncoder

MODALITIES = ("image", "dna", "text")
DNA_POOLINGS = ("mean", "mlm_softmax")
TEXT_ARCHS = ("hashed", "bert")


@dataclass
class RetrievalSpec:
    modalities: tuple[str, ...] = ("image", "dna")
    embed_dim: int = 768
    image_arch: str = "vit_b_16"
    image_size: int = 224
    image_vit: dict = field(default_factory=dict)  # ViTConfig fields of vit_base_patch16_224 (CLIBD's)
    dna_k: int = 5
    dna_stride: int = 5
    dna_max_len: int = 660
    dna_vocab: str = "v1"  # v1: <MASK> <CLS> <UNK> + 4^k; v2: [MASK] [UNK] + 4^k (datasets/bioscan/dna.py)
    dna_n_kmers: bool = False  # v2's tokenize_n: k-mers with N have ids
    dna_attend_padding: bool = False  # BarcodeBERT v1 and CLIBD: no attention mask, padding pooled too
    dna_prefix: int | None = None  # CLIBD: token id 0 before every barcode
    dna_pooling: str = "mean"  # mean of the last hidden states, projected; mlm_softmax: CLIBD's
    dna_bert: dict = field(default_factory=dict)  # BertConfig fields that differ from BarcodeBERT's
    text_arch: str = "hashed"  # hashed: one token per rank; bert: CLIBD's BERT-small over WordPiece tokens
    text_buckets: int = 65536
    text_width: int = 256
    text_layers: int = 2
    text_bert: dict = field(default_factory=dict)  # BertConfig of the bert text tower
    temperature: float = 0.07
    learn_temperature: bool = True
    logit_scale_max: float | None = None  # None: unclamped (CLIBD); else the logit scale is clamped there

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(self.modalities) < 2 or len(set(self.modalities)) != len(self.modalities):
            raise UserError(
                f"--modalities must name two or three of {', '.join(MODALITIES)}, got {self.modalities}"
            )
        if "dna" not in self.modalities and "image" not in self.modalities:
            raise UserError("--modalities needs image or dna besides text")
        if self.dna_pooling not in DNA_POOLINGS:
            raise UserError(f"dna_pooling must be one of {', '.join(DNA_POOLINGS)}, got {self.dna_pooling!r}")
        if self.text_arch not in TEXT_ARCHS:
            raise UserError(f"text_arch must be one of {', '.join(TEXT_ARCHS)}, got {self.text_arch!r}")

    @property
    def dna_tokenizer(self) -> KmerTokenizer:
        return KmerTokenizer(self.dna_k, self.dna_stride, self.dna_max_len, self.dna_vocab, self.dna_n_kmers,
                             self.dna_attend_padding, self.dna_prefix)  # fmt: skip

    @property
    def text_tokenizer(self) -> TaxonomyTokenizer | None:
        """The hashed-taxonomy tokenizer; None for the bert text tower (its ids come from the HDF5 file's
        `language_tokens_*` or a WordPiece vocabulary)."""
        return TaxonomyTokenizer(self.text_buckets) if self.text_arch == "hashed" else None

    @property
    def bert_config(self) -> BertConfig:
        return BertConfig(**{**self.dna_bert, "vocab_size": self.dna_tokenizer.vocab_size})

    @property
    def load_size(self) -> int:
        """Side of the square the loader decodes to (train crops from it, eval centre-crops image_size)."""
        return round(self.image_size * 8 / 7)

    def preprocessing(self) -> dict:
        pixels = ("[0, 1] RGB, unnormalised (CLIBD)" if self.image_arch == "vit_base_patch16_224"
                  else "[-1, 1] RGB; ImageNet mean/std inside the model")  # fmt: skip
        padding = "attended to and pooled" if self.dna_attend_padding else "masked"
        return {
            "image": {"resize": f"short side to {self.load_size} px, centre crop {self.image_size} px",
                      "pixels": pixels, "arch": self.image_arch},
            "dna": {"normalise": "upper case, gaps kept (a k-mer with a gap is unknown), other non-ACGT as N",
                    **self.dna_tokenizer.config, "padding": f"right with N, {padding}", "pooling": self.dna_pooling},
            "text": None if "text" not in self.modalities else (
                self.text_tokenizer.config if self.text_arch == "hashed"
                else {"tokens": "HDF5 language_tokens_* (BERT-small WordPiece, 20 tokens)", "pooling": "mean of all"}),
        }  # fmt: skip

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data


class MLMTransform(nn.Module):
    """HF `BertPredictionHeadTransform`: dense, GELU, LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """CLIBD's DNA head: BarcodeBERT's MLM transform and a decoder replaced by Linear(hidden -> embed_dim)."""

    def __init__(self, config: BertConfig, embed_dim: int):
        super().__init__()
        self.transform = MLMTransform(config)
        self.decoder = nn.Linear(config.hidden_size, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class DNAEncoder(nn.Module):
    """BarcodeBERT-compatible BERT (`bert.*` keys) and a pooling: `mean` projects the (masked) mean of the
    last hidden states; `mlm_softmax` is CLIBD's mean over tokens of a softmax over its MLM head's outputs.
    With `attend_padding` (BarcodeBERT v1, CLIBD) attention sees every token, as those were trained."""

    def __init__(
        self, config: BertConfig, embed_dim: int, pooling: str = "mean", attend_padding: bool = False
    ):
        super().__init__()
        self.bert = Bert(config)
        self.pooling, self.attend_padding = pooling, attend_padding
        if pooling == "mean":
            self.proj = nn.Linear(config.hidden_size, embed_dim)
        else:
            self.head = MLMHead(config, embed_dim)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(ids, None if self.attend_padding else mask)

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The BERT's own embedding: the mean of the last hidden states over the tokens `mask` keeps
        (BarcodeBERT's: over every token for v1, the real ones for v2)."""
        return masked_mean(self.hidden(ids, mask), mask)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return self.proj(self.features(ids, mask))
        return masked_mean(self.head(self.hidden(ids, mask)).softmax(-1), mask)


class RetrievalModel(nn.Module):
    """`forward(inputs) -> {modality: unit vectors [B, D], "logit_scale": exp(scale)}` for the modalities present.

    Inputs: `image` (float [-1, 1] NCHW), `dna_ids`/`dna_mask`, `text_ids`/`text_mask`.
    """

    def __init__(self, spec: RetrievalSpec, image_weights: str = "none", dna_weights: str | None = None):
        super().__init__()
        self.spec = spec
        if "image" in spec.modalities:
            self.image = ImageEncoder(
                spec.image_arch, spec.embed_dim, spec.image_size, image_weights, spec.image_vit
            )
        if "dna" in spec.modalities:
            self.dna = DNAEncoder(spec.bert_config, spec.embed_dim, spec.dna_pooling, spec.dna_attend_padding)
            if dna_weights:
                load_barcodebert(self.dna.bert, dna_weights)
        if "text" in spec.modalities and spec.text_arch == "bert":
            self.text = BertTextEncoder(BertConfig(**spec.text_bert), spec.embed_dim)
        elif "text" in spec.modalities:
            vocab = spec.text_tokenizer.vocab_size
            self.text = TextEncoder(vocab, spec.embed_dim, spec.text_width, spec.text_layers)
        init = torch.tensor(math.log(1 / spec.temperature))
        self.logit_scale = nn.Parameter(init, requires_grad=spec.learn_temperature)

    def encode(self, modality: str, inputs: dict) -> torch.Tensor:
        if modality == "image":
            out = self.image(inputs["image"])
        elif modality == "dna":
            out = self.dna(inputs["dna_ids"], inputs["dna_mask"])
        else:
            out = self.text(inputs["text_ids"], inputs["text_mask"])
        return F.normalize(out.float(), dim=-1)

    def forward(self, inputs: dict) -> dict:
        out = {m: self.encode(m, inputs) for m in self.spec.modalities if _has(inputs, m)}
        scale = self.logit_scale
        if self.spec.logit_scale_max is not None:
            scale = scale.clamp(max=math.log(self.spec.logit_scale_max))
        out["logit_scale"] = scale.exp()
        return out


def _has(inputs: dict, modality: str) -> bool:
    return ("image" if modality == "image" else f"{modality}_ids") in inputs


def load_retrieval_model(path: str | os.PathLike, device: str = "cpu") -> tuple[RetrievalModel, dict, str]:
    """(model in eval mode, meta, weights content hash) from this project's `.safetensors` (or a run
    directory), or from a CLIBD checkpoint `.pth` (models/retrieval/clibd.py), told apart by content."""
    from core.checkpoint import file_hash, load_state_dict_checked, load_weights, sniff_format

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if path.is_file() and sniff_format(path) in ("torch", "pickle"):
        model, meta = _load_clibd(path)
        return model.to(device).eval(), meta, file_hash(path)
    state, meta = load_weights(path, device=device)
    if meta.get("kind") != "retrieval" or "spec" not in meta:
        raise UserError(
            f"{path} is not a retrieval model (kind: {meta.get('kind')!r}); train one with `train retrieval`"
        )
    model = RetrievalModel(RetrievalSpec(**meta["spec"]))
    load_state_dict_checked(model, state, str(path))
    return model.to(device).eval(), meta, file_hash(path)


def _load_clibd(path: Path) -> tuple[RetrievalModel, dict]:
    from core.checkpoint import load_state_dict_checked
    from models.retrieval.clibd import clibd_model_parts, is_clibd_state
    from models.retrieval.torchfile import read_torch_file

    state = read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not is_clibd_state(state):
        raise UserError(f"{path} is a torch file but not a CLIBD checkpoint (no image_encoder./dna_encoder./"
                        "language_encoder. weights); a BarcodeBERT one goes to `train retrieval --dna-weights`")  # fmt: skip
    fields, weights = clibd_model_parts(state, str(path))
    model = RetrievalModel(RetrievalSpec(**fields))
    weights.setdefault("logit_scale", model.logit_scale.detach().clone())
    load_state_dict_checked(model, weights, str(path))
    spec = model.spec.to_dict()
    return model, {
        "kind": "retrieval",
        "source": "clibd",
        "spec": spec,
        "preprocessing": model.spec.preprocessing(),
    }

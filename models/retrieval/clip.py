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
from models.retrieval.bert import Bert, BertConfig, load_barcodebert, masked_mean
from models.retrieval.image import ImageEncoder
from models.retrieval.text import TextEncoder

MODALITIES = ("image", "dna", "text")
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class RetrievalSpec:
    modalities: tuple[str, ...] = ("image", "dna")
    embed_dim: int = 768
    image_arch: str = "vit_b_16"
    image_size: int = 224
    dna_k: int = 5
    dna_stride: int = 5
    dna_max_len: int = 660
    dna_bert: dict = field(default_factory=dict)  # BertConfig fields that differ from BarcodeBERT's
    text_buckets: int = 65536
    text_width: int = 256
    text_layers: int = 2
    temperature: float = 0.07
    learn_temperature: bool = True

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(self.modalities) < 2 or len(set(self.modalities)) != len(self.modalities):
            raise UserError(
                f"--modalities must name two or three of {', '.join(MODALITIES)}, got {self.modalities}"
            )
        if "dna" not in self.modalities and "image" not in self.modalities:
            raise UserError("--modalities needs image or dna besides text")

    @property
    def dna_tokenizer(self) -> KmerTokenizer:
        return KmerTokenizer(self.dna_k, self.dna_stride, self.dna_max_len)

    @property
    def text_tokenizer(self) -> TaxonomyTokenizer:
        return TaxonomyTokenizer(self.text_buckets)

    @property
    def bert_config(self) -> BertConfig:
        return BertConfig(**{"vocab_size": self.dna_tokenizer.vocab_size, **self.dna_bert})

    @property
    def load_size(self) -> int:
        """Side of the square the loader decodes to (train crops from it, eval centre-crops image_size)."""
        return round(self.image_size * 8 / 7)

    def preprocessing(self) -> dict:
        return {
            "image": {"resize": f"short side to {self.load_size} px, centre crop {self.image_size} px",
                      "pixels": "[-1, 1] RGB; ImageNet mean/std inside the model", "arch": self.image_arch},
            "dna": {"normalise": "upper case, gaps removed, non-ACGT as N", **self.dna_tokenizer.config,
                    "padding": "right with N, masked", "pooling": "masked mean of last hidden states"},
            "text": self.text_tokenizer.config if "text" in self.modalities else None,
        }  # fmt: skip

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data


class DNAEncoder(nn.Module):
    """BarcodeBERT-compatible BERT (`bert.*` keys), masked mean of its last hidden states, linear projection."""

    def __init__(self, config: BertConfig, embed_dim: int):
        super().__init__()
        self.bert = Bert(config)
        self.proj = nn.Linear(config.hidden_size, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(masked_mean(self.bert(ids, mask), mask))


class RetrievalModel(nn.Module):
    """`forward(inputs) -> {modality: unit vectors [B, D], "logit_scale": exp(scale)}` for the modalities present.

    Inputs: `image` (float [-1, 1] NCHW), `dna_ids`/`dna_mask`, `text_ids`/`text_mask`.
    """

    def __init__(self, spec: RetrievalSpec, image_weights: str = "none", dna_weights: str | None = None):
        super().__init__()
        self.spec = spec
        if "image" in spec.modalities:
            self.image = ImageEncoder(spec.image_arch, spec.embed_dim, spec.image_size, image_weights)
        if "dna" in spec.modalities:
            self.dna = DNAEncoder(spec.bert_config, spec.embed_dim)
            if dna_weights:
                load_barcodebert(self.dna.bert, dna_weights)
        if "text" in spec.modalities:
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
        out["logit_scale"] = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return out


def _has(inputs: dict, modality: str) -> bool:
    return ("image" if modality == "image" else f"{modality}_ids") in inputs


def load_retrieval_model(path: str | os.PathLike, device: str = "cpu") -> tuple[RetrievalModel, dict, str]:
    """(model in eval mode, sidecar meta, weights content hash) from `.safetensors` or a run directory."""
    from core.checkpoint import file_hash, load_state_dict_checked, load_weights

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    state, meta = load_weights(path, device=device)
    if meta.get("kind") != "retrieval" or "spec" not in meta:
        raise UserError(
            f"{path} is not a retrieval model (kind: {meta.get('kind')!r}); train one with `train retrieval`"
        )
    model = RetrievalModel(RetrievalSpec(**meta["spec"]))
    load_state_dict_checked(model, state, str(path))
    return model.to(device).eval(), meta, file_hash(path)

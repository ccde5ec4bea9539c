"""Saving and loading a VisCoIN ensemble: training checkpoints and the one-file `to-pickle` bundle.

- Training writes `best/last/final.safetensors`: Psi, Theta and Omega weights under `extractor.`,
  `explainer.`, `decoder.` prefixes, with a YAML sidecar holding their configs, the dataset identity and the
  path + content hash of the frozen classifier (loaded from there, and refused if it changed).
- The bundle is one `torch.save` file of plain dicts and tensors (configs, meta, the four state dicts,
  classifier included), loadable with `torch.load(weights_only=True)`. Nothing here unpickles code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import checkpoint
from core.errors import UserError
from models.classifiers import Classifier, load_classifier
from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer

BUNDLE_FORMAT = "biovis.viscoin-bundle"
BUNDLE_VERSION = 1
PARTS = ("extractor", "explainer", "decoder")


@dataclass
class VisCoINModels:
    classifier: Classifier
    extractor: ConceptExtractor
    explainer: Explainer
    decoder: ConceptDecoder
    meta: dict = field(default_factory=dict)
    source: str = ""
    content_hash: str = ""

    @property
    def n_concepts(self) -> int:
        return self.extractor.n_concepts

    @property
    def num_classes(self) -> int:
        return self.explainer.n_classes

    @property
    def image_size(self) -> int:
        return int(self.meta.get("image_size", self.decoder.generator_config["img_resolution"]))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "classifier": self.classifier,
            "extractor": self.extractor,
            "explainer": self.explainer,
            "decoder": self.decoder,
        }

    def to(self, device) -> VisCoINModels:
        for module in self.modules().values():
            module.to(device)
        return self

    def eval(self) -> VisCoINModels:
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        """images -> (f logits, concept maps, support, Theta logits)."""
        logits, features = self.classifier(images)
        concepts, support = self.extractor(features)
        return logits, concepts, support, self.explainer(concepts)


def build_parts(configs: dict) -> tuple[ConceptExtractor, Explainer, ConceptDecoder]:
    extractor = ConceptExtractor(
        **{**configs["extractor"], "in_channels": tuple(configs["extractor"]["in_channels"])}
    )
    explainer = Explainer(**configs["explainer"])
    dec = dict(configs["decoder"])
    dec["concept_slots"] = tuple(dec["concept_slots"])
    decoder = ConceptDecoder(**dec)
    return extractor, explainer, decoder


def part_configs(extractor, explainer, decoder) -> dict:
    return {"extractor": extractor.config, "explainer": explainer.config, "decoder": decoder.config}


def parts_state(extractor, explainer, decoder) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, module in zip(PARTS, (extractor, explainer, decoder), strict=True):
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return state


def _split_state(state: dict, source: str) -> dict[str, dict]:
    split = {p: {} for p in PARTS}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in split:
            raise UserError(f"{source}: unexpected tensor {key!r}; not a VisCoIN checkpoint")
        split[prefix][rest] = value
    return split


def _assemble(classifier, configs: dict, states: dict[str, dict], meta: dict, source: str) -> VisCoINModels:
    extractor, explainer, decoder = build_parts(configs)
    for name, module in zip(PARTS, (extractor, explainer, decoder), strict=True):
        checkpoint.load_state_dict_checked(module, states[name], f"{source} ({name})")
    return VisCoINModels(classifier, extractor, explainer, decoder, meta, source)


def resolve_source(source: str | os.PathLike) -> Path:
    """A bundle file, a `.safetensors` checkpoint, or a training run directory (its best checkpoint)."""
    path = Path(source)
    if path.is_dir():
        for name in ("best.safetensors", "final.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no VisCoIN checkpoint (best/final/last.safetensors)")
    if not path.is_file():
        raise UserError(f"VisCoIN bundle or checkpoint {path} does not exist")
    return path


def load_viscoin(source: str | os.PathLike, device: str = "cpu") -> VisCoINModels:
    """Load a bundle (`.pt`), a training checkpoint (`.safetensors`) or a run directory, in eval mode."""
    path = resolve_source(source)
    if path.suffix == ".safetensors":
        state, meta = checkpoint.load_weights(path)
        if meta.get("kind") != "viscoin":
            raise UserError(f"{path} is not a VisCoIN checkpoint (kind: {meta.get('kind')!r})")
        clf_path = Path(meta["classifier"]["path"])
        if not clf_path.is_file():
            raise UserError(
                f"{path} was trained with the classifier {clf_path}, which is gone; use its to-pickle bundle"
            )
        if checkpoint.file_hash(clf_path) != meta["classifier"]["hash"]:
            raise UserError(f"the classifier {clf_path} changed since {path} was trained")
        classifier, _ = load_classifier(clf_path)
        models = _assemble(classifier, meta["configs"], _split_state(state, str(path)), meta, str(path))
    else:
        try:
            bundle = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = checkpoint.load_error_reason(err)
            raise UserError(f"{path} is not a VisCoIN bundle that loads safely ({reason})") from None
        if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{path} is not a VisCoIN bundle (missing format {BUNDLE_FORMAT!r})")
        meta, configs, states = bundle["meta"], bundle["configs"], bundle["state"]
        classifier = Classifier(**configs["classifier"])
        checkpoint.load_state_dict_checked(classifier, states["classifier"], f"{path} (classifier)")
        models = _assemble(classifier, configs, states, meta, str(path))
    models.content_hash = checkpoint.file_hash(path)
    return models.to(device).eval()


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether `path` is a VisCoIN bundle (`save_bundle`'s format marker), read as data (tensors mapped, not
    loaded)."""
    if checkpoint.sniff_format(path) != "torch":
        return False
    bundle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(bundle, dict) and bundle.get("format") == BUNDLE_FORMAT


def save_bundle(models: VisCoINModels, path: str | os.PathLike) -> Path:
    """The one-file export: configs, meta and the four state dicts, as tensors and plain values only."""
    configs = {
        "classifier": models.classifier.config,
        **part_configs(models.extractor, models.explainer, models.decoder),
    }
    state = {name: {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
             for name, module in models.modules().items()}  # fmt: skip
    meta = {k: v for k, v in models.meta.items() if k not in ("configs",)}
    meta["exported_from"] = models.source
    bundle = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "meta": meta,
        "configs": configs,
        "state": state,
    }
    return checkpoint.save_state(path, bundle)


def check_compatible(
    models: VisCoINModels,
    dataset: str | None = None,
    n_concepts: int | None = None,
    num_classes: int | None = None,
) -> None:
    """Refuse a bundle trained on another dataset, K or class count, naming what differs."""
    trained_on = (models.meta.get("dataset") or {}).get("name")
    if dataset is not None and trained_on is not None and dataset != trained_on:
        raise UserError(f"{models.source} was trained on dataset {trained_on!r}, not {dataset!r}")
    if n_concepts is not None and n_concepts != models.n_concepts:
        raise UserError(f"{models.source} has K={models.n_concepts} concepts, not {n_concepts}")
    if num_classes is not None and num_classes != models.num_classes:
        raise UserError(f"{models.source} predicts {models.num_classes} classes; the data has {num_classes}")

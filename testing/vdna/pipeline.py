"""Visual DNA pipeline: image source -> frozen extractor -> VDNA in one streaming pass; cached activation-range
calibrations; comparison of two VDNAs (scalar, per layer, most different neurons) and per-layer summaries.

Sources are resolved by `testing.vdna.sources`; extractors are built by `models.extractors`; distributions,
distances and files are `core.vdna`'s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.cachedir import cache_root
from core.errors import UserError
from core.vdna import (
    VDNA,
    ActivationRangeAccumulator,
    GaussianAccumulator,
    HistogramAccumulator,
    LayerGaussianAccumulator,
    load_activation_ranges_json,
    load_vdna,
    save_vdna,
    vdna_paths,
)
from models.extractors import FeatureExtractor, build_extractor
from testing.vdna.sources import ImageSource, Preprocess, collate_images, resolve_source

DISTRIBUTIONS = ("histogram-N", "gaussian", "layer-gaussian", "activation-ranges")

# ----- distributions and activation ranges -----


def parse_distribution(name: str) -> tuple[str, int | None]:
    """``histogram-N`` -> ("histogram", N); the other names -> (name, None)."""
    if name.startswith("histogram-"):
        bins = name.removeprefix("histogram-")
        if not bins.isdigit() or int(bins) < 1:
            raise UserError(f"--distribution {name}: the bin count must be a positive integer")
        return "histogram", int(bins)
    if name not in DISTRIBUTIONS[1:]:
        raise UserError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got {name!r}")
    return name, None


Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]


def ranges_id(ranges: Ranges, layers: list[str]) -> str:
    """Content hash of the per-neuron ranges of `layers` (float64), recorded in histogram VDNAs."""
    digest = hashlib.sha256()
    for layer in layers:
        lo, hi = ranges[layer]
        digest.update(layer.encode())
        digest.update(torch.as_tensor(lo, dtype=torch.float64).numpy().tobytes())
        digest.update(torch.as_tensor(hi, dtype=torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_ranges(path: str | os.PathLike) -> Ranges:
    """Ranges from vdna's ``activation_ranges.json`` or from a saved activation-ranges VDNA."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read activation ranges {path}: {e}") from None
        if isinstance(head, dict) and "mins_per_neuron" in head:
            return load_activation_ranges_json(path)
    return load_vdna(path).as_ranges()


def ranges_cache() -> Path:
    """Where activation-range calibrations live: $BIOVIS_CACHE/vdna-ranges (default ~/.cache/biovis)."""
    return cache_root() / "vdna-ranges"


def _calibration_dir(extractor: FeatureExtractor) -> Path:
    return ranges_cache() / extractor.name / extractor.identity[:16]


@dataclass
class Calibration:
    """Activation ranges to histogram with, and where they came from."""

    ranges: Ranges
    id: str
    origin: str


def find_calibration(
    extractor: FeatureExtractor, image_size: int, resize: str, wanted_id: str | None = None
) -> Calibration | None:
    """The cached calibration of this extractor: the one with `wanted_id`, else the newest one made at the
    same image size and resize mode, else the newest one."""
    entries = sorted(
        _calibration_dir(extractor).glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    found = []
    for entry in entries:
        vdna = load_vdna(entry)
        ranges = vdna.as_ranges()
        cal = Calibration(ranges, ranges_id(ranges, list(extractor.neurons)), f"{entry.with_suffix('')}")
        if wanted_id is not None and cal.id == wanted_id:
            return cal
        same = (vdna.data_settings.get("image_size"), vdna.data_settings.get("resize")) == (
            image_size,
            resize,
        )
        found.append((not same, cal))
    if wanted_id is not None or not found:
        return None
    return min(found, key=lambda item: item[0])[1]


def _resolve_ranges(
    ranges: str | os.PathLike | Ranges | VDNA | None,
    extractor: FeatureExtractor,
    image_size: int,
    resize: str,
) -> Calibration:
    if ranges is None:
        cal = find_calibration(extractor, image_size, resize)
        if cal is None:
            raise UserError(
                f"histogram VDNAs need activation ranges for {extractor.name}: run `python main.py vdna "
                f"calibrate SOURCE --extractor {extractor.spec}` first, or pass --ranges activation_ranges.json"
            )
        return cal
    if isinstance(ranges, VDNA):
        values, origin = ranges.as_ranges(), "activation-ranges VDNA"
    elif isinstance(ranges, dict):
        values, origin = ranges, "given ranges"
    else:
        values, origin = load_ranges(ranges), str(ranges)
    missing = [layer for layer in extractor.neurons if layer not in values]
    if missing:
        raise UserError(f"activation ranges {origin} lack the layers {missing[:4]} of {extractor.name}")
    return Calibration(values, ranges_id(values, list(extractor.neurons)), origin)


# ----- one streaming pass -----

# On the CPU one forward pass keeps its tapped features within this many bytes.
CPU_FEATURE_BYTES = 96 << 20


def forward_batch_size(model: FeatureExtractor, size: int, batch_size: int, device: torch.device) -> int:
    """Images per forward pass: `batch_size` on CUDA; on the CPU at most `batch_size`, and only as many as
    keep the tapped features within `CPU_FEATURE_BYTES` (measured on one blank image). Large CPU batches
    spend their time moving and faulting in gigabytes of activations: ResNet-50 at 224 px runs about twice
    as fast in batches of 4 as in batches of 64, with bit-identical features."""
    if device.type != "cpu":
        return batch_size
    with torch.inference_mode():
        probe = model(torch.zeros(1, 3, size, size, device=device))
    per_image = sum(v.numel() * v.element_size() for v in probe.values())
    return max(1, min(batch_size, CPU_FEATURE_BYTES // max(1, per_image)))


def _accumulator(vdna_type: str, bins: int | None, neurons: dict[str, int], ranges: Ranges | None) -> Any:
    if vdna_type == "histogram":
        return HistogramAccumulator(neurons, bins, ranges)
    kinds = {
        "gaussian": GaussianAccumulator,
        "layer-gaussian": LayerGaussianAccumulator,
        "activation-ranges": ActivationRangeAccumulator,
    }
    return kinds[vdna_type](neurons)


@dataclass
class PassStats:
    images: int = 0
    forward_batch: int = 0
    workers: int = 0
    unreadable: list[str] = field(default_factory=list)


def _stream(
    source: ImageSource,
    extractor: FeatureExtractor,
    accumulator: Any,
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int | None,
    device: str,
    amp: bool,
    quiet: bool,
    lent: bool = True,
) -> tuple[PassStats, torch.device]:
    """Decode, preprocess, extract and accumulate every image of `source` once, on a copy of `extractor`
    when it is `lent` (the caller's) and lives on another device."""
    from core.device import autocast, loader_settings, resolve_device
    from core.progress import Progress
    from datasets.gpu_transforms import to_model_images

    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model = extractor
    if _device_of(extractor) != dev:  # a lent model is never moved: its copy is
        model = (copy.deepcopy(extractor) if lent else extractor).to(dev)
    if dev.type == "cuda" and (model is not extractor or not lent):
        model = model.to(memory_format=torch.channels_last)
    step = forward_batch_size(model, preprocess.size, batch_size, dev)
    dataset = source.dataset(preprocess)
    settings = loader_settings(dev, num_workers)
    if num_workers is None:  # one pass: no worker beyond one per batch, none kept alive after it
        batches = -(-len(dataset) // step)
        settings = {
            **loader_settings(dev, min(settings["num_workers"], batches)),
            "persistent_workers": False,
        }
    loader = DataLoader(dataset, batch_size=step, shuffle=False, collate_fn=collate_images, **settings)
    stats = PassStats(forward_batch=step, workers=settings["num_workers"])
    with Progress(len(dataset), f"vdna {source.spec}", enabled=not quiet) as bar:
        for images, bad in loader:
            stats.unreadable += [str(source.paths[i]) for i in bad]
            if images is not None:
                x = to_model_images(images, dev, train=False)  # uint8 -> [-1, 1] on the device
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    with autocast(dev, amp):
                        features = model(x)
                    accumulator.update({k: v.float() for k, v in features.items()})
                stats.images += len(images)
            bar.update(len(bad) + (0 if images is None else len(images)))
    if stats.images == 0:
        examples = ", ".join(stats.unreadable[:2])
        raise UserError(
            f"no readable image in {source.spec} ({len(stats.unreadable)} unreadable, e.g. {examples})"
        )
    return stats, dev


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _as_extractor(
    extractor: str | FeatureExtractor, weights: str | os.PathLike | None, image_size: int | None
) -> FeatureExtractor:
    return (
        extractor
        if isinstance(extractor, FeatureExtractor)
        else build_extractor(extractor, weights, image_size)
    )


def make_vdna(
    source: str | os.PathLike | ImageSource,
    extractor: str | FeatureExtractor = "rand_resnet50",
    distribution: str = "histogram-1000",
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    image_size: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    *,
    weights: str | os.PathLike | None = None,
    ranges: str | os.PathLike | Ranges | VDNA | None = None,
    resize: str = "center-crop",
    amp: bool = True,
    quiet: bool = False,
) -> VDNA:
    """The VDNA of a source under an extractor, in one streaming pass (memory independent of image count).

    `distribution` is ``histogram-N``, ``gaussian``, ``layer-gaussian`` or ``activation-ranges``. Histograms
    use `ranges` (a vdna ``activation_ranges.json``, an activation-ranges VDNA or its path, or a dict), else
    the cached calibration of this extractor (`calibrate`). `num_images` takes a `seed`-ed random subset.
    Unreadable images are skipped and counted in ``data_settings["unreadable_images_skipped"]``.
    """
    vdna_type, bins = parse_distribution(distribution)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    src = src.subset(num_images, seed)
    model = _as_extractor(extractor, weights, image_size)
    size = image_size or model.image_size
    model.check_size(size)
    preprocess = Preprocess(size, resize)
    cal = _resolve_ranges(ranges, model, size, resize) if vdna_type == "histogram" else None
    accumulator = _accumulator(vdna_type, bins, model.neurons, cal.ranges if cal else None)
    lent = isinstance(extractor, FeatureExtractor)
    stats, dev = _stream(
        src, model, accumulator, preprocess, batch_size, num_workers, device, amp, quiet, lent
    )
    data_settings = {
        "source": src.spec,
        "crop_to_square_pre_resize": "none" if resize == "clean" else "center",
        "resize_mode": resize,
        "shuffle_files": bool(src.selection and "@seed" in src.selection),
        "num_images": num_images if num_images and num_images > 0 else -1,
        "source_kind": src.kind,
        "source_selection": src.selection,
        "image_size": size,
        "resize": resize,
        "non_image_files_skipped": src.non_images,
        "unreadable_images_skipped": len(stats.unreadable),
    }
    extraction_settings = {
        "batch_size": batch_size,
        "forward_batch_size": stats.forward_batch,
        "device": str(dev),
        "num_workers": stats.workers,
        "seed": seed,
        "extractor_identity": model.identity,
        "amp": bool(amp and dev.type == "cuda"),
    }
    if cal is not None:
        extraction_settings.update(activation_ranges_id=cal.id, activation_ranges_origin=cal.origin)
    return accumulator.result(model.name, data_settings, extraction_settings)


def calibrate(
    source: str | os.PathLike | ImageSource,
    extractor: str | FeatureExtractor = "rand_resnet50",
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    image_size: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    *,
    weights: str | os.PathLike | None = None,
    resize: str = "center-crop",
    amp: bool = True,
    force: bool = False,
    quiet: bool = False,
) -> tuple[VDNA, Path, bool]:
    """Per-neuron activation ranges of `source`, cached under `ranges_cache()`; returns (VDNA, path, cached).

    The cache key holds the extractor's identity (weights hash), the source's identity (file list, sizes,
    times) and the options; `force` recomputes. Writes are atomic.
    """
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    src = src.subset(num_images, seed)
    model = _as_extractor(extractor, weights, image_size)
    size = image_size or model.image_size
    from core.device import resolve_device

    bf16 = bool(amp) and resolve_device(device).type == "cuda"
    key = hashlib.sha256(json.dumps([src.identity, size, resize, bf16]).encode()).hexdigest()[:16]
    path = _calibration_dir(model) / key
    if not force and vdna_paths(path)[0].is_file():
        return load_vdna(path), path, True
    vdna = make_vdna(src, model, "activation-ranges", batch_size, num_workers, device, size, None, seed,
                     resize=resize, amp=amp, quiet=quiet)  # fmt: skip
    save_vdna(vdna, path)
    return vdna, path, False


# ----- comparing and summarising -----

DEFAULT_DISTANCE = {"histogram": "emd", "gaussian": "nfd", "layer-gaussian": "fd"}


def is_saved_vdna(spec: str | os.PathLike) -> bool:
    """True when `spec` names a saved VDNA (``x``, ``x.json`` or ``x.npz`` with x.json beside it)."""
    text = str(spec)
    if text.endswith((".json", ".npz")):
        return True
    json_path, _ = vdna_paths(text)
    return json_path.is_file() and not Path(text).is_dir()


def check_same_making(a: VDNA, b: VDNA) -> None:
    """Refuse VDNAs whose extractors share a name but not weights, or whose histograms used other ranges."""
    for key, what in (
        ("extractor_identity", "extractor weights"),
        ("activation_ranges_id", "activation ranges"),
    ):
        ia, ib = a.extraction_settings.get(key), b.extraction_settings.get(key)
        if ia and ib and ia != ib and a.type == b.type:
            raise UserError(
                f"the VDNAs were made with different {what} ({ia} vs {ib}) under the same name "
                f"{a.feature_extractor_name!r}: their distributions are not comparable"
                + ("; make both with the same --ranges file" if key == "activation_ranges_id" else "")
            )


@dataclass
class Comparison:
    """A distance between two VDNAs with its per-layer and per-neuron break-down."""

    distance: str
    value: float
    per_layer: Any  # DataFrame: layer, neurons, distance
    top: Any  # DataFrame: rank, layer, neuron, distance (most different neurons first)
    neuron_metric: str


def _select(v: VDNA, layer: str | None, neuron: int | None) -> list[str]:
    """Validate a layer / neuron selection (UserError naming the valid choices) and return its layers."""
    if neuron is not None and layer is None:
        raise UserError("--neuron needs --layer: a neuron index is counted within one layer")
    if neuron is not None:
        v.check_neuron(layer, neuron)
    elif layer is not None:
        v.check_layer(layer)
    return [layer] if layer is not None else list(v.neurons_list)


def compare_vdnas(
    a: VDNA,
    b: VDNA,
    distance: str | None = None,
    layer: str | None = None,
    neuron: int | None = None,
    top_k: int = 8,
) -> Comparison:
    """`distance` (emd, nfd or fd; default by type) between `a` and `b`, restricted to a layer or a neuron.

    The scalar is core.vdna's: the unweighted mean over the selected neurons (FD: one layer's FD, or the
    mean of the per-layer FDs). Per-layer values are each layer's mean (FD: the layer's FD); the top-k table
    ranks the selected neurons by their neuron-wise distance (for FD: the NFD of the covariance diagonals).
    """
    import pandas as pd

    from core.vdna import check_compatible, emd, fd, nfd

    distance = distance or DEFAULT_DISTANCE.get(a.type)
    if distance not in ("emd", "nfd", "fd"):
        raise UserError(f"no distance is defined between {a.name} VDNAs; compare histograms or gaussians")
    allowed = {"emd": ("histogram",), "nfd": ("gaussian", "layer-gaussian"), "fd": ("layer-gaussian",)}
    check_compatible(a, b, allowed[distance], distance.upper())
    check_same_making(a, b)
    if neuron is not None and distance == "fd":
        raise UserError("FD compares whole layers; drop --neuron or use --distance nfd")
    layers = _select(a, layer, neuron)
    metric = "emd" if distance == "emd" else "nfd"
    wise = (emd if metric == "emd" else nfd)(a, b, neuron_wise=True)
    if distance == "fd":
        per_layer_values = fd(a, b, layer_wise=True)
        value = (
            per_layer_values[layer] if layer is not None else float(np.mean(list(per_layer_values.values())))
        )
    else:
        per_layer_values = {name: float(v.mean()) for name, v in wise.items()}
        selected = (
            wise[layer][neuron : neuron + 1] if neuron is not None else torch.cat([wise[n] for n in layers])
        )
        value = float(selected.mean())
    per_layer = pd.DataFrame(
        {
            "layer": list(a.neurons_list),
            "neurons": list(a.neurons_list.values()),
            "distance": [float(per_layer_values[name]) for name in a.neurons_list],
        }
    )
    values = torch.cat([wise[name] for name in layers]).numpy()
    offsets = np.cumsum([0] + [a.neurons_list[name] for name in layers])
    order = np.array([neuron]) if neuron is not None else np.argsort(-values, kind="stable")[: max(0, top_k)]
    where = np.searchsorted(offsets, order, side="right") - 1 if neuron is None else np.zeros(1, dtype=int)
    top = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "layer": [layers[i] for i in where],
            "neuron": order - offsets[where],
            metric: values[order],
        }
    )
    return Comparison(distance, float(value), per_layer, top, metric)


def summarize(vdna: VDNA) -> Any:
    """One row per layer: neurons and, by type, where the mass lies (histograms, on the normalised [-1, 1]
    axis, pooled over the layer's neurons), the mean of mu/var (Gaussians) or the range (activation ranges)."""
    import pandas as pd

    rows = []
    for layer, c in vdna.neurons_list.items():
        row: dict[str, Any] = {"layer": layer, "neurons": c}
        entry = vdna.data[layer]
        if vdna.type == "histogram":
            counts = entry.to(torch.float64)
            pooled = counts.sum(0)
            total = float(pooled.sum())
            n = counts.shape[1]
            centres = torch.linspace(-1 + 1 / n, 1 - 1 / n, n, dtype=torch.float64)
            cdf = torch.cumsum(pooled, 0) / max(total, 1.0)
            q = torch.searchsorted(cdf, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).clamp_max(n - 1)
            row.update(
                values_per_neuron=total / c,
                mean=float((pooled * centres).sum() / max(total, 1.0)),
                q05=float(centres[q[0]]),
                median=float(centres[q[1]]),
                q95=float(centres[q[2]]),
                first_bin_share=float(pooled[0] / max(total, 1.0)),
                last_bin_share=float(pooled[-1] / max(total, 1.0)),
            )
        elif vdna.type in ("gaussian", "layer-gaussian"):
            var = entry["var"] if vdna.type == "gaussian" else torch.diagonal(entry["sigma"])
            row.update(mean_mu=float(entry["mu"].mean()), std_mu=float(entry["mu"].std()) if c > 1 else 0.0,
                       mean_var=float(var.mean()))  # fmt: skip
        else:
            row.update(min=float(entry["min"].min()), max=float(entry["max"].max()),
                       mean_width=float((entry["max"] - entry["min"]).mean()))  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


# ----- saved VDNAs or sources, built alike -----


@dataclass
class BuildOptions:
    """How to build a VDNA from a source; None fields are taken from a reference VDNA when there is one."""

    extractor: str | None = None
    weights: str | None = None
    distribution: str | None = None
    ranges: str | None = None
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    image_size: int | None = None
    resize: str | None = None
    num_images: int | None = None
    seed: int = 0
    amp: bool = True
    quiet: bool = False


def _rebuildable(name: str) -> bool:
    """Whether an extractor name alone rebuilds it (torchvision weights or seeded random weights)."""
    from models.extractors import ARCHS, RAND_PATTERN

    return name in ARCHS or RAND_PATTERN.match(name) is not None


def _inherit(
    options: BuildOptions, ref: VDNA, extractor: FeatureExtractor | None
) -> tuple[BuildOptions, Any, FeatureExtractor]:
    """Options, ranges and extractor for building a VDNA comparable to `ref`."""
    name = ref.feature_extractor_name
    spec = options.extractor
    if spec is None and extractor is None:
        if not _rebuildable(name):
            raise UserError(
                f"the saved VDNA was made with extractor {name!r}, which its name alone cannot rebuild: pass "
                "--extractor (classifier:PATH for a classifier) and --weights as when it was made"
            )
        spec = name
    filled = replace(
        options,
        extractor=spec,
        distribution=options.distribution or ref.name,
        image_size=options.image_size or ref.data_settings.get("image_size"),
        resize=options.resize or ref.data_settings.get("resize") or "center-crop",
    )
    model = extractor or build_extractor(spec, options.weights, filled.image_size)
    ranges: Any = options.ranges
    wanted = ref.extraction_settings.get("activation_ranges_id")
    if filled.distribution == ref.name and ref.type == "histogram" and ranges is None:
        size = filled.image_size or model.image_size
        cal = find_calibration(model, size, filled.resize, wanted) if wanted else None
        if cal is None:
            raise UserError(
                f"the saved histogram VDNA used activation ranges {wanted or '(not recorded)'} that are not in "
                f"the calibration cache {ranges_cache()}: pass the same --ranges file it was made with"
            )
        ranges = cal.ranges
    return filled, ranges, model


def open_or_make(
    spec: str, options: BuildOptions, reference: VDNA | None = None, extractor: FeatureExtractor | None = None
) -> VDNA:
    """A saved VDNA (``x``, ``x.json`` or ``x.npz``) or one built from the source `spec` with `options`,
    whose unset fields follow `reference` (extractor, distribution, image size, resize, ranges)."""
    if is_saved_vdna(spec):
        return load_vdna(spec)
    ranges: Any = options.ranges
    model = extractor
    if reference is not None:
        options, ranges, model = _inherit(options, reference, extractor)
    model = model or build_extractor(
        options.extractor or "rand_resnet50", options.weights, options.image_size
    )
    return make_vdna(
        spec, model, options.distribution or "histogram-1000", options.batch_size, options.num_workers,
        options.device, options.image_size, options.num_images, options.seed, ranges=ranges,
        resize=options.resize or "center-crop", amp=options.amp, quiet=options.quiet,
    )  # fmt: skip

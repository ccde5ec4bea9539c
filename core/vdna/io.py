"""VDNA files in the vdna package's own layout: ``<path>.json`` (metadata) + ``<path>.npz`` (arrays).

NPZ keys and dtypes: histogram ``<layer>`` int32 ``[C, N]`` (int64 only if a count exceeds int32);
gaussian ``mu-<layer>``, ``var-<layer>`` float32; layer-gaussian ``mu-<layer>``, ``sigma-<layer>`` float64;
activation-ranges ``min-<layer>``, ``max-<layer>`` float32. Both files are written atomically (npz first,
so the json never describes an unwritten npz) and read without unpickling (``allow_pickle=False``).
vdna's own non-histogram files also hold a pickled empty dict per layer name; it is never read here.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import atomic_path, write_text
from core.errors import UserError
from core.vdna.vdna import DIST_KEYS, VDNA, VDNA_TYPES

# The vdna version whose layout these files follow; written so that vdna tools recognise them.
VDNA_FORMAT_VERSION = "0.1.1"
# vdna rebuilds its settings dataclasses from these keys, so any other key would break its loader:
# the rest travels in top-level "extra_*" entries, which vdna ignores and `load_vdna` merges back.
VDNA_DATA_SETTINGS_KEYS = frozenset(
    [
        "source",
        "crop_to_square_pre_resize",
        "resize_mode",
        "custom_fn_resize",
        "custom_np_image_tranform",
        "custom_pil_image_tranform",
        "shuffle_files",
        "num_images",
    ]
)
VDNA_EXTRACTION_SETTINGS_KEYS = frozenset(
    [
        "average_feats_spatially",
        "accumulate_spatial_feats_in_hist",
        "accumulate_sample_feats_in_hist",
        "keep_only_min_max",
        "normalise_feats",
        "range_scale_for_norm_params",
        "hist_range",
        "hist_nb_bins",
        "hist_channel_batch_size",
        "num_workers",
        "batch_size",
        "device",
        "description",
        "verbose",
        "n_sample_images",
        "sample_images_folder",
        "seed",
        "hub_repo",
    ]
)
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def vdna_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(x.json, x.npz)`` for a path given as ``x``, ``x.json`` or ``x.npz``."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".json", ".npz") else p
    return Path(f"{base}.json"), Path(f"{base}.npz")


def _jsonable(obj: Any) -> Any:
    """json.dump fallback: arrays and numbers through `tolist`, anything else (paths, callables) as text."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def _npz_arrays(vdna: VDNA) -> dict[str, np.ndarray]:
    arrays = {}
    for layer, entry in vdna.data.items():
        if vdna.type == "histogram":
            counts = entry.detach().cpu().numpy()
            fits = counts.size == 0 or counts.max() <= np.iinfo(np.int32).max
            arrays[layer] = counts.astype(np.int32 if fits else np.int64)
            continue
        for key, value in entry.items():
            dtype = np.float64 if vdna.type == "layer-gaussian" else np.float32
            arrays[f"{key}-{layer}"] = value.detach().cpu().numpy().astype(dtype)
    return arrays


def _split_settings(settings: dict[str, Any], known: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {k: v for k, v in settings.items() if k in known}, {
        k: v for k, v in settings.items() if k not in known
    }


def save_vdna(vdna: VDNA, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write `vdna` as ``path.json`` + ``path.npz`` (vdna layout) atomically; return both paths."""
    json_path, npz_path = vdna_paths(path)
    data_settings, extra_data = _split_settings(vdna.data_settings, VDNA_DATA_SETTINGS_KEYS)
    extraction_settings, extra_extraction = _split_settings(
        vdna.extraction_settings, VDNA_EXTRACTION_SETTINGS_KEYS
    )
    metadata: dict[str, Any] = {
        "time_of_compute": vdna.time_of_compute or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vdna_version": VDNA_FORMAT_VERSION,
        "distribution": {"hist_nb_bins": vdna.hist_nb_bins} if vdna.type == "histogram" else {},
        "type": vdna.type,
        "name": vdna.name,
        "data_settings": data_settings,
        "extraction_settings": extraction_settings,
        "num_images": vdna.num_images,
        "feature_extractor_name": vdna.feature_extractor_name,
        "neurons_list": dict(vdna.neurons_list),
    }
    if extra_data:
        metadata["extra_data_settings"] = extra_data
    if extra_extraction:
        metadata["extra_extraction_settings"] = extra_extraction
    text = json.dumps(metadata, indent=4, default=_jsonable)
    with atomic_path(npz_path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **_npz_arrays(vdna))
    write_text(json_path, text + "\n")
    return json_path, npz_path


def _read_metadata(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise UserError(
            f"VDNA metadata file not found: {json_path} (a VDNA is a pair <name>.json + <name>.npz)"
        )
    try:
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read VDNA metadata {json_path}: {e}") from None
    if not isinstance(metadata, dict):
        raise UserError(f"VDNA metadata {json_path} is not a JSON object")
    missing = [
        k
        for k in ("type", "name", "num_images", "feature_extractor_name", "neurons_list")
        if k not in metadata
    ]
    if missing:
        raise UserError(f"VDNA metadata {json_path} lacks the keys {missing}")
    if metadata["type"] not in VDNA_TYPES:
        raise UserError(f"VDNA metadata {json_path} has unknown type {metadata['type']!r}")
    return metadata


def is_vdna_file(path: str | os.PathLike) -> bool:
    """Whether `path` (``x.json`` or ``x.npz``) is one half of a VDNA, as `vdna make --overwrite` may replace:
    VDNA metadata in the json; in the npz, the arrays that the json beside it names."""
    path = Path(path)
    json_path, npz_path = vdna_paths(path)
    try:
        metadata = _read_metadata(json_path)
    except UserError:
        return False
    if path.suffix != ".npz":
        return True
    if not zipfile.is_zipfile(npz_path):
        return False
    with zipfile.ZipFile(npz_path) as archive:
        names = {n.removesuffix(".npy") for n in archive.namelist()}
    layers = metadata["neurons_list"] if isinstance(metadata["neurons_list"], dict) else {}
    keys = DIST_KEYS.get(metadata["type"], ())
    expected = (
        set(layers) if metadata["type"] == "histogram" else {f"{k}-{la}" for la in layers for k in keys}
    )
    return bool(expected) and expected <= names


def _hist_nb_bins(metadata: dict[str, Any], json_path: Path) -> int | None:
    if metadata["type"] != "histogram":
        return None
    bins = (metadata.get("distribution") or {}).get("hist_nb_bins")
    if bins is None and str(metadata["name"]).startswith("histogram-"):
        bins = metadata["name"].removeprefix("histogram-")
    try:
        return int(bins)
    except (TypeError, ValueError):
        raise UserError(f"VDNA metadata {json_path} gives no valid histogram bin count") from None


def _read_array(npz: Any, key: str, npz_path: Path, floating: bool) -> torch.Tensor:
    if key not in npz.files:
        raise UserError(f"VDNA data file {npz_path} lacks the array {key!r}")
    array = npz[key]
    kind_ok = np.issubdtype(array.dtype, np.floating if floating else np.integer)
    if not kind_ok:
        raise UserError(f"VDNA data file {npz_path}: array {key!r} has unexpected dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.float64 if floating else np.int64))


def load_vdna(path: str | os.PathLike, device: str | torch.device = "cpu") -> VDNA:
    """Read a VDNA written by `save_vdna` or by the vdna package; never unpickles.

    In memory, counts are int64 and every other array float64.
    """
    json_path, npz_path = vdna_paths(path)
    metadata = _read_metadata(json_path)
    vdna_type = metadata["type"]
    neurons = metadata["neurons_list"]
    if not isinstance(neurons, dict) or not all(isinstance(c, int) for c in neurons.values()):
        raise UserError(f"VDNA metadata {json_path}: neurons_list must map layer names to neuron counts")
    if not npz_path.is_file():
        raise UserError(f"VDNA data file not found: {npz_path} (next to {json_path.name})")
    data: dict[str, Any] = {}
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            for layer in neurons:
                if vdna_type == "histogram":
                    data[layer] = _read_array(npz, layer, npz_path, floating=False).to(device)
                else:
                    data[layer] = {
                        k: _read_array(npz, f"{k}-{layer}", npz_path, floating=True).to(device)
                        for k in DIST_KEYS[vdna_type]
                    }
    except UserError:
        raise
    except _READ_ERRORS as e:
        raise UserError(f"cannot read VDNA data file {npz_path} (truncated or corrupt?): {e}") from None
    try:
        return VDNA(
            type=vdna_type,
            name=metadata["name"],
            data=data,
            num_images=int(metadata["num_images"]),
            feature_extractor_name=str(metadata["feature_extractor_name"]),
            neurons_list=dict(neurons),
            hist_nb_bins=_hist_nb_bins(metadata, json_path),
            data_settings={
                **(metadata.get("data_settings") or {}),
                **metadata.get("extra_data_settings", {}),
            },
            extraction_settings={
                **(metadata.get("extraction_settings") or {}),
                **metadata.get("extra_extraction_settings", {}),
            },
            time_of_compute=metadata.get("time_of_compute"),
        )
    except UserError as e:
        raise UserError(f"VDNA {json_path} / {npz_path.name} is inconsistent: {e.message}") from None


def load_activation_ranges_json(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read vdna's per-extractor ``activation_ranges.json`` into ``{layer: (min[C], max[C])}`` (float64).

    Its layout is ``{"mins_per_neuron": {layer: {"0": float, ...}}, "maxs_per_neuron": {...}}``.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        mins, maxs = raw["mins_per_neuron"], raw["maxs_per_neuron"]
        ranges = {}
        for layer, per_neuron in mins.items():
            order = sorted(per_neuron, key=int)
            lo = torch.tensor([float(per_neuron[i]) for i in order], dtype=torch.float64)
            hi = torch.tensor([float(maxs[layer][i]) for i in order], dtype=torch.float64)
            ranges[layer] = (lo, hi)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read activation ranges {path}: {type(e).__name__}: {e}") from None
    return ranges

"""Dataset names -> data. `world` (alias `toy`) is the synthetic species world, generated on first use;
`cub` is CUB-200-2011 (kagglehub or `--data-dir`); `folder` is an image folder with class sub-folders.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

DATASETS = ("world", "cub", "folder")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096  # pixels; beyond this a batch no longer fits any GPU
ALIASES = {"toy": "world"}
WORLD_PRESETS = {
    "default": {},
    "small": dict(
        n_orders=2,
        families_per_order=2,
        genera_per_family=1,
        species_per_genus=2,
        images_per_species=16,
        image_size=32,
    ),
    # BIOSCAN-like: four species per genus that share the primary colour, so that an unseen species has three
    # seen congeners that look like it (48 species, 30 images each); `train retrieval --preset tiny` uses it
    "bioscan": dict(species_per_genus=4, images_per_species=30, colour_rank="genus"),
}


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choices: {', '.join(DATASETS)} (toy = world)")
    return name


def data_root() -> Path:
    """Where generated and downloaded data live: $BIOVIS_DATA, else ~/.cache/biovis/data."""
    return Path(os.environ.get("BIOVIS_DATA") or Path.home() / ".cache" / "biovis" / "data")


def world_config(preset: str = "default", seed: int = 0):
    from datasets.world import WorldConfig

    if preset not in WORLD_PRESETS:
        raise UserError(f"unknown world preset {preset!r}; choices: {', '.join(WORLD_PRESETS)}")
    return WorldConfig(seed=seed, **WORLD_PRESETS[preset])


def ensure_world_root(
    preset: str = "default", data_dir: str | os.PathLike | None = None, quiet: bool = False
) -> Path:
    """The synthetic world's CUB-layout folder, generated (once) under `data_dir` or the data root."""
    from core.progress import Progress
    from datasets.world import ensure_world

    config = world_config(preset)
    target = Path(data_dir) if data_dir else data_root()
    with Progress(None, f"generating world {config.key()}", enabled=not quiet) as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.count)

        return ensure_world(target, config, progress=report)


@dataclass
class DataConfig:
    """The data options of every trainer (its config's `data` block; the options of cli.common's bundle)."""

    dataset: str = "world"
    data_dir: str | None = None
    world: str = "default"
    image_size: int = 64
    val_fraction: float = 0.1
    bbox_crop: bool = False
    skip_bad_images: bool = False

    def validate(self) -> None:
        """The checks that need no file: a known world preset, a resolution and split share in range (which
        datasets a trainer reads is its own check; check_data_spec also looks at the files)."""
        check_image_size(self.image_size)
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.world not in WORLD_PRESETS:
            raise UserError(f"unknown world preset {self.world!r}; choices: {', '.join(WORLD_PRESETS)}")

    def spec(self, seed: int, **changes) -> DataSpec:
        """What the loaders need: these options, the seed that splits validation from train, and `changes`
        (a trainer whose resolution comes from elsewhere, such as VisCoIN's classifier, passes it here)."""
        return DataSpec(**{**dataclasses.asdict(self), "seed": seed, **changes})


@dataclass
class DataSpec(DataConfig):
    """What the data loaders need to know: the data options and the seed that splits validation from train."""

    seed: int = 0


def check_image_size(size: int | None, option: str = "--image-size") -> None:
    if size is not None and not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UserError(f"{option} must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels, got {size}")


def check_data_spec(spec: DataSpec) -> None:
    """Cheap checks of the data options, made before any output folder is touched."""
    check_image_size(spec.image_size)
    name = canonical_name(spec.dataset)
    if name == "folder" and not spec.data_dir:
        raise UserError("--dataset folder needs --data-dir pointing at ROOT/<class>/<image> files")
    if spec.data_dir and name != "world":
        path = Path(spec.data_dir).expanduser()
        if not path.is_dir():
            state = "is not a folder" if path.exists() else "does not exist"
            raise UserError(f"--data-dir {spec.data_dir} {state}")
    if spec.world not in WORLD_PRESETS:
        raise UserError(f"unknown world preset {spec.world!r}; choices: {', '.join(WORLD_PRESETS)}")


def resolve_meta(spec: DataSpec, quiet: bool = False):
    """Parse (and, for the world, generate; for CUB, download) the dataset's files."""
    from datasets.cub import find_cub_root, read_cub_meta
    from datasets.folder import read_folder_meta

    name = canonical_name(spec.dataset)
    if name == "world":
        return read_cub_meta(ensure_world_root(spec.world, spec.data_dir, quiet=quiet))
    if name == "folder":
        if not spec.data_dir:
            raise UserError("--dataset folder needs --data-dir pointing at ROOT/<class>/<image> files")
        return read_folder_meta(spec.data_dir)
    if spec.data_dir:
        return read_cub_meta(find_cub_root(spec.data_dir))
    from datasets.kaggle import download_cub

    return read_cub_meta(find_cub_root(download_cub()))


OUTPUTS = ("float", "uint8", "encoded")


def build_dataset(
    spec: DataSpec,
    split: str,
    train_transform: bool,
    meta=None,
    attributes: bool | None = False,
    transform=None,
    output: str = "float",
):
    """A split with the train (augmenting) or eval transform, or the given `transform`.

    `output="float"`: images in [-1, 1], transformed in the loader workers. `"uint8"`: the workers only decode
    and resize (`datasets.transforms.Uint8Images`); `datasets.gpu_transforms.to_model_batch` makes model input
    of each batch on the device, augmenting there when training (eval tensors equal the float path's).
    `"encoded"`: JPEG bytes shipped as they are and decoded on the device (nvJPEG on CUDA).
    """
    from datasets.cub import CUBDataset
    from datasets.transforms import Uint8Images, build_transform

    check_image_size(spec.image_size)
    if not 0 <= spec.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {spec.val_fraction}")
    if output not in OUTPUTS:
        raise UserError(f"the loader output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    meta = meta if meta is not None else resolve_meta(spec)
    if transform is None and output != "float":
        mode = "train" if train_transform else "eval"
        transform = Uint8Images(spec.image_size, mode, encoded=output == "encoded")
    transform = transform or build_transform(spec.image_size, train=train_transform)
    return CUBDataset(
        meta,
        split,
        transform,
        val_fraction=spec.val_fraction,
        seed=spec.seed,
        bbox_crop=spec.bbox_crop,
        attributes=attributes,
        skip_bad_images=spec.skip_bad_images,
    )


def collate_skipping(batch: list):
    """Default collation that drops unreadable images (None) and counts them in `skipped`; encoded images
    (bytes of different lengths) stay a list."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    encoded = [item.pop("encoded") for item in kept if "encoded" in item]
    out = default_collate(kept) if kept else {}
    if encoded:
        out["encoded"] = encoded
    out["skipped"] = len(batch) - len(kept)
    return out

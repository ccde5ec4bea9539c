"""Conditional VAE outputs: samples under given conditions, traversals of latent dimensions, interpolations.

Image i of every condition draws its standard-normal `eps` from seed `seed + i` (`z_from_seeds`, NVlabs'
convention) and decodes z = mean + std * eps of the fitted latents of the condition (models.cvae: the prior
mean plus the training images' spread around it; the prior p(z | condition) itself for a model without a fit):
rows of different conditions share their draws and differ only by the condition. Traversals sweep `eps` in one
dimension (prior standard units).
Every mode decodes and writes `batch_size` images at a time, so memory does not grow with --n or --steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.errors import UserError
from core.progress import Progress
from models.cvae import CVAE
from testing.generation.writer import SampleWriter, evenly_spaced, slug, to_rgb
from testing.sampling import z_from_seeds

KL_SETTING = {(False, False): "none", (True, False): "class", (False, True): "all", (True, True): "all"}


@dataclass
class Condition:
    """What is given: a class index (or None) and attribute values by index (the rest not given)."""

    label: int | None
    attributes: dict[int, float]

    def vector(self, model: CVAE) -> torch.Tensor:
        """[1, cond_dim] on the model's device."""
        device = next(model.parameters()).device
        labels = torch.tensor([self.label or 0], device=device)
        present = torch.tensor([float(self.label is not None)], device=device)
        values = torch.zeros(1, model.num_attributes, device=device)
        mask = torch.zeros(1, model.num_attributes, device=device)
        for i, v in self.attributes.items():
            values[0, i], mask[0, i] = v, 1.0
        return model.conditions(1, labels, present, values if model.num_attributes else None,
                                mask if model.num_attributes else None)  # fmt: skip

    def describe(self, meta: dict) -> dict:
        names = meta.get("attribute_names") or []
        return {"class": meta["class_names"][self.label] if self.label is not None else None,
                "attributes": {names[i]: v for i, v in sorted(self.attributes.items())}}  # fmt: skip

    def group(self, meta: dict) -> str:
        described = self.describe(meta)
        parts = [described["class"] or "any-class"]
        attrs = described["attributes"]
        if 0 < len(attrs) <= 3:
            parts += [f"{k}={v:g}" for k, v in attrs.items()]
        elif attrs:
            parts.append(f"{len(attrs)}-attributes")
        return slug("+".join(parts))

    def caption(self, meta: dict) -> str:
        """The condition in words, for the grid: class and attributes given (or "nothing given")."""
        described = self.describe(meta)
        parts = [described["class"]] if described["class"] else []
        parts += [f"{k}={v:g}" for k, v in described["attributes"].items()][:3]
        if len(described["attributes"]) > 3:
            parts.append(f"+{len(described['attributes']) - 3} attributes")
        return ", ".join(parts) or "nothing given"

    def kl_setting(self) -> str:
        return KL_SETTING[(self.label is not None, bool(self.attributes))]


@torch.no_grad()
def decode(model: CVAE, eps: torch.Tensor | None, c: torch.Tensor, value_range, batch_size: int,
           z: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[-1, 1] RGB images of latents z = sample_latent(c, eps) (the fitted latents of a model that has them,
    else its prior), or of the given latents `z`."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(c), batch_size):
        part = c[i : i + batch_size]
        latent = (
            z[i : i + batch_size].to(device)
            if z is not None
            else model.sample_latent(part, eps[i : i + batch_size])
        )
        out.append(model.decode(latent, part))
    return to_rgb(torch.cat(out), value_range).clamp(-1, 1)


def sample(model, meta, writer: SampleWriter, conditions: list[Condition], n: int, seed: int, batch_size: int,
           quiet: bool = True) -> None:  # fmt: skip
    """n images per condition, image i from seed + i."""
    value_range = tuple(meta.get("value_range", (-1.0, 1.0)))
    with Progress(len(conditions) * n, "generate cvae", enabled=not quiet) as bar:
        for condition in conditions:
            for start in range(seed, seed + n, batch_size):
                seeds = list(range(start, min(start + batch_size, seed + n)))
                c = condition.vector(model).expand(len(seeds), -1)
                images = decode(model, z_from_seeds(seeds, model.latent_dim), c, value_range, batch_size)
                rows = [{"condition": condition.describe(meta), "seed": s} for s in seeds]
                writer.add(images, rows, condition.group(meta), row_label=condition.caption(meta))
                bar.update(len(seeds))


def top_dimensions(meta: dict, setting: str, k: int) -> list[int]:
    """The k latent dimensions with the largest held-out KL under the condition setting (most used first)."""
    kl = (meta.get("kl_per_dim") or {}).get(setting)
    if not kl:
        raise UserError(f"the checkpoint records no per-dimension KL for setting {setting!r}; pass --dims")
    return [int(i) for i in np.argsort(kl)[::-1][:k]]


def traverse(model, meta, writer: SampleWriter, condition: Condition, dims: list[int], steps: int, span: float,
             seed: int, batch_size: int) -> None:  # fmt: skip
    """One row per dimension: the seed's prior draw with that coordinate swept over [-span, span] (in units of
    the conditional prior's standard deviation); the grid shows evenly spaced values of each row."""
    base = z_from_seeds([seed], model.latent_dim)
    values = torch.linspace(-span, span, steps)
    kl = (meta.get("kl_per_dim") or {}).get(condition.kl_setting())
    value_range = tuple(meta.get("value_range", (-1.0, 1.0)))
    shown = evenly_spaced(steps, writer.grid_columns)
    c = condition.vector(model)
    for d in dims:
        label = f"dim {d}" + (f" (KL {kl[d]:.2f})" if kl else "")
        for start in range(0, steps, batch_size):
            part = values[start : start + batch_size]
            eps = base.repeat(len(part), 1)
            eps[:, d] = part
            images = decode(model, eps, c.expand(len(part), -1), value_range, batch_size)
            rows = [{"condition": condition.describe(meta), "seed": seed, "dimension": d, "value": round(float(v), 6),
                     "kl": kl[d] if kl else None} for v in part]  # fmt: skip
            writer.add(images, rows, f"dim{d:03d}", labels=[f"{float(v):+.2f} sd" for v in part], row_label=label,
                       grid=[start + k in shown for k in range(len(part))])  # fmt: skip


def interpolate(model, meta, writer: SampleWriter, start: tuple, end: tuple, steps: int, batch_size: int,
                rows_info: list[dict], latents: bool = False, row_labels: list[str] | None = None) -> None:  # fmt: skip
    """Rows of `steps` frames from start to end, linear in both parts of each endpoint: (eps or z [R, latent],
    c [R, cond_dim]). `latents=False`: eps are prior draws (z follows the prior of the interpolated condition);
    True: they are latents (encoded images). `rows_info[r]` describes row r in the manifest."""
    (z0, c0), (z1, c1) = start, end
    t = torch.linspace(0, 1, steps)
    value_range = tuple(meta.get("value_range", (-1.0, 1.0)))
    shown = evenly_spaced(steps, writer.grid_columns)
    for r, info in enumerate(rows_info):
        for first in range(0, steps, batch_size):
            part = t[first : first + batch_size]
            z = torch.lerp(z0[r : r + 1], z1[r : r + 1], part[:, None].to(z0))
            c = torch.lerp(c0[r : r + 1], c1[r : r + 1], part[:, None].to(c0))
            images = decode(model, None if latents else z, c, value_range, batch_size, z if latents else None)
            writer.add(images, [{**info, "t": round(float(v), 6)} for v in part], f"row{r:03d}",
                       labels=[f"t = {float(v):.2f}" for v in part],
                       row_label=row_labels[r] if row_labels else f"row {r}",
                       grid=[first + k in shown for k in range(len(part))])  # fmt: skip


@torch.no_grad()
def encode_mean(model: CVAE, image: torch.Tensor, condition: Condition) -> torch.Tensor:
    """The posterior mean of one image ([1, 3, S, S] in [-1, 1]) under a condition."""
    device = next(model.parameters()).device
    mu, _ = model.encode(image.to(device), condition.vector(model))
    return mu.cpu()

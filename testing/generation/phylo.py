"""Phylo-NN outputs: codes drawn by the prior for a species or a tree node, decoded; code traversals; code-swap
paths from one specimen or species to another (free part first, then level 0, 1, ... as the paper's translation).

Image i draws its tokens with the uniforms of `RandomState(seed + i)`, so it depends on its seed only.
With `--node` every image draws all its codes from the prior conditioned on the node, its coarse levels too:
a run shows the variation the model has learnt for the clade, image by image, not one ancestor's draw.
Codes are drawn, decoded and written `batch_size` images at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from core.progress import Progress
from datasets.phylogeny import Levels
from models.phylo import PhyloModel
from testing.generation.conditions import uniforms
from testing.generation.writer import SampleWriter, evenly_spaced, slug


def draw(model: PhyloModel, cond: int, seeds: list[int], prefix: torch.Tensor | None, temperature: float,
         top_k: int, batch_size: int) -> torch.Tensor:  # fmt: skip
    """[len(seeds), T] codes from the prior under condition id `cond`, keeping `prefix` [P] when given."""
    return draw_many(model, [cond] * len(seeds), seeds, temperature, top_k, batch_size, prefix)


def draw_many(model: PhyloModel, conds: list[int], seeds: list[int], temperature: float, top_k: int,
              batch_size: int, prefix: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[len(seeds), T] codes, row i drawn under condition id `conds[i]` with the uniforms of `seeds[i]`."""
    device = next(model.prior.parameters()).device
    u = torch.from_numpy(uniforms(seeds, model.prior.length)).to(device)
    cond_ids = torch.as_tensor(conds, dtype=torch.long, device=device)
    out = []
    for i in range(0, len(seeds), batch_size):
        n = len(seeds[i : i + batch_size])
        pre = prefix.to(device).expand(n, -1) if prefix is not None else None
        out.append(model.prior.sample(cond_ids[i : i + n], u[i : i + n], pre, temperature, top_k))
    return torch.cat(out)


@torch.no_grad()
def decode(model: PhyloModel, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.autoencoder.parameters()).device
    return torch.cat([model.autoencoder.decode_codes(codes[i : i + batch_size].to(device)).clamp(-1, 1)
                      for i in range(0, len(codes), batch_size)])  # fmt: skip


def species_condition(levels: Levels, species: int) -> int:
    return levels.condition_offsets[-1] + species


def _chunks(seed: int, n: int, batch_size: int):
    for start in range(seed, seed + n, batch_size):
        yield list(range(start, min(start + batch_size, seed + n)))


def sample_species(model, levels: Levels, writer: SampleWriter, species: list[int], n: int, seed: int,
                   temperature: float, top_k: int, batch_size: int, quiet: bool = True) -> None:  # fmt: skip
    with Progress(len(species) * n, "generate phylo", enabled=not quiet) as bar:
        for s in species:
            name = levels.species[s]
            for seeds in _chunks(seed, n, batch_size):
                codes = draw(model, species_condition(levels, s), seeds, None, temperature, top_k, batch_size)
                rows = [{"condition": {"species": name}, "seed": sd, "temperature": temperature, "top_k": top_k,
                         "codes": c} for sd, c in zip(seeds, codes.tolist(), strict=True)]  # fmt: skip
                writer.add(decode(model, codes, batch_size), rows, slug(name), row_label=name)
                bar.update(len(seeds))


def sample_node(model, levels: Levels, writer: SampleWriter, level: int, group: int, n: int, seed: int,
                temperature: float, top_k: int, batch_size: int, quiet: bool = True) -> None:  # fmt: skip
    """n images under an ancestor, each drawing all its codes from the prior conditioned on it."""
    cond = levels.condition_offsets[level] + group
    name = levels.groups[level][group]
    label = f"{levels.names[level]} {name}" if levels.names else f"level {level}: {name}"
    condition = {
        "node": name,
        "level": level,
        "species": [levels.species[s] for s in levels.members(level, group)],
    }
    with Progress(n, "generate phylo", enabled=not quiet) as bar:
        for seeds in _chunks(seed, n, batch_size):
            codes = draw(model, cond, seeds, None, temperature, top_k, batch_size)
            rows = [{"condition": condition, "seed": sd, "temperature": temperature, "top_k": top_k, "codes": c}
                    for sd, c in zip(seeds, codes.tolist(), strict=True)]  # fmt: skip
            writer.add(decode(model, codes, batch_size), rows, slug(f"level{level}-{name}"), row_label=label)
            bar.update(len(seeds))


def position_part(model: PhyloModel, position: int) -> str:
    ae = model.autoencoder
    return "free" if position >= ae.n_phylo else f"level {position // ae.codes_per_level}"


def default_positions(model: PhyloModel) -> list[int]:
    """The first code position of every level and of the free part."""
    ae = model.autoencoder
    return [level * ae.codes_per_level for level in range(ae.levels)] + [ae.n_phylo]


def traverse(model, writer: SampleWriter, base: torch.Tensor, base_info: dict, positions: list[int], steps: int,
             batch_size: int) -> None:  # fmt: skip
    """One row per code position: the base codes with that position set to `steps` evenly spaced entries."""
    vocab = model.autoencoder.quantizer.n_embed
    entries = np.unique(np.linspace(0, vocab - 1, min(steps, vocab)).round().astype(int)).tolist()
    shown = evenly_spaced(len(entries), writer.grid_columns)
    for p in positions:
        part_name = position_part(model, p)
        for first in range(0, len(entries), batch_size):
            chunk = entries[first : first + batch_size]
            codes = base.repeat(len(chunk), 1)
            codes[:, p] = torch.tensor(chunk)
            rows = [{**base_info, "position": p, "part": part_name, "code": e} for e in chunk]
            writer.add(decode(model, codes, batch_size), rows, f"position{p:03d}", labels=[f"code {e}" for e in chunk],
                       row_label=f"position {p} ({part_name})",
                       grid=[first + k in shown for k in range(len(chunk))])  # fmt: skip


def swap_path(model: PhyloModel, start: torch.Tensor, end: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Frames from `start` to `end` codes: the free part swapped first, then level 0, 1, ...; [(swapped, codes)]."""
    ae = model.autoencoder
    parts = [("free", list(ae.free_positions))]
    parts += [
        (f"level {lv}", list(range(lv * ae.codes_per_level, (lv + 1) * ae.codes_per_level)))
        for lv in range(ae.levels)
    ]
    frames, codes = [("none", start.clone())], start.clone()
    for name, positions in parts:
        codes = codes.clone()
        codes[positions] = end[positions]
        frames.append((name, codes))
    return frames


def interpolate(model, writer: SampleWriter, pairs: list[tuple[torch.Tensor, torch.Tensor, dict]], batch_size: int,
                row_labels: list[str] | None = None) -> None:  # fmt: skip
    """One row per (start codes, end codes, description): the code-swap path between them."""
    for r, (start, end, info) in enumerate(pairs):
        frames = swap_path(model, start, end)
        codes = torch.stack([c for _, c in frames])
        rows = [{**info, "swapped_last": name, "codes": c.tolist()} for name, c in frames]
        labels = ["start"] + [f"+ {name}" for name, _ in frames[1:]]
        writer.add(decode(model, codes, batch_size), rows, f"row{r:03d}", labels=labels,
                   row_label=row_labels[r] if row_labels else f"row {r}")  # fmt: skip

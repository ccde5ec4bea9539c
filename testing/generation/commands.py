"""The `generate cvae|phylo|traverse|interpolate` runs: check every input, then create the run directory, write
the outputs through a `SampleWriter`, and mark the run finished. Nothing is created when an input is bad."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from core.checkpoint import file_hash
from core.device import resolve_device
from core.errors import UserError
from core.rundir import mark_run, prepare_run_dir
from models.artifacts import checkpoint_kind
from models.cvae import KIND as CVAE_KIND
from models.cvae import RUN_FILE as CVAE_FILE
from models.cvae import load_cvae
from models.phylo import KIND as PHYLO_KIND
from models.phylo import load_phylo
from models.phylo.checkpoint import RUN_FILE as PHYLO_FILE
from testing.generation import TOP_K
from testing.generation import cvae as gen_cvae
from testing.generation import phylo as gen_phylo
from testing.generation.conditions import (
    check_positive,
    check_seed,
    load_image,
    parse_attribute_pairs,
    parse_attribute_vector,
    resolve_class,
)
from testing.generation.writer import SampleWriter
from testing.sampling import z_from_seeds


@dataclass
class Common:
    """Options every mode shares."""

    checkpoint: Path
    out: Path
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    extra_inputs: list = field(default_factory=list)


def family(path: Path) -> tuple[str, Path]:
    """(kind, weights file) of a CVAE or Phylo-NN checkpoint or run directory."""
    path = Path(path)
    if path.is_dir():
        for kind, name in ((CVAE_KIND, CVAE_FILE), (PHYLO_KIND, PHYLO_FILE)):
            if (path / name).is_file():
                return kind, path / name
        raise UserError(
            f"{path} holds neither {CVAE_FILE} nor {PHYLO_FILE}: pass a train cvae or train phylo run"
        )
    kind = checkpoint_kind(path)
    if kind not in (CVAE_KIND, PHYLO_KIND):
        raise UserError(f"{path} is not a CVAE or Phylo-NN checkpoint (kind: {kind!r})")
    return kind, path


def start(common: Common, command: str, weights: Path) -> Path:
    """The run directory, created after every input was checked (never one that holds an input)."""
    inputs = [common.checkpoint, weights, *common.extra_inputs]
    return prepare_run_dir(common.out, command, overwrite=common.overwrite, inputs=inputs, resumable=False)


def finish(run_dir: Path, writer: SampleWriter, weights: Path, **fields) -> dict:
    mark_run(run_dir, status="finished", checkpoint=str(weights), **fields)
    return writer.summary()


# ----------------------------------------------------------------------------
# CVAE


def cvae_condition(
    meta: dict, label: str | None, attrs: list[str], attr_vector: str | None
) -> gen_cvae.Condition:
    names = meta.get("attribute_names") or []
    if attrs and attr_vector is not None:
        raise UserError("give attributes either as --attr NAME=VALUE or as one --attrs vector, not both")
    given = (
        parse_attribute_vector(attr_vector, names)
        if attr_vector is not None
        else parse_attribute_pairs(attrs, names)
    )
    index = resolve_class(label, meta["class_names"]) if label is not None else None
    return gen_cvae.Condition(index, given)


def generate_cvae(
    common: Common, classes: list[str], attrs: list[str], attr_vector: str | None, n: int
) -> dict:
    check_positive(n=n, batch_size=common.batch_size)
    check_seed(common.seed, n)
    kind, weights = family(common.checkpoint)
    if kind != CVAE_KIND:
        raise UserError(
            f"{weights} is not a CVAE checkpoint (kind: {kind!r}); use generate phylo for Phylo-NN"
        )
    model, meta, _ = load_cvae(weights, resolve_device(common.device))
    labels: list[str | None] = list(meta["class_names"]) if classes == ["all"] else (classes or [None])
    conditions = [cvae_condition(meta, label, attrs, attr_vector) for label in labels]
    run_dir = start(common, "generate cvae", weights)
    with SampleWriter(run_dir, "cvae", file_hash(weights), rows="condition", columns="seed") as writer:
        gen_cvae.sample(model, meta, writer, conditions, n, common.seed, common.batch_size, common.quiet)
    return finish(run_dir, writer, weights, n=n, seed=common.seed)


# ----------------------------------------------------------------------------
# Phylo-NN


def load_phylo_levels(weights: Path, device: str):
    from datasets.phylogeny import levels_from_record

    model = load_phylo(weights, resolve_device(device))
    return model, levels_from_record(model.meta["phylogeny"])


def check_sampler(temperature: float, top_k: int) -> None:
    if not temperature > 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = all codes), got {top_k}")


def generate_phylo(common: Common, species: list[str], node: str | None, level: int | None, n: int,
                   temperature: float, top_k: int) -> dict:  # fmt: skip
    check_positive(n=n, batch_size=common.batch_size)
    check_seed(common.seed, n)
    check_sampler(temperature, top_k)
    if bool(species) == (node is not None):
        raise UserError("give either --species (one or more, or all) or --node, not both and not neither")
    if level is not None and node is None:
        raise UserError("--level applies to --node")
    kind, weights = family(common.checkpoint)
    if kind != PHYLO_KIND:
        raise UserError(
            f"{weights} is not a Phylo-NN checkpoint (kind: {kind!r}); use generate cvae for a CVAE"
        )
    model, levels = load_phylo_levels(weights, common.device)
    if node is not None:
        found_level, group = levels.find_node(node, level)
    else:
        chosen = (
            range(len(levels.species))
            if species == ["all"]
            else [resolve_class(s, levels.species, "species") for s in species]
        )
    run_dir = start(common, "generate phylo", weights)
    rows = "tree node" if node is not None else "species"
    with SampleWriter(run_dir, "phylo", file_hash(weights), rows=rows, columns="seed") as writer:
        if node is not None:
            gen_phylo.sample_node(model, levels, writer, found_level, group, n, common.seed, temperature, top_k,
                                  common.batch_size, common.quiet)  # fmt: skip
        else:
            gen_phylo.sample_species(model, levels, writer, list(chosen), n, common.seed, temperature, top_k,
                                     common.batch_size, common.quiet)  # fmt: skip
    return finish(run_dir, writer, weights, n=n, seed=common.seed)


# ----------------------------------------------------------------------------
# traverse and interpolate, for either family


@dataclass
class Choice:
    """Mode options that only one family reads; a given option of the other family is refused."""

    cvae: dict
    phylo: dict

    def check(self, kind: str) -> None:
        other = self.phylo if kind == CVAE_KIND else self.cvae
        given = [name for name, value in other.items() if value not in (None, [], False)]
        if given:
            family_name = "Phylo-NN" if kind == CVAE_KIND else "CVAE"
            verb = "does" if len(given) == 1 else "do"
            raise UserError(
                f"{', '.join(given)} {verb} not apply to a {kind} checkpoint; only to {family_name} ones"
            )


MAX_SPAN = 100.0  # prior standard deviations: far beyond anything a decoder has seen


def check_span(span: float) -> None:
    if not (math.isfinite(span) and 0 < span <= MAX_SPAN):
        raise UserError(f"--span must be a finite number of prior standard deviations in (0, {MAX_SPAN:g}], "
                        f"e.g. 3; got {span}")  # fmt: skip


def interpolation_label(condition: dict, seed: int | None) -> str:
    """'A -> B' for a grid row, from the manifest's condition of an interpolation (class, species or image)."""

    def end(side: dict) -> str:
        if side.get("image"):
            return Path(side["image"]).name
        return str(side.get("species") or side.get("class") or "nothing given")

    text = f"{end(condition['from'])} -> {end(condition['to'])}"
    return text + (f" (seed {seed})" if seed is not None else "")


def parse_ints(text: str | None, option: str, upper: int) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < upper]
    if bad or not values:
        raise UserError(f"{option} values must lie in 0..{upper - 1}, got {text!r}")
    return values


def traverse(common: Common, label: str | None, attrs: list[str], dims: str | None, top: int | None, span: float,
             species: str | None, image: Path | None, positions: str | None, steps: int | None,
             temperature: float = 1.0, top_k: int = TOP_K) -> dict:  # fmt: skip
    check_seed(common.seed, 1)
    check_positive(batch_size=common.batch_size)
    kind, weights = family(common.checkpoint)
    choice = Choice({"--class": label, "--attr": attrs, "--dims": dims, "--top": top},
                    {"--species": species, "--image": image, "--positions": positions})  # fmt: skip
    choice.check(kind)
    if image is not None:
        common.extra_inputs.append(image)
    if kind == CVAE_KIND:
        steps = 9 if steps is None else steps
        check_positive(steps=steps)
        check_span(span)
        model, meta, _ = load_cvae(weights, resolve_device(common.device))
        condition = cvae_condition(meta, label, attrs, None)
        if dims is not None and top is not None:
            raise UserError("give --dims or --top, not both")
        chosen = parse_ints(dims, "--dims", model.latent_dim)
        if chosen is None:
            check_positive(top=4 if top is None else top)
            chosen = gen_cvae.top_dimensions(
                meta, condition.kl_setting(), min(4 if top is None else top, model.latent_dim)
            )
        run_dir = start(common, "generate traverse", weights)
        with SampleWriter(run_dir, "traverse", file_hash(weights), rows="latent dimension",
                          columns="value in prior standard deviations") as writer:  # fmt: skip
            gen_cvae.traverse(
                model, meta, writer, condition, chosen, steps, span, common.seed, common.batch_size
            )
        return finish(run_dir, writer, weights, seed=common.seed)

    steps = 16 if steps is None else steps
    check_positive(steps=steps)
    check_sampler(temperature, top_k)
    model, levels = load_phylo_levels(weights, common.device)
    if (species is None) == (image is None):
        raise UserError(
            "give the codes to traverse: --species NAME (drawn from the prior) or --image PATH (encoded)"
        )
    chosen = parse_ints(
        positions, "--positions", model.autoencoder.sequence_length
    ) or gen_phylo.default_positions(model)
    if image is not None:
        base = model.autoencoder.encode_codes(load_image(image, model.autoencoder.config["image_size"], "--image").to(
            next(model.autoencoder.parameters()).device))[0].cpu()  # fmt: skip
        info = {"condition": {"image": str(image)}, "seed": None}
    else:
        s = resolve_class(species, levels.species, "species")
        base = gen_phylo.draw(
            model, gen_phylo.species_condition(levels, s), [common.seed], None, temperature, top_k, 1
        )[0].cpu()
        info = {"condition": {"species": levels.species[s]}, "seed": common.seed}
    run_dir = start(common, "generate traverse", weights)
    with SampleWriter(
        run_dir, "traverse", file_hash(weights), rows="code position", columns="codebook entry"
    ) as writer:
        gen_phylo.traverse(model, writer, base, info, chosen, steps, common.batch_size)
    return finish(run_dir, writer, weights, seed=common.seed)


def interpolate(common: Common, from_class: str | None, to_class: str | None, attrs: list[str], from_species: str | None,
                to_species: str | None, from_image: Path | None, to_image: Path | None, steps: int | None, n: int,
                temperature: float = 1.0, top_k: int = TOP_K) -> dict:  # fmt: skip
    check_positive(n=n, batch_size=common.batch_size)
    check_seed(common.seed, n)
    if (from_image is None) != (to_image is None):
        raise UserError("give both --from-image and --to-image, or neither")
    kind, weights = family(common.checkpoint)
    Choice({"--from-class": from_class, "--to-class": to_class, "--attr": attrs, "--steps": steps},
           {"--from-species": from_species, "--to-species": to_species}).check(kind)  # fmt: skip
    images = [p for p in (from_image, to_image) if p is not None]
    common.extra_inputs += images
    if kind == CVAE_KIND:
        steps = 8 if steps is None else steps
        check_positive(steps=steps)
        model, meta, _ = load_cvae(weights, resolve_device(common.device))
        if not images and (from_class is None or to_class is None):
            raise UserError("give two endpoints: --from-class and --to-class, or --from-image and --to-image")
        c0 = cvae_condition(meta, from_class, attrs, None)
        c1 = cvae_condition(meta, to_class, attrs, None)
        if images:
            if model.arch != "conv":
                raise UserError("--from-image/--to-image need an image CVAE; this one models vectors")
            size = model.x_shape[-1]
            z0, z1 = (
                gen_cvae.encode_mean(model, load_image(p, size, option), c)
                for p, c, option in ((from_image, c0, "--from-image"), (to_image, c1, "--to-image"))
            )
            rows = [{"condition": {"from": {"image": str(from_image), **c0.describe(meta)},
                                   "to": {"image": str(to_image), **c1.describe(meta)}}, "seed": None}]  # fmt: skip
        else:
            seeds = list(range(common.seed, common.seed + n))
            z0 = z1 = z_from_seeds(seeds, model.latent_dim)
            rows = [
                {"condition": {"from": c0.describe(meta), "to": c1.describe(meta)}, "seed": s} for s in seeds
            ]
        count = len(rows)
        ends = [(z, c.vector(model).expand(count, -1)) for z, c in ((z0, c0), (z1, c1))]
        labels = [interpolation_label(row["condition"], row["seed"]) for row in rows]
        run_dir = start(common, "generate interpolate", weights)
        with SampleWriter(
            run_dir, "interpolate", file_hash(weights), rows="endpoints", columns="t"
        ) as writer:
            gen_cvae.interpolate(model, meta, writer, ends[0], ends[1], steps, common.batch_size, rows, bool(images),
                                 labels)  # fmt: skip
        return finish(run_dir, writer, weights, seed=common.seed)

    check_sampler(temperature, top_k)
    model, levels = load_phylo_levels(weights, common.device)
    if images:
        if from_species is not None or to_species is not None:
            raise UserError("give species or images as endpoints, not both")
        device = next(model.autoencoder.parameters()).device
        size = model.autoencoder.config["image_size"]
        a, b = (model.autoencoder.encode_codes(load_image(p, size, option).to(device))[0].cpu()
                for p, option in zip(images, ("--from-image", "--to-image"), strict=True))  # fmt: skip
        pairs = [
            (
                a,
                b,
                {
                    "condition": {"from": {"image": str(from_image)}, "to": {"image": str(to_image)}},
                    "seed": None,
                },
            )
        ]
    else:
        if from_species is None or to_species is None:
            raise UserError(
                "give two endpoints: --from-species and --to-species, or --from-image and --to-image"
            )
        s0, s1 = (resolve_class(s, levels.species, "species") for s in (from_species, to_species))
        seeds = list(range(common.seed, common.seed + n))
        a, b = (gen_phylo.draw(model, gen_phylo.species_condition(levels, s), seeds, None, temperature, top_k,
                               common.batch_size).cpu() for s in (s0, s1))  # fmt: skip
        condition = {"from": {"species": levels.species[s0]}, "to": {"species": levels.species[s1]}}
        pairs = [(a[i], b[i], {"condition": condition, "seed": s}) for i, s in enumerate(seeds)]
    labels = [interpolation_label(info["condition"], info["seed"]) for _, _, info in pairs]
    run_dir = start(common, "generate interpolate", weights)
    with SampleWriter(run_dir, "interpolate", file_hash(weights), grid_columns=max(16, model.autoencoder.levels + 2),
                      rows="endpoints", columns="codes swapped so far") as writer:  # fmt: skip
        gen_phylo.interpolate(model, writer, pairs, common.batch_size, labels)
    return finish(run_dir, writer, weights, seed=common.seed)

"""What `train phylo` and `test phylo` report about a trained Phylo-NN on a split, in one pass over its images.

- Codes follow the tree (testing.phylo.correlations): per level, the Spearman correlation of code distances
  with tree distances for the phylo prefix, the free part and the plain VQ baseline (the stage-1 VQGAN's codes).
- The world's ground truth (testing.phylo.traits): each code part's held-out trait predictions.
- The round trip of real images through the codes: an independent classifier's accuracy on the images and on
  their reconstructions, and the model's own level heads on the images and on their re-encoded
  reconstructions (what the issue's 0.72 -> 0.40 measured).
- Sample fidelity (testing.generation.fidelity), with an independent classifier: `samples` images per species
  drawn by the prior given the species, and per node of every coarser level given the node, each recognised
  per level (the species, the clade), beside chance; their within-class spread against the real images'.
  Sample i of a condition draws from seed `seed + i`, as `generate phylo --seed` does, so a grid here and a
  generate run show the same images.
Everything lands in `out_dir` with its figures; the returned summary holds the headline numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from core.atomic import write_text
from core.errors import UserError
from core.runlog import json_ready
from datasets.phylogeny import Levels
from testing.generation import TOP_K, fidelity
from testing.phylo.correlations import correlations, write_report

__all__ = ["code_usage", "evaluate_run", "evaluate_stage1", "load_judge", "run_phylo_test"]

REAL_PER_CLASS = 50  # real images kept per class for the spread and feature comparisons


def code_usage(counts: torch.Tensor) -> dict:
    """Codebook entries used and the perplexity of their use, from per-entry counts."""
    p = counts.double() / counts.sum().clamp(min=1)
    p = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "perplexity": float(torch.exp(-(p * p.log()).sum()))}


def load_judge(path, num_classes: int, device) -> tuple[torch.nn.Module, int | None]:
    """An independent classifier (a `train classifier` run or checkpoint) that must know the data's classes:
    (frozen model, its training resolution)."""
    from models.classifiers import load_classifier

    classifier, meta = load_classifier(path, device=str(device))
    if classifier.num_classes != num_classes:
        raise UserError(f"--classifier {path} knows {classifier.num_classes} classes, the data {num_classes}")
    return classifier.eval().requires_grad_(False), meta.get("image_size")


# ----------------------------------------------------------------------------
# One pass over a split.


@torch.no_grad()
def split_outputs(autoencoder, loader, device, plain=None, judge=None, keep_per_class: int = REAL_PER_CLASS,
                  quiet: bool = True) -> dict:  # fmt: skip
    """Codes, labels, the plain baseline's codes, the level heads' predictions on the images and on their
    re-encoded reconstructions, the judge's on the images and on their reconstructions, and up to
    `keep_per_class` real images per class (on the CPU)."""
    from core.progress import Progress

    autoencoder.eval()
    out = {
        k: [] for k in ("codes", "labels", "plain", "heads", "heads_round_trip", "judge", "judge_round_trip")
    }
    kept, kept_labels, counts = [], [], {}
    with Progress(len(loader), "evaluate", enabled=not quiet) as bar:
        for batch in loader:
            bar.update(1)
            if "image" not in batch:
                continue
            x, y = batch["image"].to(device), batch["label"]
            forward = autoencoder(x)  # in eval mode its codes are encode_codes(x)'s
            codes = forward["codes"]
            recon = autoencoder.decode_codes(codes).float().clamp(-1, 1)
            out["codes"].append(codes.cpu())
            out["labels"].append(y)
            if plain is not None:
                out["plain"].append(plain.encode_codes(x).cpu())
            if "level_logits" in forward:  # not the plain autoencoder of earlier runs
                out["heads"].append(_heads(forward))
                out["heads_round_trip"].append(_heads(autoencoder(recon)))
            if judge is not None:
                classifier, size = judge
                out["judge"].append(fidelity.classifier_outputs(classifier, x, size)[0])
                out["judge_round_trip"].append(fidelity.classifier_outputs(classifier, recon, size)[0])
            for image, label in zip(x.cpu(), y.tolist(), strict=True):
                if counts.get(label, 0) < keep_per_class:
                    counts[label] = counts.get(label, 0) + 1
                    kept.append(image)
                    kept_labels.append(label)
    if not out["codes"]:
        raise UserError("every image of the split is unreadable")
    result = {k: torch.cat(v, dim=-1 if k.startswith("heads") else 0) if v else None for k, v in out.items()}
    result["real_images"], result["real_labels"] = torch.stack(kept), np.asarray(kept_labels)
    return result


def _heads(forward: dict) -> torch.Tensor:
    """[levels, N] each level head's predicted group, from the model's forward outputs."""
    return torch.stack([logits.argmax(1).cpu() for logits in forward["level_logits"]])


def round_trip(outputs: dict, levels: Levels) -> dict:
    """Accuracies on the real images and on their round trip: the model's level heads (per level) and the judge."""
    labels = outputs["labels"].numpy()
    result = {"images": int(len(labels))}
    if outputs["heads"] is not None:
        truth = levels.assignment[:, labels]
        for name in ("heads", "heads_round_trip"):
            hits = outputs[name].numpy() == truth
            result[name] = [float(h) for h in hits.mean(1)]
    if outputs["judge"] is not None:
        result["classifier"] = float((outputs["judge"].numpy() == labels).mean())
        result["classifier_round_trip"] = float((outputs["judge_round_trip"].numpy() == labels).mean())
    return result


# ----------------------------------------------------------------------------
# Samples.


def draw_samples(model, conds: list[int], n: int, seed: int, top_k: int, temperature: float = 1.0,
                 batch_size: int = 256) -> torch.Tensor:  # fmt: skip
    """[len(conds) * n, 3, S, S] images: n per condition, sample i from seed `seed + i`."""
    from testing.generation.phylo import decode, draw_many

    seeds = [seed + i for _ in conds for i in range(n)]
    cond_ids = [c for c in conds for _ in range(n)]
    codes = draw_many(model, cond_ids, seeds, temperature, top_k, batch_size)
    return decode(model, codes, batch_size).float().cpu()


def sample_fidelity(model, levels: Levels, judge, outputs: dict, n: int, seed: int, top_k: int,
                    out_dir: Path) -> dict:  # fmt: skip
    """Species samples and node samples of every coarser level, judged; reports, figures and grids in `out_dir`."""
    classifier, size = judge
    real, real_labels = outputs["real_images"], outputs["real_labels"]
    names = level_names(levels)
    species = list(range(len(levels.species)))
    images = draw_samples(model, [levels.condition_offsets[-1] + s for s in species], n, seed, top_k)
    labels = np.repeat(species, n)
    report = fidelity.fidelity_report(classifier, images, fidelity.species_targets(labels, levels.assignment),
                                      labels, real, real_labels, levels.assignment, size)  # fmt: skip
    fidelity.write_fidelity(report, out_dir / "species", names)
    sample_grid(images, report["predicted"], labels, levels, n, out_dir / "species" / "samples.png",
                [levels.species[s] for s in species], "species")  # fmt: skip
    summary = {"species": _headline(report), "nodes": {}}
    for level in range(levels.n_levels - 1):
        groups = list(range(len(levels.groups[level])))
        images = draw_samples(model, [levels.condition_offsets[level] + g for g in groups], n, seed, top_k)
        group_of = np.repeat(groups, n)
        intended = np.concatenate(
            [fidelity.node_targets(level, g, n, levels.assignment) for g in groups], axis=1
        )
        real_groups = levels.assignment[level][real_labels]
        report = fidelity.fidelity_report(classifier, images, intended, group_of, real, real_groups,
                                          levels.assignment, size)  # fmt: skip
        folder = out_dir / f"level{level}"
        fidelity.write_fidelity(report, folder, names)
        sample_grid(images, report["predicted"], group_of, levels, n, folder / "samples.png",
                    levels.groups[level], names[level], level)  # fmt: skip
        summary["nodes"][level] = _headline(report, level)
    return summary


def _headline(report: dict, level: int | None = None) -> dict:
    rows = report["recognition"]
    if level is not None:  # a node's samples: membership of its clade at its own level
        rows = [r for r in rows if r["level"] == level]
    return {"recognition": [{k: r[k] for k in ("level", "rate", "chance")} for r in rows],
            "spread_ratio": report["pixel_spread"]["ratio"], "feature_distance": report["feature_distance"]["all"],
            "samples": report["samples"]}  # fmt: skip


def level_names(levels: Levels) -> list[str]:
    if levels.names:
        return list(levels.names)
    return [f"level {lv}" for lv in range(levels.n_levels - 1)] + ["species"]


def short_name(species: str) -> str:
    """ "Mosaelax_gubralata" -> "M.gubral" (a cell's width): genus initial and the epithet's start."""
    parts = species.replace("_", " ").split()
    return f"{parts[0][0]}.{parts[-1][:6]}" if len(parts) > 1 else species[:8]


def sample_grid(images: torch.Tensor, predicted: list[int], groups: np.ndarray, levels: Levels, n: int, path: Path,
                row_names: list[str], what: str, level: int | None = None) -> None:  # fmt: skip
    """One labelled row per condition: its samples, each captioned with the judge's species and whether it lies
    in the intended group (ok / no)."""
    from datasets.transforms import to_uint8_images
    from testing.generation.grid import labelled_grid
    from testing.sampling import png_bytes

    pixels = to_uint8_images(images)
    rows, labels = [], []
    for g in range(len(row_names)):
        members = np.flatnonzero(groups == g)[:n]
        rows.append(pixels[members])
        captions = []
        for k in members:
            guess = int(predicted[k])
            inside = guess == g if level is None else levels.assignment[level, guess] == g
            captions.append(f"{'ok' if inside else 'no'} {short_name(levels.species[guess])}")
        labels.append(captions)
    title = f"samples: rows = {what} asked for, columns = seed; caption = the classifier's species (ok: in the group)"
    image, _ = labelled_grid(rows, list(row_names), labels, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    from core.atomic import write_bytes

    write_bytes(path, png_bytes(image))


# ----------------------------------------------------------------------------
# The whole report.


def trait_summary(rows: list[dict]) -> dict:
    """Per code part: the mean probe accuracy on traits fixed at or above its level and on finer ones."""
    out = {}
    for part in dict.fromkeys(r["part"] for r in rows):
        mine = [r for r in rows if r["part"] == part]
        coarse = [r["accuracy"] for r in mine if r["fixed_at_or_above"]]
        fine = [r["accuracy"] for r in mine if r["fixed_at_or_above"] is False]
        out[part] = {"fixed_at_or_above": float(np.mean(coarse)) if coarse else None,
                     "finer": float(np.mean(fine)) if fine else None,
                     "all": float(np.mean([r["accuracy"] for r in mine]))}  # fmt: skip
    return out


def world_traits(autoencoder, levels: Levels, train: tuple, test: tuple, world_root, out_dir: Path) -> dict:
    """The trait probe on a synthetic world: traits.csv/png in `out_dir`; the per-part summary."""
    from datasets.world import load_traits
    from testing.phylo.traits import code_parts, trait_probe, write_trait_report

    _, traits = load_traits(world_root)
    rows = trait_probe(
        train, test, code_parts(autoencoder), traits, levels.assignment, autoencoder.quantizer.n_embed
    )
    write_trait_report(rows, out_dir, ["order", "family", "genus", "species"])
    return trait_summary(rows)


def load_baseline(path, device):
    """The plain VQ to compare with: a stage-1 VQGAN (its checkpoint or a run holding one) or the plain VQ
    autoencoder an earlier `train phylo` kept in `baseline/`."""
    from models.artifacts import checkpoint_kind
    from models.phylo import load_plain, load_vqgan
    from models.phylo.checkpoint import VQGAN_KIND

    path = Path(path)
    if path.is_dir() or checkpoint_kind(path) == VQGAN_KIND:
        return load_vqgan(path, device)[0]
    return load_plain(path, device=device)[0]


def plain_baseline(autoencoder, plain):
    """The plain VQ to compare with: `plain` when given, else a two-stage model's own stage-1 VQGAN."""
    if plain is not None:
        return plain
    return getattr(autoencoder, "stage1", None)


def evaluate_run(model, levels: Levels, loader, device, out_dir: str | os.PathLike, train: tuple | None = None,
                 world_root=None, judge=None, judge_name=None, plain=None, samples: int = 10, top_k: int = TOP_K,
                 seed: int = 0, quiet: bool = True, show: bool = False) -> dict:  # fmt: skip
    """Correlations, traits (a world with `train` codes), the round trip and, with a judge (`load_judge`),
    sample fidelity, written into `out_dir`; returns the summary."""
    out_dir = Path(out_dir)
    autoencoder = model.autoencoder
    plain = plain_baseline(autoencoder, plain)
    outputs = split_outputs(autoencoder, loader, device, plain, judge, quiet=quiet)
    codes, labels = outputs["codes"], outputs["labels"]
    baseline = (outputs["plain"], labels, plain.quantizer.n_embed) if plain is not None else None
    result = correlations(codes, labels, autoencoder, levels, baseline)
    summary = {"correlation": write_report(result, out_dir, show=show)["levels"]}
    if world_root is not None and train is not None:
        summary["traits"] = world_traits(
            autoencoder, levels, train, (codes, labels.numpy()), world_root, out_dir
        )
    summary["round_trip"] = round_trip(outputs, levels)
    if judge is not None:
        summary["fidelity"] = sample_fidelity(model, levels, judge, outputs, samples, seed, top_k,
                                              out_dir / "fidelity")  # fmt: skip
        summary["fidelity"]["judge"] = str(judge_name)
    write_text(out_dir / "summary.json", json.dumps(json_ready(summary), indent=1, allow_nan=False))
    return summary


@torch.no_grad()
def evaluate_stage1(stage1, loader, device, judge=None, out_dir=None) -> dict:
    """A stage-1 VQGAN alone on a split: held-out L1, codebook use and, with a judge (`load_judge`), the
    classifier's accuracy on the images and on their reconstructions; summary.json in `out_dir`."""
    stage1.eval()
    l1, n, counts, hits, rec_hits = 0.0, 0, torch.zeros(stage1.quantizer.n_embed), 0, 0
    for batch in loader:
        if "image" not in batch:
            continue
        x, y = batch["image"].to(device), batch["label"]
        out = stage1(x)
        recon = out["recon"].float().clamp(-1, 1)
        l1 += float((recon - x).abs().mean((1, 2, 3)).sum())
        counts += torch.bincount(out["indices"].flatten().cpu(), minlength=counts.numel()).float()
        if judge is not None:
            hits += int((fidelity.classifier_outputs(judge[0], x, judge[1])[0] == y).sum())
            rec_hits += int((fidelity.classifier_outputs(judge[0], recon, judge[1])[0] == y).sum())
        n += len(y)
    result = {"images": n, "l1": l1 / max(n, 1), **code_usage(counts)}
    if judge is not None:
        result.update({"classifier": hits / max(n, 1), "classifier_round_trip": rec_hits / max(n, 1)})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(out_dir) / "stage1.json", json.dumps(json_ready(result), indent=1, allow_nan=False))
    return result


def run_phylo_test(checkpoint, run_dir, baseline=None, classifier=None, split: str = "test", data_overrides=None,
                   samples: int = 10, top_k: int = TOP_K, seed: int = 0, batch_size: int = 64, device: str = "auto",
                   num_workers: int | None = None, overwrite: bool = False, show: bool = False,
                   quiet: bool = False) -> dict:  # fmt: skip
    """`test phylo`: the report of `evaluate_run` for a trained model on a split, written into `run_dir`, which
    is created only once every input checked out. The plain VQ baseline is `baseline`, else the model's own
    stage-1 VQGAN (or the plain autoencoder an earlier run kept in `baseline/`)."""
    from torch.utils.data import DataLoader

    from core.config import saved_settings
    from core.device import loader_settings, resolve_device
    from core.rundir import mark_run, prepare_run_dir
    from datasets.phylogeny import levels_from_record
    from datasets.registry import DataSpec, build_dataset, collate_skipping, resolve_meta
    from datasets.transforms import square_transform
    from models.phylo import load_phylo
    from models.phylo.checkpoint import PLAIN_RUN_FILE

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if samples <= 0 or top_k < 0:
        raise UserError(f"--samples must be positive and --top-k >= 0, got {samples} and {top_k}")
    dev = resolve_device(device)
    model = load_phylo(checkpoint, device=dev)
    ae = model.autoencoder
    if baseline is None and Path(checkpoint).is_dir() and (Path(checkpoint) / PLAIN_RUN_FILE).is_file():
        baseline = Path(checkpoint) / PLAIN_RUN_FILE  # an earlier run's plain VQ autoencoder
    plain = load_baseline(baseline, dev) if baseline is not None else None
    levels = levels_from_record(model.meta["phylogeny"])
    info = dict(model.meta.get("dataset") or {})
    values = {"dataset": info.get("name", "world"), "data_dir": info.get("data_dir"),
              "world": info.get("world") or "default", "image_size": ae.config["image_size"]}  # fmt: skip
    values.update({k: v for k, v in (data_overrides or {}).items() if v is not None})
    settings = saved_settings(model.meta.get("config"))
    spec = DataSpec(**values, val_fraction=settings.get("val_fraction", 0.1),
                    bbox_crop=settings.get("bbox_crop", False), seed=settings.get("seed", 0))  # the run's splits  # fmt: skip
    meta = resolve_meta(spec, quiet=quiet)
    if list(meta.class_names) != list(model.meta["phylogeny"]["class_names"]):
        raise UserError(f"dataset {spec.dataset} has other classes than the model was trained on "
                        f"({meta.num_classes} vs {len(levels.species)})")  # fmt: skip
    transform = square_transform(spec.image_size)
    data = build_dataset(spec, split, False, meta=meta, transform=transform)
    if len(data) == 0:
        raise UserError(f"split {split} of dataset {spec.dataset} is empty")
    judge = load_judge(classifier, len(levels.species), dev) if classifier else None
    inputs = [checkpoint, baseline, classifier, spec.data_dir]
    run_dir = prepare_run_dir(run_dir, "test phylo", overwrite=overwrite, inputs=inputs, resumable=False)
    settings_ = loader_settings(dev, num_workers)

    def loader(dataset):
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping, **settings_
        )

    train = None
    world_root = meta.root if spec.dataset == "world" else None
    if world_root is not None:  # the trait probe is fitted on the training images' codes
        from testing.phylo.correlations import encode_dataset

        codes, labels = encode_dataset(ae, loader(build_dataset(spec, "train", False, meta=meta, transform=transform)),
                                       dev)  # fmt: skip
        train = (codes, labels.numpy())
    summary = evaluate_run(model, levels, loader(data), dev, run_dir, train=train, world_root=world_root,
                           judge=judge, judge_name=classifier, plain=plain, samples=samples, top_k=top_k, seed=seed,
                           quiet=quiet, show=show)  # fmt: skip
    mark_run(
        run_dir, status="finished", checkpoint=str(model.path), baseline=str(baseline) if baseline else None
    )
    return summary

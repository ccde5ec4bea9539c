"""`retrieve evaluate`: the BIOSCAN protocol for a trained model on a BIOSCAN HDF5 file, written into a run
directory (paper-layout CSV, long CSV, JSON, accuracy figure, novelty calibration)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.atomic import write_text
from core.errors import UserError
from datasets.bioscan.hdf5 import check_split, read_labels
from testing.retrieval.novelty import auroc, calibrate, flag_rates
from testing.retrieval.protocol import evaluate_pairs, paper_table, selection_score

DEFAULT_PAIRS = ("image:image", "dna:dna", "image:dna", "image:text")


def parse_pairs(text: str | None, modalities) -> list[tuple[str, str]]:
    """`image:dna,dna:dna` -> [(image, dna), (dna, dna)]; None -> the default pairs the model can run."""
    if text is None:
        items = [p for p in DEFAULT_PAIRS if all(m in modalities for m in p.split(":"))]
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    pairs = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"--pairs item {item!r} is not QUERY:KEY (e.g. image:dna)")
        missing = [m for m in parts if m not in modalities]
        if missing:
            raise UserError(
                f"--pairs {item}: the model was trained on {', '.join(modalities)}, not {missing[0]}"
            )
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise UserError("--pairs names no pair of modalities")
    return pairs


def score_model(model, data, query_splits: list[str], key_split: str, pairs, device, batch_size: int = 256,
                num_workers: int | None = None, amp: bool = True, backend: str = "torch", index_for=None,
                quiet: bool = False):  # fmt: skip
    """Embed the query splits and the keys (through `index_for(split, modalities)` when given, which returns a
    cached index; in memory otherwise) and run the protocol (a `ProtocolResult`)."""
    from testing.retrieval.embed import embed_split

    query_modalities = sorted({q for q, _ in pairs})
    key_modalities = sorted({k for _, k in pairs})

    def embeddings(split: str, modalities):
        if index_for is not None:
            index = index_for(split, modalities)
            return {m: np.asarray(index.keys(m)) for m in modalities}, index.labels
        return embed_split(model, data, split, modalities, device, batch_size, num_workers, amp, quiet=quiet), \
            read_labels(data, split)  # fmt: skip

    keys, key_labels = embeddings(key_split, key_modalities)
    queries, query_labels = {}, {}
    for split in query_splits:
        queries[split], query_labels[split] = embeddings(split, query_modalities)
    return evaluate_pairs(queries, query_labels, keys, key_labels, pairs, backend=backend, device=str(device))


def novelty_report(best: dict, pairs, on: str, stored: dict, heldout: str | None = None) -> tuple[dict, dict]:
    """Per pair: AUROC of the best score (seen vs unseen) and, on val, a calibrated threshold; on test, the flag
    rates under the threshold calibrated earlier on val (when there is one). With `heldout` (BIOSCAN-5M's
    `other_heldout`: species in neither set), the same for seen vs held-out queries, under the same threshold.
    Returns (report, new thresholds)."""
    report, thresholds = {}, {}
    for q, k in pairs:
        name = f"{q}:{k}"
        seen, unseen = best[(q, k, f"{on}_seen")], best[(q, k, f"{on}_unseen")]
        result = calibrate(seen, unseen)
        if on == "val":
            thresholds[name] = {key: result[key] for key in ("threshold", "tpr", "fpr", "auroc")}
            report[name] = result
            threshold = result["threshold"]
        else:
            report[name] = {"auroc": result["auroc"], "n_seen": len(seen), "n_unseen": len(unseen)}
            threshold = stored.get(name, {}).get("threshold")
            if threshold is not None:
                report[name].update({"threshold_from_val": threshold, **flag_rates(seen, unseen, threshold)})
        if heldout is not None:
            other = best[(q, k, heldout)]
            entry = {"split": heldout, "n": len(other), "auroc": auroc(seen, other)}
            if threshold is not None:
                entry["flagged"] = float((other < threshold).mean())
            report[name]["heldout"] = entry
    return report, thresholds


def write_results(run_dir: Path, rows: list[dict], per_class: list[dict], summary: dict, show: bool = False):
    """The run's files: results.csv (the paper's layout), results_long.csv, per_class.csv, accuracy.png (+csv),
    results.json (`summary` with the rows and the selection score) and novelty.json. Returns the paper table."""
    import pandas as pd

    from core.plotting import save_table
    from testing.retrieval.plots import plot_accuracy

    table = paper_table(rows)
    save_table(table, run_dir / "results.csv")
    save_table(pd.DataFrame(rows), run_dir / "results_long.csv")
    save_table(pd.DataFrame(per_class), run_dir / "per_class.csv")
    plot_accuracy(rows, run_dir / "accuracy.png", show=show)
    summary.update(selection_score=selection_score(rows), results=rows)
    write_text(run_dir / "results.json", json.dumps(summary, indent=2))
    write_text(run_dir / "novelty.json", json.dumps(summary.get("novelty", {}), indent=2))
    return table


def run_evaluate(model_path: str | os.PathLike, data: str | os.PathLike, run_dir: Path, on: str = "val",
                 pairs: str | None = None, key_split: str = "all_keys", batch_size: int = 256, device: str = "auto",
                 num_workers: int | None = None, amp: bool = True, backend: str = "torch", force: bool = False,
                 show: bool = False, quiet: bool = False, overwrite: bool = False, heldout: str | None = None) -> dict:  # fmt: skip
    from core.device import resolve_device
    from core.rundir import mark_run, prepare_run_dir
    from models.retrieval import load_retrieval_model
    from testing.retrieval.store import build_index

    if on not in ("val", "test"):
        raise UserError(f"--on must be val or test, got {on!r}")
    if heldout in (f"{on}_seen", f"{on}_unseen", key_split):
        raise UserError(
            f"--heldout {heldout} is already a query or key group; name the held-out species' group"
        )
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model, meta, model_hash = load_retrieval_model(model_path, str(dev))
    chosen = parse_pairs(pairs, model.spec.modalities)
    query_splits = [f"{on}_seen", f"{on}_unseen", *([heldout] if heldout else [])]
    needed = {q for q, _ in chosen}, {k for _, k in chosen}
    for split in [*query_splits, key_split]:
        modalities = needed[1] if split == key_split else needed[0]
        check_split(data, split, tuple(sorted(modalities)), model.spec.text_arch == "bert")
    run_dir = prepare_run_dir(
        run_dir, "retrieve evaluate", overwrite=overwrite, inputs=[model_path, data], resumable=False
    )
    indexes = {}

    def index_for(split: str, modalities):
        index, _ = build_index(model, model_hash, model_path, data, split, modalities, dev, batch_size,
                               num_workers, amp, force=force, quiet=quiet)  # fmt: skip
        indexes[split] = index
        return index

    rows, best, per_class = score_model(model, data, query_splits, key_split, chosen, dev, batch_size, num_workers,
                                        amp, backend, index_for=index_for, quiet=quiet)  # fmt: skip
    if heldout:  # its rows are their own kind, beside seen and unseen
        for row in (*rows, *per_class):
            if row["split"] == heldout:
                row["kind"] = "heldout"
    key_index = indexes[key_split]
    novelty, thresholds = novelty_report(best, chosen, on, key_index.novelty(), heldout)
    if thresholds:
        key_index.save_novelty(thresholds)
    summary = {
        "model": str(model_path), "model_hash": model_hash, "data": str(data), "on": on, "key_split": key_split,
        "keys": len(key_index), "queries": {s: len(indexes[s]) for s in query_splits},
        "pairs": [f"{q}:{k}" for q, k in chosen], "novelty": novelty, "index": str(key_index.folder),
    }  # fmt: skip
    table = write_results(run_dir, rows, per_class, summary, show)
    mark_run(run_dir, status="finished")
    summary["table"] = table
    return summary

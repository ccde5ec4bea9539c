"""`retrieve evaluate --features FILE.hdf5 --labels FILE.json`: the BIOSCAN protocol over embeddings someone
else extracted, as CLIBD's `inference_and_eval.py` writes and releases them, so that the paper's numbers can be
reproduced without a model.

The features file has groups `seen`, `unseen` (the queries of the val or test split) and `key` (all keys),
each holding any of `encoded_image_feature`, `encoded_dna_feature`, `encoded_language_feature`,
`averaged_feature`, `concatenated_feature` ([N, D], float64 in CLIBD's files) and, for keys,
`all_key_features` (image, DNA and text keys stacked, 3N rows). The labels file is
{"seen_gt_dict", "unseen_gt_dict", "key_gt_dict"}: one {order, family, genus, species} per row. As CLIBD does,
both sides are L2-normalised in float64 and searched in float32, exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from datasets.bioscan.taxonomy import RANKS

FEATURES = {"image": "encoded_image_feature", "dna": "encoded_dna_feature", "text": "encoded_language_feature",
            "average": "averaged_feature", "concat": "concatenated_feature", "all": "all_key_features"}  # fmt: skip
KEY_ONLY = ("all",)
GROUPS = {"seen": "seen_gt_dict", "unseen": "unseen_gt_dict", "key": "key_gt_dict"}
HEADLINE = ("dna:dna", "image:image", "image:dna", "image:text")


def _labels(path: Path) -> dict[str, dict[str, np.ndarray]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read labels file {path}: {str(err).splitlines()[0][:100]}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in GROUPS.values()):
        raise UserError(
            f"{path} is not a CLIBD labels file (lists seen_gt_dict, unseen_gt_dict, key_gt_dict)"
        )
    out = {}
    for group, key in GROUPS.items():
        rows = data[key]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or
                    any(not isinstance(r.get(rank), str) for rank in RANKS)), None)  # fmt: skip
        if bad is not None:
            raise UserError(f"{path}: {key}[{bad}] is not a mapping of {', '.join(RANKS)} to names")
        out[group] = {rank: np.array([r[rank] for r in rows], dtype=object) for rank in RANKS}
    return out


def _normalised(values: np.ndarray, where: str) -> np.ndarray:
    """float64 L2 normalisation (sklearn's `normalize`: a zero row stays zero), then float32."""
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
        raise UserError(f"{where} is not a 2-D array of floats (shape {values.shape}, dtype {values.dtype})")
    x = values.astype(np.float64)
    finite = np.isfinite(x).all(1)
    if not finite.all():
        raise UserError(f"{where}: row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms == 0, 1, norms)).astype(np.float32)


def read_features(features: str | os.PathLike, labels: str | os.PathLike):
    """(queries {split: {name: [N, D]}}, query labels {split: {rank: names}}, keys {name: [M, D]}, key labels)
    with every array normalised and its row count checked against the labels."""
    from datasets.bioscan.hdf5 import open_hdf5

    features, labels = Path(features), Path(labels)
    names = _labels(labels)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    with open_hdf5(features) as f:
        missing = [g for g in GROUPS if g not in f]
        if missing:
            raise UserError(f"{features} lacks the group(s) {', '.join(missing)}; is it CLIBD's "
                            "extracted_feature_from_*_split.hdf5?")  # fmt: skip
        for group in GROUPS:
            arrays[group] = {}
            for name, dataset in FEATURES.items():
                if dataset not in f[group] or (name in KEY_ONLY and group != "key"):
                    continue
                x = _normalised(np.asarray(f[group][dataset]), f"{features}:{group}/{dataset}")
                rows = len(names[group]["species"]) * (3 if name == "all" else 1)
                if len(x) != rows:
                    raise UserError(
                        f"{features}:{group}/{dataset} has {len(x)} rows but {labels} labels {rows}"
                    )
                arrays[group][name] = x
    queries = {"seen": arrays["seen"], "unseen": arrays["unseen"]}
    key_labels = names["key"]
    return queries, {"seen": names["seen"], "unseen": names["unseen"]}, arrays["key"], key_labels


def feature_pairs(text: str | None, queries: dict, keys: dict) -> list[tuple[str, str]]:
    """`--pairs` over feature names (image, dna, text, average, concat; keys also all): None -> the paper's
    headline pairs present, `all` -> every query type against every key type of its dimension."""
    available_q = [n for n in FEATURES if all(n in q for q in queries.values())]
    if text == "all":
        return [(q, k) for q in available_q for k in keys
                if keys[k].shape[1] == queries["seen"][q].shape[1]]  # fmt: skip
    items = [p for p in HEADLINE if all(m in available_q or m in keys for m in p.split(":"))] if text is None \
        else [p.strip() for p in text.split(",") if p.strip()]  # fmt: skip
    pairs = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or parts[0] not in available_q or parts[1] not in keys:
            raise UserError(f"--pairs {item!r}: the features hold queries {', '.join(available_q)} and keys "
                            f"{', '.join(keys)} (QUERY:KEY, or all)")  # fmt: skip
        if keys[parts[1]].shape[1] != queries["seen"][parts[0]].shape[1]:
            raise UserError(f"--pairs {item}: {parts[0]} and {parts[1]} features differ in dimension")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise UserError("--pairs names no pair the features hold")
    return pairs


def run_evaluate_features(features: str | os.PathLike, labels: str | os.PathLike, run_dir: Path,
                          pairs: str | None = None, backend: str = "torch", show: bool = False,
                          overwrite: bool = False) -> dict:  # fmt: skip
    from core.rundir import mark_run, prepare_run_dir
    from testing.retrieval.evaluate import write_results
    from testing.retrieval.novelty import auroc
    from testing.retrieval.protocol import evaluate_pairs

    queries, query_labels, keys, key_labels = read_features(features, labels)
    chosen = feature_pairs(pairs, queries, keys)
    run_dir = prepare_run_dir(run_dir, "retrieve evaluate", overwrite=overwrite, inputs=[features, labels],
                              resumable=False)  # fmt: skip
    tiled = {rank: np.tile(key_labels[rank], 3) for rank in RANKS}

    rows, best, per_class = [], {}, []
    for q, k in chosen:  # one pair at a time: `all` keys carry their own (tiled) labels
        result = evaluate_pairs(queries, query_labels, keys, tiled if k == "all" else key_labels, [(q, k)],
                                backend=backend)  # fmt: skip
        rows += result.rows
        best.update(result.best)
        per_class += result.per_class
    novelty = {f"{q}:{k}": {"auroc": auroc(best[(q, k, "seen")], best[(q, k, "unseen")])} for q, k in chosen}
    summary = {"features": str(features), "labels": str(labels), "keys": len(key_labels["species"]),
               "queries": {s: len(query_labels[s]["species"]) for s in ("seen", "unseen")},
               "pairs": [f"{q}:{k}" for q, k in chosen], "novelty": novelty}  # fmt: skip
    table = write_results(run_dir, rows, per_class, summary, show)
    mark_run(run_dir, status="finished")
    summary["table"] = table
    return summary

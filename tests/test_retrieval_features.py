"""`retrieve evaluate --features --labels` on a constructed CLIBD features file: the paper's table (micro and
macro, seen/unseen/H.M., per rank, top-1 and top-3) equals a hand computation, `not_classified` counted as a
label as CLIBD counts it; bad files are one-line errors."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import run_main

NC = "not_classified"
KEYS = [  # angle in degrees, (order, family, genus, species)
    (0, ("O1", "F1", "G1", "S1")), (60, ("O1", "F1", "G1", "S2")), (120, ("O1", "F2", NC, NC)),
    (180, ("O2", "F3", "G3", "S3")), (240, ("O2", "F3", "G4", "S4")), (300, ("O2", NC, NC, NC)),
]  # fmt: skip
SEEN = [(10, ("O1", "F1", "G1", "S1")), (50, ("O1", "F1", "G1", "S1")), (125, ("O1", "F2", NC, NC)),
        (170, ("O2", "F3", "G4", "S4"))]  # fmt: skip
UNSEEN = [(235, ("O2", "F3", "G4", "S5")), (305, ("O2", "F5", "G5", "S6")), (295, ("O2", NC, NC, NC))]
# By hand (nearest keys: s0 k0,k1,k5; s1 k1,k0,k2; s2 k2,k3,k1; s3 k3,k2,k4; u0 k4,k3,k5; u1 k5,k0,k4;
# u2 k5,k4,k0), top-1 (micro, macro) per rank:
EXPECTED_SEEN = {"order": (1, 1), "family": (1, 1), "genus": (3 / 4, 2 / 3), "species": (2 / 4, 1.5 / 3)}
EXPECTED_UNSEEN = {
    "order": (1, 1),
    "family": (2 / 3, 2 / 3),
    "genus": (2 / 3, 2 / 3),
    "species": (1 / 3, 1 / 3),
}


def _vectors(items, scale: float) -> np.ndarray:
    return np.array(
        [[scale * math.cos(math.radians(a)), scale * math.sin(math.radians(a))] for a, _ in items]
    )


def _labels(items) -> list[dict]:
    return [dict(zip(("order", "family", "genus", "species"), names, strict=True)) for _, names in items]


def write_features(folder, seen=SEEN):
    path = folder / "extracted_feature_from_test_split.hdf5"
    with h5py.File(path, "w") as f:  # float64, not unit length: the evaluation normalises as CLIBD does
        for group, items, scale in (("seen", seen, 3.0), ("unseen", UNSEEN, 0.5), ("key", KEYS, 2.0)):
            f.create_group(group).create_dataset("encoded_image_feature", data=_vectors(items, scale))
        f["key"].create_dataset("all_key_features", data=np.tile(_vectors(KEYS, 1.0), (3, 1)))
    labels = folder / "labels_test.json"
    labels.write_text(json.dumps({"seen_gt_dict": _labels(seen), "unseen_gt_dict": _labels(UNSEEN),
                                  "key_gt_dict": _labels(KEYS)}))  # fmt: skip
    return path, labels


def _hm(s: float, u: float) -> float:
    return 2 * s * u / (s + u) if s and u else 0.0


def evaluate_features(tmp_path, pairs: str, capsys, monkeypatch):
    """`retrieve evaluate --features` on the written features: (the result, results.csv indexed, the run)."""
    features, labels = write_features(tmp_path)
    out = tmp_path / "run"
    result = run_main(("retrieve", "evaluate", "--features", str(features), "--labels", str(labels), "--pairs",
                       pairs, "--out", str(out)), capsys, monkeypatch)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, pd.read_csv(out / "results.csv").set_index(["query", "key", "metric", "k"]), out


def test_features_table_by_hand(tmp_path, capsys, monkeypatch):
    result, table, out = evaluate_features(tmp_path, "image:image", capsys, monkeypatch)
    for metric, i in (("micro", 0), ("macro", 1)):
        row = table.loc[("image", "image", metric, 1)]
        for rank in EXPECTED_SEEN:
            seen, unseen = EXPECTED_SEEN[rank][i], EXPECTED_UNSEEN[rank][i]
            assert row[f"{rank}_seen"] == pytest.approx(seen), (metric, rank)
            assert row[f"{rank}_unseen"] == pytest.approx(unseen), (metric, rank)
            assert row[f"{rank}_hm"] == pytest.approx(_hm(seen, unseen)), (metric, rank)
    top3 = table.loc[("image", "image", "micro", 3)]
    assert top3["species_seen"] == 1 and top3["species_unseen"] == pytest.approx(1 / 3)  # u0: S5 in no key
    per_class = pd.read_csv(out / "per_class.csv")
    g4 = per_class[(per_class["kind"] == "seen") & (per_class["rank"] == "genus") & (per_class["k"] == 1)]
    assert g4.set_index("class").loc["G4", "accuracy"] == 0 and g4.set_index("class").loc[NC, "correct"] == 1
    assert "H.M." in result.stdout and "image>image" in result.stdout


def test_features_all_pairs_and_stacked_keys(tmp_path, capsys, monkeypatch):
    """`--pairs all` runs every query type against every key type; the stacked keys carry tiled labels."""
    _, table, _ = evaluate_features(tmp_path, "all", capsys, monkeypatch)
    stacked = table.loc[("image", "all", "micro", 1)]
    assert stacked["genus_seen"] == pytest.approx(3 / 4) and stacked["species_unseen"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("nan", "seen/encoded_image_feature: row 1 holds NaN or infinite values"),
        ("rows", "has 3 rows but"),
        ("labels", "is not a CLIBD labels file"),
        ("pair", "--pairs 'dna:dna': the features hold queries image"),
    ],
)
def test_bad_features_are_one_line_errors(tmp_path, capsys, monkeypatch, change, fragment):
    features, labels = write_features(tmp_path, SEEN[:3] if change == "rows" else SEEN)
    if change == "rows":
        labels.write_text(json.dumps({"seen_gt_dict": _labels(SEEN), "unseen_gt_dict": _labels(UNSEEN),
                                      "key_gt_dict": _labels(KEYS)}))  # fmt: skip
    if change == "nan":
        with h5py.File(features, "a") as f:
            f["seen/encoded_image_feature"][1, 0] = np.nan
    if change == "labels":
        labels.write_text(json.dumps([1, 2]))
    pairs = ("--pairs", "dna:dna") if change == "pair" else ()
    result = run_main(("retrieve", "evaluate", "--features", str(features), "--labels", str(labels), *pairs,
                       "--out", str(tmp_path / "run")), capsys, monkeypatch)  # fmt: skip
    message = result.stderr.strip()
    assert result.returncode == 2 and len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert fragment in message, message
    assert not (tmp_path / "run").exists()

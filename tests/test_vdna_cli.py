"""`python main.py vdna ...` as a user runs it: calibrate, make, inspect, compare (figures, CSVs, the printed
number) and every bad input of the issue (exit 2, one line, nothing overwritten). `make` runs in a
subprocess; the other commands run `main.main()` in this process (same code path, no torch import each)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, run_main, snapshot
from test_vdna_pipeline import copy_images, one_thread, save_tiny_classifier, world_images  # noqa: F401

from core.vdna import emd, load_vdna


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vdna_cli")
    species = world_images(small_world)
    a = copy_images(species[0][:6] + species[1][:6], root / "a" / "nested")
    (a / "notes.txt").write_text("not an image")
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    b = copy_images(species[6][:8], root / "b")
    checkpoint = save_tiny_classifier(root / "tiny.safetensors")
    env = {"BIOVIS_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    return {"root": root, "a": root / "a", "b": b, "extractor": f"classifier:{checkpoint}:blocks", "env": env}


@pytest.fixture()
def vdna_cli(setup, capsys, monkeypatch):
    """`python main.py vdna ARGS` in this process: exit code, stdout and stderr."""
    for key, value in setup["env"].items():
        monkeypatch.setenv(key, value)

    def run(*args: str):
        return run_main(("vdna", *args), capsys, monkeypatch)

    return run


@pytest.fixture(scope="module")
def made(setup) -> Path:
    """calibrate A, then make A's histogram VDNA (separate processes, as a user runs them)."""
    out = setup["root"] / "vdnas" / "a"
    result = run_cli("vdna", "calibrate", str(setup["a"]), "-e", setup["extractor"], env=setup["env"])
    assert result.returncode == 0, result.stderr
    assert "activation ranges of classifier-" in result.stdout and "cached" in result.stdout
    result = run_cli("vdna", "make", str(setup["a"]), "--out", str(out), "-e", setup["extractor"],
                     "--distribution", "histogram-64", "--batch-size", "5", "-q", env=setup["env"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "histogram-64 VDNA of 12 images" in result.stdout
    assert "skipped 1 non-image files and 1 unreadable images" in result.stdout
    return out


def test_make_inspect_compare(setup, made, vdna_cli):
    assert made.with_suffix(".json").is_file() and made.with_suffix(".npz").is_file()
    vdna = load_vdna(made)
    assert vdna.num_images == 12 and vdna.hist_nb_bins == 64
    assert vdna.data_settings["non_image_files_skipped"] == 1
    assert vdna.data_settings["unreadable_images_skipped"] == 1

    shown = vdna_cli("inspect", str(made) + ".npz")
    assert shown.returncode == 0, shown.stderr
    assert "histogram-64 VDNA of 12 images" in shown.stdout
    assert all(layer in shown.stdout for layer in vdna.neurons_list)

    out = setup["root"] / "compare"
    result = vdna_cli("compare", str(made), str(setup["b"]), "-e", setup["extractor"], "--out", str(out),
                      "--top-k", "6", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = float(re.search(r"EMD = ([0-9.eE+-]+)", result.stdout).group(1))
    assert "A: 12 images, B: 8 images" in result.stdout
    for name in ("distance_per_layer.png", "distance_per_layer.csv", "top_neurons.png", "top_neurons.csv",
                 "top_neurons.json", "summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["value"] == pytest.approx(printed, rel=1e-5) and printed > 0
    per_layer = pd.read_csv(out / "distance_per_layer.csv")
    assert list(per_layer["layer"]) == list(vdna.neurons_list)
    weights = per_layer["neurons"] / per_layer["neurons"].sum()
    assert (per_layer["distance"] * weights).sum() == pytest.approx(printed, rel=1e-5)
    top = pd.read_csv(out / "top_neurons.csv")
    assert len(top) == 6 and list(top["emd"]) == sorted(top["emd"], reverse=True)
    numbers = json.loads((out / "top_neurons.json").read_text())
    assert len(numbers[0]["a"]["probabilities"]) == 64 and sum(
        numbers[0]["a"]["probabilities"]
    ) == pytest.approx(1)

    # the saved VDNA against its own source rebuilt on the fly: the same histograms, distance 0
    again = vdna_cli("compare", str(made), str(setup["a"]), "-e", setup["extractor"], "--layer",
                     "layer2_0", "--out", str(setup["root"] / "same"), "-q")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "EMD on layer layer2_0 = 0  [" in again.stdout


def test_compare_two_saved(setup, made, tmp_path, vdna_cli):
    other = tmp_path / "b"
    result = vdna_cli("make", str(setup["b"]), "--out", str(other), "-e", setup["extractor"],
                      "--distribution", "histogram-64", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = vdna_cli("compare", str(made) + ".json", str(other), "--layer", "layer3_0", "--neuron", "5",
                      "--out", str(tmp_path / "cmp"), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = emd(load_vdna(made), load_vdna(other), layer="layer3_0", neuron=5)
    printed = float(re.search(r"= ([0-9.eE+-]+)", result.stdout).group(1))
    assert printed == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_exit_2(setup, made, tmp_path, vdna_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = vdna_cli("make", str(empty), "--out", str(tmp_path / "x"), "-e", setup["extractor"], "-q")
    assert result.returncode == 2 and str(empty) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.json").exists()

    result = vdna_cli("compare", str(made), str(made), "--layer", "nope", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "unknown layer 'nope'" in result.stderr and "layer1_0" in result.stderr
    assert not (tmp_path / "c").exists()

    truncated = tmp_path / "trunc"
    shutil.copy(made.with_suffix(".json"), truncated.with_suffix(".json"))
    data = made.with_suffix(".npz").read_bytes()
    truncated.with_suffix(".npz").write_bytes(data[: len(data) // 2])
    result = vdna_cli("inspect", str(truncated))
    assert (
        result.returncode == 2
        and "truncated or corrupt" in result.stderr
        and "Traceback" not in result.stderr
    )

    before = snapshot(made.parent)
    result = vdna_cli("make", str(setup["b"]), "--out", str(made), "-e", setup["extractor"], "-q")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = vdna_cli("make", str(setup["b"]), "--out", str(tmp_path / "y"), "-e", "rand_resnet50",
                      "--image-size", "32", "-q")  # fmt: skip
    assert result.returncode == 2 and "vdna calibrate" in result.stderr
    assert snapshot(made.parent) == before

    result = vdna_cli("compare", str(made), str(setup["b"]), "-e", setup["extractor"], "--distribution",
                      "histogram-32", "--out", str(tmp_path / "d"), "-q")  # fmt: skip
    assert result.returncode == 2 and "different bin counts: 64 vs 32" in result.stderr


def test_make_overwrite_replaces_its_own_pair(setup, made, tmp_path, vdna_cli):
    mine = tmp_path / "mine"
    for suffix in (".json", ".npz"):
        shutil.copy(made.with_suffix(suffix), mine.with_suffix(suffix))
    result = vdna_cli("make", str(setup["b"]), "--out", str(mine), "-e", setup["extractor"], "--distribution",
                      "histogram-64", "--batch-size", "5", "-q", "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_vdna(mine).num_images == 8 and load_vdna(made).num_images == 12

"""Issue 19's retrieval cases, as a user meets them: a damaged index folder (eleven ways) is one line and exit 2
with every file left as it was, a damaged cache entry is rebuilt, `--min-sim nan` and a negative `image_mask`
are refused, FASTA files stream in bounded batches, `--skip-bad-images` exists where the error advises it,
and `export-world --overwrite` replaces only its own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_main, snapshot

from core import checkpoint
from models.retrieval.clip import RetrievalModel, RetrievalSpec

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    """An untrained tiny model on the small world's HDF5 export, and its index copied to a folder."""
    from datasets.bioscan.export import ensure_world_hdf5

    root = tmp_path_factory.mktemp("robust")
    mp = pytest.MonkeyPatch()
    mp.setenv("BIOVIS_CACHE", str(root / "cache"))
    data = ensure_world_hdf5("small", quiet=True)
    spec = RetrievalSpec(("image", "dna", "text"), embed_dim=16, image_arch="tiny", image_size=32,
                         dna_bert=TINY_BERT, text_buckets=64, text_width=16, text_layers=1)  # fmt: skip
    model = root / "model.safetensors"
    checkpoint.save_weights(model, RetrievalModel(spec).state_dict(),
                            {"kind": "retrieval", "spec": spec.to_dict(), "dataset": {"path": str(data)}})  # fmt: skip
    with h5py.File(data) as f:
        barcode = f["all_keys"]["barcode"][2].decode()
        image = f["all_keys"]["image"][2, : f["all_keys"]["image_mask"][2]].tobytes()
    (root / "good.png").write_bytes(image)
    yield {"root": root, "model": model, "data": data, "barcode": barcode}
    mp.undo()


@pytest.fixture()
def cli(setup, capsys, monkeypatch):
    monkeypatch.setenv("BIOVIS_CACHE", str(setup["root"] / "cache"))
    return lambda *args: run_main(tuple(str(a) for a in args), capsys, monkeypatch)


def _one_line(result, *fragments) -> None:
    message = result.stderr.strip()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture()
def index(setup, cli, tmp_path) -> Path:
    folder = setup["root"] / "idx"
    if not folder.is_dir():
        assert cli("retrieve", "index", "--model", setup["model"], "--out", folder, "-q").returncode == 0
    copy = tmp_path / "idx"
    shutil.copytree(folder, copy)
    return copy


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(change(manifest)))


def _save_npy(folder: Path, array) -> None:
    with open(folder / "dna.npy", "wb") as f:
        np.save(f, array, allow_pickle=True)


DAMAGE = {
    "meta missing": (lambda f: (f / "meta.csv").unlink(), "meta.csv is missing"),
    "meta short": (lambda f: (f / "meta.csv").write_text("\n".join((f / "meta.csv").read_text().splitlines()[:-2])),
                   "meta.csv has"),
    "no model_hash": (lambda f: _edit_manifest(f, lambda m: {k: v for k, v in m.items() if k != "model_hash"}),
                      "manifest.json lacks model_hash"),
    "no modalities": (lambda f: _edit_manifest(f, lambda m: {k: v for k, v in m.items() if k != "modalities"}),
                      "manifest.json lacks modalities"),
    "manifest list": (lambda f: (f / "manifest.json").write_text("[1, 2]"), "not a retrieval index manifest"),
    "npy truncated": (lambda f: (f / "dna.npy").write_bytes((f / "dna.npy").read_bytes()[:-100]), "truncated?"),
    "npy object": (lambda f: _save_npy(f, np.array([{"a": 1}] * 3, dtype=object)), "holds object values"),
    "npy width": (lambda f: _save_npy(f, np.zeros((len((f / "meta.csv").read_text().splitlines()) - 1, 7),
                                                  dtype=np.float32)), "dna.npy has shape"),
    "npy dev zero": (lambda f: ((f / "dna.npy").unlink(), (f / "dna.npy").symlink_to("/dev/zero")),
                     "dna.npy is not a regular file"),
    "novelty json": (lambda f: (f / "novelty.json").write_text("{not json"), "novelty.json is invalid"),
    "novelty nan": (lambda f: (f / "novelty.json").write_text('{"dna:dna": {"threshold": NaN}}'),
                    "novelty.json is invalid"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_index_folder_is_one_line(setup, cli, index, case):
    damage, fragment = DAMAGE[case]
    damage(index)
    before = snapshot(index) if case != "npy dev zero" else None
    result = cli("retrieve", "query", "--model", setup["model"], "--index", index, "--dna", setup["barcode"],
                 "--device", "cpu")  # fmt: skip
    _one_line(result, "the retrieval index" if case != "manifest list" else "", fragment)
    if before is not None:
        assert snapshot(index) == before


def test_damaged_cache_entry_is_rebuilt(setup, cli):
    query = (
        "retrieve",
        "query",
        "--model",
        setup["model"],
        "--dna",
        setup["barcode"],
        "--json",
        "--device",
        "cpu",
    )
    first = cli(*query)
    assert first.returncode == 0, first.stderr
    cached = next((setup["root"] / "cache").rglob("dna.npy"))
    cached.write_bytes(cached.read_bytes()[:-64])  # a killed copy, a full disk
    again = cli(*query)
    assert again.returncode == 0 and "rebuilding the cached index" in again.stderr, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)


@pytest.mark.parametrize("value", ["nan", "inf", "1.5"])
def test_min_sim_must_be_a_cosine(setup, cli, value):
    result = cli("retrieve", "query", "--model", setup["model"], "--dna", "ACGT", "--min-sim", value)
    _one_line(result, f"--min-sim must be a cosine between -1 and 1, got {float(value)}")


def test_negative_image_mask_is_refused(setup, cli, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(setup["data"], bad)
    with h5py.File(bad, "a") as f:
        f["val_seen"]["image_mask"][3] = -5
    before = snapshot(tmp_path)
    result = cli("retrieve", "index", "--model", setup["model"], "--data", bad, "--split", "val_seen", "-q")
    _one_line(result, "record 3: image_mask is -5, not a byte count within its")
    assert snapshot(tmp_path) == before


def test_fasta_streams_in_batches(setup, cli, tmp_path, monkeypatch):
    """20,000 records once peaked at 5.8 GB: every record was embedded in one forward pass."""
    import testing.retrieval.query as query

    sizes = []
    embed = query.embed_dna
    monkeypatch.setattr(
        query, "embed_dna", lambda model, seqs, device: sizes.append(len(seqs)) or embed(model, seqs, device)
    )
    fasta = tmp_path / "many.fa"
    fasta.write_text("".join(f">r{i}\n{setup['barcode'][i % 50 :]}\n" for i in range(600)))
    result = cli(
        "retrieve",
        "query",
        "--model",
        setup["model"],
        "--fasta",
        fasta,
        "--json",
        "--device",
        "cpu",
        "-k",
        "1",
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["query"] for a in answers] == [f"r{i}" for i in range(600)]
    assert sizes == [256, 256, 88]


def test_skip_bad_images(setup, cli, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ("retrieve", "query", "--model", setup["model"], "--keys", "image", "--image", broken, "--image",
            setup["root"] / "good.png", "--json", "--device", "cpu")  # fmt: skip
    _one_line(cli(*args), "cannot read image", "--skip-bad-images")
    result = cli(*args, "--skip-bad-images")
    assert result.returncode == 0 and "skipped: cannot read image" in result.stderr, result.stderr
    assert [a["query"] for a in json.loads(result.stdout)] == [str(setup["root"] / "good.png")]


def test_export_world_overwrites_only_its_own_file(setup, cli, tmp_path, small_world):
    notes = tmp_path / "notes.txt"
    notes.write_text("my field notes\n")
    before = snapshot(tmp_path)
    result = cli("retrieve", "export-world", "--out", notes, "--overwrite", "--world", "small", "-q")
    _one_line(result, "--overwrite refused", "notes.txt is not a file `retrieve export-world` wrote")
    assert snapshot(tmp_path) == before
    own = tmp_path / "world.h5"
    for _ in range(2):  # its own export is replaced
        assert (
            cli("retrieve", "export-world", "--out", own, "--overwrite", "--world", "small", "-q").returncode
            == 0
        )


def test_nan_embeddings_are_refused_at_index_time(setup, cli, tmp_path):
    """A model that embeds NaN would have its keys skipped by the search: the index is refused instead."""
    state, meta = checkpoint.load_weights(setup["model"])
    state["dna.proj.bias"][0] = float("nan")
    checkpoint.save_weights(tmp_path / "nan.safetensors", state, meta)
    cache = snapshot(setup["root"] / "cache") if (setup["root"] / "cache").is_dir() else {}
    result = cli("retrieve", "index", "--model", tmp_path / "nan.safetensors", "--split", "val_seen", "-q")
    _one_line(result, "embeds record 0 of", "(dna) as NaN or infinite", "no index was written")
    assert (snapshot(setup["root"] / "cache") if (setup["root"] / "cache").is_dir() else {}) == cache


def test_heldout_group_and_projection_choice(setup, cli, tmp_path):
    """`--heldout GROUP` (BIOSCAN-5M's other_heldout; here a stand-in group) adds its rows as their own kind
    and its novelty figures; `--projection umap` without umap-learn, or an unknown one, is one line."""
    out = tmp_path / "eval"
    result = cli("retrieve", "evaluate", "--model", setup["model"], "--heldout", "test_unseen", "--pairs",
                 "dna:dna", "--out", out, "--device", "cpu", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    import pandas as pd

    rows = pd.read_csv(out / "results_long.csv")
    assert set(rows["kind"]) == {"seen", "unseen", "heldout"}
    assert set(rows[rows["kind"] == "heldout"]["split"]) == {"test_unseen"}
    novelty = json.loads((out / "novelty.json").read_text())["dna:dna"]["heldout"]
    assert novelty["split"] == "test_unseen" and 0 <= novelty["auroc"] <= 1 and 0 <= novelty["flagged"] <= 1
    assert "test_unseen (" in result.stdout
    _one_line(
        cli("retrieve", "evaluate", "--model", setup["model"], "--heldout", "val_seen"), "already a query"
    )
    try:
        import umap  # noqa: F401
    except ImportError:
        _one_line(
            cli("retrieve", "plot", "--model", setup["model"], "--projection", "umap"),
            "pip install umap-learn",
        )
    _one_line(
        cli("retrieve", "plot", "--model", setup["model"], "--projection", "tsne"), "--projection must be"
    )


def test_text_query_by_taxon_name(setup, cli):
    """Zero-shot search by taxon name: the world's own names, in either spelling, give the same answer."""
    from datasets.bioscan.hdf5 import read_labels
    from testing.retrieval.query import parse_taxon

    labels = read_labels(setup["data"], "all_keys")
    ranks = [str(labels[r][2]) for r in ("order", "family", "genus", "species")]
    assert parse_taxon(" ".join(ranks)) == tuple(ranks) == parse_taxon(";".join(ranks))
    assert parse_taxon("Diptera;;Bradysia") == ("Diptera", "not_classified", "Bradysia", "not_classified")
    result = cli("retrieve", "query", "--model", setup["model"], "--text", " ".join(ranks), "--text",
                 ";".join(ranks), "--keys", "image", "--json", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["modality"] == "text" and first["neighbours"] == second["neighbours"]
    _one_line(cli("retrieve", "query", "--model", setup["model"], "--text", "a;b;c;d;e"), "names 5 ranks")

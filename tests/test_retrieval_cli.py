"""`train retrieval` and `python main.py retrieve ...` on the small world, as a user runs them: exact resume,
index (fp16, manifest), query by barcode, FASTA and image, evaluate (numbers equal to a brute-force
recomputation from the index), plot, and the bad inputs of the issue (exit 2, one line, nothing changed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_main, snapshot

from core import checkpoint
from datasets.bioscan.hdf5 import read_labels
from training.retrieval import RetrievalConfig, train_retrieval

SMALL = {"world": "small", "epochs": 2, "batch_size": 16, "eval_every": 3, "device": "cpu", "num_workers": 0,
         "crop_whole_image": True, "rotation": 45.0, "selection": "micro_macro", "eval_skip_epochs": 1.5}  # fmt: skip


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory) -> dict:
    """A tiny model trained on the small world (2 epochs), with the cache in the test's folder."""
    root = tmp_path_factory.mktemp("retrieval")
    mp = pytest.MonkeyPatch()
    mp.setenv("BIOVIS_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and much faster on a busy machine
    cfg = RetrievalConfig.preset("tiny", SMALL)
    train_retrieval(cfg, root / "run", quiet=True)
    yield {"root": root, "run": root / "run", "cfg": cfg, "data": cfg.data_path(quiet=True)}
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture()
def cli(trained, capsys, monkeypatch):
    return lambda *args: run_main(args, capsys, monkeypatch)


def test_training_run_and_exact_resume(trained, monkeypatch):
    run = trained["run"]
    meta = checkpoint.read_meta(run / "best.safetensors")
    assert meta["kind"] == "retrieval" and meta["spec"]["modalities"] == ["image", "dna", "text"]
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [e for e in events if e["split"] == "val"]
    assert [e["step"] for e in val] == [6] and all(0 <= e["score"] <= 1 for e in val)  # step 3 < 1.5 epochs
    assert all(np.isfinite(e["loss"]) for e in events if e["split"] == "train")

    # SLURM's warning signal during step 2: the trainer saves after that step and stops; the resumed run
    # lands on the same weights as the uninterrupted one.
    import os
    import signal

    import training.retrieval as trainer
    from core.preemption import Preempted

    other = trained["root"] / "resumed"
    step = trainer.train_step
    calls = []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", signalled_step)
    with pytest.raises(Preempted):
        train_retrieval(trained["cfg"], other, quiet=True)
    monkeypatch.setattr(trainer, "train_step", step)
    assert checkpoint.load_state(other / "last.pt")["step"] == 2
    train_retrieval(trained["cfg"], other, resume=True, quiet=True)
    a, _ = checkpoint.load_weights(run / "last.safetensors")
    b, _ = checkpoint.load_weights(other / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_index_query_evaluate_plot(trained, cli):
    root, run = trained["root"], trained["run"]
    result = cli(
        "retrieve", "index", "--model", str(run), "--out", str(root / "idx"), "--device", "cpu", "-q"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((root / "idx" / "manifest.json").read_text())
    keys = np.load(root / "idx" / "dna.npy", mmap_mode="r")
    assert keys.dtype == np.float32 and keys.shape == (manifest["count"], 128)
    assert np.allclose(np.linalg.norm(keys.astype(np.float32), axis=1), 1, atol=2e-3)
    assert manifest["model_hash"] == checkpoint.file_hash(run / "best.safetensors")
    assert manifest["preprocessing"]["dna"]["k"] == 5 and manifest["data"]["split"] == "all_keys"

    labels = read_labels(trained["data"], "all_keys")
    import h5py

    with h5py.File(trained["data"]) as f:
        barcode = f["all_keys"]["barcode"][4].decode()
        image = f["all_keys"]["image"][4, : f["all_keys"]["image_mask"][4]].tobytes()
    (root / "query.png").write_bytes(image)
    (root / "q.fa").write_text(f">mine\n{barcode[:300]}\n{barcode[300:]}\n>other\n{barcode[::-1]}\n")
    result = cli("retrieve", "query", "--model", str(run), "--index", str(root / "idx"), "--dna", barcode,
                 "--image", str(root / "query.png"), "--fasta", str(root / "q.fa"), "--json", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["modality"] for a in answers] == ["image", "dna", "dna", "dna"]
    for answer in answers[1:3]:  # the key's own barcode finds the key itself
        assert answer["neighbours"][0]["id"] == labels["id"][4] and answer["best_score"] > 0.99
        assert answer["prediction"]["species"]["label"] == labels["species"][4]
    result = cli("retrieve", "query", "--model", str(run), "--index", str(root / "idx"), "--keys", "image",
                 "--image", str(root / "query.png"), "--device", "cpu")  # fmt: skip
    assert (
        result.returncode == 0 and labels["id"][4] in result.stdout and "prediction: order" in result.stdout
    )

    result = cli(
        "retrieve", "evaluate", "--model", str(run), "--out", str(root / "eval"), "--device", "cpu", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert "dna>dna" in result.stdout and "AUROC" in result.stdout
    for name in (
        "results.csv",
        "results_long.csv",
        "results.json",
        "accuracy.png",
        "accuracy.csv",
        "novelty.json",
    ):
        assert (root / "eval" / name).is_file(), name
    table = pd.read_csv(root / "eval" / "results.csv").set_index(["query", "key", "metric", "k"])
    # the same number from the cached embeddings by brute force
    summary = json.loads((root / "eval" / "results.json").read_text())
    index_folder = Path(summary["index"])
    all_keys = np.load(index_folder / "dna.npy").astype(np.float64)
    query_index = next(p for p in index_folder.parent.iterdir()
                       if (p / "manifest.json").is_file() and json.loads((p / "manifest.json").read_text())["data"]["split"] == "val_unseen")  # fmt: skip
    queries = np.load(query_index / "dna.npy").astype(np.float64)
    nearest = (queries @ all_keys.T).argmax(1)
    truth = read_labels(trained["data"], "val_unseen")["genus"]
    expected = float(np.mean(labels["genus"][nearest] == truth))
    assert table.loc[("dna", "dna", "micro", 1), "genus_unseen"] == pytest.approx(expected)
    thresholds = json.loads((index_folder / "novelty.json").read_text())
    assert set(thresholds) == {"image:image", "dna:dna", "image:dna", "image:text"}

    result = cli("retrieve", "plot", "--model", str(run), "--rank", "family", "--out", str(root / "plot"),
                 "--device", "cpu", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    projection = pd.read_csv(root / "plot" / "projection_all_keys_family.csv")
    assert len(projection) == 2 * len(labels["id"]) and set(projection["modality"]) == {"image", "dna"}
    assert (root / "plot" / "projection_all_keys_family.png").is_file()


def test_bad_inputs_change_nothing(trained, cli):
    root, run = trained["root"], trained["run"]
    (root / "notes.h5").write_text("not hdf5")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    state, meta = checkpoint.load_weights(run / "best.safetensors")
    state["logit_scale"] = state["logit_scale"] + 1
    checkpoint.save_weights(root / "other.safetensors", state, meta)
    if not (root / "idx").is_dir():
        assert cli("retrieve", "index", "--model", str(run), "--out", str(root / "idx"), "-q").returncode == 0
    before = snapshot(root)
    model = ("--model", str(run), "--device", "cpu")
    cases = [
        (("retrieve", "query", *model, "--dna", "ACGTXACGT"), ("'X' at position 5", "--dna-unknown n")),
        (("retrieve", "evaluate", *model, "--data", str(root / "notes.h5"), "--out", str(root / "e2")),
         ("notes.h5 is not a readable HDF5 file",)),
        (("retrieve", "index", *model, "--split", "nope"), ("has no split 'nope'",)),
        (("retrieve", "query", *model, "--index", str(root / "idx"), "--image", str(root / "broken.png")),
         ("cannot read image", "broken.png")),
        (("retrieve", "query", "--model", str(root / "other.safetensors"), "--index", str(root / "idx"), "--dna",
          "ACGT"), ("was built with model", checkpoint.file_hash(root / "other.safetensors"))),
        (("train", "retrieval", "--preset", "bioscan-1m", "--out", str(root / "t")), ("--data PATH",)),
        (("retrieve", "evaluate", *model, "--out", str(root / "eval2"), "--pairs", "image:sound"),
         ("--pairs image:sound",)),
    ]  # fmt: skip
    for args, fragments in cases:
        assert_user_error(cli(*args), *fragments)
    assert snapshot(root) == before

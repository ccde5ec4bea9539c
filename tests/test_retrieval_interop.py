"""Checkpoints of the field load and embed as the reference code does: BarcodeBERT v1 (DDP `model_41.pth`), v2
(`safe_save_model` dicts with an argparse.Namespace, k = 3 with N k-mers, 4 and 5) and CLIBD's
`image_dna_text.pth` (LoRA-wrapped timm ViT, BarcodeBERT with CLIBD's softmax head, BERT-small), each written
here in its exact format from the committed fixture and compared with embeddings that the reference's own code
computed (tests/fixtures/retrieval/make_fixtures.py, pinned commits in interop.json). Reading a file runs
nothing it holds."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_retrieval_interop import fixture, seeded_images, write_clibd, write_v1, write_v2

from core.errors import UserError
from datasets.bioscan.dna import KmerTokenizer
from models.retrieval.barcodebert import read_barcodebert
from models.retrieval.clip import RetrievalModel, RetrievalSpec, load_retrieval_model

TOL = 1e-5
META, ARRAYS = fixture()
SEQUENCES = META["sequences"]


def _dna_model(path: Path, **options) -> tuple[RetrievalModel, KmerTokenizer]:
    checkpoint = read_barcodebert(path, **options)
    spec = RetrievalSpec(
        ("image", "dna"), embed_dim=8, image_arch="tiny", image_size=32, **checkpoint.spec_fields()
    )
    model = RetrievalModel(spec, dna_weights=str(path)).eval()
    return model, spec.dna_tokenizer


def _features(model: RetrievalModel, tokenizer: KmerTokenizer, sequences) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokenizer.encode(sequences)
    with torch.no_grad():
        out = model.dna.features(torch.from_numpy(ids), torch.from_numpy(mask))
    return ids, out.numpy()


def test_barcodebert_v1_embeds_as_the_reference(tmp_path):
    """v1 attends to its N padding and keeps the frame across gaps: equal at 300-700 nt, with and without gaps."""
    path = write_v1(tmp_path / "model_41.pth", META["v1"])
    checkpoint = read_barcodebert(path)
    assert checkpoint.kind == "v1" and checkpoint.tokens["k"] == 5 and checkpoint.tokens["attend_padding"]
    model, tokenizer = _dna_model(path)
    ids, got = _features(model, tokenizer, SEQUENCES)
    assert (ids == ARRAYS["v1_ids"]).all()
    assert np.abs(got - ARRAYS["v1_embeddings"]).max() < TOL
    # masking v1's padding (the project's old behaviour) moves the short barcodes' embeddings
    masked = RetrievalModel(
        RetrievalSpec(**{**model.spec.to_dict(), "dna_attend_padding": False}), dna_weights=str(path)
    )
    _, off = _features(masked.eval(), masked.spec.dna_tokenizer, SEQUENCES[:1])
    assert np.abs(off - ARRAYS["v1_embeddings"][:1]).max() > 1e-2


@pytest.mark.parametrize("name", ["v2_k4", "v2_k5", "v2_k3n"])
def test_barcodebert_v2_embeds_as_the_reference(tmp_path, name):
    """k, stride, length, vocabulary (2 specials, N k-mers for k3n) and BERT size all come from the file."""
    entry = META[name]
    path = write_v2(tmp_path / f"{name}.pt", entry)
    checkpoint = read_barcodebert(path)
    assert checkpoint.kind == "v2" and checkpoint.tokens["k"] == entry["config"]["k_mer"]
    assert checkpoint.config.num_attention_heads == 2 and checkpoint.tokens["n_kmers"] == name.endswith("n")
    model, tokenizer = _dna_model(path)
    ids, got = _features(model, tokenizer, SEQUENCES)
    assert (ids == ARRAYS[f"{name}_ids"]).all()
    assert (tokenizer.encode(SEQUENCES)[1] == ARRAYS[f"{name}_mask"]).all()
    assert np.abs(got - ARRAYS[f"{name}_embeddings"]).max() < TOL


def test_dna_options_fill_what_the_file_does_not_say(tmp_path):
    v1 = write_v1(tmp_path / "model_41.pth", META["v1"])
    assert read_barcodebert(v1, max_len=600).tokens["max_len"] == 600
    with pytest.raises(UserError, match=r"--dna-k 4 differs from the 5 that .* leave the option out"):
        read_barcodebert(v1, k=4)
    v2 = write_v2(tmp_path / "v2.pt", META["v2_k4"])
    with pytest.raises(UserError, match=r"--dna-stride 2 differs from the 4"):
        read_barcodebert(v2, stride=2)
    with pytest.raises(
        UserError, match="280 tokens of 5-mers over 1400 nt exceed its 160 positions; lower --dna-max-len"
    ):
        read_barcodebert(v1, max_len=1400)


@pytest.mark.parametrize("name", ["clibd", "clibd_lora"])
def test_clibd_towers_embed_as_the_reference(tmp_path, name):
    """image_dna_text.pth (and a LoRA-trained variant): three towers equal to CLIBD's SimpleCLIP outputs."""
    entry = META[name]
    path = write_clibd(tmp_path / f"{name}.pth", entry)
    model, meta, _ = load_retrieval_model(path)
    assert meta["source"] == "clibd" and model.spec.modalities == ("image", "dna", "text")
    tokenizer = model.spec.dna_tokenizer
    dna_ids, dna_mask = tokenizer.encode(SEQUENCES[:3])
    assert (dna_ids == ARRAYS[f"{name}_dna_ids"]).all() and dna_ids.shape[1] == 133
    images = seeded_images(3, entry["image_size"], entry["images_seed"]) * 2 - 1  # the project's [-1, 1]
    inputs = {"image": images, "dna_ids": torch.from_numpy(dna_ids), "dna_mask": torch.from_numpy(dna_mask),
              "text_ids": torch.from_numpy(ARRAYS[f"{name}_text_ids"].astype(np.int64)),
              "text_mask": torch.from_numpy(ARRAYS[f"{name}_text_mask"])}  # fmt: skip
    with torch.no_grad():
        for modality in ("image", "dna", "text"):
            got = model.encode(modality, inputs).numpy()
            assert np.abs(got - ARRAYS[f"{name}_{modality}"]).max() < TOL, modality


def test_clibd_legacy_parameter_names(tmp_path):
    """Older CLIBD checkpoints (lora_vit, lora_barcode_bert, lora_bert) load as CLIBD renames them."""
    entry = META["clibd"]
    path = write_clibd(tmp_path / "new.pth", entry)
    state = torch.load(path, weights_only=True)
    legacy = {k.replace("base_image_encoder", "lora_vit").replace("base_dna_encoder", "lora_barcode_bert")
              .replace("base_language_encoder", "lora_bert"): v for k, v in state.items()}  # fmt: skip
    torch.save(legacy, tmp_path / "old.pth")
    new, _, _ = load_retrieval_model(path)
    old, _, _ = load_retrieval_model(tmp_path / "old.pth")
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_payload_in_a_v2_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    entry = META["v2_k4"]
    path = write_v2(tmp_path / "clean.pt", entry)
    data = torch.load(path, weights_only=False)  # our own file, written just above
    data["config"] = argparse.Namespace(**{**vars(data["config"]), "run_name": Payload(marker)})
    torch.save(data, tmp_path / "config.pt")
    with pytest.raises(
        UserError, match=r"config\['run_name'\] holds posix.system, where plain settings belong"
    ):
        read_barcodebert(tmp_path / "config.pt")
    # in parts that are not read (the scheduler), such an object stays an inert record and the file loads
    data["config"] = argparse.Namespace(**entry["config"])
    data["scheduler"]["anneal_func"] = Payload(marker)
    torch.save(data, tmp_path / "scheduler.pt")
    assert read_barcodebert(tmp_path / "scheduler.pt").kind == "v2"
    with pytest.raises(UserError, match="CLIBD checkpoint"):
        load_retrieval_model(tmp_path / "scheduler.pt")
    data["model"]["bert.embeddings.LayerNorm.bias"] = Payload(marker)  # where a tensor belongs
    torch.save(data, tmp_path / "weights.pt")
    with pytest.raises(
        UserError, match=r"its weights\['bert.embeddings.LayerNorm.bias'\] holds posix.system"
    ):
        read_barcodebert(tmp_path / "weights.pt")
    assert not marker.exists()


def test_a_torch_2_0_scheduler_state_loads(tmp_path):
    """torch 2.0's OneCycleLR kept a bound method in its state dict, so v2 checkpoints of that time pickle the
    whole scheduler and optimiser objects: `weights_only` refuses them, this reader skips them."""
    path = write_v2(tmp_path / "v2.pt", META["v2_k4"])
    data = torch.load(path, weights_only=False)
    params = [torch.nn.Parameter(torch.ones(2))]
    schedule = torch.optim.lr_scheduler.OneCycleLR(torch.optim.AdamW(params), max_lr=1e-3, total_steps=5)
    data["scheduler"]["anneal_func"] = schedule._anneal_func
    torch.save(data, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    model, tokenizer = _dna_model(path)
    _, got = _features(model, tokenizer, SEQUENCES)
    assert np.abs(got - ARRAYS["v2_k4_embeddings"]).max() < TOL


def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    path = write_v1(tmp_path / "model_41.pth", META["v1"])
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a torch.save file, or it is truncated"):
        read_barcodebert(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint .*text.pth"):
        load_retrieval_model(tmp_path / "text.pth")


def test_training_takes_the_checkpoints_tokenisation(tmp_path):
    """`train retrieval --dna-weights` builds the DNA tower and its tokenizer from the file (dropout aside)."""
    from training.retrieval import RetrievalConfig

    path = write_v2(tmp_path / "v2.pt", META["v2_k4"])
    cfg = RetrievalConfig(modalities=["image", "dna"], image_arch="tiny", weights="none", dna_weights=str(path),
                          dna_bert={"hidden_size": 32, "hidden_dropout_prob": 0.0})  # fmt: skip
    spec = cfg.spec()
    assert (spec.dna_k, spec.dna_stride, spec.dna_vocab, spec.dna_attend_padding) == (4, 4, "v2", False)
    assert spec.bert_config.hidden_size == 64 and spec.bert_config.hidden_dropout_prob == 0.0
    model = RetrievalModel(spec, dna_weights=str(path)).eval()
    _, got = _features(model, spec.dna_tokenizer, SEQUENCES)
    assert np.abs(got - ARRAYS["v2_k4_embeddings"]).max() < TOL
    with pytest.raises(UserError, match="--dna-k 5 differs"):
        RetrievalConfig(dna_weights=str(path), dna_k=5).spec()


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "dip", "##tera", "sci", "##aria", "##e", "brady", "##sia", "not",
         "_", "classified", "sp", ".", "bio", "##ug", "##0", "##1", "ce", "##ci", "##do", "##my", "##ii", "##da",
         "é", "a", "##b", "-", "x"]  # fmt: skip


def test_wordpiece_equals_bert_tokenizer(tmp_path):
    """CLIBD's text tokens: BERT's uncased WordPiece (transformers' BertTokenizer on the same vocab.txt)."""
    transformers = pytest.importorskip("transformers")
    from datasets.bioscan.wordpiece import WordPieceTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    texts = ["Diptera Sciaridae Bradysia not_classified", "Diptera Cecidomyiidae not_classified not_classified",
             "Diptera Sciaridae Bradysia Bradysia sp. BIOUG01", "DIPTÉRA  xyz\tsciaridae-a", "",
             "Diptera Diptera Diptera Diptera Diptera Diptera Diptera Diptera Diptera Diptera Diptera"]  # fmt: skip
    reference = transformers.BertTokenizer(str(vocab), do_lower_case=True)
    expected = reference(texts, padding="max_length", max_length=20, truncation=True)
    ids, mask = WordPieceTokenizer(vocab).encode(texts)
    assert ids.tolist() == expected["input_ids"] and mask.astype(int).tolist() == expected["attention_mask"]


def test_text_query_with_a_clibd_model(tmp_path):
    """`retrieve query --text` with a CLIBD checkpoint embeds CLIBD's string in WordPiece tokens."""
    from datasets.bioscan.wordpiece import WordPieceTokenizer
    from testing.retrieval.query import embed_text

    model, _, _ = load_retrieval_model(write_clibd(tmp_path / "clibd.pth", META["clibd"]))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB + [f"w{i}" for i in range(120 - len(VOCAB))]) + "\n")
    got = embed_text(model, ["Diptera;Sciaridae;Bradysia"], "cpu", vocab)
    ids, mask = WordPieceTokenizer(vocab).encode(["Diptera Sciaridae Bradysia not_classified"])
    with torch.no_grad():
        expected = model.encode(
            "text", {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)}
        )
    assert np.abs(got - expected.numpy()).max() == 0
    with pytest.raises(UserError, match="needs --text-vocab"):
        embed_text(model, ["Diptera"], "cpu")


def test_clibd_checkpoint_evaluates_on_a_bioscan_file(small_world, tmp_path, capsys, monkeypatch):
    """`retrieve evaluate --model image_dna_text.pth` end to end on an HDF5 file in the BIOSCAN layout with
    `language_tokens_*` (the small world's export, tokens added): every tower through the data pipeline, the
    stored embeddings equal to the model's on the same records."""
    import shutil

    import h5py
    from conftest import run_main

    from datasets.bioscan.export import ensure_world_hdf5
    from datasets.bioscan.hdf5 import TEXT_TOKENS

    monkeypatch.setenv("BIOVIS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "bioscan.h5"
    shutil.copy(ensure_world_hdf5("small", quiet=True), data)
    with h5py.File(data, "a") as f:
        for group in f.values():
            n = group["barcode"].shape[0]
            ids = (np.arange(n * 20).reshape(n, 20) % 100 + 4) * (np.arange(20) < 7)
            group.create_dataset(TEXT_TOKENS[0], data=ids)
            group.create_dataset(TEXT_TOKENS[1], data=(ids > 0).astype(np.int64))
    path = write_clibd(tmp_path / "image_dna_text.pth", META["clibd"])
    result = run_main(("retrieve", "evaluate", "--model", str(path), "--data", str(data), "--pairs",
                       "dna:dna,image:image,image:text", "--out", str(tmp_path / "eval"), "--device", "cpu", "-q"),
                      capsys, monkeypatch)  # fmt: skip
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "eval" / "results.json").read_text())["index"]
    model, _, _ = load_retrieval_model(path)
    with h5py.File(data) as f:
        barcode = f["all_keys"]["barcode"][0].decode()
        tokens = f["all_keys"][TEXT_TOKENS[0]][:1]
    ids, mask = model.spec.dna_tokenizer.encode([barcode])
    with torch.no_grad():
        dna = model.encode("dna", {"dna_ids": torch.from_numpy(ids), "dna_mask": torch.from_numpy(mask)})
        text = model.encode(
            "text", {"text_ids": torch.from_numpy(tokens), "text_mask": torch.from_numpy(tokens > 0)}
        )
    assert np.abs(np.load(Path(index) / "dna.npy")[0] - dna[0].numpy()).max() < 1e-6
    assert np.abs(np.load(Path(index) / "text.npy")[0] - text[0].numpy()).max() < 1e-6

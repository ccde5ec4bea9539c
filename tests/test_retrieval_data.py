"""BIOSCAN data: DNA validation and FASTA, the k-mer tokenizer (BarcodeBERT's ids, padding mask), the world's
HDF5 export read back record by record, its seen/unseen partition, and the reader's one-line errors."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest

from core.errors import UserError
from datasets.bioscan.dna import KmerTokenizer, clean_dna, iter_fasta, read_fasta
from datasets.bioscan.export import POOLS, export_world
from datasets.bioscan.hdf5 import BioscanSplit, check_split, read_labels
from datasets.bioscan.taxonomy import TaxonomyTokenizer, lineage_ids
from datasets.world import load_barcodes, load_taxonomy

UNK_ID = 2  # v1's <UNK>


def test_vocabulary_is_barcodebert_order():
    """Specials first, then the 4^k k-mers in lexicographic order (torchtext's order for equal counts)."""
    tok = KmerTokenizer(k=3, stride=3, max_len=12)
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=3)]
    assert [tok.token(km) for km in kmers] == list(range(3, 3 + 64))
    assert tok.vocab_size == 67 and tok.token("ANA") == UNK_ID


def test_tokens_and_padding_mask():
    tok = KmerTokenizer(k=5, stride=5, max_len=20)
    ids, mask = tok.encode(["ACGTACGTAC", "ACGTANNNNNGG"])
    assert ids.shape == (2, 4) and mask.shape == (2, 4)
    assert ids[0].tolist() == [tok.token("ACGTA"), tok.token("CGTAC"), UNK_ID, UNK_ID]
    assert mask[0].tolist() == [True, True, False, False]
    # an N inside the sequence is an unknown token that stays visible; padding is masked
    assert ids[1].tolist() == [tok.token("ACGTA"), UNK_ID, UNK_ID, UNK_ID]
    assert mask[1].tolist() == [
        True,
        True,
        False,
        False,
    ]  # 12 nt: two whole 5-mers; the partial one is padding
    long_ids, long_mask = tok.encode(["ACGTA" * 10])
    assert long_mask.all() and (long_ids == tok.token("ACGTA")).all()  # truncated to max_len


def test_v2_vocabulary_and_n_kmers():
    """BarcodeBERT v2: [MASK] [UNK] first (every k-mer one id lower than v1), and with tokenize_n the k-mers
    holding N after the 4^k others, in the order of itertools.product("ACGTN")."""
    v1, v2 = KmerTokenizer(k=3), KmerTokenizer(k=3, vocab="v2")
    assert v2.token("AAA") == v1.token("AAA") - 1 == 2 and v2.unk_id == 1 and v2.vocab_size == 66
    n = KmerTokenizer(k=2, stride=2, max_len=8, vocab="v2", n_kmers=True)
    with_n = [km for km in ("".join(p) for p in itertools.product("ACGTN", repeat=2)) if "N" in km]
    assert [n.token(km) for km in with_n] == list(range(18, 27)) and n.vocab_size == 27
    assert n.token("A-") == 1  # a gap is unknown in every vocabulary


def test_gaps_keep_the_frame_and_prefix():
    tok = KmerTokenizer(k=3, stride=3, max_len=9, attend_padding=True, prefix=0)
    ids, mask = tok.encode(["AC-GTAC"])
    assert ids[0].tolist() == [0, 2, tok.token("GTA"), 2] and mask.all()  # AC- unknown, GTA in frame, C+NN


def test_clean_dna_names_the_position():
    assert clean_dna(" acg-t\nnA ") == "ACG-TNA"
    with pytest.raises(UserError, match=r"'X' at position 4 .*--dna-unknown n"):
        clean_dna("ACGXT")
    assert clean_dna("ACGXRT", unknown="n") == "ACGNNT"
    with pytest.raises(UserError, match="empty"):
        clean_dna("--")


def test_fasta(tmp_path):
    path = tmp_path / "q.fa"
    path.write_text(">one sample\nACGT\nacgt\n\n>two\nGG-CC\n")
    assert read_fasta(path) == [("one sample", "ACGTACGT"), ("two", "GG-CC")]
    assert next(iter_fasta(path)) == ("one sample", "ACGTACGT")
    path.write_text(">bad\nACGT\nACZT\n")
    with pytest.raises(UserError, match=r"record 'bad'.*'Z' at position 7"):
        read_fasta(path)
    path.write_text(">empty\n>next\nACGT\n")
    with pytest.raises(UserError, match="no sequence lines"):
        read_fasta(path)


def test_token_groups():
    import torch

    from datasets.bioscan.taxonomy import token_groups

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 0, 0], [5, 6, 0, 0]])
    groups = token_groups(ids, ids != 0)
    assert groups[2] == groups[3] and len({groups[0].item(), groups[1].item(), groups[2].item()}) == 3


def test_taxonomy_tokens_mask_unclassified():
    tok = TaxonomyTokenizer(buckets=64)
    ids, mask = tok.encode([("Diptera", "Sciaridae", "not_classified", "not_classified"),
                            ("Diptera", "Sciaridae", "Bradysia", "")])  # fmt: skip
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert (ids[0, :2] == ids[1, :2]).all() and ids[0, 2] == 0
    rows = [
        ("a", "b", "c", "d"),
        ("a", "b", "c", "d"),
        ("a", "b", "c", "e"),
        ("a", "b", "not_classified", "d"),
    ]
    lineage = lineage_ids(rows, [0, 1, 2, 3])
    assert (lineage[0] == lineage[1]).all()  # same species
    assert (lineage[0] == lineage[2]).tolist() == [True, True, True, False]  # same genus
    assert (lineage[0] == lineage[3]).tolist() == [True, True, False, False]  # unknown genus: unique below
    assert lineage[3, 2] != lineage[3, 3] and lineage[3, 2] < 0


@pytest.fixture(scope="module")
def world_h5(small_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("bioscan") / "world.h5"
    return export_world(small_world, path, unseen_fraction=0.25, seed=3)


def test_world_round_trip(small_world, world_h5):
    """Every record of every group reads back as the world's own image bytes, barcode and taxonomy."""
    from datasets.cub import read_cub_meta

    meta = read_cub_meta(small_world)
    taxonomy = {row["class_id"]: row for row in load_taxonomy(small_world)}
    barcodes = load_barcodes(small_world)
    by_file = {p: i for i, p in enumerate(meta.paths)}
    with h5py.File(world_h5) as f:
        for name in f:
            group = f[name]
            for j in range(group["barcode"].shape[0]):
                i = by_file[group["image_file"][j].decode()]
                expected = (small_world / "images" / meta.paths[i]).read_bytes()
                assert group["image"][j, : group["image_mask"][j]].tobytes() == expected
                assert group["barcode"][j].decode() == barcodes[i + 1]
                row = taxonomy[int(meta.labels[i]) + 1]
                assert [group[r][j].decode() for r in ("order", "family", "genus", "species")] == [
                    row["order"], row["family"], row["genus"], row["species"]]  # fmt: skip
    item = BioscanSplit(world_h5, "val_seen", ("image", "dna", "text"), image_size=24)[0]
    assert item["image"].shape == (3, 24, 24) and str(item["image"].dtype) == "torch.uint8"
    assert item["dna_mask"].sum() == 130  # 650 nt -> 130 real 5-mers of 132


def test_partition_is_bioscan_like(world_h5):
    with h5py.File(world_h5) as f:
        ids = {name: set(f[name]["processid"][:].tolist()) for name in f}
        species = {name: set(f[name]["species"][:].tolist()) for name in f}
    seen, unseen = species["train_seen"], species["val_unseen"] | species["test_unseen"]
    assert seen and unseen and not seen & unseen and not species["val_unseen"] & species["test_unseen"]
    assert species["val_seen"] == species["seen_keys"] == seen
    queries = ["val_seen", "test_seen", "val_unseen", "test_unseen"]
    parts = ["train_seen", "seen_keys", "val_unseen_keys", "test_unseen_keys", *queries]
    for a, b in itertools.combinations(parts, 2):
        assert not ids[a] & ids[b], (a, b)
    for pool, members in POOLS.items():
        assert ids[pool] == set().union(*(ids[m] for m in members))
    assert species["val_unseen_keys"] == species["val_unseen"]


def test_reader_errors(world_h5, tmp_path):
    with pytest.raises(UserError, match=r"has no split 'nope'; its groups are: all_keys"):
        check_split(world_h5, "nope")
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.create_group("all_keys").create_dataset("barcode", data=np.array([b"ACGT"]))
    with pytest.raises(
        UserError, match=r"group 'all_keys' lacks dataset\(s\) order, family, genus, species, image"
    ):
        check_split(broken, "all_keys")
    data = world_h5.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        check_split(tmp_path / "cut.h5", "all_keys")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        check_split(tmp_path / "empty.h5", "all_keys")
    labels = read_labels(world_h5, "all_keys")
    assert len(labels["id"]) == check_split(world_h5, "all_keys") and labels["id"][0].startswith("WORLD")


def test_square_images_crop_flip_and_centre():
    """Train crops of the whole square without flips are the identity; flags flip; eval input is the centre
    crop in [-1, 1]."""
    import torch

    from datasets.gpu_transforms import crop_resize, square_images, to_pm1

    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    hw = torch.tensor([[12, 12]]).expand(4, 2)
    whole = torch.tensor([[0, 0, 12, 12]]).expand(4, 4)
    assert torch.allclose(crop_resize(x, hw, whole, 12), x, atol=1e-5)
    both = torch.tensor([True, False, True, False])
    flipped = crop_resize(x, hw, whole, 12, flips=both, vflips=both.roll(1))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(
        flipped[1], x[1].flip(-2), atol=1e-5
    )
    pixels = torch.randint(0, 256, (2, 3, 14, 14), dtype=torch.uint8)
    assert square_images(pixels, "cpu", 8, train=True, vflip=True).shape == (2, 3, 8, 8)
    out = square_images(pixels, "cpu", 12, train=False)
    assert torch.equal(out, to_pm1(pixels)[..., 1:13, 1:13])
    assert out.min() >= -1 and out.max() <= 1


def test_clibd_augmentation_geometry():
    """crop_flip_rotate: no rotation is gpu_transforms' crop_resize; a quarter turn of the whole image is
    rot90 (sample points on pixel centres); at 45 degrees the corners fall outside the crop and are black."""
    import torch

    from datasets.bioscan.augment import crop_flip_rotate
    from datasets.gpu_transforms import crop_resize

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    hw = torch.tensor([[16, 16], [24, 16]])  # the second shows a 24 x 16 source squashed
    crops = torch.tensor([[2.0, 3.0, 10.0, 9.0], [4.0, 0.0, 20.0, 16.0]])
    flips = torch.tensor([True, False])
    same = crop_flip_rotate(x, hw, crops, 8, flips, ~flips)
    assert torch.allclose(same, crop_resize(x, hw, crops, 8, flips, ~flips), atol=1e-6)
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    turned = crop_flip_rotate(x, hw[:1].expand(2, 2), whole, 16, angles=torch.tensor([90.0, 90.0]))
    assert torch.allclose(turned, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5) or torch.allclose(
        turned, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5
    )
    tilted = crop_flip_rotate(x, hw[:1].expand(2, 2), whole, 16, angles=torch.tensor([45.0, -45.0]))
    assert (tilted[:, :, 0, 0] == -1).all() and (tilted[:, :, 8, 8] != -1).any()


def test_whole_image_geometry(tmp_path):
    """Training batches ship the whole image squashed with its Resize(side) size, for crops of all of it."""
    from PIL import Image

    from datasets.bioscan.hdf5 import decode_image

    buffer = tmp_path / "wide.png"
    Image.new("RGB", (90, 30), (200, 10, 10)).save(buffer)
    pixels, size = decode_image(buffer.read_bytes(), 32, "wide.png", whole=True)
    assert pixels.shape == (3, 32, 32) and size == (32, 96)
    assert decode_image(buffer.read_bytes(), 32, "wide.png").shape == (3, 32, 32)


def test_selection_and_unclassified_protocol():
    """CLIBD's selection averages micro and macro top-1; not_classified counts as a label unless left out."""
    from testing.retrieval.protocol import score_queries, selection_score

    rows = [{"metric": "micro", "k": 1, "value": 0.8}, {"metric": "macro", "k": 1, "value": 0.4},
            {"metric": "micro", "k": 3, "value": 1.0}, {"metric": "chance", "k": 1, "value": 0.1}]  # fmt: skip
    assert selection_score(rows) == pytest.approx(0.6) and selection_score(rows, "micro") == pytest.approx(
        0.8
    )
    nc = "not_classified"
    query = {r: np.array(v, dtype=object) for r, v in zip(("order", "family", "genus", "species"),
             (["O", "O", "O"], ["F", "F", "F"], ["G", nc, "H"], ["s", nc, "t"]), strict=True)}  # fmt: skip
    keys = {r: np.array(v, dtype=object) for r, v in zip(("order", "family", "genus", "species"),
            (["O", "O"], ["F", "F"], ["G", nc], ["s", nc]), strict=True)}  # fmt: skip
    top = np.array([[0, 1], [1, 0], [0, 1]])  # query 2 (genus H) matches nothing
    counted = {(r["rank"], r["metric"], r["k"]): r["value"] for r in score_queries(query, keys, top, ks=(1,))}
    assert counted[("genus", "micro", 1)] == pytest.approx(2 / 3)
    dropped = {(r["rank"], r["metric"], r["k"]): r["value"]
               for r in score_queries(query, keys, top, ks=(1,), unclassified=False)}  # fmt: skip
    assert dropped[("genus", "micro", 1)] == pytest.approx(1 / 2)

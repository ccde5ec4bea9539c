"""The synthetic species world: determinism, CUB file formats, true attributes, tree-shaped DNA and Newick."""

from __future__ import annotations

import hashlib
import io
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from datasets.phylogeny import parse_newick
from datasets.world import (
    DNA_RATES,
    PALETTE,
    TRAIT_RANK,
    TRAITS,
    WorldConfig,
    build_species,
    ensure_world,
    generate_world,
    load_barcodes,
    load_taxonomy,
    png_bytes,
    render_specimen,
)

SMALL = dict(n_orders=2, families_per_order=2, genera_per_family=1, species_per_genus=2, images_per_species=6)
CONFIG = WorldConfig(seed=0, image_size=32, **SMALL)  # 8 species x 6 images
FLOAT = re.compile(r"^\d+\.\d$")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world") / "CUB_200_2011", CONFIG)


def table(root: Path, name: str) -> list[list[str]]:
    return [line.split() for line in (root / name).read_text().splitlines() if line.strip()]


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def info(root: Path) -> dict:
    return json.loads((root / "world.json").read_text())


def image_class(root: Path) -> dict[int, int]:
    return {int(i): int(c) for i, c in table(root, "image_class_labels.txt")}


# ------------------------------------------------------------------------------------------ determinism


def test_same_config_gives_byte_identical_files(world, tmp_path):
    again = generate_world(tmp_path / "again", CONFIG)
    first, second = digests(world), digests(again)
    assert len(first) > CONFIG.n_images
    assert first == second


def test_different_seed_gives_different_images(world, tmp_path):
    other = generate_world(tmp_path / "other", WorldConfig(seed=1, image_size=32, **SMALL))
    paths_a = [r[1] for r in table(world, "images.txt")]
    paths_b = [r[1] for r in table(other, "images.txt")]
    same = [
        np.array_equal(
            np.asarray(Image.open(world / "images" / a)), np.asarray(Image.open(other / "images" / b))
        )
        for a, b in zip(paths_a, paths_b, strict=True)
    ]
    assert not any(same)
    assert WorldConfig(seed=1).key() != WorldConfig(seed=0).key()


def test_an_image_drawn_alone_equals_its_file(world):
    """Every image depends only on (seed, index): drawing one out of order gives the same pixels and box."""
    species = build_species(CONFIG)
    sp, k = species[5], 4
    pixels, box = render_specimen(CONFIG, sp, k)
    image_id = (sp.class_id - 1) * CONFIG.images_per_species + k + 1
    path = dict((int(i), p) for i, p in table(world, "images.txt"))[image_id]
    assert np.array_equal(np.asarray(Image.open(world / "images" / path)), pixels)
    boxes = {int(r[0]): [float(v) for v in r[1:]] for r in table(world, "bounding_boxes.txt")}
    assert boxes[image_id] == [float(v) for v in box]


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (32, 17, 3)])
def test_png_encoder_round_trips(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pixels[0] = 255  # neighbours that wrap around modulo 256 in the Sub filter
    pixels[-1, ::2] = 0
    data = png_bytes(pixels)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), pixels)


def test_key_is_short_and_stable():
    key = WorldConfig().key()
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    assert key == WorldConfig().key()
    assert key != WorldConfig(image_size=32).key()
    # colour_rank came later: at its default it stays out of the key, so cached worlds keep their folders
    assert key == "b94a47abecac"
    assert key != WorldConfig(colour_rank="genus").key()


# ------------------------------------------------------------------------------------------ CUB formats


def test_cub_tables_agree_and_every_image_exists(world):
    n = CONFIG.n_images
    images = table(world, "images.txt")
    assert [int(r[0]) for r in images] == list(range(1, n + 1))
    classes = table(world, "classes.txt")
    assert [int(r[0]) for r in classes] == list(range(1, CONFIG.n_species + 1))
    folders = {int(c): name for c, name in classes}
    labels = image_class(world)
    assert sorted(labels) == list(range(1, n + 1))
    for image_id, path in images:
        folder, file = path.split("/")
        assert folder == folders[labels[int(image_id)]]
        assert re.fullmatch(r"\d{3}\.[A-Z][a-z]+_[a-z]+", folder)
        assert file.startswith(folder.split(".", 1)[1] + "_") and file.endswith(".png")
        image = Image.open(world / "images" / path)
        assert image.mode == "RGB" and image.size == (CONFIG.image_size, CONFIG.image_size)
    pngs = sorted(str(p.relative_to(world / "images")) for p in (world / "images").rglob("*.png"))
    assert pngs == sorted(r[1] for r in images)


def test_each_species_has_train_and_test_images(world):
    split = {int(i): int(t) for i, t in table(world, "train_test_split.txt")}
    assert sorted(split) == list(range(1, CONFIG.n_images + 1)) and set(split.values()) == {0, 1}
    labels = image_class(world)
    for class_id in range(1, CONFIG.n_species + 1):
        flags = [split[i] for i, c in labels.items() if c == class_id]
        assert sum(flags) == 3 and len(flags) == 6  # test_fraction 0.5 of 6 images
    assert info(world)["counts"]["train"] == sum(split.values())


def test_boxes_are_one_decimal_floats_inside_the_image(world):
    size = CONFIG.image_size
    rows = table(world, "bounding_boxes.txt")
    assert [int(r[0]) for r in rows] == list(range(1, CONFIG.n_images + 1))
    for row in rows:
        assert len(row) == 5 and all(FLOAT.match(v) for v in row[1:])
        x, y, w, h = map(float, row[1:])
        assert w >= 4 and h >= 4
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        # the bird is scaled to 55-90 % of the image along its longer side
        assert max(w, h) >= 0.4 * size


def test_box_encloses_the_bird(world):
    """Pixels far outside the box are background: a smooth gradient, so tiny neighbour differences."""
    rows = {int(r[0]): [int(float(v)) for v in r[1:]] for r in table(world, "bounding_boxes.txt")}
    for image_id, path in table(world, "images.txt")[:12]:
        pixels = np.asarray(Image.open(world / "images" / path), dtype=np.float32)
        x, y, w, h = rows[int(image_id)]
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2] = False
        steps = np.abs(np.diff(pixels, axis=1)).max(axis=2)
        inside = ~outside[:, 1:] & ~outside[:, :-1]
        background = outside[:, 1:] & outside[:, :-1]
        assert steps[background].max() < 30  # noise and gradient only
        assert steps[inside].max() > 60  # the bird has edges


# ------------------------------------------------------------------------------------------ ground truth


def test_attribute_labels_are_the_true_traits(world):
    names = table(world, "attributes/attributes.txt")
    assert [int(r[0]) for r in names] == list(range(1, len(names) + 1))
    assert 30 <= len(names) <= 45
    parsed = [re.fullmatch(r"has_([a-z_]+)::([a-z]+)", r[1]).groups() for r in names]
    assert {t for t, _ in parsed} == set(TRAITS)
    species_traits = {sp["class_id"]: sp["traits"] for sp in info(world)["species"]}
    labels = image_class(world)
    present: dict[int, list[tuple[str, str]]] = {i: [] for i in labels}
    rows = table(world, "attributes/image_attribute_labels.txt")
    assert len(rows) == CONFIG.n_images * len(names)
    for image_id, attribute_id, is_present, certainty, time in rows:
        assert is_present in ("0", "1") and certainty in ("1", "2", "3", "4") and float(time) >= 0
        if is_present == "1":
            present[int(image_id)].append(parsed[int(attribute_id) - 1])
    for image_id, pairs in present.items():
        traits = [t for t, _ in pairs]
        assert sorted(traits) == sorted(TRAITS)  # exactly one value of every trait
        assert dict(pairs) == species_traits[labels[image_id]]


def test_world_json_attribute_ids_match_attribute_names(world):
    meta = info(world)
    names = dict(table(world, "attributes/attributes.txt"))
    for sp in meta["species"]:
        expected = {f"has_{t}::{v}" for t, v in sp["traits"].items()}
        assert {names[str(i)] for i in sp["attribute_ids"]} == expected
    assert meta["counts"]["species"] == CONFIG.n_species and meta["config"]["seed"] == CONFIG.seed


def test_species_are_pairwise_distinct_and_siblings_differ_in_colour(world):
    species = info(world)["species"]
    tuples = [tuple(sp["traits"][t] for t in TRAITS) for sp in species]
    assert len(set(tuples)) == len(tuples)
    colours = [t for t, rank in TRAIT_RANK.items() if rank == "species"]
    for a, b in combinations(species, 2):
        if a["genus"] == b["genus"]:
            assert any(a["traits"][c] != b["traits"][c] for c in colours)


@pytest.mark.parametrize("shape", [(13, 1, 1, 10), (1, 5, 9, 10)])
def test_large_worlds_keep_species_distinct(shape):
    """Past 12 orders, 4 families or 8 genera the higher traits repeat; colours must still keep species apart."""
    n_orders, families, genera, per_genus = shape
    config = WorldConfig(
        n_orders=n_orders, families_per_order=families, genera_per_family=genera, species_per_genus=per_genus
    )
    species = build_species(config)
    assert len(species) == config.n_species
    assert len({tuple(sp.traits[t] for t in TRAITS) for sp in species}) == len(species)
    assert len({sp.name for sp in species}) == len(species)
    for a, b in combinations(species, 2):
        if a.genus == b.genus and a.class_id + 8 > b.class_id:  # up to 8 siblings get distinct primaries
            assert a.traits["primary_color"] != b.traits["primary_color"]


def test_genus_colour_rank_makes_congeners_share_their_primary_colour(tmp_path):
    """The bioscan-like world: one primary colour per genus, siblings told apart by wing (and head) colour."""
    config = WorldConfig(species_per_genus=4, colour_rank="genus")
    species = build_species(config)
    assert len({tuple(sp.traits[t] for t in TRAITS) for sp in species}) == len(species)
    for a, b in combinations(species, 2):
        if a.genus == b.genus:
            assert a.traits["primary_color"] == b.traits["primary_color"]
            assert a.traits["wing_color"] != b.traits["wing_color"]
    genera = {sp.genus: sp.traits["primary_color"] for sp in species}
    assert len(set(genera.values())) == min(len(genera), len(PALETTE))  # genera spread over the palette
    default = build_species(WorldConfig(species_per_genus=4))
    assert [sp.name for sp in default] == [sp.name for sp in species]  # same tree and names, other colours
    root = generate_world(tmp_path / "w", WorldConfig(n_orders=1, image_size=16, images_per_species=2,
                                                      colour_rank="genus"))  # fmt: skip
    meta = info(root)
    assert meta["traits"]["primary_color"]["rank"] == "genus" and meta["config"]["colour_rank"] == "genus"
    assert "colour_rank" not in info(generate_world(tmp_path / "d", WorldConfig(n_orders=1, image_size=16,
                                                                               images_per_species=2)))["config"]  # fmt: skip


def test_extreme_test_fraction_still_leaves_train_and_test(tmp_path):
    for fraction in (0.01, 0.99):
        tiny = dict(n_orders=1, families_per_order=1, genera_per_family=1, species_per_genus=2)
        config = WorldConfig(image_size=16, images_per_species=3, test_fraction=fraction, **tiny)
        root = generate_world(tmp_path / str(fraction), config)
        split = [int(t) for _, t in table(root, "train_test_split.txt")]
        assert split[:3].count(0) == (1 if fraction < 0.5 else 2) and split[3:].count(0) == split[:3].count(0)


def test_traits_are_inherited_along_the_tree(world):
    """Species sharing an ancestor at a rank share every trait fixed at that rank or above."""
    ranks = ("order", "family", "genus")
    species = info(world)["species"]
    for a, b in combinations(species, 2):
        for depth, rank in enumerate(ranks):
            if a[rank] == b[rank]:
                fixed = [t for t, r in TRAIT_RANK.items() if r in ranks[: depth + 1]]
                assert all(a["traits"][t] == b["traits"][t] for t in fixed)
    orders = {sp["order"]: sp["traits"]["body_shape"] for sp in species}
    assert len(set(orders.values())) == len(orders)  # sibling orders get different body shapes


def test_taxonomy_round_trips(world):
    taxonomy = load_taxonomy(world)
    assert [row["class_id"] for row in taxonomy] == list(range(1, CONFIG.n_species + 1))
    for row, sp in zip(taxonomy, info(world)["species"], strict=True):
        assert (row["order"], row["family"], row["genus"], row["species"]) == (
            sp["order"],
            sp["family"],
            sp["genus"],
            sp["name"],
        )
        assert row["species"].startswith(row["genus"] + "_") and " " not in row["species"]
    assert len({row["genus"] for row in taxonomy}) == 4 and len({row["order"] for row in taxonomy}) == 2


# ------------------------------------------------------------------------------------------ DNA and tree


def test_barcodes_follow_the_tree(world):
    barcodes = load_barcodes(world)
    assert sorted(barcodes) == list(range(1, CONFIG.n_images + 1))
    assert all(len(s) == CONFIG.barcode_length and set(s) <= set("ACGT") for s in barcodes.values())
    taxa = {row["class_id"]: row for row in load_taxonomy(world)}
    labels = image_class(world)
    codes = {i: np.frombuffer(s.encode(), dtype=np.uint8) for i, s in barcodes.items()}
    groups: dict[str, list[int]] = {"species": [], "genus": [], "order": []}
    for a, b in combinations(sorted(codes), 2):
        ta, tb = taxa[labels[a]], taxa[labels[b]]
        distance = int((codes[a] != codes[b]).sum())
        if ta["species"] == tb["species"]:
            groups["species"].append(distance)
        elif ta["genus"] == tb["genus"]:
            groups["genus"].append(distance)
        elif ta["order"] != tb["order"]:
            groups["order"].append(distance)
    means = {k: np.mean(v) for k, v in groups.items()}
    assert means["species"] < means["genus"] < means["order"]
    assert means["species"] < 0.02 * CONFIG.barcode_length < means["genus"]
    assert means["order"] > 0.25 * CONFIG.barcode_length


def test_newick_is_the_taxonomy_with_rates_as_branch_lengths(world):
    tree = parse_newick((world / "tree.nwk").read_text())
    taxonomy = load_taxonomy(world)
    leaves: list[tuple[str, list[str], list[float]]] = []

    def walk(node, path, lengths):
        if node.length is not None:  # every node but the root
            path, lengths = path + [node.name], lengths + [node.length]
        if not node.children:
            leaves.append((path[-1], path[:-1], lengths))
        for child in node.children:
            walk(child, path, lengths)

    walk(tree, [], [])
    assert sorted(name for name, _, _ in leaves) == sorted(row["species"] for row in taxonomy)
    by_name = {row["species"]: row for row in taxonomy}
    for name, path, lengths in leaves:
        row = by_name[name]
        assert path == [row["order"], row["family"], row["genus"]]
        assert lengths == [DNA_RATES[r] for r in ("order", "family", "genus", "species")]


# ------------------------------------------------------------------------------------------ API behaviour


def test_ensure_world_generates_once(tmp_path):
    calls = []
    tiny = dict(
        n_orders=1, families_per_order=1, genera_per_family=1, species_per_genus=2, images_per_species=2
    )
    config = WorldConfig(seed=2, image_size=16, barcode_length=20, **tiny)
    root = ensure_world(tmp_path, config, progress=lambda done, total: calls.append((done, total)))
    assert root == tmp_path / f"world-{config.key()}" / "CUB_200_2011"
    assert calls[-1] == (4, 4) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    before = digests(root)
    (root / "marker").write_text("kept")
    again = ensure_world(tmp_path, config, progress=lambda done, total: calls.append("again"))
    assert again == root and "again" not in calls and (root / "marker").is_file()
    assert {k: v for k, v in digests(root).items() if k != "marker"} == before
    assert [p.name for p in tmp_path.iterdir()] == [f"world-{config.key()}"]  # no temporary folder left


def test_generate_world_refuses_an_existing_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("x")
    with pytest.raises(UserError):
        generate_world(tmp_path / "taken", WorldConfig(image_size=16, images_per_species=2))
    assert (tmp_path / "taken" / "precious.txt").read_text() == "x"


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_orders=0),
        dict(families_per_order=-1),
        dict(genera_per_family=0),
        dict(species_per_genus=0),
        dict(images_per_species=0),
        dict(images_per_species=1),
        dict(barcode_length=0),
        dict(image_size=15),
        dict(test_fraction=0.0),
        dict(test_fraction=1.0),
        dict(test_fraction=1.5),
        dict(seed=-1),
        dict(image_size=32.0),
        dict(n_orders="3"),
        dict(colour_rank="family"),
        dict(species_per_genus=65, colour_rank="genus"),
    ],
)
def test_bad_config_values_raise_user_error(bad):
    with pytest.raises(UserError) as error:
        WorldConfig(**bad)
    assert "\n" not in error.value.message and next(iter(bad)) in error.value.message


def test_ensure_world_does_not_return_an_incomplete_folder(tmp_path):
    config = WorldConfig(image_size=16, images_per_species=2, n_orders=1, families_per_order=1)
    partial = tmp_path / f"world-{config.key()}" / "CUB_200_2011"
    (partial / "images").mkdir(parents=True)  # e.g. copied by hand, no world.json
    with pytest.raises(UserError):
        ensure_world(tmp_path, config)


def test_the_project_cub_loader_reads_the_world(world):
    cub = pytest.importorskip("datasets.cub")
    meta = cub.read_cub_meta(world)
    assert meta.num_classes == CONFIG.n_species and len(meta.paths) == CONFIG.n_images
    assert meta.class_names == [r[1] for r in table(world, "classes.txt")]
    assert meta.boxes is not None and meta.boxes.shape == (CONFIG.n_images, 4)
    names, matrix = cub.read_attributes(world, CONFIG.n_images)
    assert matrix.shape == (CONFIG.n_images, len(names)) and (matrix.sum(axis=1) == len(TRAITS)).all()

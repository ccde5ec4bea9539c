"""`generate cvae|phylo|traverse|interpolate` as a user runs them: same seed -> same bytes, manifests that name
every image's condition, seed and checkpoint, folders `vdna make` reads, and what each mode promises."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_user_error, snapshot
from helpers_generate import cvae as tiny_cvae
from helpers_generate import phylo as tiny_phylo
from PIL import Image
from test_gan_cli import cli  # noqa: F401  (the in-process CLI fixture)
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)

from core.checkpoint import file_hash
from datasets.phylogeny import levels_from_record
from models.cvae import load_cvae
from models.phylo import load_phylo
from testing.vdna.sources import resolve_source


@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    cvae_run, phylo_run = tiny_cvae(root), tiny_phylo(root)
    cvae_meta = load_cvae(cvae_run)[1]
    levels = levels_from_record(load_phylo(phylo_run).meta["phylogeny"])
    images = sorted((small_world / "images").rglob("*.png"))
    return {"cvae": cvae_run, "phylo": phylo_run, "classes": cvae_meta["class_names"], "levels": levels,
            "images": [str(images[0]), str(images[-1])]}  # fmt: skip


def generate(cli, out, *args):  # noqa: F811
    result = cli("generate", *args, "--out", out, "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def assert_labelled_grid(folder, groups: list[str]) -> dict:
    """grid.png holds one labelled row per group whose cells are the files grid.json names, enlarged by nearest
    neighbour to 96 px (what a reader sees at a glance), with a title and labels around them."""
    layout = json.loads((folder / "grid.json").read_text())
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert [row["cells"][0]["file"].split("/")[1] for row in layout["rows"]] == groups
    assert layout["title"].startswith("generate ") and " rows = " in layout["title"]
    for row in layout["rows"]:
        assert row["label"] and all(cell["label"] for cell in row["cells"])
        for cell in row["cells"]:
            x, y, w, h = cell["box"]
            image = np.asarray(Image.open(folder / cell["file"]))
            scale = w // image.shape[1]
            assert w >= 96 and np.array_equal(grid[y : y + h : scale, x : x + w : scale], image), cell
    first = layout["rows"][0]["cells"][0]["box"]
    labels = grid[first[1] : first[1] + first[3], : first[0]]  # the row label's margin
    assert first[0] > 30 and (labels < 128).any()  # dark text on white
    return layout


def mode_args(runs, mode: str) -> list[str]:
    classes, levels = runs["classes"], runs["levels"]
    species = levels.species
    return {
        "cvae": ["cvae", "-c", runs["cvae"], "--class", "all", "--n", "3"],
        "cvae-attr": [
            "cvae",
            "-c",
            runs["cvae"],
            "--class",
            classes[1],
            "--attr",
            "has_crest::yes=1",
            "--n",
            "2",
        ],
        "phylo": ["phylo", "-c", runs["phylo"], "--species", "all", "--n", "2"],
        "phylo-node": ["phylo", "-c", runs["phylo"], "--node", levels.groups[0][1], "--n", "3"],
        "traverse-cvae": [
            "traverse",
            "-c",
            runs["cvae"],
            "--class",
            classes[2],
            "--top",
            "2",
            "--steps",
            "4",
        ],
        "traverse-phylo": ["traverse", "-c", runs["phylo"], "--species", species[3], "--steps", "4"],
        "interpolate-cvae": [
            "interpolate",
            "-c",
            runs["cvae"],
            "--from-class",
            classes[0],
            "--to-class",
            classes[5],
            "--n",
            "2",
            "--steps",
            "5",
        ],  # fmt: skip
        "interpolate-phylo": [
            "interpolate",
            "-c",
            runs["phylo"],
            "--from-species",
            species[0],
            "--to-species",
            species[7],
            "--n",
            "2",
        ],  # fmt: skip
        "interpolate-images": [
            "interpolate",
            "-c",
            runs["cvae"],
            "--from-image",
            runs["images"][0],
            "--to-image",
            runs["images"][1],
            "--steps",
            "3",
        ],  # fmt: skip
    }[mode]


@pytest.mark.parametrize(
    "mode",
    [
        "cvae",
        "cvae-attr",
        "phylo",
        "phylo-node",
        "traverse-cvae",
        "traverse-phylo",
        "interpolate-cvae",
        "interpolate-phylo",
        "interpolate-images",
    ],  # fmt: skip
)
def test_every_mode_same_seed_same_bytes_with_a_manifest(runs, cli, tmp_path, mode):  # noqa: F811
    args = [str(a) for a in mode_args(runs, mode)]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    rows = generate(cli, a, *args, "--seed", "5")
    assert generate(cli, b, *args, "--seed", "5") == rows
    files = {k: v for k, v in snapshot(a).items() if k != "run.yaml"}
    assert files == {k: v for k, v in snapshot(b).items() if k != "run.yaml"}
    weights = runs["cvae"] / "cvae.safetensors" if "cvae" in args[2] else runs["phylo"] / "phylo.safetensors"
    digest = file_hash(weights)
    kind = args[0]
    for row in rows:
        assert row["mode"] == kind and row["checkpoint"] == digest and "condition" in row and "seed" in row
        assert (a / row["file"]).is_file()
    assert {p.name for p in a.iterdir()} == {"images", "grid.png", "grid.json", "manifest.jsonl", "run.yaml"}
    source = resolve_source(str(a))
    assert source.kind == "generated" and len(source) == len(rows)  # what `vdna make` reads
    groups = list(dict.fromkeys(row["file"].split("/")[1] for row in rows))
    assert_labelled_grid(a, groups)
    if "images" not in mode:  # endpoints drawn from seeds: another seed, other images
        generate(cli, c, *args, "--seed", "6")
        assert snapshot(c / "images") != snapshot(a / "images")


def test_node_samples_draw_their_own_codes_each(runs, cli, tmp_path):  # noqa: F811
    """Every `--node` image draws all its codes from the prior given the node: image i depends on seed + i only,
    so a run is as varied as the clade and any image comes back alone from its seed."""
    levels = runs["levels"]
    node = levels.groups[0][0]
    args = ("phylo", "-c", str(runs["phylo"]), "--node", node, "--level", "0")
    rows = generate(cli, tmp_path / "all", *args, "--n", "6", "--seed", "11", "--batch-size", "4")
    members = [levels.species[s] for s in levels.members(0, 0)]
    assert rows[0]["condition"] == {"node": node, "level": 0, "species": members}
    assert len({tuple(row["codes"][:4]) for row in rows}) > 1  # level-0 codes (4 per level) vary per image
    alone = generate(cli, tmp_path / "one", *args, "--n", "1", "--seed", "14")
    assert alone[0]["codes"] == rows[3]["codes"] and rows[0]["top_k"] == 5  # the paper's top-k by default


def test_phylo_interpolation_swaps_one_part_at_a_time(runs, cli, tmp_path):  # noqa: F811
    species = runs["levels"].species
    path = generate(cli, tmp_path / "path", "interpolate", "-c", str(runs["phylo"]), "--from-species", species[0],
                    "--to-species", species[5], "--n", "1", "--seed", "3")  # fmt: skip
    ends = [generate(cli, tmp_path / s, "phylo", "-c", str(runs["phylo"]), "--species", s, "--n", "1", "--seed", "3")
            for s in (species[0], species[5])]  # fmt: skip
    assert path[0]["codes"] == ends[0][0]["codes"] and path[-1]["codes"] == ends[1][0]["codes"]
    assert [row["swapped_last"] for row in path] == [
        "none",
        "free",
        "level 0",
        "level 1",
        "level 2",
        "level 3",
    ]
    model = load_phylo(
        runs["phylo"]
    ).autoencoder  # the run's layout: levels x codes per level, then free codes
    per_level, phylo_positions = model.codes_per_level, model.n_phylo
    for previous, row in zip(path[:-1], path[1:], strict=True):
        changed = {i for i, (p, q) in enumerate(zip(previous["codes"], row["codes"], strict=True)) if p != q}
        part = row["swapped_last"]
        allowed = (set(range(phylo_positions, len(row["codes"]))) if part == "free"
                   else set(range(per_level * int(part[-1]), per_level * (int(part[-1]) + 1))))  # fmt: skip
        assert changed <= allowed, (part, changed)


def test_cvae_interpolation_ends_are_the_conditional_samples(runs, cli, tmp_path):  # noqa: F811
    a, b = runs["classes"][0], runs["classes"][5]
    generate(cli, tmp_path / "path", "interpolate", "-c", str(runs["cvae"]), "--from-class", a, "--to-class", b,
             "--n", "1", "--steps", "4", "--seed", "9")  # fmt: skip
    frames = [
        np.asarray(Image.open(p)) for p in sorted((tmp_path / "path" / "images" / "row000").glob("*.png"))
    ]
    for name, frame in ((a, frames[0]), (b, frames[-1])):
        generate(
            cli, tmp_path / name, "cvae", "-c", str(runs["cvae"]), "--class", name, "--n", "1", "--seed", "9"
        )
        sample = np.asarray(Image.open(next((tmp_path / name / "images").rglob("*.png"))))
        assert np.abs(sample.astype(int) - frame).max() <= 1  # same latent and condition (float rounding)


def test_traversals_sweep_what_they_say(runs, cli, tmp_path):  # noqa: F811
    meta = load_cvae(runs["cvae"])[1]
    rows = generate(cli, tmp_path / "cvae", "traverse", "-c", str(runs["cvae"]), "--top", "3", "--steps", "5")
    kl = meta["kl_per_dim"]["none"]
    top = sorted(range(len(kl)), key=lambda d: -kl[d])[:3]
    assert [rows[5 * i]["dimension"] for i in range(3)] == top
    assert [row["value"] for row in rows[:5]] == [-3.0, -1.5, 0.0, 1.5, 3.0]
    layout = assert_labelled_grid(tmp_path / "cvae", [f"dim{d:03d}" for d in top])
    assert [c["label"] for c in layout["rows"][0]["cells"]] == [
        "-3.00 sd",
        "-1.50 sd",
        "+0.00 sd",
        "+1.50 sd",
        "+3.00 sd",
    ]
    assert layout["rows"][0]["label"].startswith(f"dim {top[0]} (KL ")
    model = load_phylo(runs["phylo"]).autoencoder
    free, last = (
        model.n_phylo,
        model.quantizer.n_embed - 1,
    )  # the first free position, the codebook's last entry
    rows = generate(cli, tmp_path / "phylo", "traverse", "-c", str(runs["phylo"]), "--species", runs["levels"].species[0],
                    "--positions", f"2,{free}", "--steps", "4")  # fmt: skip
    assert [(row["position"], row["part"], row["code"]) for row in rows[:5]] == [
        (2, "level 0", 0), (2, "level 0", round(last / 3)), (2, "level 0", round(2 * last / 3)), (2, "level 0", last),
        (free, "free", 0)]  # fmt: skip


def test_output_folder_may_not_hold_the_checkpoint(runs, cli, tmp_path):  # noqa: F811
    run = runs["cvae"]
    before = snapshot(run)
    result = cli("generate", "cvae", "-c", run, "--out", run, "--overwrite", "--device", "cpu")
    assert_user_error(result, "would hold the command's own input")
    assert_user_error(cli("generate", "traverse", "-c", run, "--species", "x", "--out", tmp_path / "t"),
                      "--species does not apply to a cvae checkpoint", "Phylo-NN")  # fmt: skip
    assert_user_error(cli("generate", "phylo", "-c", runs["phylo"], "--node", runs["levels"].groups[0][0],
                          "--level", "9", "--out", tmp_path / "n"), "--level must be in 0..3")  # fmt: skip
    assert snapshot(run) == before and not (tmp_path / "t").exists()


def test_long_traversals_stream_and_the_grid_shows_an_even_subset(runs, cli, tmp_path, monkeypatch):  # noqa: F811
    """--steps 2000: decoded and written a batch at a time; the grid shows 16 evenly spaced values of each row."""
    from testing.generation import cvae as gen_cvae

    sizes = []
    decode = gen_cvae.decode

    def recording(model, eps, c, *args, **kwargs):
        sizes.append(len(c))
        return decode(model, eps, c, *args, **kwargs)

    monkeypatch.setattr(gen_cvae, "decode", recording)
    rows = generate(cli, tmp_path / "t", "traverse", "-c", str(runs["cvae"]), "--dims", "1", "--steps", "2000",
                    "--batch-size", "128", "--span", "2")  # fmt: skip
    assert len(rows) == 2000 and len(list((tmp_path / "t" / "images" / "dim001").iterdir())) == 2000
    assert max(sizes) == 128 and sum(sizes) == 2000
    cells = json.loads((tmp_path / "t" / "grid.json").read_text())["rows"][0]["cells"]
    assert len(cells) == 16 and cells[0]["label"] == "-2.00 sd" and cells[-1]["label"] == "+2.00 sd"
    assert cells[-1]["file"].endswith("001999.png")


def test_out_of_range_values_and_unreadable_images_are_one_line_errors(runs, cli, tmp_path, monkeypatch):  # noqa: F811
    cvae = str(runs["cvae"])
    out = tmp_path / "out"
    base = ("--out", str(out), "--device", "cpu")
    assert_user_error(cli("generate", "cvae", "-c", cvae, "--attr", "has_crest::yes=1e308", *base),
                      "--attr has_crest::yes: 1e308 is out of range")  # fmt: skip
    assert_user_error(cli("generate", "cvae", "-c", cvae, "--attrs", ",".join(["-1e9"] + ["?"] * 40), *base),
                      "--attrs entry 1: -1e9 is out of range")  # fmt: skip
    for span in ("inf", "nan", "1e9", "0", "-1"):
        assert_user_error(cli("generate", "traverse", "-c", cvae, "--span", span, *base),
                          "--span must be a finite number of prior standard deviations")  # fmt: skip
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = runs["images"][0]
    for args, option in (((broken, good), "--from-image"), ((good, broken), "--to-image")):
        result = cli(
            "generate", "interpolate", "-c", cvae, "--from-image", args[0], "--to-image", args[1], *base
        )
        assert_user_error(result, f"{option}: cannot read image {broken}", "give a readable image file")
        assert "--skip-bad-images" not in result.stderr
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # a 32 px image is now a decompression bomb
    result = cli("generate", "traverse", "-c", str(runs["phylo"]), "--image", good, *base)
    assert_user_error(
        result, "--image: cannot read image", "decompression bombs", "give a readable image file"
    )
    assert not out.exists()


def test_labelled_grid_layout():
    """Shared column labels go on top; rows with other labels get a caption under each cell; long row labels wrap;
    every cell sits, enlarged by nearest neighbour, where its box says."""
    from testing.generation.grid import CELL, labelled_grid

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 255, (k, 8, 8, 3), dtype=np.uint8) for k in (3, 2)]
    shared, boxes = labelled_grid(rows, ["first row", "second"], [["a", "b", "c"], ["a", "b"]], "title")
    own, own_boxes = labelled_grid(rows, ["first row", "second"], [["a", "b", "c"], ["x", "y"]], "title")
    assert own.shape[0] > shared.shape[0]  # a caption line under every row
    for image, layout in ((shared, boxes), (own, own_boxes)):
        for cells, row in zip(rows, layout, strict=True):
            for cell, (x, y, w, h) in zip(cells, row, strict=True):
                assert (w, h) == (CELL, CELL) and np.array_equal(
                    image[y : y + h : CELL // 8, x : x + w : CELL // 8], cell
                )
    long = "Mogilis trumubunata -> Gogella betrasii (seed 3)"
    wrapped, _ = labelled_grid(rows[:1], [long], [["a", "b", "c"]], "title")
    single, _ = labelled_grid(rows[:1], ["short"], [["a", "b", "c"]], "title")
    assert wrapped.shape[1] - single.shape[1] < 250  # the label wraps instead of widening the figure

"""Phylo-NN: Newick parsing and tree distances, level cuts, the VQ, the adversary's gradient path, the prior's
conditioning, the code-tree correlation measure, and `train phylo` / `test phylo` / bad input as a user runs them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_user_error, snapshot
from helpers_generate import phylo as tiny_phylo
from scipy.stats import spearmanr
from test_gan_cli import cli  # noqa: F401  (the in-process CLI fixture)
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)

from core.config import from_preset
from core.errors import UserError
from datasets.phylogeny import NewickError, Tree, build_levels, levels_from_record, parse_newick
from datasets.world import DNA_RATES, load_taxonomy
from models.phylo import CodePrior, PhyloAutoencoder, VectorQuantizer, load_phylo
from testing.phylo import code_histograms, correlations, js_distances
from training.phylo import PRESETS, PhyloConfig, autoencoder_losses

# ((A:1,B:2)AB:3,(C:1,'D e':1)CD:0.5)root;  depths: AB 3, A 4, B 5, CD 0.5, C 1.5, D 1.5
TREE = "((A:1,B:2)AB:3,(C:1,'D e':1)CD:0.5)root;"


def tree(text: str = TREE) -> Tree:
    return Tree(parse_newick(text), "test tree")


# ---------------------------------------------------------------------------------------------- Newick


def test_newick_names_lengths_nesting_quotes_and_comments():
    root = parse_newick("[a comment] ( (A:1, B:2.5e-1)AB:3 ,\n ('it''s D':1,[NHX]C:1E0)CD:0.5 )'the root';\n")
    assert root.name == "the root" and root.length is None
    ab, cd = root.children
    assert (ab.name, ab.length, [c.name for c in ab.children]) == ("AB", 3.0, ["A", "B"])
    assert [c.length for c in ab.children] == [1.0, 0.25]
    assert [c.name for c in cd.children] == ["it's D", "C"] and cd.children[1].length == 1.0
    assert all(leaf.is_leaf for leaf in root.leaves()) and len(root.leaves()) == 4
    assert ab.children[0].parent is ab and ab.parent is root


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("(A,B", "line 1, column 5", "expected ',' or ')'"),
        ("(A,B)", "line 1, column 6", "does not end with ';'"),
        ("(A:x,B);", "line 1, column 4", "branch length 'x' is not a number"),
        ("(A,\n'B);", "line 2, column 1", "quoted label is never closed"),
        ("(A,B);C;", "line 1, column 7", "text after the closing ';'"),
        ("(A,B));", "line 1, column 6", "')' without a matching '('"),
        ("  \n", "line 2, column 1", "the text is empty"),
        ("(A,B)[oops;", "line 1, column 6", "comment '[' is never closed"),
    ],
)
def test_newick_errors_say_where(text, where, what):
    with pytest.raises(NewickError) as err:
        parse_newick(text, "t.nwk")
    message = err.value.message
    assert message.startswith(f"t.nwk is not valid Newick at {where}: ") and what in message, message


def test_tree_distances_by_hand():
    t = tree()
    a, b, c, d = (t.leaf(n) for n in ("A", "B", "C", "D_e"))  # underscores match blanks
    assert (t.depth(a), t.depth(b), t.depth(c)) == (4.0, 5.0, 1.5)
    assert t.distance(a, b) == 3.0 and t.distance(c, d) == 2.0
    assert t.distance(a, c) == 4.0 + 1.5 and t.distance(a, a) == 0.0
    assert t.mrca(a, b).name == "AB" and t.mrca(b, d) is t.root
    unit = tree("((A,B),C);")  # no lengths: every branch counts 1
    assert unit.distance(unit.leaf("A"), unit.leaf("C")) == 3.0
    with pytest.raises(UserError, match="some branches have lengths"):
        tree("((A:1,B),C:1);")
    with pytest.raises(UserError, match="'A' appears twice"):
        tree("((A:1,B:1):1,A:1);")
    with pytest.raises(UserError, match="no species 'E' in test tree; closest"):
        t.leaf("E")


def test_level_cuts_and_group_distances():
    t = tree()
    levels = build_levels(t, ["001.A", "002.B", "003.C", "004.D_e"], [0.5, 0.9])
    # A (depth 4): deepest ancestor at depth <= 2 is the root; at <= 3.6, AB. C (1.5): CD at <= 0.75.
    assert levels.groups[0] == ["root", "CD"] and levels.assignment[0].tolist() == [0, 0, 1, 1]
    assert levels.groups[1] == ["AB", "CD"]
    assert levels.groups[2] == ["A", "B", "C", "D e"]
    assert levels.distances[0][0, 2] == pytest.approx(0.5) and levels.distances[0][0, 1] == 0
    assert levels.distances[1][0, 2] == pytest.approx(3.5) and levels.distances[2][0, 1] == pytest.approx(3.0)
    assert levels.find_node("CD") == (1, 1) and levels.find_node("CD", level=0) == (0, 1)
    assert levels.condition_offsets == [0, 2, 4]
    with pytest.raises(
        UserError, match="no node .rooot. is a group at any level of the tree; closest: .root."
    ):
        levels.find_node("rooot")
    with pytest.raises(UserError, match="classes are not leaves"):
        build_levels(t, ["A", "Zed"], [0.5])


def test_world_tree_levels_are_its_taxonomy(small_world):
    """The world's tree.nwk, cut at the tiny preset's depths, gives orders, families, genera, species."""
    taxonomy = load_taxonomy(small_world)
    names = [row["species"] for row in taxonomy]
    cfg = from_preset(PhyloConfig, PRESETS, "tiny")
    levels = build_levels(Tree.read(small_world / "tree.nwk"), names, cfg.cuts)
    for level, rank in enumerate(("order", "family", "genus", "species")):
        expected = [row[rank].replace("_", " ") for row in taxonomy]
        assert [levels.groups[level][g].replace("_", " ") for g in levels.assignment[level]] == expected
    depth = {"order": 0.0, "family": DNA_RATES["order"], "genus": DNA_RATES["order"] + DNA_RATES["family"]}
    pairs = [(i, j) for i in range(len(names)) for j in range(len(names))]
    for i, j in pairs:  # level 0: two orders are 2 x order-branch apart, or 0 when the same
        same = taxonomy[i]["order"] == taxonomy[j]["order"]
        assert levels.distances[0][i, j] == pytest.approx(0 if same else 2 * DNA_RATES["order"])
    assert depth["genus"] > 0


# --------------------------------------------------------------------------------------------- models


def test_quantizer_picks_nearest_entry_with_straight_through_gradient():
    vq = VectorQuantizer(4, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]))
    z = torch.tensor([[[0.9, 0.2], [0.1, 0.8], [-1.0, -1.0]]], requires_grad=True)
    z_q, idx, loss = vq(z)
    assert idx.tolist() == [[1, 2, 0]]
    assert torch.equal(z_q.detach(), vq.embedding.weight[idx].detach())
    expected = 1.25 * ((z - z_q) ** 2).mean()  # codebook + 0.25 commitment, both equal in value
    assert loss.item() == pytest.approx(expected.item())
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight through


def tiny_autoencoder(plain: bool = False) -> PhyloAutoencoder:
    torch.manual_seed(0)
    return PhyloAutoencoder(16, 4, 8, 16, 1, 8, 4, 16, 3, 2, 3, [2, 3, 5], 16, plain)


def test_adversary_gradient_reaches_the_free_encoder_only_through_the_frozen_adversary():
    from core.config import build

    model = tiny_autoencoder()
    cfg = build(PhyloConfig, {"amp": False})
    x = torch.randn(6, 3, 16, 16)
    groups = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0]])
    losses = autoencoder_losses(model, x, groups, cfg)
    losses["confusion"].backward()
    free, phylo = model.free.to_codes.weight.grad, model.phylo.to_codes.weight.grad
    assert free is not None and free.abs().sum() > 0  # the encoder's free branch learns to confuse
    assert phylo is None or phylo.abs().sum() == 0  # the phylo branch does not
    assert model.encoder[0].weight.grad.abs().sum() > 0  # nor is the shared trunk cut off
    assert all(
        p.grad is None for p in model.adversary.parameters()
    )  # the adversary itself is not trained here
    assert 0 <= losses["confusion"].item() <= math.log(5)


def test_prior_trains_every_token_and_honours_its_condition():
    torch.manual_seed(0)
    vocab, length = 12, 6
    prior = CodePrior(vocab, length, n_conditions=3, width=32, layers=2, heads=4)
    patterns = torch.tensor([[(3 * k + t) % vocab for t in range(length)] for k in range(3)])
    cond = torch.arange(3).repeat(8)
    codes = patterns[cond]
    logits = prior(cond, codes[:, :-1])
    assert logits.shape == (24, length, vocab)  # one prediction for every token, the first included
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), codes.reshape(-1))
    assert prior.loss(cond, codes).item() == pytest.approx(manual.item())
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(120):
        opt.zero_grad()
        prior.loss(cond, codes).backward()
        opt.step()
    prior.eval()
    u = torch.from_numpy(np.random.RandomState(0).random_sample((9, length)))
    drawn = prior.sample(torch.arange(3).repeat_interleave(3), u)
    assert torch.equal(drawn, patterns.repeat_interleave(3, dim=0))
    kept = prior.sample(torch.full((3,), 2), u[:3], prefix=patterns[0, :2].expand(3, -1))
    assert torch.equal(kept[:, :2], patterns[0, :2].expand(3, -1))


def test_correlation_measure_known_answers():
    assert js_distances(np.array([[[1.0, 0]], [[1.0, 0]], [[0, 1.0]]]))[..., 0].tolist() == [
        [0, 0, 1],
        [0, 0, 1],
        [1, 1, 0],
    ]
    t = tree()
    levels = build_levels(t, ["A", "B", "C", "D e"], [0.5, 0.9])
    model = tiny_autoencoder()  # 3 levels x 2 codes + 3 free codes, 16 entries
    labels = torch.arange(4).repeat_interleave(5)
    codes = torch.zeros(20, model.sequence_length, dtype=torch.long)
    for level in range(3):  # each level's codes name the species' group at that level
        codes[:, level * 2 : level * 2 + 2] = torch.as_tensor(levels.assignment[level])[labels, None]
    codes[:, model.n_phylo :] = torch.arange(20)[:, None] % 5  # the same free codes in every species
    hist = code_histograms(codes, labels, 4, 16)
    assert hist.shape == (4, model.sequence_length, 16) and np.allclose(hist.sum(-1), 1)
    result = correlations(codes, labels, model, levels, plain=(codes, labels))
    # Levels 0 and 1: code distance 0 within a group, 1 across, as the tree's: rank correlation 1. Species
    # level: code distances (1/3 within AB and CD, 1 across) vs tree distances 3, 2 and 5.5-6.5 by hand.
    pairs_code, pairs_tree = [1 / 3, 1, 1, 1, 1, 1 / 3], [3, 5.5, 5.5, 6.5, 6.5, 2]  # AB AC AD BC BD CD
    expected = spearmanr(pairs_code, pairs_tree).statistic
    assert [row["phylo"] for row in result["levels"]] == pytest.approx([1.0, 1.0, expected])
    # All codes: the free ones add nothing (equal histograms), the distance is 6/9 of the full prefix's.
    assert result["levels"][2]["plain_vq"] == pytest.approx(expected)
    assert math.isnan(result["levels"][0]["free"])  # equal histograms: no distance varies


# ------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    return tiny_phylo(tmp_path_factory.getbasetemp())


def test_train_phylo_run_and_test_phylo(trained, cli, tmp_path):  # noqa: F811
    for name in ("phylo.safetensors", "phylo.yaml", "levels.json", "log.jsonl", "summary.json",
                 "baseline/vq.safetensors", "analysis/correlation.json", "analysis/heatmaps.png"):  # fmt: skip
        assert (trained / name).is_file(), name
    model = load_phylo(trained)
    levels = levels_from_record(model.meta["phylogeny"])
    assert [len(g) for g in levels.groups] == [2, 4, 4, 8]  # the small world: 2 orders, 4 families = genera
    stages = {e.get("stage") for e in map(json.loads, (trained / "log.jsonl").read_text().splitlines())}
    assert stages == {"autoencoder", "prior"}
    out = tmp_path / "test"
    result = cli(
        "test", "phylo", "--checkpoint", str(trained), "--out", str(out), "--device", "cpu", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "correlation.json").read_text())
    assert [row["level"] for row in report["levels"]] == [0, 1, 2, 3]
    assert all(
        -1 <= row[k] <= 1 for row in report["levels"] for k in ("phylo", "plain_vq") if row[k] == row[k]
    )
    assert report["images"] == 64  # the small world's test split
    train_report = json.loads((trained / "analysis" / "correlation.json").read_text())
    assert train_report["levels"] == report["levels"]  # the same measure at the end of training
    assert (out / "heatmaps.png").stat().st_size > 5000 and (out / "code_distance_level0.csv").is_file()


def test_phylo_bad_input(trained, small_world, cli, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.nwk"
    bad.write_text("((A:1,B:1):1,\n(C:1,D:1):1;\n")
    out = tmp_path / "run"
    result = cli(
        "train", "phylo", "--world", "small", "--tree", str(bad), "--out", str(out), "--device", "cpu"
    )
    assert_user_error(result, "not valid Newick at line 2, column 12", "expected ',' or ')'")
    assert not out.exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "note.txt").write_text("mine")
    before = snapshot(keep)
    species = load_taxonomy(small_world)[0]["species"]
    base = ("generate", "phylo", "--checkpoint", str(trained), "--out", str(keep), "--device", "cpu")
    assert_user_error(cli(*base, "--node", "Nowhereiformes"), "no node 'Nowhereiformes'")
    assert_user_error(
        cli(*base, "--species", species[:-1] + "x"),
        "unknown species",
        f"closest: '{species.replace('_', ' ')}'",
    )
    assert_user_error(cli(*base, "--species", species, "--node", "x"), "either --species")
    cvae_weights = tmp_path / "fake.safetensors"
    from core.checkpoint import save_weights

    save_weights(cvae_weights, {"w": torch.zeros(1)}, {"kind": "cvae"})
    assert_user_error(cli(*base[:3], str(cvae_weights), *base[4:], "--species", species),
                      "is not a Phylo-NN checkpoint", "'cvae'")  # fmt: skip
    assert_user_error(cli("test", "phylo", "--checkpoint", str(cvae_weights), "--out", str(keep)),
                      "not a Phylo-NN checkpoint")  # fmt: skip
    assert snapshot(keep) == before

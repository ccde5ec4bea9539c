"""Phylo-NN: the VQ, the adversary's gradient path, the prior's conditioning, the code-tree correlation measure,
and `train phylo` / `test phylo` / bad input as a user runs them (trees and levels: tests/test_phylogeny.py)."""

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

from datasets.phylogeny import Tree, build_levels, levels_from_record, parse_newick
from datasets.world import load_taxonomy
from models.phylo import CodePrior, PhyloAutoencoder, VectorQuantizer, load_phylo
from testing.phylo import code_histograms, correlations, js_distances, json_ready, write_report
from training.phylo import PhyloConfig, autoencoder_losses

# Ultrametric, height 3: AB at 2, CD at 1.5; cut 0.6 (1.8) and 0.9 (2.7) both give the groups AB and CD.
TREE = "((A:1,B:1)AB:2,(C:1.5,'D e':1.5)CD:1.5)root;"


def tree(text: str = TREE) -> Tree:
    return Tree(parse_newick(text), "test tree")


def strict_json(path):
    """The JSON at `path`, refusing the NaN/Infinity literals that are not JSON."""

    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON literal {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


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
    levels = build_levels(t, ["A", "B", "C", "D e"], [0.6, 0.9])
    assert levels.groups[:2] == [["AB", "CD"], ["AB", "CD"]]
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
    # level: code distances (1/3 within AB and CD, 1 across) vs tree distances 2, 3 and 6 by hand.
    pairs_code, pairs_tree = [1 / 3, 1, 1, 1, 1, 1 / 3], [2, 6, 6, 6, 6, 3]  # AB AC AD BC BD CD
    expected = spearmanr(pairs_code, pairs_tree).statistic
    assert [row["phylo"] for row in result["levels"]] == pytest.approx([1.0, 1.0, expected])
    # All codes: the free ones add nothing (equal histograms), the distance is 6/9 of the full prefix's.
    assert result["levels"][2]["plain_vq"] == pytest.approx(expected)
    relabelled = correlations(
        codes, labels, model, levels, plain=(codes * 10, labels, 200)
    )  # a larger codebook
    assert [row["plain_vq"] for row in relabelled["levels"]] == pytest.approx(
        [r["plain_vq"] for r in result["levels"]]
    )
    assert math.isnan(result["levels"][0]["free"])  # equal histograms: no distance varies
    assert result["levels"][0]["free_reason"] == "the code distance is the same for every species pair"
    assert "phylo_reason" not in result["levels"][0]


def test_undefined_correlations_are_null_with_a_reason_in_the_json(tmp_path):
    """A NaN correlation is written as null beside its reason, never as a `NaN` literal (not JSON)."""
    t = tree()
    levels = build_levels(t, ["A", "B", "C", "D e"], [0.6])
    model = tiny_autoencoder()
    labels = torch.arange(4).repeat_interleave(2)
    codes = torch.zeros(8, model.sequence_length, dtype=torch.long)  # every species the same codes
    result = correlations(codes, labels, model, levels)
    assert all(math.isnan(row["phylo"]) for row in result["levels"])
    write_report(result, tmp_path)
    report = strict_json(tmp_path / "correlation.json")
    for row in report["levels"]:
        assert (
            row["phylo"] is None
            and row["phylo_reason"] == "the code distance is the same for every species pair"
        )
    assert json_ready({"a": [float("inf"), np.float32(0.5), np.int64(3)]}) == {"a": [None, 0.5, 3]}
    assert (tmp_path / "correlation.png").stat().st_size > 5000  # the figure still drawn, bars marked n/a


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
    report = strict_json(out / "correlation.json")
    assert [row["level"] for row in report["levels"]] == [0, 1, 2, 3]
    assert report["images"] == 64  # the small world's test split
    for row in report["levels"]:  # the reported numbers are those of the matrices written beside them
        level = row["level"]
        code, tree_distance = (np.loadtxt(out / f"{kind}_distance_level{level}.csv", delimiter=",", skiprows=1,
                                          usecols=range(1, 9)) for kind in ("code", "tree"))  # fmt: skip
        upper = np.triu_indices(8, k=1)
        expected = spearmanr(code[upper], tree_distance[upper]).statistic
        assert row["phylo"] == pytest.approx(expected), level
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

"""Phylo-NN: the VQ, the prior's conditioning, the code-tree correlation measure, and `train phylo` / `test phylo`
/ bad input as a user runs them: every stage resumes to the uninterrupted weights, samples are recognised by the
world's classifier, taxonomy tables stand for trees (trees and levels: tests/test_phylogeny.py; the stages'
losses by hand: tests/test_phylo_stages.py)."""

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

from core.checkpoint import load_weights
from core.runlog import json_ready
from datasets.phylogeny import Tree, build_levels, levels_from_record, parse_newick
from datasets.world import load_taxonomy
from models.phylo import CodePrior, PhyloAutoencoder, VectorQuantizer, load_phylo
from testing.phylo.correlations import code_histograms, correlations, js_distances, write_report

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


def test_weights_of_the_one_stage_design_still_load(tmp_path):
    """A run of the one-stage design (a pixel autoencoder, its prior, and the plain VQ twin it kept in
    baseline/) loads as it was saved: the model for generate and test phylo, the twin as test phylo's baseline."""
    from models.phylo import save_phylo, save_plain
    from models.phylo.checkpoint import PLAIN_RUN_FILE, RUN_FILE
    from testing.phylo.evaluate import load_baseline

    ae, plain = tiny_autoencoder(), tiny_autoencoder(plain=True)
    prior = CodePrior(ae.quantizer.n_embed, ae.sequence_length, n_conditions=10, width=16, layers=1, heads=2)
    (tmp_path / "baseline").mkdir()
    save_phylo(tmp_path / RUN_FILE, ae, prior, {"phylogeny": {}})
    save_plain(tmp_path / PLAIN_RUN_FILE, plain, {})
    model = load_phylo(tmp_path)
    assert isinstance(model.autoencoder, PhyloAutoencoder)
    for loaded, saved in ((model.autoencoder, ae), (model.prior, prior), (load_baseline(tmp_path / PLAIN_RUN_FILE, "cpu"), plain)):  # fmt: skip
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items()), type(saved).__name__


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
                 "stage1/vqgan.safetensors", "analysis/correlation.json", "analysis/heatmaps.png",
                 "analysis/traits.csv", "analysis/traits.png"):  # fmt: skip
        assert (trained / name).is_file(), name
    model = load_phylo(trained)
    levels = levels_from_record(model.meta["phylogeny"])
    assert [len(g) for g in levels.groups] == [2, 4, 4, 8]  # the small world: 2 orders, 4 families = genera
    events = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert {e.get("stage") for e in events} == {"vqgan", "disentangler", "prior"}
    summary = strict_json(trained / "summary.json")
    assert set(summary["traits"]) == {"level 0", "level 1", "level 2", "level 3", "free"}
    assert len(summary["round_trip"]["heads"]) == 4 and summary["round_trip"]["images"] == 64
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
        assert "plain_vq" in row  # the stage-1 VQGAN's codes, the plain VQ baseline
    train_report = json.loads((trained / "analysis" / "correlation.json").read_text())
    assert train_report["levels"] == report["levels"]  # the same measure at the end of training
    assert (out / "heatmaps.png").stat().st_size > 5000 and (out / "code_distance_level0.csv").is_file()
    assert strict_json(out / "summary.json")["traits"] == summary["traits"]


@pytest.mark.slow
def test_species_samples_are_recognised_by_an_independent_classifier(small_world, tmp_path_factory):
    """A short run of the three stages (about 40 s on one core) draws samples that the session's classifier,
    trained apart on the same crops, recognises as the species and the clade asked for well above chance
    (measured: species 0.56, genus 0.97, level-1 nodes 0.94; chance 0.125 / 0.25 / 0.25); a decoder that
    loses the species or a prior that ignores its condition falls to chance. The round trip keeps what the
    classifier sees in the test images."""
    from helpers_generate import SMALL, classifier, single_threaded

    from core.rundir import prepare_run_dir
    from training.phylo import trainer as tp

    root = tmp_path_factory.getbasetemp()
    judge = classifier(root)
    cfg = tp.PhyloConfig.preset(
        "tiny",
        {
            **SMALL,
            "bbox_crop": True,
            "vqgan_steps": 200,
            "steps": 400,
            "prior_steps": 200,
            "batch_size": 16,
            "vqgan_batch_size": 16,
            "prior_batch_size": 16,
            "eval_every": 400,
            "log_every": 50,
            "prior_eval_every": 200,
            "classifier": str(judge),
            "fidelity_samples": 4,
        },
    )
    with single_threaded():
        summary = tp.train_phylo(cfg, prepare_run_dir(root / "phylo-fidelity", "train phylo"), quiet=True)
    species = {row["level"]: row for row in summary["fidelity"]["species"]["recognition"]}
    assert species[3]["chance"] == pytest.approx(1 / 8) and species[3]["rate"] >= 0.3, species
    assert species[2]["rate"] >= 0.6 and species[0]["rate"] >= 0.75, species
    nodes = {str(level): row for level, row in summary["fidelity"]["nodes"].items()}["1"]["recognition"][0]
    assert nodes["level"] == 1 and nodes["rate"] >= 0.5, nodes
    trip = summary["round_trip"]
    assert trip["classifier_round_trip"] >= trip["classifier"] - 0.1, trip


def test_print_correlations_says_n_a_for_a_missing_value(capsys):
    from cli.phylo import print_correlations

    print_correlations([{"level": 0, "groups": 2, "phylo": 0.5, "free": None, "plain_vq": float("nan")}])
    line = [row for row in capsys.readouterr().out.splitlines() if "0.500" in row][0]
    assert line.count("n/a") == 2


def test_a_taxonomy_table_stands_for_the_tree(small_world, tmp_path):
    """`--tree taxonomy.csv`: one level per rank (no cuts needed), the same groups as the world's Newick tree."""
    from training.phylo import trainer as tp

    rows = load_taxonomy(small_world)
    table = tmp_path / "taxonomy.csv"
    table.write_text("id,Order,Family,Genus,Species\n" + "".join(
        f"{r['class_id']},{r['order']},{r['family']},{r['genus']},{r['species']}\n" for r in rows))  # fmt: skip
    overrides = {"dataset": "world", "world": "small", "device": "cpu"}
    cfg = tp.PhyloConfig.preset("tiny", {**overrides, "tree": str(table)})
    _, _, cuts, levels, _ = tp.build_data(cfg, quiet=True)
    newick = tp.build_data(tp.PhyloConfig.preset("tiny", overrides), quiet=True)[3]
    assert cuts is None and levels.names == ["order", "family", "genus", "species"]
    assert np.array_equal(levels.assignment, newick.assignment)  # the world's cuts give its ranks


def stop_after(calls: int):
    """A stand-in for core.preemption.Watch.requested: a stop signalled after the `calls`-th step of this
    process (steps of every stage counted in turn), as SIGTERM would between two steps."""
    counter = iter(range(1, 10**6))
    return lambda self, step: next(counter) == calls


@pytest.mark.slow
def test_each_stage_resumes_to_the_uninterrupted_weights(small_world, tmp_path, monkeypatch):
    """Stopped in stage 1, resumed and stopped in stage 2, resumed and stopped in stage 3, resumed to the end:
    every weight of the VQGAN, the disentangler and the prior equals an uninterrupted run's, and each stage's
    log lines appear once."""
    from core.preemption import Watch
    from core.rundir import prepare_run_dir
    from training.phylo import trainer as tp

    overrides = {"dataset": "world", "world": "small", "bbox_crop": True, "device": "cpu", "amp": False,
                 "vqgan_steps": 4, "steps": 4, "prior_steps": 4, "batch_size": 8, "vqgan_batch_size": 8,
                 "prior_batch_size": 8, "disc_start": 1, "vq_restart_every": 2, "codebook_restart_every": 2,
                 "eval_every": 2, "prior_eval_every": 2, "log_every": 1, "lr_cycle": 3}  # fmt: skip
    cfg = tp.PhyloConfig.preset("tiny", overrides)
    straight = prepare_run_dir(tmp_path / "straight", "train phylo")
    tp.train_phylo(cfg, straight, quiet=True)
    stopped = prepare_run_dir(tmp_path / "stopped", "train phylo")
    # stage 1 after step 3; then (1 step of stage 1 left) stage 2 after its step 2; then stage 3 after its step 2
    for resume, calls in ((False, 3), (True, 3), (True, 4)):
        monkeypatch.setattr(Watch, "requested", stop_after(calls))
        with pytest.raises(SystemExit) as stop:
            tp.train_phylo(cfg, stopped, resume=resume, quiet=True)
        assert stop.value.code == 75
    monkeypatch.undo()
    tp.train_phylo(cfg, stopped, resume=True, quiet=True)
    for name in ("phylo.safetensors", "stage1/vqgan.safetensors"):
        a, b = (load_weights(run / name)[0] for run in (straight, stopped))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = [(run / "log.jsonl").read_text().splitlines() for run in (straight, stopped)]
    drop_time = [[{k: v for k, v in json.loads(x).items() if k not in ("time", "images_per_s", "sequences_per_s")}
                  for x in part] for part in lines]  # fmt: skip
    assert drop_time[0] == drop_time[1]


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
    reuse = ("train", "phylo", "--world", "small", "--stage1", str(trained), "--device", "cpu", "--quiet")
    for extra, said in ((("--bbox-crop", "--seed", "1"), "seed 0 (this run: 1)"),
                        (("--no-bbox-crop",), "bbox_crop True (this run: False)")):  # fmt: skip
        assert_user_error(cli(*reuse, *extra, "--out", str(out)), f"--stage1 {trained}", said)
        assert not out.exists()  # refused before the run starts
    done = cli(
        *reuse, "--bbox-crop", "--steps", "4", "--prior-steps", "100", "--eval-every", "2", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    summary = strict_json(out / "summary.json")
    assert summary["steps"]["vqgan"] == 0 and summary["perceptual"] == "given stage 1"
    assert not (out / "stage1").exists() and (out / "phylo.safetensors").is_file()

"""VisCoIN: shapes, losses and metrics against hand-computed values, frozen parts, bundles, CLI at 32 px."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_cli, snapshot
from helpers_viscoin import assert_only_viscoin_trained
from safetensors.torch import load_file

from core.errors import UserError
from models.classifiers import Classifier
from models.stylegan2 import Generator
from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer, default_concept_slots
from testing.viscoin import metrics as vm
from training import losses_viscoin as L

TINY_G = dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
              synthesis_kwargs=dict(channel_base=512, channel_max=32))  # fmt: skip


@pytest.fixture(scope="module")
def parts(small_world, tmp_path_factory):
    """A classifier run (small world, 32 px) and a random tiny generator checkpoint."""
    from models.stylegan2.checkpoint import save_generator

    root = tmp_path_factory.mktemp("viscoin")
    result = run_cli("train", "classifier", "--world", "small", "--image-size", "32", "--epochs", "2", "--no-amp",
                     "--quiet", "--out", str(root / "clf"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    torch.manual_seed(0)
    save_generator(root / "gan.safetensors", Generator(**TINY_G), {"source": "random (tests)"})
    return root


TRAIN = ["train", "viscoin", "--world", "small", "--iterations", "12", "--eval-every", "6", "--checkpoint-every", "6",
         "--log-every", "3", "--eval-images", "16", "--no-amp", "--device", "cpu", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(parts):
    run = parts / "run"
    result = run_cli(
        *TRAIN,
        "--classifier",
        str(parts / "clf"),
        "--generator",
        str(parts / "gan.safetensors"),
        "--out",
        str(run),
    )
    assert result.returncode == 0, result.stderr
    return run


def test_shapes_and_slots():
    f = Classifier("tiny", 5)
    psi = ConceptExtractor(f.feature_channels, n_concepts=7, latent_channels=8)
    _, features = f(torch.rand(2, 3, 32, 32) * 2 - 1)
    concepts, support = psi(features)
    assert concepts.shape == (2, 7, 3, 3) and support.shape == (2, 63) and (concepts >= 0).all()
    assert Explainer(7, 5)(concepts).shape == (2, 5)
    G = Generator(**TINY_G)
    omega = ConceptDecoder.from_generator(G, 7, 3)
    images, ws = omega(concepts, support)
    assert images.shape == (2, 3, 32, 32) and ws.shape == (2, G.num_ws, 32)
    assert torch.equal(omega.w_avg, G.mapping.w_avg) and not omega.w_avg.requires_grad
    assert default_concept_slots(14) == (2, 11) and default_concept_slots(8) == (1, 6)
    # scale invariance of Omega (normalize_2nd_moment): doubling every concept changes nothing
    assert torch.allclose(omega.ws(concepts * 2, support), omega.ws(concepts, support), atol=1e-5)


def test_losses_against_hand_computed_values():
    target, logits = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    expected = -0.5 * (math.log(0.25) + math.log(0.75))
    assert L.soft_cross_entropy(target, logits).item() == pytest.approx(expected)
    assert L.output_fidelity(target, logits).item() == pytest.approx(expected)
    concepts = torch.zeros(1, 2, 3, 3)
    concepts[0, 0, 1, 1] = 3.0  # one concept fires once: pooled = [3, 0] -> normalised [1, 0]
    assert L.sparsity(concepts).item() == pytest.approx(0.5 + 3.0 / 18)
    assert L.orthogonality(torch.eye(2).view(2, 2, 1, 1)).item() == pytest.approx(0.0)
    assert L.orthogonality(torch.tensor([[1.0, 0.0], [2.0, 0.0]]).view(2, 2, 1, 1)).item() == pytest.approx(
        0.5
    )
    assert L.w_regulariser(torch.ones(1, 2, 3), torch.zeros(3)).item() == pytest.approx(1.0)
    x, x_hat = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    parts = L.reconstruction(x_hat, x, target, target, torch.tensor([0.2]), beta=3.0, gamma=0.1)
    assert parts["l1"].item() == pytest.approx(0.5) and parts["l2"].item() == pytest.approx(0.25)
    assert parts["rec"].item() == pytest.approx(0.5 + 0.25 + 0.1 * math.log(2) + 3 * 0.2)
    big = torch.tensor([[1000.0, -1000.0]])
    assert torch.isfinite(L.soft_cross_entropy(-big, big))  # log_softmax: no -inf * 0


def test_metric_formulas_on_constructed_cases():
    logits_f = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    logits_t = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert vm.prediction_counts(logits_f, logits_t, labels) == {
        "correct_f": 3,
        "correct_theta": 2,
        "agree": 3,
        "n": 4,
    }
    concepts = torch.zeros(1, 4, 3, 3)
    concepts[0, :, 0, 0] = torch.tensor([1.0, 0.5, 0.05, 0.0])
    assert vm.active_concepts(concepts).tolist() == [2]
    weight = torch.tensor([[1.0, 3.0, -1.0, 5.0]])
    assert vm.top_relevant(concepts, weight, torch.tensor([0]), 2).tolist() == [[1, 0]]
    top = torch.tensor([[True, True, False, False]])
    # the random baseline prefers concepts that fire: concept 2 (0.05) before concept 3 (0.0)
    rand = vm.random_baseline(top, torch.tensor([[0.1, 0.2, 0.9, 0.0]]), vm.concept_activations(concepts) > 0)
    assert rand.tolist() == [[False, False, True, True]]
    one = vm.random_baseline(
        top[:, :3].clone(), torch.tensor([[0.1, 0.2, 0.9]]), torch.tensor([[True, True, True]])
    )
    assert one.tolist() == [[False, False, True]]
    scaled = vm.scale_selected(concepts, torch.tensor([[True, False, False, False]]), 0.0)
    assert scaled[0, 0].abs().sum() == 0 and torch.equal(scaled[0, 1], concepts[0, 1])


def test_faithfulness_is_the_papers_threshold_rule():
    """Important concepts: r_k / max|r| > tau; faithfulness: mean drop of p_f(class), random one beside it."""
    concepts = torch.zeros(3, 5, 3, 3)
    concepts[:, :, 1, 1] = torch.tensor(
        [[2.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0]]
    )
    weight = torch.tensor([[0.5, 0.6, 0.4, -2.0, 1.0], [-1.0, -0.5, -0.2, -0.1, 0.0]])
    r = vm.relevance(concepts, weight, torch.tensor([0, 1, 0]))
    # image 0: r = [1, .6, .4, -2, 0] -> normalised [.5, .3, .2, -1, 0]: tau 0.2 keeps 0 and 1 (0.2 is not > 0.2),
    # whatever a top-k would take; image 1: nothing positive; image 2: r = [0, 0, .4, -2, 1] -> [0, 0, .2, -1, .5]
    torch.testing.assert_close(vm.normalised_relevance(r)[0], torch.tensor([0.5, 0.3, 0.2, -1.0, 0.0]))
    mask = vm.relevant_mask(r, 0.2)
    assert [row.nonzero().flatten().tolist() for row in mask] == [[0, 1], [], [4]]
    assert vm.relevant_mask(r, 0.0).sum(1).tolist() == [3, 0, 2]
    f = vm.faithfulness(
        torch.tensor([0.9, 0.8, 0.5]), torch.tensor([0.3, 0.8, 0.2]), torch.tensor([0.85, 0.8, 0.5])
    )
    assert f["faithfulness"] == pytest.approx((0.6 + 0.0 + 0.3) / 3)
    assert f["faithfulness_random"] == pytest.approx(0.05 / 3)


def test_separability_probe_known_cases():
    """Consistency's probe: the same change on every image is separable (1.0), image-specific noise is not."""
    torch.manual_seed(0)
    original = torch.randn(40, 16)
    shifted = original + torch.tensor([8.0] + [0.0] * 15)  # one direction, every image, beyond the spread
    assert vm.separability(original, shifted) == 1.0
    noisy = original + torch.randn(40, 16)  # a different change per image: no common direction
    assert 0.3 <= vm.separability(original, noisy) <= 0.7
    # the L2-logistic fit is the minimiser: its gradient vanishes
    x, y = torch.randn(30, 3).double(), (torch.rand(30) < 0.5).double()
    w, b = vm.fit_logistic(x, y, l2=2.0)
    p = torch.sigmoid(x @ w + b)
    torch.testing.assert_close(
        x.T @ (p - y) / 30 + 2.0 / 30 * w, torch.zeros(3, dtype=torch.float64), atol=1e-7, rtol=0
    )
    torch.testing.assert_close((p - y).mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-7, rtol=0)


def test_alignment_null_is_what_unrelated_concepts_score():
    torch.manual_seed(0)
    attrs = (torch.rand(200, 12) < 0.3).long()
    aligned = attrs[:, :4].float() + 0.1 * torch.rand(200, 4)  # concepts that are attributes 0..3
    assert vm.mean_best_auc(vm.attribute_auc(aligned, attrs)) == pytest.approx(1.0)
    null = vm.alignment_null(aligned, attrs, permutations=10)
    assert null.shape == (10,) and 0.5 < float(null.mean()) < 0.7  # max over 12 attributes: above 0.5
    unrelated = torch.rand(200, 4)
    real = vm.mean_best_auc(vm.attribute_auc(unrelated, attrs))
    assert abs(real - float(vm.alignment_null(unrelated, attrs).mean())) < 0.05  # noise scores like its null


def test_attribute_auc_matches_pairwise_definition():
    torch.manual_seed(0)
    acts = torch.randint(0, 4, (40, 3)).float()  # many ties
    attrs = torch.randint(0, 2, (40, 2))
    auc = vm.attribute_auc(acts, attrs)
    for k in range(3):
        for a in range(2):
            pos, neg = acts[attrs[:, a] == 1, k], acts[attrs[:, a] == 0, k]
            diff = pos[:, None] - neg[None, :]
            expected = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
            assert auc[k, a].item() == pytest.approx(expected.item())
    perfect = vm.attribute_auc(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0, 1], [1, 1], [1, 1]]))
    assert perfect[0, 0].item() == 1.0 and math.isnan(perfect[0, 1].item())


def test_frozen_parts_receive_no_gradient_and_do_not_change(trained, parts, tmp_path, monkeypatch):
    """f's in-memory state (weights and BatchNorm buffers) and G's synthesis are the same objects' values
    before and after real training steps, while the trainable trio moved."""
    from core.rundir import prepare_run_dir
    from training import viscoin as tv

    seen = {}

    def capture(name, loader):
        def load(*args, **kwargs):
            module, meta = loader(*args, **kwargs)
            seen[name] = (module, {k: v.detach().clone() for k, v in module.state_dict().items()})
            return module, meta

        return load

    class Net(tv.VisCoINNet):
        def __init__(self, *args):
            super().__init__(*args)
            seen["net"] = (self, {k: v.detach().clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(tv, "load_classifier", capture("f", tv.load_classifier))
    monkeypatch.setattr(tv, "load_generator", capture("G", tv.load_generator))
    monkeypatch.setattr(tv, "VisCoINNet", Net)
    cfg = tv.VisCoINConfig.preset(
        "tiny",
        dict(
            world="small",
            classifier=str(parts / "clf"),
            generator=str(parts / "gan.safetensors"),
            iterations=2,
            warmup=0,
            eval_every=2,
            checkpoint_every=2,
            eval_images=8,
            device="cpu",
            amp=False,
            num_workers=0,
        ),
    )
    tv.train_viscoin(cfg, prepare_run_dir(tmp_path / "run", "t"), quiet=True)
    f, f_before = seen["f"]
    assert any("running_mean" in k for k in f_before) and any("num_batches_tracked" in k for k in f_before)
    assert not f.training and f_before.keys() == f.state_dict().keys()
    for key, value in f.state_dict().items():
        assert torch.equal(value, f_before[key]), key
    G, G_before = seen["G"]
    for key, value in G.state_dict().items():
        assert torch.equal(value, G_before[key]), key
    net, net_before = seen["net"]
    assert_only_viscoin_trained(net_before, net.state_dict())
    gan = load_file(str(parts / "gan.safetensors"))
    final = load_file(str(trained / "final.safetensors"))
    assert torch.equal(final["decoder.w_avg"], gan["mapping.w_avg"])
    # and in one explicit step: f's weights get no gradient, the synthesis neither, Psi does
    from models.classifiers import load_classifier

    f, _ = load_classifier(parts / "clf")
    f.eval().requires_grad_(False)
    G = Generator(**TINY_G)
    psi = ConceptExtractor(f.feature_channels, 4, 8)
    omega = ConceptDecoder.from_generator(G, 4, 3)
    _, feats = f(torch.rand(2, 3, 32, 32) * 2 - 1)
    c, s = psi(feats)
    x_hat, _ = omega(c, s)
    logits, _ = f(x_hat)
    (logits.sum() + x_hat.sum()).backward()
    assert all(p.grad is None for p in f.parameters()) and all(
        p.grad is None for p in omega.synthesis.parameters()
    )
    assert psi.conv5.weight.grad is not None and omega.heads[0].weight.grad is not None


def test_run_outputs_and_bundle_round_trip(trained, tmp_path):
    from models.viscoin_io import load_viscoin, save_bundle

    for name in ("best.safetensors", "last.safetensors", "final.safetensors", "last.pt", "log.jsonl"):
        assert (trained / name).is_file(), name
    val = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines() if '"val"' in x]
    assert [e["step"] for e in val] == [6, 12] and all(0 <= e["fidelity"] <= 1 for e in val)
    models = load_viscoin(trained)
    save_bundle(models, tmp_path / "bundle.pt")
    again = load_viscoin(tmp_path / "bundle.pt")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = models.encode(x), again.encode(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(models.decoder(a[1], a[2])[0], again.decoder(b[1], b[2])[0])

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"format": "biovis.viscoin-bundle", "meta": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="loads safely"):
        load_viscoin(tmp_path / "evil.pt")


def test_resume_reaches_the_same_weights(parts, tmp_path, monkeypatch):
    from core.rundir import prepare_run_dir
    from training import viscoin as tv

    overrides = dict(world="small", classifier=str(parts / "clf"), generator=str(parts / "gan.safetensors"),
                     iterations=8, eval_every=4, checkpoint_every=4, log_every=4, eval_images=8, device="cpu",
                     amp=False, num_workers=0)  # fmt: skip
    cfg = tv.VisCoINConfig.preset("tiny", overrides)
    whole = prepare_run_dir(tmp_path / "whole", "t")
    tv.train_viscoin(cfg, whole, quiet=True)

    real_save = tv.checkpoint.save_state

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(tv.checkpoint, "save_state", save_then_die)
    killed = prepare_run_dir(tmp_path / "killed", "t")
    with pytest.raises(KeyboardInterrupt):
        tv.train_viscoin(cfg, killed, quiet=True)
    monkeypatch.setattr(tv.checkpoint, "save_state", real_save)
    assert torch.load(killed / "last.pt", weights_only=True)["step"] == 4
    tv.train_viscoin(cfg, prepare_run_dir(killed, "t", resume=True), resume=True, quiet=True)
    a, b = load_file(str(whole / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_test_and_to_pickle(trained, tmp_path):
    def evaluate(bundle, out):
        result = run_cli("test", "viscoin", "--bundle", str(bundle), "--out", str(out), "--no-amp", "--quiet",
                         "--device", "cpu", "--consistency-images", "24")  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result, json.loads((out / "metrics.json").read_text())

    result, metrics = evaluate(trained, tmp_path / "t1")
    assert metrics["n"] == 64 and 0 <= metrics["accuracy_theta"] <= 1 and "alignment_mean_best_auc" in metrics
    assert "fidelity" in result.stdout and (tmp_path / "t1" / "reconstructions.png").is_file()
    assert metrics["faithfulness_threshold"] == 0.2 and -1 <= metrics["faithfulness_random"] <= 1
    assert 0.5 <= metrics["alignment_null_mean"] <= metrics["alignment_null_p95"] <= 1
    assert metrics["consistency_images"] == 24 and 0 <= metrics["consistency"] <= 1
    assert "random baseline" in result.stdout and "null (shuffled attributes)" in result.stdout
    bundle = tmp_path / "bundle.pt"
    assert run_cli("to-pickle", str(trained), "--out", str(bundle)).returncode == 0
    _, again = evaluate(bundle, tmp_path / "t2")
    for key in (
        "accuracy_f",
        "accuracy_theta",
        "fidelity",
        "accuracy_f_reconstructions",
        "l1",
        "l2",
        "faithfulness",
        "faithfulness_random",
        "consistency",
    ):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.slow
def test_bad_inputs(parts, trained, tmp_path):
    from models.stylegan2.checkpoint import save_generator

    save_generator(tmp_path / "g64.safetensors", Generator(**{**TINY_G, "img_resolution": 64}), {})
    assert_user_error(run_cli(*TRAIN, "--classifier", str(parts / "clf"), "--generator", str(tmp_path / "g64.safetensors"),
                   "--out", str(tmp_path / "r")), "64 px")  # fmt: skip
    assert_user_error(run_cli(*TRAIN, "--generator", str(parts / "gan.safetensors"), "--out", str(tmp_path / "r2")),
           "train classifier")  # fmt: skip
    before = snapshot(trained)
    assert_user_error(run_cli("test", "viscoin", "--bundle", str(trained), "--dataset", "cub", "--out", str(tmp_path / "t")),
           "trained on dataset 'world'")  # fmt: skip
    assert_user_error(
        run_cli("to-pickle", str(trained), "--out", str(trained / "config.yaml")), "--overwrite"
    )
    assert snapshot(trained) == before
    assert not Path(tmp_path / "r" / "final.safetensors").exists()


def test_evaluation_is_the_same_from_uint8_and_float_batches(viscoin):
    """test viscoin ships uint8 batches (converted on the device); every metric equals the float path's."""
    from torch.utils.data import DataLoader

    from datasets.registry import build_dataset, collate_skipping, resolve_meta
    from models.viscoin_io import load_viscoin
    from testing.viscoin.evaluate import evaluate_viscoin
    from testing.viscoin.report import data_spec_for

    models = load_viscoin(viscoin.bundle, device="cpu")
    spec = data_spec_for(models, None, None)
    meta = resolve_meta(spec, quiet=True)
    results = []
    for output in ("float", "uint8"):
        data = build_dataset(spec, "test", train_transform=False, meta=meta, attributes=None, output=output)
        loader = DataLoader(data, batch_size=16, collate_fn=collate_skipping)
        results.append(evaluate_viscoin(models, loader, torch.device("cpu"), amp=False, progress=False))
    floats, uint8s = ({k: v for k, v in r.items() if isinstance(v, float | int)} for r in results)
    assert floats.keys() == uint8s.keys() and len(floats) > 5
    assert floats == uint8s, (floats, uint8s)

"""The trainers' optimisation steps make no host sync (issue 15): each step function runs to its end while the
project's code may not turn a tensor into a host value (core.syncs.no_syncs), and returns tensors that hold
what the step computed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_viscoin import assert_only_viscoin_trained

from core.syncs import HostSyncError, count_syncs, no_syncs


def test_the_guard_refuses_each_conversion_and_counts_them():
    x = torch.ones(3)
    conversions = (lambda: x[0].item(), lambda: bool(x[0]), lambda: float(x[0]), lambda: int(x[0]),
                   lambda: x.tolist(), lambda: x.numpy(), lambda: x.cpu())  # fmt: skip
    for convert in conversions:
        with pytest.raises(HostSyncError), no_syncs():
            convert()
    with count_syncs(x.device) as counts:
        if torch.isfinite(x).all():
            x.sum().item()
    assert counts == {"__bool__": 1, "item": 1}
    assert x[0].item() == 1.0 and bool(x[0])  # restored


def test_classifier_step_makes_no_host_sync():
    from core.config import build
    from models.classifiers import build_classifier
    from training.classifier import ClassifierConfig, classifier_step
    from training.optim import build_optimizer

    torch.manual_seed(0)
    cfg = build(ClassifierConfig, dict(arch="tiny", image_size=16, label_smoothing=0.1))
    model = build_classifier("tiny", 5, "none")
    before = copy.deepcopy(model)
    optimizer = build_optimizer(model.parameters(), "adam", 1e-2)
    batch = {"image": torch.rand(6, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3, 4, 0])}
    with no_syncs():
        out = classifier_step(model, batch, optimizer, cfg)
    logits, _ = before.train()(batch["image"])
    expected = F.cross_entropy(logits, batch["label"], label_smoothing=0.1)
    assert torch.allclose(out["loss"], expected) and not out["loss"].requires_grad
    assert out["correct"] == (logits.argmax(1) == batch["label"]).sum()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True))


TINY_G = dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
              synthesis_kwargs=dict(channel_base=512, channel_max=32))  # fmt: skip


def test_viscoin_step_makes_no_host_sync():
    """With gradient accumulation and LPIPS: the parts' means add up to the loss, the trio moves, f, G and
    Omega's synthesis do not."""
    from models.classifiers import Classifier
    from models.stylegan2 import Generator
    from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer
    from testing.viscoin.evaluate import load_lpips
    from training.viscoin import StepModels, VisCoINConfig, VisCoINNet, viscoin_step

    torch.manual_seed(0)
    cfg = VisCoINConfig(n_concepts=6, latent_channels=8, batch_size=2, grad_accum=2, warmup=0,
                        lpips_weights="random", beta=3.0)  # fmt: skip
    f = Classifier("tiny", 5).eval().requires_grad_(False)
    G = Generator(**TINY_G).eval().requires_grad_(False)
    decoder = ConceptDecoder.from_generator(G, cfg.n_concepts, cfg.grid)
    net = VisCoINNet(ConceptExtractor(f.feature_channels, 6, 8, cfg.grid), Explainer(6, 5), decoder).train()
    optimisers = [torch.optim.Adam([*net.extractor.parameters(), *net.explainer.parameters()], lr=1e-3),
                  torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-3)]  # fmt: skip
    before = copy.deepcopy(net.state_dict())
    frozen = [copy.deepcopy(module.state_dict()) for module in (f, G)]
    with no_syncs():
        parts = viscoin_step(StepModels(f, G, net, load_lpips("random", "cpu")), torch.rand(4, 3, 32, 32) * 2 - 1,
                             optimisers, cfg, step=0)  # fmt: skip
    assert {"loss", "rec", "l1", "l2", "ce_rec", "lpips", "ortho", "w_reg", "of", "sparsity"} == set(parts)
    assert all(v.ndim == 0 and not v.requires_grad for v in parts.values())
    total = parts["rec"] + parts["ortho"] + cfg.w_reg * parts["w_reg"] + cfg.alpha * parts["of"]
    assert torch.allclose(parts["loss"], total + cfg.delta * parts["sparsity"])
    assert_only_viscoin_trained(before, net.state_dict())
    for module, state in zip((f, G), frozen, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("aug", ["none", "ada"])
def test_gan_train_step_makes_no_host_sync(aug):
    """Step 0 runs all four phases (path length and R1 included), with style mixing and D's augmentation."""
    from training.gan.trainer import GanConfig, new_state, train_step

    overrides = dict(pl_weight=2.0, style_mixing=0.9, device="cpu", aug=aug, aug_p=0.2, ada_interval=1)
    cfg = GanConfig.preset("tiny", overrides)
    state = new_state(cfg, torch.device("cpu"))
    before = copy.deepcopy(state.D.state_dict())
    torch.manual_seed(0)
    with no_syncs():
        out = train_step(state, torch.rand(8, 3, 32, 32) * 2 - 1, cfg, world=1, amp=False)
    assert {"window", "pl", "pl_mean", "r1"} <= set(out) and torch.isfinite(out["window"]).all()
    assert all(torch.is_tensor(v) for v in out.values()) and state.step == 1
    assert any(not torch.equal(v, before[k]) for k, v in state.D.state_dict().items())


def test_style_mixing_switches_every_image_to_the_second_latent_at_one_cutoff():
    """NVlabs' rule, drawn on the device: with probability p a cutoff in [1, num_ws) for the whole batch."""
    from models.stylegan2 import Generator
    from training.gan.trainer import generate

    torch.manual_seed(0)
    G = Generator(**TINY_G)
    cutoffs = []
    for _ in range(12):
        z = torch.randn(2, G.z_dim)
        _, plain = generate(G, z, 0.0)
        _, ws = generate(G, z, 0.5)
        own = (ws == plain[:, :1]).all(2)  # [N, num_ws]: the rows still from z's own latent
        cutoff = int(own[0].sum())
        assert torch.equal(own, (torch.arange(G.num_ws) < cutoff).expand_as(own)), "one prefix for the batch"
        cutoffs.append(cutoff)
    assert min(cutoffs) >= 1 and G.num_ws in cutoffs and len(set(cutoffs)) > 2

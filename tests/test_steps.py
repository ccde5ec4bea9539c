"""The trainers' optimisation steps make no host sync (issue 15): each step function runs to its end while the
project's code may not turn a tensor into a host value (core.syncs.no_syncs), and returns tensors that hold
what the step computed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

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
    from models.classifiers import build_classifier
    from training.classifier import ClassifierConfig, classifier_step
    from training.optim import build_optimizer

    torch.manual_seed(0)
    cfg = ClassifierConfig(arch="tiny", image_size=16, label_smoothing=0.1)
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

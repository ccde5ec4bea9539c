"""ADA (training/gan/augment.py): the twice-differentiable resampling, the transforms' invariants, the p controller
on a discriminator that overfits a tiny set versus one that cannot, and ADA with R1 in the real training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gan_training import one_thread  # noqa: F401  (autouse: these small networks on one thread)

from training.gan.augment import AugmentPipe, grid_sample
from training.gan.losses import d_logistic, r1_penalty
from training.gan.trainer import GanConfig, build_networks, new_state, train_step


def _grid(n: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    theta = torch.tensor([[0.9, 0.3, 0.1], [-0.2, 1.2, -0.4]], dtype=dtype).expand(n, 2, 3)
    return F.affine_grid(theta, [n, 3, h, w], align_corners=False)


def test_grid_sample_forward_and_both_derivatives():
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 5, 6, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    grid = _grid(2, 7, 4)
    native = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert torch.equal(grid_sample(x, grid), native)
    assert torch.autograd.gradcheck(lambda a: grid_sample(a, grid), (x,))
    assert torch.autograd.gradgradcheck(lambda a: grid_sample(a, grid), (x,))  # what R1 needs


def test_r1_through_the_resampling_matches_autograd_on_the_plain_op():
    """D-weight gradients of R1 = |d D(sample(x)) / dx|^2 equal those of torch's own grid_sample where this torch
    differentiates its backward (2.14 does on CPU; NVlabs' crash was on older versions and its gradfix)."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    grid = _grid(2, 8, 8)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    grads = []
    for sample in (
        grid_sample,
        lambda a, g: F.grid_sample(a, g, padding_mode="reflection", align_corners=False),
    ):
        w = weight.clone().requires_grad_(True)
        x_in = x.clone().requires_grad_(True)
        logits = F.conv2d(torch.tanh(sample(x_in, grid)), w).square().sum(dim=(1, 2, 3))
        try:
            r1_penalty(x_in, logits).sum().backward()
        except RuntimeError as err:  # torch without grid_sampler_2d_backward's derivative: nothing to compare
            pytest.skip(f"this torch cannot differentiate grid_sample twice: {err}")
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_transforms_identity_at_p0_and_invariants_at_p1():
    torch.manual_seed(2)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    pipe = AugmentPipe(0.0)
    assert torch.equal(pipe(images), images)  # p = 0: untouched, bit for bit
    pipe.p.fill_(1.0)
    out = pipe(images)
    assert out.shape == images.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - images).abs().mean() > 0.1
    # a flat grey image stays flat (reflection padding, one matrix per image) and grey (hue and saturation turn
    # around the luma axis; brightness, contrast and luma flip move grey along it)
    grey = torch.full((16, 3, 16, 16), 0.3)
    out = pipe(grey)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, out.mean(dim=(2, 3), keepdim=True).expand_as(out), atol=1e-5, rtol=0)
    assert out[:, 0, 0, 0].std() > 0.05  # ... by a different amount per image


def _ada_on(real_source, fake_source, warmup: int = 40, steps: int = 32) -> list[float]:
    """A tiny 16 px D trained on (real, fake) batches, then `steps` more with the ADA controller (ada_kimg 0.8:
    +-0.04 per adjustment of 4 steps x 8 reals): p after every adjustment."""
    cfg = GanConfig.preset("tiny", {"device": "cpu", "image_size": 16})
    torch.manual_seed(0)
    _, D = build_networks(cfg)
    opt = torch.optim.Adam(D.parameters(), lr=0.005, betas=(0.0, 0.99))
    pipe, history = AugmentPipe(0.0), []
    for step in range(warmup + steps):
        real, fake = real_source(), fake_source()
        real_logits = D(pipe(real))
        loss = d_logistic(real_logits, D(pipe(fake)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:
            pipe.observe(real_logits)
            if (step + 1 - warmup) % 4 == 0:
                pipe.adjust(0.6, len(real) * 4, 0.8)
                history.append(float(pipe.p))
    return history


def test_ada_p_rises_when_d_overfits_a_tiny_set_and_stays_near_zero_otherwise(small_world):
    from datasets.registry import DataSpec, build_dataset

    data = build_dataset(DataSpec("world", world="small", image_size=32), "train", train_transform=False)
    pool = F.avg_pool2d(torch.stack([data[i]["image"] for i in range(len(data))]), 2)
    overfit = _ada_on(lambda: pool[:8], lambda: pool[8:16])  # D memorises which 8 images are "real"
    g = torch.Generator().manual_seed(0)
    draw = lambda: pool[torch.randint(0, len(pool), (8,), generator=g)]  # noqa: E731
    same = _ada_on(draw, draw)  # reals and "fakes" from one distribution: nothing to memorise
    rises = sum(b > a for a, b in zip([0.0, *overfit], overfit, strict=False))
    assert overfit[-1] >= 0.16 and rises >= 6, overfit  # r_t = E[sign D(real)] > 0.6: p climbs
    assert max(same) <= 0.04, same  # r_t well below 0.6: p stays at 0 (one step up at most)


def test_ada_and_r1_train_together(tmp_path):
    """The training step with ADA and R1 at step 0 (R1's double backward runs through the augmentation); p, its
    statistics and r_t travel with the resume state."""
    cfg = GanConfig.preset("tiny", {"aug": "ada", "aug_p": 0.5, "ada_interval": 2, "ada_kimg": 0.1,
                           "gamma": 1.0, "device": "cpu"})  # fmt: skip
    state = new_state(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    first = train_step(state, real, cfg, world=1, amp=False)
    assert "r1" in first and torch.isfinite(first["r1"]) and first["r1"] > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in state.D.parameters())
    second = train_step(state, real, cfg, world=1, amp=False)
    assert "ada_r_t" in second and -1 <= float(second["ada_r_t"]) <= 1
    expected = min(1.0, max(0.0, 0.5 + float(torch.sign(second["ada_r_t"] - 0.6)) * 16 / 100))
    assert float(second["aug_p"]) == pytest.approx(expected)  # one adjustment of 2 steps x 8 images
    resume = state.to_resume_state(cfg)
    again = new_state(cfg, torch.device("cpu"))
    torch.save(resume, tmp_path / "last.pt")
    again.load(torch.load(tmp_path / "last.pt", weights_only=True))
    assert (
        float(again.augment.p) == float(state.augment.p)
        and again.augment.sign_count == state.augment.sign_count
    )
    fixed = GanConfig.preset("tiny", {"aug": "fixed", "aug_p": 0.3, "device": "cpu"})
    s = new_state(fixed, torch.device("cpu"))
    for _ in range(3):
        out = train_step(s, real, fixed, world=1, amp=False)
    assert float(out["aug_p"]) == pytest.approx(0.3) and "ada_r_t" not in out

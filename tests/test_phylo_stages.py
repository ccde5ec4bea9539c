"""Phylo-NN's two stages: the VQGAN losses against hand computations (hinge, adaptive weight, perceptual term,
codebook and commitment), the patch discriminator, the disentangler's losses (orthogonality, the level heads'
weighting, the adversary's gradient path), the cosine schedule, and both models with their checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)
from torch import nn

from core.errors import UserError
from models.lpips import LPIPS
from models.phylo import (
    VQGAN,
    CodePrior,
    PatchDiscriminator,
    PhyloDisentangler,
    PhyloNN,
    codebook_commitment,
    load_phylo,
    load_vqgan,
    save_phylo,
    save_vqgan,
)
from training.phylo.losses import (
    adaptive_weight,
    adversary_loss,
    confusion_loss,
    cosine_warm_restarts,
    disc_factor,
    disentangler_losses,
    hinge_d_loss,
    hinge_g_loss,
    kernel_orthogonality,
    phylo_loss,
    reconstruction_loss,
    vqgan_discriminator_losses,
    vqgan_generator_losses,
)


def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(image_size=16, latent_size=4, channels=8, channel_mult=[1, 2, 2], res_blocks=1, z_channels=16,
                 embed_dim=8, n_embed=32)  # fmt: skip


def tiny_disentangler(group_counts=(2, 3, 5)) -> PhyloDisentangler:
    torch.manual_seed(1)
    return PhyloDisentangler(16, 4, list(group_counts), channels=12, phylo_channels=8, embed_dim=4, n_embed=16,
                             codes_per_level=2, free_codes=3, adversary_hidden=16)  # fmt: skip


# ------------------------------------------------------------------------------------------ stage 1


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = 0, 0.5, 2 -> 5/6; relu(1 + fake) = 0, 1, 2 -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0  # past the margins
    assert (disc_factor(9, 10), disc_factor(10, 10), disc_factor(11, 10, 0.5)) == (0.0, 1.0, 0.5)


def test_adaptive_weight_on_a_toy_decoder_by_hand():
    """Last layer out = W h + b on fixed h: d/dW of mean((out - t)^2) is 2/(N K) (out - t)^T h and of
    -mean(out[:, 0]) is -1/N sum_n h_n in row 0; the weight is the ratio of their norms."""
    torch.manual_seed(0)
    h, t = torch.randn(5, 3), torch.randn(5, 2)
    last = nn.Linear(3, 2)
    out = last(h)
    rec = (out - t).square().mean()
    g = -out[:, 0].mean()
    weight = adaptive_weight(rec, g, last.weight, scale=0.8)
    hn, outn, tn = h.numpy(), out.detach().numpy(), t.numpy()
    rec_grad = 2 / (5 * 2) * (outn - tn).T @ hn
    g_grad = np.zeros((2, 3))
    g_grad[0] = -hn.sum(0) / 5
    expected = np.linalg.norm(rec_grad) / (np.linalg.norm(g_grad) + 1e-4) * 0.8
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad and last.weight.grad is None  # detached; nothing accumulated
    flat = adaptive_weight(rec, 0.0 * out.sum(), last.weight)  # no adversarial gradient: clamped at 1e4
    assert flat.item() == pytest.approx(1e4)


class FixedLPIPS(nn.Module):
    """LPIPS stand-in with known per-image distances."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, x, y):
        return self.values


def test_reconstruction_loss_with_and_without_lpips():
    x = torch.zeros(2, 3, 2, 2)
    recon = torch.cat([torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -1.0)])
    plain = reconstruction_loss(x, recon)
    assert plain["l1"].item() == pytest.approx(0.75) and plain["perceptual"].item() == 0
    assert plain["nll"].item() == pytest.approx(0.75)
    perceptual = reconstruction_loss(x, recon, FixedLPIPS([0.2, 0.6]), perceptual_weight=2.0)
    assert perceptual["perceptual"].item() == pytest.approx(0.4)
    assert perceptual["nll"].item() == pytest.approx(0.75 + 2.0 * 0.4)  # per-image LPIPS broadcast per pixel
    real = LPIPS("random")  # the project's LPIPS, offline weights: a module is accepted as is
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    terms = reconstruction_loss(images, images.flip(3), real)
    assert terms["perceptual"].item() == pytest.approx(real(images, images.flip(3)).mean().item())
    assert reconstruction_loss(images, images, real)["nll"].item() == pytest.approx(0.0, abs=1e-6)


def test_codebook_and_commitment_values_and_gradients():
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8]], requires_grad=True)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    codebook, commitment = codebook_commitment(z, e)
    expected = ((0.1**2 + 0.2**2) + (0.1**2 + 0.2**2)) / 4
    assert codebook.item() == pytest.approx(expected) and commitment.item() == pytest.approx(expected)
    codebook.backward()
    assert z.grad is None and torch.allclose(e.grad, 2 * (e - z).detach() / 4)  # moves only the entries
    e.grad = None
    commitment.backward()
    assert e.grad is None and torch.allclose(
        z.grad, 2 * (z - e).detach() / 4
    )  # moves only the encoder output


def test_moving_average_codebook_and_restarts_by_hand():
    """decay d: count <- d count + (1 - d) n, sum <- d sum + (1 - d) sum of assigned vectors, entry <- sum / count
    (Laplace-smoothed); an eval-mode forward changes nothing; restarts move only the unused entries."""
    from models.phylo import VectorQuantizer

    vq = VectorQuantizer(3, 2, decay=0.5)
    assert not vq.embedding.weight.requires_grad and {"ema_count", "ema_sum"} <= set(vq.state_dict())
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
        vq.ema_sum.copy_(vq.embedding.weight)
    z = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.2, 1.0]])  # two vectors choose entry 0, one entry 1
    vq.eval()
    vq(z)
    assert torch.equal(vq.embedding.weight[0], torch.zeros(2))  # eval mode: no update
    vq.train()
    _, indices, _ = vq(z)
    assert indices.tolist() == [0, 0, 1]
    count = torch.tensor([0.5 + 0.5 * 2, 0.5 + 0.5 * 1, 0.5])
    sums = torch.tensor([[0.5 * 0.2, 0.5 * 0.4], [0.5 + 0.6, 0.5 + 0.5], [2.5, 2.5]])
    assert torch.allclose(vq.ema_count, count)
    total = count.sum()
    smoothed = (count + 1e-5) / (total + 3e-5) * total
    assert torch.allclose(vq.embedding.weight, sums / smoothed[:, None])
    moved = vq.restart_unused(torch.tensor([2, 1, 0]), z)
    assert moved.item() == 1 and torch.allclose(vq.embedding.weight[:2], sums[:2] / smoothed[:2, None])
    assert any(torch.equal(vq.embedding.weight[2], row) for row in z)  # onto one of the encoder outputs
    assert torch.equal(vq.ema_sum[2], vq.embedding.weight[2]) and vq.ema_count[2].item() == 1.0


def test_patch_discriminator_layout_and_init():
    torch.manual_seed(0)
    d = PatchDiscriminator(width=16, n_layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6: one logit per patch
    assert PatchDiscriminator(width=8)(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(norms) == 2 and convs[0].bias is not None and convs[1].bias is None
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and all(
        abs(n.weight.mean().item() - 1) < 0.01 for n in norms
    )


def test_vqgan_step_losses_add_up_and_switch_on_at_disc_start():
    model, disc = tiny_vqgan(), PatchDiscriminator(width=8, n_layers=2)
    x = torch.rand(3, 3, 16, 16) * 2 - 1

    class Refuse(nn.Module):
        def forward(self, x):
            raise AssertionError("the discriminator ran before disc_start")

    early = vqgan_generator_losses(model, Refuse(), x, step=4, disc_start=5)
    assert early["g_loss"].item() == 0 and early["d_weight"].item() == 0
    assert early["loss"].item() == pytest.approx(early["nll"].item() + early["vq"].item())
    assert vqgan_discriminator_losses(Refuse(), x, early["recon"], step=4, disc_start=5)["loss"].item() == 0
    late = vqgan_generator_losses(model, disc, x, step=5, disc_start=5, codebook_weight=2.0, disc_weight=0.5)
    expected = late["nll"] + late["d_weight"] * late["g_loss"] + 2.0 * late["vq"]
    assert late["loss"].item() == pytest.approx(expected.item()) and late["d_weight"].item() > 0
    assert late["vq"].item() == pytest.approx((late["codebook"] + 0.25 * late["commitment"]).item())
    late["loss"].backward()
    assert model.last_layer.grad.abs().sum() > 0 and model.encoder.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())  # the generator's step leaves D untouched
    model.zero_grad(set_to_none=True)
    d = vqgan_discriminator_losses(disc, x, late["recon"], step=5, disc_start=5, disc_factor_value=0.5)
    with torch.no_grad():  # train-mode batch norm: the same batches give the same logits again
        expected = 0.5 * hinge_d_loss(disc(x), disc(late["recon"]))
    assert d["loss"].item() == pytest.approx(expected.item())
    d["loss"].backward()
    assert all(p.grad is not None for p in disc.parameters()) and all(
        p.grad is None for p in model.parameters()
    )


def test_vqgan_codes_round_trip_and_shapes():
    model = tiny_vqgan().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out["recon"].shape == x.shape and out["features"].shape == (2, 16, 4, 4)
    codes = model.encode_codes(x)
    assert codes.shape == (2, model.sequence_length) == (2, 16)
    assert torch.equal(codes, out["indices"].flatten(1))
    assert torch.allclose(model.decode_codes(codes), out["recon"], atol=1e-5)
    assert torch.allclose(model.decode_features(out["features"]), out["recon"], atol=1e-5)
    assert model.last_layer is model.decoder.conv_out.weight
    with pytest.raises(UserError, match="must divide --image-size"):
        VQGAN(image_size=16, latent_size=3)


# ------------------------------------------------------------------------------------------ stage 2


def test_kernel_orthogonality_by_hand():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    assert kernel_orthogonality(q[:4].view(4, 6, 1, 1)).item() == pytest.approx(
        0.0, abs=1e-5
    )  # orthonormal rows
    assert kernel_orthogonality(2 * torch.eye(3).view(3, 3, 1, 1)).item() == pytest.approx(3 * math.sqrt(3))
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    # W * W: output (a, b) is the sum over channels and taps of w[a] w[b] (a 1x1 map for a 3x3 kernel)
    gram = torch.einsum("aikl,bikl->ab", w, w)
    assert kernel_orthogonality(w).item() == pytest.approx((gram - torch.eye(3)).norm().item(), rel=1e-5)


def test_phylo_loss_puts_the_species_inside_the_beta_weighted_sum():
    torch.manual_seed(0)
    logits = [torch.randn(4, n, requires_grad=True) for n in (2, 3, 5)]
    groups = torch.tensor([[0, 1, 0, 1], [0, 2, 1, 2], [0, 4, 2, 3]])
    ce = [F.cross_entropy(lg, g) for lg, g in zip(logits, groups, strict=True)]
    beta = 0.5
    total = phylo_loss(logits, groups, beta)
    assert total.item() == pytest.approx((beta * (ce[0] + ce[1] + ce[2]) + (1 - beta) * ce[2]).item())
    total.backward()
    (species_grad,) = torch.autograd.grad(ce[2], logits[2])
    assert torch.allclose(logits[2].grad, species_grad)  # the species' weight is 1 at any beta
    assert torch.allclose(logits[0].grad, beta * torch.autograd.grad(ce[0], logits[0])[0])
    only_species = phylo_loss(logits[-1:], groups[-1:], beta)
    assert only_species.item() == pytest.approx(ce[2].item())


def test_confusion_is_zero_for_a_uniform_adversary_and_log_c_for_a_certain_one():
    assert confusion_loss(torch.zeros(3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    assert confusion_loss(torch.tensor([[100.0, 0, 0, 0]])).item() == pytest.approx(math.log(4), abs=1e-4)


def test_disentangler_losses_and_their_gradient_paths():
    model = tiny_disentangler()
    features = torch.randn(6, 16, 4, 4)
    groups = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0]])
    losses = disentangler_losses(model, features, groups, level_beta=0.5, phylo_weight=0.1, adv_weight=0.2,
                                 ortho_weight=3.0)  # fmt: skip
    parts = (
        losses["rec"]
        + losses["vq"]
        + 3.0 * losses["ortho"]
        + 0.1 * losses["phylo"]
        + 0.2 * losses["confusion"]
    )
    assert losses["loss"].item() == pytest.approx(parts.item())
    assert losses["ortho"].item() == pytest.approx(kernel_orthogonality(model.conv_in.weight).item())
    losses["confusion"].backward(retain_graph=True)
    free, phylo = model.free.to_codes.weight.grad, model.phylo.to_codes.weight.grad
    assert free is not None and free.abs().sum() > 0  # the free part learns to confuse the adversary
    assert phylo is None or phylo.abs().sum() == 0  # the phylo part does not
    assert model.conv_in.weight.grad.abs().sum() > 0  # through the shared kernel
    assert all(p.grad is None for p in model.adversary.parameters())  # the adversary itself is frozen here
    model.zero_grad(set_to_none=True)
    adv = adversary_loss(model.adversary, losses["free"], groups[-1])
    adv.backward()
    assert all(p.grad is not None for p in model.adversary.parameters())
    assert model.free.to_codes.weight.grad is None  # its own step trains only itself
    out = model(features)
    assert out["codes"].shape == (6, model.sequence_length) == (6, 9)
    assert [lg.shape[1] for lg in out["level_logits"]] == [2, 3, 5]


def test_phylo_nn_keeps_stage_one_frozen_and_decodes_through_it(tmp_path):
    stage1, disentangler = tiny_vqgan(), tiny_disentangler()
    model = PhyloNN(stage1, disentangler).train()
    assert not stage1.training and not any(p.requires_grad for p in stage1.parameters())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = model(x)
    assert torch.allclose(out["target"], stage1.encode_features(x))
    groups = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0], [0, 1, 2, 3]])
    disentangler_losses(model.disentangler, out["target"], groups)["loss"].backward()
    assert all(p.grad is None for p in stage1.parameters())
    model.eval()
    codes = model.encode_codes(x)
    assert codes.shape == (4, model.sequence_length) and list(model.level_positions(1)) == list(range(4))
    assert list(model.free_positions) == [6, 7, 8] and model.config["image_size"] == 16
    expected = stage1.decode_features(disentangler.decode_codes(codes))
    assert torch.allclose(model.decode_codes(codes), expected) and torch.allclose(
        model.reconstruct(x), expected
    )
    prior = CodePrior(16, model.sequence_length, n_conditions=10, width=16, layers=1, heads=2)
    save_phylo(tmp_path / "phylo.safetensors", model, prior, {"phylogeny": {}})
    loaded = load_phylo(tmp_path / "phylo.safetensors")
    assert isinstance(loaded.autoencoder, PhyloNN) and loaded.meta["architecture"] == "vqgan+disentangler"
    assert torch.equal(loaded.autoencoder.encode_codes(x), codes)
    assert torch.allclose(loaded.autoencoder.decode_codes(codes), expected)
    with pytest.raises(UserError, match="the disentangler reads 16 x 8"):
        PhyloNN(stage1, PhyloDisentangler(16, 8, [2, 3]))


def test_vqgan_checkpoint_round_trip_with_its_discriminator(tmp_path):
    model, disc = tiny_vqgan().eval(), PatchDiscriminator(width=8, n_layers=2).eval()
    (tmp_path / "run" / "stage1").mkdir(parents=True)
    save_vqgan(tmp_path / "run" / "stage1" / "vqgan.safetensors", model, {"source": "test"}, disc)
    loaded, loaded_disc, meta, path = load_vqgan(tmp_path / "run", discriminator=True)  # a run folder
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert meta["kind"] == "vqgan" and path.name == "vqgan.safetensors"
    assert torch.equal(loaded.encode_codes(x), model.encode_codes(x))
    assert torch.allclose(loaded_disc(x), disc(x))
    assert load_vqgan(path)[1] is None  # the discriminator only when asked for
    prior = CodePrior(16, 9, n_conditions=4, width=16, layers=1, heads=2)
    save_phylo(tmp_path / "p.safetensors", PhyloNN(model, tiny_disentangler()), prior, {})
    with pytest.raises(UserError, match="is not a stage-1 VQGAN checkpoint .kind: 'phylo-nn'"):
        load_vqgan(tmp_path / "p.safetensors")


# ----------------------------------------------------------------------------------------- schedule


def test_cosine_warm_restarts_match_sgdr():
    params = [nn.Parameter(torch.zeros(1))]
    ours = torch.optim.SGD(params, lr=0.1)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = cosine_warm_restarts(ours, cycle=7, floor=0.01)
    sgdr = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(reference, T_0=7, eta_min=0.1 * 0.01)
    for _ in range(30):
        assert ours.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9)
        ours.step()
        reference.step()
        schedule.step()
        sgdr.step()
    lrs = []
    fresh = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    again = cosine_warm_restarts(fresh, cycle=4, floor=0.1)
    for _ in range(9):
        lrs.append(fresh.param_groups[0]["lr"])
        fresh.step()
        again.step()
    assert lrs[0] == lrs[4] == lrs[8] == 1.0 and lrs[2] == pytest.approx(0.55)  # restarts every 4 steps

"""Conditional VAEs: a convolutional one for images, an MLP for vectors, both given any subset of conditions.

The condition vector holds the class as a one-hot times its presence bit, the presence bit, then every
attribute's value times its presence bit and the presence bits (the CVAE testbed's [values, indicators]
layout): `[onehot * p_c, p_c, a * m, m]`, of size `num_classes + 1 + 2 * num_attributes`. A missing condition
is therefore a zero value *and* a zero indicator, never a value that happens to be zero. Encoder q(z | x, c),
decoder p(x | z, c) and, with `prior="learned"`, a learned prior p(z | c) = N(m(c), I) (Sohn et al. 2015) all read it:
samples are drawn from the prior of their conditions, so a latent that also carries the class cannot contradict it.
`prior="standard"` is the testbed's N(0, I) for every condition, so the KL charges every bit a latent carries.
Checkpoints made before the choice existed have a learned prior.
Samples: a trained model's encodings of its training images need not fill its prior (measured on the world's
birds: the N(0, I) prior's encoder keeps the species in z, so prior samples of one class show any species;
the learned prior's class means are right but its encodings spread 1.3 standard units around them, so unit-
variance samples are templates). `fit_latents` stores the training images' aggregate posterior around the prior
mean as a Gaussian per class and dimension (and one over all images, for conditions without a class), and
`sample_latent` draws from it (ex-post density estimation, Ghosh et al. 2020); a model without a fit samples its
prior. The decoder's likelihood is a Gaussian of fixed standard deviation `sigma` (a training setting; the
testbed's summed squared error is sigma^2 = 1/2 without the constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.errors import UserError
from models.blocks import down_path

ARCHS = ("conv", "mlp")
PRIORS = ("learned", "standard")
KIND = "cvae"


def condition_vector(
    num_classes: int,
    labels: torch.Tensor | None,
    label_present: torch.Tensor | None,
    attributes: torch.Tensor | None,
    attribute_present: torch.Tensor | None,
    num_attributes: int,
    batch: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[N, num_classes + 1 + 2K] conditions; None for a part means "not given" for every row."""
    parts = []
    if num_classes:
        if labels is None:
            parts.append(torch.zeros(batch, num_classes + 1, device=device))
        else:
            present = label_present.float().view(-1, 1)
            onehot = torch.nn.functional.one_hot(labels.long().clamp(min=0), num_classes).float()
            parts += [onehot * present, present]
    if num_attributes:
        if attributes is None:
            parts.append(torch.zeros(batch, 2 * num_attributes, device=device))
        else:
            mask = attribute_present.float()
            parts += [attributes.float() * mask, mask]
    if not parts:
        return torch.zeros(batch, 0, device=device)
    return torch.cat(parts, dim=1)


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | float = 0.0,
    prior_logvar: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per dimension:
    0.5 (prior_logvar - logvar + (e^logvar + (mu - prior_mu)^2) / e^prior_logvar - 1); the prior defaults to N(0, 1)."""
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    return 0.5 * (
        prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).square()) / prior_logvar.exp() - 1.0
    )


def gaussian_nll(x: torch.Tensor, recon: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x; recon, sigma^2 I) per sample: 0.5 sum((x - recon) / sigma)^2 + D (log sigma + 0.5 log 2 pi)."""
    d = x[0].numel()
    squared = (recon.float().flatten(1) - x.float().flatten(1)).square().sum(1)
    return 0.5 * squared / sigma**2 + d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def elbo_terms(
    x: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    sigma: float = 1.0,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample reconstruction NLL (Gaussian of std `sigma`) and KL to the `prior` (mean, log-variance; N(0, 1)
    when None), so that `-(rec + kl)` is the ELBO in nats; their beta-weighted batch mean `loss`; and the
    batch-mean KL of every latent dimension `kl_per_dim`."""
    rec = gaussian_nll(x, recon, sigma)
    prior_mu, prior_logvar = (p.float() for p in prior) if prior is not None else (0.0, 0.0)
    kl_dims = gaussian_kl(mu.float(), logvar.float(), prior_mu, prior_logvar)
    kl = kl_dims.sum(1)
    return {"loss": (rec + beta * kl).mean(), "rec": rec, "kl": kl, "kl_per_dim": kl_dims.mean(0)}


def _widths(image_size: int, channels: int, max_channels: int) -> list[int]:
    """Channels at each resolution from `image_size` down to 4 (doubling per halving, capped)."""
    steps = int(math.log2(image_size // 4))
    return [min(channels * 2**i, max_channels) for i in range(steps + 1)]


class ConvEncoder(nn.Module):
    def __init__(self, widths: list[int], depth: int, cond_dim: int, hidden: int, latent: int):
        super().__init__()
        self.features = down_path(widths, depth)
        self.head = nn.Sequential(
            nn.Linear(widths[-1] * 16 + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.features(x).flatten(1), c], dim=1))


class UpBlock(nn.Module):
    """A stride-2 4x4 transposed conv (x2, as `models.blocks.up_path`) and `depth - 1` 3x3 convs; the
    condition enters as a per-channel bias after the first."""

    def __init__(self, cin: int, cout: int, cond_dim: int, depth: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1)
        self.cond = nn.Linear(cond_dim, cout) if cond_dim else None
        self.rest = nn.Sequential(
            *(m for _ in range(depth - 1) for m in (nn.Conv2d(cout, cout, 3, 1, 1), nn.SiLU()))
        )
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv(h)
        if self.cond is not None:
            h = h + self.cond(c)[:, :, None, None]
        return self.rest(self.act(h))


class ConvDecoder(nn.Module):
    def __init__(self, widths: list[int], depth: int, cond_dim: int, hidden: int, latent: int):
        super().__init__()
        widths = widths[::-1]
        self.start = widths[0]
        self.stem = nn.Sequential(
            nn.Linear(latent + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, widths[0] * 16), nn.SiLU()
        )
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.blocks = nn.ModuleList(UpBlock(a, b, cond_dim, depth) for a, b in pairs)
        self.out = nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([z, c], dim=1)).view(-1, self.start, 4, 4)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    """`forward(x, c) -> (recon, mu, logvar)`; `decode(z, c)` samples; `config` rebuilds it.

    conv: `channels` at full resolution, doubling per halving down to 4x4 (capped at `max_channels`), `depth`
    convs per resolution, a dense layer of `hidden` at the bottleneck; mlp: `layers` dense layers of `hidden`."""

    def __init__(
        self,
        arch: str = "conv",
        x_shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 0,
        num_attributes: int = 0,
        latent_dim: int = 16,
        channels: int = 32,
        max_channels: int = 128,
        hidden: int = 256,
        layers: int = 3,
        depth: int = 1,
        prior: str = "learned",
        fitted: bool = False,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown CVAE architecture {arch!r}; choices: {', '.join(ARCHS)}")
        if prior not in PRIORS:
            raise UserError(f"unknown CVAE prior {prior!r}; choices: {', '.join(PRIORS)}")
        x_shape = tuple(int(s) for s in x_shape)
        if arch == "conv":
            size = x_shape[-1]
            if len(x_shape) != 3 or x_shape[0] != 3 or x_shape[1] != size or size < 8 or size & (size - 1):
                raise UserError(
                    f"the conv CVAE needs square RGB images of a power-of-two size >= 8, got {x_shape}"
                )
        self.arch, self.x_shape, self.prior_kind = arch, x_shape, prior
        self.num_classes, self.num_attributes, self.latent_dim = num_classes, num_attributes, latent_dim
        self._config = dict(arch=arch, x_shape=list(x_shape), num_classes=num_classes, num_attributes=num_attributes,
                            latent_dim=latent_dim, channels=channels, max_channels=max_channels, hidden=hidden,
                            layers=layers, depth=depth, prior=prior, fitted=fitted)  # fmt: skip
        cond = self.cond_dim
        if arch == "conv":
            widths = _widths(x_shape[-1], channels, max_channels)
            self.encoder = ConvEncoder(widths, depth, cond, hidden, latent_dim)
            self.decoder = ConvDecoder(widths, depth, cond, hidden, latent_dim)
        else:
            x_dim = math.prod(x_shape)
            self.encoder = _mlp([x_dim + cond] + [hidden] * layers + [2 * latent_dim])
            self.decoder = _mlp([latent_dim + cond] + [hidden] * layers + [x_dim])
        if prior == "learned":
            # The conditional prior p(z | c) = N(m(c), I): starts as N(0, I), learns where each condition's latents lie.
            self.prior = _mlp([max(cond, 1), hidden, latent_dim])
            nn.init.zeros_(self.prior[-1].weight)
            nn.init.zeros_(self.prior[-1].bias)
        self.fitted = False
        if fitted:  # filled by the checkpoint's weights
            self.fit_latents(
                torch.zeros(max(num_classes, 1), latent_dim),
                torch.ones(max(num_classes, 1), latent_dim),
                torch.zeros(latent_dim),
                torch.ones(latent_dim),
            )

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def cond_dim(self) -> int:
        return (self.num_classes + 1 if self.num_classes else 0) + 2 * self.num_attributes

    def conditions(
        self, batch: int, labels=None, label_present=None, attributes=None, attribute_present=None
    ):
        """The condition vector for a batch (see `condition_vector`), on the model's device."""
        device = next(self.parameters()).device
        if labels is not None and label_present is None:
            label_present = torch.ones(batch, device=device)
        if attributes is not None and attribute_present is None:
            attribute_present = torch.ones_like(attributes)
        return condition_vector(self.num_classes, labels, label_present, attributes, attribute_present,
                                self.num_attributes, batch, device)  # fmt: skip

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arch == "conv":
            stats = self.encoder(x, c)
        else:
            stats = self.encoder(torch.cat([x.flatten(1), c], dim=1))
        mu, logvar = stats.float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def prior_stats(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of p(z | c): N(m(c), I) learned, or N(0, I). Only the mean is learned: a learned
        variance lets latents and prior drift to any scale together (we measured prior std ~15 after 500 steps)."""
        if self.prior_kind == "standard":
            zeros = torch.zeros(c.shape[0], self.latent_dim, device=c.device)
            return zeros, zeros
        c = c if c.shape[1] else torch.zeros(c.shape[0], 1, device=c.device)
        mu = self.prior(c).float()
        return mu, torch.zeros_like(mu)

    def prior_latent(self, c: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps under p(z | c): the latent a standard-normal draw `eps` stands for."""
        mu, logvar = self.prior_stats(c)
        return mu + (0.5 * logvar).exp() * eps.to(mu)

    def fit_latents(
        self, class_mean: torch.Tensor, class_std: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ):
        """Store the aggregate posterior around the prior mean: per class [C, latent] and over all images
        [latent] (testing.cvae.fit_latents measures it); `sample_latent` then draws from it."""
        device = next(self.parameters()).device
        for name, value in (("fit_class_mean", class_mean), ("fit_class_std", class_std), ("fit_mean", mean),
                            ("fit_std", std)):  # fmt: skip
            value = value.detach().float().to(device)
            if self.fitted:
                getattr(self, name).copy_(value)
            else:
                self.register_buffer(name, value.clone())
        self.fitted = True
        self._config["fitted"] = True

    def sample_latent(self, c: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z for standard-normal draws `eps` under conditions `c`: prior mean + fitted offset + fitted std * eps,
        the class's fit when `c` gives a class and the fit over all images otherwise; the prior's own draw
        (`prior_latent`) for a model without a fit."""
        if not self.fitted:
            return self.prior_latent(c, eps)
        mu, _ = self.prior_stats(c)
        offset, scale = self.fit_mean.expand_as(mu), self.fit_std.expand_as(mu)
        if self.num_classes:
            given = (c[:, self.num_classes] > 0.5)[:, None]
            label = c[:, : self.num_classes].argmax(1)
            offset = torch.where(given, self.fit_class_mean[label], offset)
            scale = torch.where(given, self.fit_class_std[label], scale)
        return mu + offset + scale * eps.to(mu)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.arch == "conv":
            return self.decoder(z, c)
        return self.decoder(torch.cat([z, c], dim=1)).view(-1, *self.x_shape)

    def forward(self, x: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, posterior mean, posterior log-variance, (prior mean, prior log-variance))."""
        mu, logvar = self.encode(x, c)
        noise = torch.randn_like(mu) if noise is None else noise
        z = mu + (0.5 * logvar).exp() * noise
        return self.decode(z, c), mu, logvar, self.prior_stats(c)


RUN_FILE = "cvae.safetensors"  # what a `train cvae` run directory holds


def save_cvae(path, model: CVAE, meta: dict) -> None:
    from core.checkpoint import save_weights

    save_weights(path, model.state_dict(), {**meta, "kind": KIND, "model": model.config})


def load_cvae(path, device: str | torch.device = "cpu") -> tuple[CVAE, dict, str]:
    """`(model in eval mode, meta, weights path)` from a CVAE checkpoint or `train cvae` run directory."""
    from core.checkpoint import load_state_dict_checked
    from models.artifacts import load_kind, resolve_weights

    weights = resolve_weights(path, RUN_FILE)
    state, meta = load_kind(weights, KIND, "CVAE")
    try:
        model = CVAE(**meta["model"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{weights}: the sidecar's model config cannot be built: {err}") from None
    load_state_dict_checked(model, state, str(weights))
    return model.eval().requires_grad_(False).to(device), meta, str(weights)

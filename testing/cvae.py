"""CVAE evaluation: held-out ELBO terms and per-latent-dimension KL under given condition sets, the rate at
which a classifier recognises conditional samples as their class, the KL-per-dimension figure, and the testbed's
sweep: KL per latent dimension as features are given as conditions, against the data's intrinsic dimension."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from core.plotting import pyplot, save_figure, save_table, show_or_close
from models.cvae import CVAE, elbo_terms, gaussian_kl
from testing.sampling import z_from_seeds

SETTINGS = ("none", "class", "all")  # nothing given; the class only; the class and every attribute
ACTIVE_KL = 0.05  # nats: a latent dimension whose held-out KL is above this carries information


def settings_for(model: CVAE) -> tuple[str, ...]:
    """The condition settings a model can be evaluated under (vectors without classes: none and all)."""
    if not model.num_classes:
        return ("none", "all") if model.num_attributes else ("none",)
    return SETTINGS if model.num_attributes else SETTINGS[:2]


def given_conditions(model: CVAE, setting: str, labels: torch.Tensor, attributes: torch.Tensor | None):
    """Condition vectors with nothing, the class, or the class and all attributes given."""
    n = labels.shape[0]
    if setting == "none":
        return model.conditions(n)
    if setting == "class" or attributes is None:
        return model.conditions(n, labels=labels)
    return model.conditions(n, labels=labels, attributes=attributes)


@torch.no_grad()
def evaluate_elbo(
    model: CVAE, batches, device: torch.device, seed: int = 0, beta: float = 1.0, sigma: float = 1.0
) -> dict:
    """Mean reconstruction, KL, negative ELBO and per-dimension KL over `batches` of (x, labels, attributes),
    for each condition setting; the posterior noise is drawn from `seed`, so the numbers are repeatable."""
    model.eval()
    sums = {s: {"rec": 0.0, "kl": 0.0, "kl_per_dim": torch.zeros(model.latent_dim, device=device)}
            for s in settings_for(model)}  # fmt: skip
    n = 0
    generator = torch.Generator().manual_seed(seed)
    for x, labels, attributes in batches:
        x, labels = x.to(device), labels.to(device)
        attributes = attributes.to(device) if attributes is not None else None
        noise = torch.randn(x.shape[0], model.latent_dim, generator=generator).to(device)
        for setting, acc in sums.items():
            c = given_conditions(model, setting, labels, attributes)
            recon, mu, logvar, prior = model(x, c, noise)
            terms = elbo_terms(x, recon, mu, logvar, sigma=sigma, prior=prior)
            acc["rec"] += float(terms["rec"].sum())
            acc["kl"] += float(terms["kl"].sum())
            acc["kl_per_dim"] += terms["kl_per_dim"] * x.shape[0]
        n += x.shape[0]
    out = {}
    for setting, acc in sums.items():
        rec, kl = acc["rec"] / max(n, 1), acc["kl"] / max(n, 1)
        out[setting] = {"rec": rec, "kl": kl, "neg_elbo": rec + kl, "loss": rec + beta * kl,
                        "kl_per_dim": (acc["kl_per_dim"] / max(n, 1)).tolist()}  # fmt: skip
    return {"n": n, "settings": out}


def class_attributes(
    labels: np.ndarray, attributes: np.ndarray | None, num_classes: int
) -> torch.Tensor | None:
    """One attribute vector per class: that of the class's first image (the world's are per species)."""
    if attributes is None:
        return None
    rows = np.zeros((num_classes, attributes.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members):
            rows[c] = attributes[members[0]]
    return torch.from_numpy(rows)


@torch.no_grad()
def sample(
    model: CVAE, c: torch.Tensor, seeds: list[int], batch_size: int = 64, prior: bool = False
) -> torch.Tensor:
    """Decoded samples (`CVAE.sample_latent`: the fitted latents when the model has them; `prior`: the prior
    p(z | c) itself): row i's standard-normal draw from seed `seeds[i]` (`z_from_seeds`, NVlabs' convention)."""
    model.eval()
    device = next(model.parameters()).device
    eps = z_from_seeds(seeds, model.latent_dim).to(device)
    draw = model.prior_latent if prior else model.sample_latent
    out = []
    for i in range(0, len(seeds), batch_size):
        part = c[i : i + batch_size]
        out.append(model.decode(draw(part, eps[i : i + batch_size]), part))
    return torch.cat(out)


@torch.no_grad()
def fit_latents(model: CVAE, batches, device) -> dict:
    """Measure and store (`CVAE.fit_latents`) the aggregate posterior of the images of `batches` of (x, labels,
    attributes) around the prior mean: per class under the class given, and over all images under nothing
    given; a Gaussian per dimension whose variance is that of the posterior means plus the mean posterior
    variance (the mixture's). Classes with fewer than two images take the overall fit. Returns the mean
    fitted standard deviation per setting."""
    model.eval()
    sums = {k: [] for k in ("class", "none")}
    labels_all = []
    for x, labels, _ in batches:
        x, labels = x.to(device), labels.to(device)
        for setting in ("class", "none") if model.num_classes else ("none",):
            c = given_conditions(model, setting, labels, None)
            mu, logvar = model.encode(x, c)
            sums[setting].append((mu - model.prior_stats(c)[0], logvar.exp()))
        labels_all.append(labels)
    labels = torch.cat(labels_all)

    def moments(residual, variance):
        return residual.mean(0), (residual.var(0, unbiased=True) + variance.mean(0)).sqrt()

    residual, variance = (torch.cat(parts) for parts in zip(*sums["none"], strict=True))
    mean, std = moments(residual, variance)
    n = max(model.num_classes, 1)
    class_mean, class_std = mean.repeat(n, 1), std.repeat(n, 1)
    if model.num_classes:
        residual, variance = (torch.cat(parts) for parts in zip(*sums["class"], strict=True))
        for k in range(model.num_classes):
            members = labels == k
            if int(members.sum()) > 1:
                class_mean[k], class_std[k] = moments(residual[members], variance[members])
    model.fit_latents(class_mean, class_std, mean, std)
    return {"std_none": float(std.mean()), "std_class": float(class_std.mean())}


@torch.no_grad()
def recognition(
    model: CVAE,
    classifier,
    per_class_attributes: torch.Tensor | None,
    n_per_class: int,
    seed: int = 0,
    classifier_size: int | None = None,
    real: tuple[torch.Tensor, np.ndarray] | None = None,
) -> dict:
    """Share of conditional samples the classifier assigns to the conditioned class, per condition setting
    (class only; class and all attributes), with the per-class rates; chance is 1 / num_classes. With `real`
    (images [M, 3, S, S] in [-1, 1], labels [M]): the samples' diversity beside the real images' per setting,
    `<setting>_spread` (within-class per-pixel spread, samples / real, testing.generation.fidelity) and
    `<setting>_feature_distance` (Frechet distance of the classifier's features, samples against real).
    Samples are `sample`'s (the fitted latents when the model has them); for a fitted model `prior_class`
    and `prior_class_spread` say the same of class samples drawn from the prior itself."""
    from testing.generation import fidelity

    device = next(model.parameters()).device
    classifier.eval()
    labels = torch.arange(model.num_classes, device=device).repeat_interleave(n_per_class)
    seeds = [seed + i for i in range(len(labels))]
    out = {"chance": 1.0 / model.num_classes, "n": len(labels)}
    real_features = None
    if real is not None:
        real_spread = fidelity.pixel_spread(real[0], real[1])
        real_features = fidelity.classifier_outputs(classifier, real[0], classifier_size)[1]
    runs = [("class", "class", False), ("all", "all", False)]
    if model.fitted:
        runs.append(("prior_class", "class", True))
    for key, setting, from_prior in runs:
        if setting == "all" and per_class_attributes is None:
            continue
        attributes = per_class_attributes.to(device)[labels] if setting == "all" else None
        c = given_conditions(model, setting, labels, attributes)
        images = sample(model, c, seeds, prior=from_prior).float().clamp(-1, 1)
        predicted, features = fidelity.classifier_outputs(classifier, images.cpu(), classifier_size)
        hits = (predicted == labels.cpu()).float().view(model.num_classes, n_per_class).mean(1)
        out[key] = float(hits.mean())
        out[f"{key}_per_class"] = hits.tolist()
        if real is not None:
            spread = fidelity.pixel_spread(images.cpu(), labels.cpu().numpy())
            out[f"{key}_spread"] = fidelity.spread_ratio(spread, real_spread)["ratio"]
            out[f"{key}_feature_distance"] = fidelity.feature_distance(features, real_features)
    return out


def plot_kl_per_dim(kl: dict[str, list[float]], path: str | os.PathLike, show: bool = False) -> Path:
    """Grouped bars of the held-out KL of every latent dimension, one colour per condition setting, and the
    numbers beside it as CSV (dimensions with KL near 0 are unused: the conditions already carry that)."""
    import pandas as pd

    path = Path(path)
    frame = pd.DataFrame(
        {"dimension": range(len(next(iter(kl.values())))), **{f"kl_{k}": v for k, v in kl.items()}}
    )
    save_table(frame, path.with_suffix(".csv"))
    plt = pyplot()
    dims = len(frame)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * dims + 2), 3.6))
    width = 0.8 / len(kl)
    for i, (setting, values) in enumerate(kl.items()):
        ax.bar(np.arange(dims) + (i - (len(kl) - 1) / 2) * width, values, width, label=f"given: {setting}")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL(q(z|x,c) || p(z|c)), nats")
    ax.set_title("Which latent dimensions are used,\nby the conditions given (held-out mean)")
    ax.set_xticks(range(dims))
    top = float(np.nanmax(frame.drop(columns="dimension").to_numpy(dtype=float), initial=0.0))
    ax.set_ylim(0, 1.22 * top if top > 0 else 1.0)  # room above the bars for the legend
    ax.legend(loc="upper center", ncol=len(kl), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def plot_vectors(real: torch.Tensor, samples: torch.Tensor, names: list[str], path: str | os.PathLike,
                 show: bool = False) -> Path:  # fmt: skip
    """Held-out vectors and as many samples given nothing, on their first two features (the points behind it
    as CSV): whether the samples cover the data's shape (the swiss roll's spiral, a Gaussian's disc)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a, b = (0, 1) if real.shape[1] > 1 else (0, 0)
    frame = pd.concat([pd.DataFrame({"set": kind, "x": v[:, a].numpy(), "y": v[:, b].numpy()})
                       for kind, v in (("held-out", real), ("samples", samples.float()))])  # fmt: skip
    save_table(frame, path.with_suffix(".csv"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for kind, part in frame.groupby("set", sort=False):
        ax.scatter(part["x"], part["y"], s=4, alpha=0.5, label=kind)
    ax.set_xlabel(names[a] if names else f"feature {a}")
    ax.set_ylabel(names[b] if names else f"feature {b}")
    ax.set_title("Held-out vectors and samples given nothing", fontsize=9)
    ax.legend(fontsize=8, markerscale=3)
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


# ----------------------------------------------------------------------------
# The testbed's sweep: information through the bottleneck as conditions are given.


SUBSETS = ("random", "first")


def given_masks(
    n: int, features: int, given: int, generator: torch.Generator, subset: str = "random"
) -> torch.Tensor:
    """[n, features] presence masks with exactly `given` features present per row: a random subset per row, or
    the first `given` features in every row."""
    if subset == "first":
        return (torch.arange(features) < given).float().expand(n, -1)
    ranks = torch.rand(n, features, generator=generator).argsort(1).argsort(1)
    return (ranks < given).float()


@torch.no_grad()
def kl_by_given_count(model: CVAE, x: torch.Tensor, counts: list[int], seed: int = 0, batch_size: int = 512,
                      subset: str = "random") -> dict:  # fmt: skip
    """Held-out KL of every latent dimension (nats, mean over `x`) when `k` of the features (`given_masks`) are
    given as conditions, for each k in `counts`. The features are the attributes (vector sets). With a random
    subset per sample every dimension may stay in use, each for the samples whose coordinate is missing: the
    total KL, not the count of active dimensions, then follows the information left to encode."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k in counts:
        total = torch.zeros(model.latent_dim, dtype=torch.float64)
        for chunk in x.split(batch_size):
            mask = given_masks(len(chunk), chunk.shape[1], k, generator, subset).to(device)
            chunk = chunk.to(device).float()
            c = model.conditions(len(chunk), attributes=chunk, attribute_present=mask)
            mu, logvar = model.encode(chunk, c)
            total += gaussian_kl(mu, logvar, *model.prior_stats(c)).double().sum(0).cpu()
        out[k] = (total / len(x)).tolist()
    return out


def active_dimensions(kl_per_dim: list[float], threshold: float = ACTIVE_KL) -> int:
    return int(sum(v > threshold for v in kl_per_dim))


def sweep_rows(
    run: str, input_dim: int, intrinsic: int, kl: dict[int, list[float]], independent: bool
) -> list[dict]:
    """Table rows of one run's `kl_by_given_count`: given count, active dimensions, total KL, and, for data whose
    coordinates are independent (`independent`: each given one removes one intrinsic coordinate), the two
    hypotheses: max(intrinsic - given, 0) active dimensions, and the total KL with nothing given scaled by the
    share of coordinates left to encode. Elsewhere (redundant or curved coordinates: which ones are given
    decides what is left) they are None."""
    base = float(sum(kl[min(kl)])) if kl else 0.0
    return [{"run": run, "input_dim": input_dim, "intrinsic_dim": intrinsic, "given": k,
             "active_dims": active_dimensions(values), "kl_total": float(sum(values)),
             "expected_active": max(intrinsic - k, 0) if independent else None,
             "expected_kl": base * max(intrinsic - k, 0) / intrinsic if independent else None,
             "kl_per_dim": [round(v, 5) for v in values]}
            for k, values in kl.items()]  # fmt: skip


def plot_kl_sweep(rows: list[dict], path: str | os.PathLike, show: bool = False) -> Path:
    """Total held-out KL (left) and active latent dimensions (middle) against the number of given features, one
    line per run, each hypothesis dashed where the run has one; the KL with nothing given against the input
    dimension, one point per run (right); the table beside it as CSV."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    frame = pd.DataFrame(rows)
    save_table(frame.assign(kl_per_dim=frame["kl_per_dim"].map(lambda v: " ".join(map(str, v)))),
               path.with_suffix(".csv"))  # fmt: skip
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, (run, part) in enumerate(frame.groupby("run", sort=False)):
        colour = f"C{i % 10}"
        left.plot(part["given"], part["kl_total"], "o-", color=colour, label=run)
        middle.plot(part["given"], part["active_dims"], "o-", color=colour, label=run)
        if part["expected_kl"].notna().all():  # independent coordinates: the hypotheses hold
            left.plot(part["given"], part["expected_kl"], "--", color=colour, alpha=0.6)
            middle.plot(part["given"], part["expected_active"], "--", color=colour, alpha=0.6)
        none_given = part[part["given"] == 0]
        right.plot(none_given["input_dim"], none_given["kl_total"], "o", color=colour, label=run)
    left.set_xlabel("features given as conditions")
    left.set_ylabel("total held-out KL (nats)")
    left.set_title("Information through the bottleneck\n(dashed, independent coordinates: KL with none given x "
                   "share left)", fontsize=9)  # fmt: skip
    middle.set_xlabel("features given as conditions")
    middle.set_ylabel(f"active latent dimensions (KL > {ACTIVE_KL} nats)")
    middle.set_title("Active dimensions\n(dashed, independent coordinates: intrinsic dimension - given)",
                     fontsize=9)  # fmt: skip
    right.set_xlabel("input dimension (features)")
    right.set_ylabel("total held-out KL, none given (nats)")
    right.set_title("Information with nothing given, per run", fontsize=9)
    middle.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, middle, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    show_or_close(fig, show)
    return path

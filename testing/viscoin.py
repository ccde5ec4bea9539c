"""Evaluation of a VisCoIN ensemble on a split: accuracy of f and Theta, fidelity, reconstruction
(L1, L2, LPIPS, FID), faithfulness, sparsity and, where true attributes exist, concept-attribute alignment.

Every ratio is a count divided by a count over the whole split (not a mean of per-batch means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from core.device import autocast
from core.errors import UserError
from core.progress import Progress
from testing import viscoin_metrics as vm


def fixed_subset(dataset, n: int, seed: int):
    """The same `n` images of `dataset` at every evaluation (all of them if it is smaller)."""
    if n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist())


def load_lpips(weights: str, device):
    """LPIPS with VGG weights `imagenet`, a path, `random` (smoke tests only) or `none` (no LPIPS)."""
    if weights == "none":
        return None
    from models.lpips import LPIPS

    return LPIPS(weights).to(device)


class InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3 pool features (2048-d) for FID; [-1, 1] input, bilinear resize to 299."""

    resize_mode = "bilinear 299x299 (torchvision Inception-v3, not the TF-ported FID Inception)"

    def __init__(self, weights: str = "imagenet", seed: int = 0):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
        if weights == "imagenet":
            from models.classifiers import imagenet_state_dict

            net.load_state_dict(imagenet_state_dict("inception_v3"))
        elif weights != "random":
            from core.checkpoint import load_foreign_state_dict, load_state_dict_checked

            load_state_dict_checked(net, load_foreign_state_dict(weights), weights)
        net.fc = torch.nn.Identity()
        net.aux_logits, net.AuxLogits = False, None
        self.weights = weights
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(((x + 1) / 2 - self.mean) / self.std)


def _frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    from core.vdna.distances import frechet_distance

    def stats(x):
        x = x.double()
        return x.mean(0), torch.cov(x.T)

    return frechet_distance(*stats(real), *stats(fake))


@torch.no_grad()
def evaluate_viscoin(
    models,
    loader,
    device,
    lpips=None,
    fid=None,
    top_k: int = 5,
    amp: bool = True,
    seed: int = 0,
    attributes: bool = False,
    progress: bool = True,
) -> dict:
    """Metrics of `models` (a VisCoINModels) over `loader`; see the module docstring."""
    classifier, extractor, explainer, decoder = (
        models.classifier,
        models.extractor,
        models.explainer,
        models.decoder,
    )
    for module in (classifier, extractor, explainer, decoder):
        module.eval()
    k = min(top_k, models.n_concepts)
    g = torch.Generator().manual_seed(seed)
    counts = {"correct_f": 0, "correct_theta": 0, "agree": 0, "correct_rec": 0, "n": 0}
    sums = {"l1": 0.0, "l2": 0.0, "lpips": 0.0, "active": 0.0, "p_rec": 0.0, "p_top": 0.0, "p_rand": 0.0}
    real_feats, fake_feats, acts, attrs = [], [], [], []
    with Progress(len(loader), "evaluate viscoin", enabled=progress) as bar:
        for batch in loader:
            if "image" not in batch:
                bar.update(1)
                continue
            x = batch["image"].to(device)
            labels = batch["label"].to(device)
            with autocast(device, amp):
                logits_f, features = classifier(x)
                concepts, support = extractor(features)
                logits_theta = explainer(concepts)
            concepts, support = concepts.float(), support.float()
            x_hat, _ = decoder(concepts, support, noise_mode="const")
            for key, value in vm.prediction_counts(logits_f, logits_theta, labels).items():
                counts[key] += value
            sums["l1"] += float((x_hat - x).abs().mean(dim=(1, 2, 3)).sum())
            sums["l2"] += float((x_hat - x).pow(2).mean(dim=(1, 2, 3)).sum())
            if lpips is not None:
                sums["lpips"] += float(lpips(x_hat, x).sum())
            sums["active"] += float(vm.active_concepts(concepts).sum())
            # faithfulness: remove the k most relevant concepts of Theta's class vs k random ones
            explained = logits_theta.argmax(1)
            top = vm.top_k_mask(concepts, explainer.linear.weight, explained, k)
            scores = torch.rand(top.shape, generator=g).to(top.device)
            rand = vm.random_baseline(top, scores, vm.concept_activations(concepts) > 0)
            probs = []
            for variant in (
                None,
                vm.scale_selected(concepts, top, 0.0),
                vm.scale_selected(concepts, rand, 0.0),
            ):
                image = x_hat if variant is None else decoder(variant, support, noise_mode="const")[0]
                with autocast(device, amp):
                    logits, _ = classifier(image)
                probs.append(F.softmax(logits.float(), 1).gather(1, explained[:, None]).squeeze(1))
                if variant is None:  # does f recognise the species in the reconstruction?
                    counts["correct_rec"] += int((logits.argmax(1) == labels).sum())
            sums["p_rec"] += float(probs[0].sum())
            sums["p_top"] += float(probs[1].sum())
            sums["p_rand"] += float(probs[2].sum())
            if fid is not None:
                real_feats.append(fid(x).double().cpu())
                fake_feats.append(fid(x_hat).double().cpu())
            if attributes and "attributes" in batch:
                acts.append(vm.concept_activations(concepts).cpu())
                attrs.append(batch["attributes"].cpu())
            bar.update(1)
    total = counts["n"]
    if total == 0:
        raise UserError("no image could be evaluated (all skipped or an empty split)")
    result = {
        "n": total,
        "accuracy_f": counts["correct_f"] / total,
        "accuracy_theta": counts["correct_theta"] / total,
        "fidelity": counts["agree"] / total,
        "accuracy_f_reconstructions": counts["correct_rec"] / total,
        "l1": sums["l1"] / total,
        "l2": sums["l2"] / total,
        "active_concepts": sums["active"] / total,
        "faithfulness_k": k,
    }
    result.update(vm.faithfulness(torch.tensor(sums["p_rec"] / total), torch.tensor(sums["p_top"] / total),
                                  torch.tensor(sums["p_rand"] / total)))  # fmt: skip
    if lpips is not None:
        result["lpips"] = sums["lpips"] / total
    if fid is not None:
        if total < 2:
            raise UserError("FID needs at least 2 images")
        result["fid"] = _frechet(torch.cat(real_feats), torch.cat(fake_feats))
    if acts:
        auc = vm.attribute_auc(torch.cat(acts), torch.cat(attrs))
        result["alignment_auc"] = auc
    return result


@torch.no_grad()
def concept_alignment_summary(auc: torch.Tensor, attribute_names: list[str]) -> dict:
    """Best AUC per concept (max over attributes, either polarity) and the attribute it matches."""
    oriented = torch.maximum(auc, 1 - auc).nan_to_num(0.0)
    best, which = oriented.max(dim=1)
    return {
        "mean_best_auc": float(best.mean()),
        "per_concept": [
            {"concept": i, "attribute": attribute_names[int(j)], "auc": float(b)}
            for i, (b, j) in enumerate(zip(best, which, strict=True))
        ],  # fmt: skip
    }

"""Evaluation of a VisCoIN ensemble on a split: accuracy of f and Theta, fidelity, reconstruction
(L1, L2, LPIPS, FID), faithfulness (with its random baseline), consistency, sparsity and, where true
attributes exist, concept-attribute alignment (with its shuffled-label null).

Every ratio is a count divided by a count over the whole split (not a mean of per-batch means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from core.device import autocast
from core.errors import UserError
from core.progress import Progress
from datasets.gpu_transforms import to_model_batch
from testing.viscoin import metrics as vm


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


# Validation metric that picks `best.safetensors` during training, and whether higher is better.
SELECT_METRICS = {
    "fidelity": True,
    "accuracy_theta": True,
    "accuracy_f_reconstructions": True,
    "faithfulness": True,
    "l1": False,
    "l2": False,
    "lpips": False,
}


def selection_score(metric: str, result: dict) -> float:
    """`result[metric]` oriented so that lower is better (the training loop keeps the lowest)."""
    return -result[metric] if SELECT_METRICS[metric] else result[metric]


def pooled_features(classifier, images: torch.Tensor) -> torch.Tensor:
    """f's last feature map, global-average-pooled: the embedding the consistency probe separates."""
    _, features = classifier(images)
    return features[-1].float().mean(dim=(2, 3))


@torch.no_grad()
def concept_consistency(
    models,
    concepts: torch.Tensor,
    support: torch.Tensor,
    multiplier: float = 0.0,
    min_images: int = 8,
    batch_size: int = 64,
    amp: bool = True,
    progress: bool = False,
) -> dict:
    """Consistency of each concept's visual effect across images, the paper's second interpretability metric.

    After VisCoIN's evaluation (arXiv 2407.01331, Sec. 4): concept k is consistent when changing it alters
    the decoded images in the same way whatever the image, so that a binary classifier can tell the
    modified images from the unmodified reconstructions. (The paper's section text was not available
    offline when this was written; the intervention, removal by default, and the embedding, f's own
    features, are this implementation's choices.) For every concept k and every image on which k
    fires (activation > 0), k's maps are multiplied by `multiplier` (0: removed) and decoded; f's pooled
    last-stage features of the modified and of the plain reconstruction are the two classes of a linear
    (L2-logistic) classifier trained on half the images and tested on the other half
    (`testing.viscoin.metrics.separability`). Consistency is its held-out accuracy averaged over the concepts that
    fire on at least `min_images` images (chance 0.5, 1 = the same change everywhere).
    """
    device = concepts.device
    decoder, classifier = models.decoder, models.classifier
    acts = vm.concept_activations(concepts)
    original = []
    for part in range(0, len(concepts), batch_size):
        chunk = slice(part, part + batch_size)
        image, _ = decoder(concepts[chunk], support[chunk], noise_mode="const")
        with autocast(device, amp):
            original.append(pooled_features(classifier, image))
    original = torch.cat(original).cpu()
    per_concept = torch.full((concepts.shape[1],), float("nan"))
    eligible = [k for k in range(concepts.shape[1]) if int((acts[:, k] > 0).sum()) >= min_images]
    with Progress(len(eligible), "concept consistency", enabled=progress) as bar:
        for k in eligible:
            rows = (acts[:, k] > 0).nonzero().flatten()
            mask = torch.zeros(1, concepts.shape[1], dtype=torch.bool, device=device)
            mask[0, k] = True
            modified = []
            for part in range(0, len(rows), batch_size):
                idx = rows[part : part + batch_size]
                changed = vm.scale_selected(concepts[idx], mask.expand(len(idx), -1), multiplier)
                image, _ = decoder(changed, support[idx], noise_mode="const")
                with autocast(device, amp):
                    modified.append(pooled_features(classifier, image))
            per_concept[k] = vm.separability(original[rows.cpu()], torch.cat(modified).cpu())
            bar.update(1)
    scored = per_concept[~per_concept.isnan()]
    return {
        "consistency": float(scored.mean()) if len(scored) else None,
        "consistency_concepts": len(scored),
        "consistency_images": len(concepts),
        "consistency_per_concept": per_concept,
    }


@torch.no_grad()
def evaluate_viscoin(
    models,
    loader,
    device,
    lpips=None,
    fid=None,
    threshold: float = vm.DEFAULT_THRESHOLD,
    amp: bool = True,
    seed: int = 0,
    attributes: bool = False,
    consistency_images: int = 0,
    progress: bool = True,
) -> dict:
    """Metrics of `models` (a VisCoINModels) over `loader`; see the module docstring.

    Faithfulness removes the concepts with normalised relevance above `threshold` (tau, `vm.faithfulness`).
    With `consistency_images` > 0, the concepts of the first that many images feed `concept_consistency`.
    """
    classifier, extractor, explainer, decoder = (
        models.classifier,
        models.extractor,
        models.explainer,
        models.decoder,
    )
    for module in (classifier, extractor, explainer, decoder):
        module.eval()
    g = torch.Generator().manual_seed(seed)
    counts = {"correct_f": 0, "correct_theta": 0, "agree": 0, "correct_rec": 0, "n": 0, "empty": 0}
    sums = {"l1": 0.0, "l2": 0.0, "lpips": 0.0, "active": 0.0, "removed": 0.0,
            "p_rec": 0.0, "p_removed": 0.0, "p_rand": 0.0}  # fmt: skip
    real_feats, fake_feats, acts, attrs, kept = [], [], [], [], []
    with Progress(len(loader), "evaluate viscoin", enabled=progress) as bar:
        for batch in loader:
            if "image" not in batch:
                bar.update(1)
                continue
            batch = to_model_batch(batch, device, train=False)  # float or uint8 batches alike
            x, labels = batch["image"], batch["label"]
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
            # faithfulness: remove the concepts with normalised relevance > tau vs as many random ones
            explained = logits_theta.argmax(1)
            important = vm.relevant_mask(
                vm.relevance(concepts, explainer.linear.weight.float(), explained), threshold
            )
            scores = torch.rand(important.shape, generator=g).to(important.device)
            rand = vm.random_baseline(important, scores, vm.concept_activations(concepts) > 0)
            sums["removed"] += float(important.sum())
            counts["empty"] += int((~important.any(dim=1)).sum())
            probs = []
            for variant in (
                None,
                vm.scale_selected(concepts, important, 0.0),
                vm.scale_selected(concepts, rand, 0.0),
            ):
                image = x_hat if variant is None else decoder(variant, support, noise_mode="const")[0]
                with autocast(device, amp):
                    logits, _ = classifier(image)
                probs.append(F.softmax(logits.float(), 1).gather(1, explained[:, None]).squeeze(1))
                if variant is None:  # does f recognise the species in the reconstruction?
                    counts["correct_rec"] += int((logits.argmax(1) == labels).sum())
            sums["p_rec"] += float(probs[0].sum())
            sums["p_removed"] += float(probs[1].sum())
            sums["p_rand"] += float(probs[2].sum())
            if fid is not None:
                real_feats.append(fid(x).double().cpu())
                fake_feats.append(fid(x_hat).double().cpu())
            if attributes and "attributes" in batch:
                acts.append(vm.concept_activations(concepts).cpu())
                attrs.append(batch["attributes"].cpu())
            if consistency_images > sum(len(c) for c, _ in kept):
                kept.append((concepts, support))
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
        "faithfulness_threshold": threshold,
        "faithfulness_removed": sums["removed"] / total,
        "faithfulness_no_concept": counts["empty"] / total,
    }
    result.update(vm.faithfulness(torch.tensor(sums["p_rec"] / total), torch.tensor(sums["p_removed"] / total),
                                  torch.tensor(sums["p_rand"] / total)))  # fmt: skip
    if lpips is not None:
        result["lpips"] = sums["lpips"] / total
    if fid is not None:
        from testing.fid import describe, frechet_inception_distance

        real, fake = torch.cat(real_feats), torch.cat(fake_feats)
        result["fid"] = frechet_inception_distance(real, fake)
        result.update(describe(fid, len(real), len(fake)))
    if acts:
        result["alignment_auc"] = vm.attribute_auc(torch.cat(acts), torch.cat(attrs))
        result["alignment_null"] = vm.alignment_null(torch.cat(acts), torch.cat(attrs), seed=seed)
    if kept:
        concepts = torch.cat([c for c, _ in kept])[:consistency_images]
        support = torch.cat([s for _, s in kept])[:consistency_images]
        result.update(concept_consistency(models, concepts, support, amp=amp, progress=progress))
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

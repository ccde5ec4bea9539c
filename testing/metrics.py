"""Classification metrics from one pass over a loader: loss, top-k accuracy and the confusion matrix.

Counts are summed (and all-reduced across DDP ranks) before any division, so the accuracy is exactly
correct / total, whatever the batch sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.device import autocast
from core.distributed import all_reduce_sum
from core.progress import Progress
from datasets.gpu_transforms import to_model_batch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def evaluate_classifier(
    model, loader, device, num_classes: int, amp: bool = True, progress: bool = True
) -> dict:
    """Loss, top-1/top-5 accuracy, per-class accuracy and confusion matrix of `model` over `loader`."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, skipped
    with Progress(len(loader), "evaluate", enabled=progress) as bar:
        for batch in loader:
            sums[3] += batch.get("skipped", 0)
            if "image" not in batch and "encoded" not in batch:
                bar.update(1)
                continue
            batch = to_model_batch(batch, device, train=False)  # float or uint8 batches alike
            images, labels = batch["image"], batch["label"]
            with autocast(device, amp):
                logits, _ = model(images)
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            hits = topk_correct(logits, labels)
            sums[1] += hits[1]
            sums[2] += hits[5]
            confusion += confusion_matrix(labels, logits.argmax(1), num_classes)
            bar.update(1)
    all_reduce_sum(sums)
    all_reduce_sum(confusion)
    confusion = confusion.cpu()
    total = int(confusion.sum())
    per_class_total = confusion.sum(1)
    per_class = confusion.diag().double() / per_class_total.clamp(min=1).double()
    per_class[per_class_total == 0] = float("nan")
    return {
        "n": total,
        "loss": float(sums[0] / max(total, 1)),
        "top1": float(sums[1] / max(total, 1)),
        "top5": float(sums[2] / max(total, 1)),
        "skipped": int(sums[3]),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion,
    }

"""Symmetric InfoNCE over every pair of modalities, with negatives gathered across DDP ranks.

For a pair (a, b) each rank scores its own rows of `a` against the columns of `b` gathered from all ranks
(and `b` against `a`); `all_gather` keeps gradients, so the sum over ranks is the loss of one global batch
(OpenCLIP's `local_loss=True, gather_with_grad=True`). The target of row i is its own record. In pairs with
text, the other records with the same taxonomy string are masked out of row i's negatives: identical strings
give identical text embeddings, so as negatives they would be false ones and keep the loss at or above
log(#duplicates) whatever the model does (spreading the target over them instead changes nothing then).
Optionally the other records of the same named species are masked out of the image-DNA negatives too, so the
model is not pushed to tell specimens of one species apart (useful when batches hold many per species).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Concatenate `x` over ranks (rank order); differentiable when `grad`. One process: `x` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if grad:  # backward: the gradients of every rank's copy, summed back to the owner (reduce-scatter)
        from torch.distributed._functional_collectives import all_gather_single_autograd

        return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, 0)


def modality_pairs(modalities) -> list[tuple[str, str]]:
    return list(itertools.combinations(modalities, 2))


def pair_loss(a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor,
              offset: int, groups: torch.Tensor | None = None, groups_all: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(CE(a -> all b) + CE(b -> all a)) / 2 over this rank's rows; inputs are unit vectors. With `groups`,
    columns of the row's group other than its own record are left out."""
    targets = torch.arange(offset, offset + a.shape[0], device=a.device)
    logits_ab, logits_ba = scale * a @ b_all.T, scale * b @ a_all.T
    if groups is not None:
        duplicate = groups[:, None] == groups_all[None, :]
        own = torch.arange(a.shape[0], device=a.device)
        duplicate[own, own + offset] = False
        logits_ab = logits_ab.masked_fill(duplicate, -torch.inf)
        logits_ba = logits_ba.masked_fill(duplicate, -torch.inf)
    return (F.cross_entropy(logits_ab, targets) + F.cross_entropy(logits_ba, targets)) / 2


def contrastive_loss(embeddings: dict[str, torch.Tensor], scale: torch.Tensor, text_groups: torch.Tensor | None = None,
                     species_groups: torch.Tensor | None = None, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(mean loss over modality pairs, per-pair losses) for embeddings of one rank's batch.

    `text_groups` (int64 per record, equal for equal text tokens) masks same-text records out of the
    negatives of pairs with text. In the other pairs, `species_groups` (equal for records of one named
    species, unique otherwise) does the same. None keeps every other record a negative (the reference).
    """
    names = [m for m in ("image", "dna", "text") if m in embeddings]
    gathered = {m: gather(embeddings[m]) for m in names}
    n = embeddings[names[0]].shape[0]
    groups = {"text": text_groups if "text" in names else None, "other": species_groups}
    groups_all = {kind: None if g is None else gather(g, grad=False) for kind, g in groups.items()}
    losses = []
    for a, b in modality_pairs(names):
        kind = "text" if "text" in (a, b) else "other"
        losses.append(pair_loss(embeddings[a], embeddings[b], gathered[a], gathered[b], scale, rank * n,
                                groups[kind], groups_all[kind]))  # fmt: skip
    per_pair = torch.stack(losses)
    return per_pair.mean(), per_pair

"""Do a level's codes carry the traits that level fixes, and not the finer ones? What only a world with known
traits can measure (datasets.world: the order fixes body and tail, the family the bill, the genus the wing
pattern and crest, the species the colours).

For every code part (each level's own codes, the free codes) and every trait, a probe predicts the trait value
of a held-out image from that part's codes alone: the nearest class mean of the one-hot codes, fitted on the
training images. Beside it: `chance`, the majority value's share, and `group_oracle`, the accuracy of knowing the
image's group at the part's level and guessing the group's majority value. A level's codes that encode its
group reach the oracle on every trait: 1 on the traits fixed at or above the level, less on finer ones (a level
0 code cannot tell the colours of the species of one order apart); codes that also carry finer information
exceed the oracle on finer traits, which is what the free part is for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from core.plotting import pyplot, save_figure, save_table, show_or_close


def code_parts(autoencoder) -> dict[str, list[int]]:
    """Positions of each level's own codes ("level l") and of the free codes ("free")."""
    cpl = autoencoder.codes_per_level
    parts = {f"level {lv}": list(range(lv * cpl, (lv + 1) * cpl)) for lv in range(autoencoder.levels)}
    parts["free"] = list(autoencoder.free_positions)
    return parts


def nearest_centroid(train_codes: torch.Tensor, train_y: np.ndarray, test_codes: torch.Tensor, vocab: int,
                     n_classes: int) -> np.ndarray:  # fmt: skip
    """Predicted class of each test row: the nearest class mean of the one-hot code vectors (ties: the lowest
    class). With one-hot rows |x|^2 is the number of positions, so the nearest mean maximises
    2 sum_p mean_k[p, code_p] - |mean_k|^2."""
    n, positions = train_codes.shape
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    flat = (torch.arange(positions) * vocab + train_codes.long()).flatten()
    counts = torch.zeros(n_classes, positions * vocab, dtype=torch.float64)
    counts.index_put_((y.repeat_interleave(positions), flat), torch.ones(len(flat), dtype=torch.float64),
                      accumulate=True)  # fmt: skip
    sizes = torch.bincount(y, minlength=n_classes).double().clamp(min=1)
    means = counts / sizes[:, None]
    test_flat = torch.arange(positions) * vocab + test_codes.long()  # [M, P]
    score = 2 * means[:, test_flat].sum(-1).T - means.square().sum(1)  # [M, K]
    score[:, torch.bincount(y, minlength=n_classes) == 0] = -torch.inf  # classes never seen in training
    return score.argmax(1).numpy()


def group_oracle(
    train_groups: np.ndarray, train_y: np.ndarray, test_groups: np.ndarray, n_classes: int
) -> np.ndarray:
    """The majority training value of each test row's group (the overall majority for an unseen group)."""
    overall = np.bincount(train_y, minlength=n_classes).argmax()
    majority = {}
    for g in np.unique(train_groups):
        majority[g] = np.bincount(train_y[train_groups == g], minlength=n_classes).argmax()
    return np.array([majority.get(g, overall) for g in test_groups])


def trait_probe(
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    parts: dict[str, list[int]],
    traits: dict[str, tuple[str, list[str]]],
    assignment: np.ndarray,
    vocab: int,
) -> list[dict]:
    """One row per (code part, trait): accuracy of the probe, chance, the group oracle, and whether the part's
    level fixes the trait (`fixed_at_or_above`: every group of the level holds species of one value, read from
    the data, so a level that groups the species as two ranks do fixes the traits of both).

    `train`/`test`: (codes [N, T], species index [N]); `traits`: {trait: (rank, value per species)};
    `assignment` [L, C]: each species' group per level."""
    (train_codes, train_sp), (test_codes, test_sp) = train, test
    train_sp, test_sp = np.asarray(train_sp), np.asarray(test_sp)
    rows = []
    for part, positions in parts.items():
        level = int(part.split()[1]) if part.startswith("level ") else None
        for trait, (rank, per_species) in traits.items():
            values = sorted(set(per_species))
            code = np.array([values.index(v) for v in per_species])
            y_train, y_test = code[train_sp], code[test_sp]
            predicted = nearest_centroid(train_codes[:, positions], y_train, test_codes[:, positions], vocab,
                                         len(values))  # fmt: skip
            chance = float((y_test == np.bincount(y_train, minlength=len(values)).argmax()).mean())
            row = {"part": part, "trait": trait, "rank": rank, "accuracy": float((predicted == y_test).mean()),
                   "chance": chance, "group_oracle": None, "fixed_at_or_above": None}  # fmt: skip
            if level is not None:
                groups = assignment[level]
                oracle = group_oracle(groups[train_sp], y_train, groups[test_sp], len(values))
                row["group_oracle"] = float((oracle == y_test).mean())
                row["fixed_at_or_above"] = len(set(zip(groups, code, strict=True))) == len(set(groups))
            rows.append(row)
    return rows


def write_trait_report(
    rows: list[dict], out_dir: str | os.PathLike, rank_order: list[str], show: bool = False
) -> Path:
    """traits.csv and traits.png: the probe's accuracy per code part (rows) and trait (columns, coarse to fine),
    each cell with the group oracle beside it."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    save_table(frame, out_dir / "traits.csv")
    rank_of = dict(zip(frame["trait"], frame["rank"], strict=True))
    known = {rank: i for i, rank in enumerate(rank_order)}
    traits = sorted(rank_of, key=lambda t: (known.get(rank_of[t], len(known)), t))
    parts = list(dict.fromkeys(frame["part"]))
    grid = frame.pivot(index="part", columns="trait", values="accuracy").loc[parts, traits]
    oracle = frame.pivot(index="part", columns="trait", values="group_oracle").loc[parts, traits]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(traits) + 2.5, 0.6 * len(parts) + 2.2))
    image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    for i in range(len(parts)):
        for j in range(len(traits)):
            text = f"{grid.iloc[i, j]:.2f}"
            if pd.notna(oracle.iloc[i, j]):
                text += f"\n({float(oracle.iloc[i, j]):.2f})"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if grid.iloc[i, j] < 0.6 else "black",
            )
    ax.set_xticks(
        range(len(traits)), [f"{t}\n({rank_of[t]})" for t in traits], rotation=45, ha="right", fontsize=7
    )
    ax.set_yticks(range(len(parts)), parts, fontsize=8)
    ax.set_xlabel("trait (the rank that fixes it)")
    ax.set_ylabel("codes read by the probe")
    ax.set_title("Held-out accuracy of predicting each trait from one code part\n(in brackets: knowing the "
                 "part's group and guessing its majority value)", fontsize=9)  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046, label="accuracy")
    fig.tight_layout()
    save_figure(fig, out_dir / "traits.png")
    show_or_close(fig, show)
    return out_dir / "traits.csv"

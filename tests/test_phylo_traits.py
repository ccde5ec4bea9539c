"""The world's ground truth for the codes: the trait probe on synthetic codes with known answers, the nearest
class mean by hand, the group oracle, and the world's traits read back from world.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.world import TRAIT_RANK, load_taxonomy, load_traits
from testing.phylo.traits import group_oracle, nearest_centroid, trait_probe, write_trait_report

# 8 species: 2 orders x 2 families x 2 species; level 0 = order, 1 = family, 2 = species
ASSIGNMENT = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3], list(range(8))])
TRAITS = {
    "body": ("order", ["round"] * 4 + ["long"] * 4),
    "bill": ("family", ["short", "short", "long", "long", "hooked", "hooked", "cone", "cone"]),
    "colour": ("species", ["red", "blue", "green", "white", "brown", "purple", "yellow", "orange"]),
    # a genus trait where each family holds one genus: level 1 (the families) fixes it, as it fixes the bill
    "crest": ("genus", ["none", "none", "tuft", "tuft", "none", "none", "tuft", "tuft"]),
}


def synthetic_codes(per_species: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Positions 0-1: the order id; 2-3: the family id; 4-5: the species id; 6-7: free, always 0."""
    species = np.repeat(np.arange(8), per_species)
    codes = torch.zeros(len(species), 8, dtype=torch.long)
    for level in range(3):
        codes[:, 2 * level : 2 * level + 2] = torch.as_tensor(ASSIGNMENT[level][species])[:, None]
    return codes, species


def test_nearest_centroid_and_oracle_by_hand():
    train = torch.tensor([[0, 1], [0, 1], [2, 1], [2, 3]])
    y = np.array([0, 0, 1, 1])
    # class 0 mean: position 0 = code 0, position 1 = code 1; class 1: pos 0 = 2, pos 1 = half 1, half 3
    test = torch.tensor([[0, 1], [2, 3], [2, 1], [0, 3]])
    assert nearest_centroid(train, y, test, vocab=4, n_classes=3).tolist() == [0, 1, 1, 0]
    # [2, 1]: class 0 scores 2 (0 + 1) - 2 = 0, class 1 2 (1 + 0.5) - 1.5 = 1.5; [0, 3]: 0 against -0.5
    assert group_oracle(np.array([0, 0, 0, 1]), np.array([2, 2, 1, 0]), np.array([0, 1, 5]), 3).tolist() == [
        2,
        0,
        2,
    ]


def test_each_levels_codes_reach_the_group_oracle_and_no_further():
    train, test = synthetic_codes(6, 0), synthetic_codes(4, 1)
    parts = {"level 0": [0, 1], "level 1": [2, 3], "level 2": [4, 5], "free": [6, 7]}
    rows = trait_probe(train, test, parts, TRAITS, ASSIGNMENT, vocab=8)
    table = {(r["part"], r["trait"]): r for r in rows}
    # Level 0 codes name the order: the body exactly; the bill as well as knowing the order allows (1 of the 2
    # families' bills: 1/2); the colour 1 of 4 species per order (ties go to the lowest class, as the oracle's).
    assert [table["level 0", t]["accuracy"] for t in ("body", "bill", "colour")] == [1.0, 0.5, 0.25]
    assert [table["level 0", t]["group_oracle"] for t in ("body", "bill", "colour")] == [1.0, 0.5, 0.25]
    assert [table["level 1", t]["accuracy"] for t in ("body", "bill", "colour")] == [1.0, 1.0, 0.5]
    assert all(table["level 2", t]["accuracy"] == 1.0 for t in TRAITS)
    assert table["level 0", "body"]["fixed_at_or_above"] and not table["level 0", "bill"]["fixed_at_or_above"]
    assert (
        table["level 1", "bill"]["fixed_at_or_above"] and not table["level 1", "colour"]["fixed_at_or_above"]
    )
    assert (
        table["level 1", "crest"]["fixed_at_or_above"] and not table["level 0", "crest"]["fixed_at_or_above"]
    )
    # The free codes are constant: the probe falls back to one value, the majority's share at best.
    assert [table["free", t]["accuracy"] for t in TRAITS] == [0.5, 0.25, 0.125, 0.5]
    assert [table["free", t]["chance"] for t in TRAITS] == [0.5, 0.25, 0.125, 0.5]
    assert table["free", "body"]["group_oracle"] is None


def test_trait_report_files(tmp_path):
    train, test = synthetic_codes(3, 0), synthetic_codes(3, 1)
    parts = {"level 0": [0, 1], "free": [6, 7]}
    rows = trait_probe(train, test, parts, TRAITS, ASSIGNMENT, vocab=8)
    write_trait_report(rows, tmp_path, ["order", "family", "species"])
    header = (tmp_path / "traits.csv").read_text().splitlines()[0]
    assert header == "part,trait,rank,accuracy,chance,group_oracle,fixed_at_or_above"
    assert (tmp_path / "traits.png").stat().st_size > 5000


def test_world_traits_are_fixed_by_their_rank(small_world):
    names, traits = load_traits(small_world)
    taxonomy = load_taxonomy(small_world)
    assert names == [row["species"] for row in taxonomy]
    assert {t: rank for t, (rank, _) in traits.items()} == TRAIT_RANK
    for trait, (rank, values) in traits.items():  # species of one group at the trait's rank share the value
        groups = [row[rank] for row in taxonomy]
        for g in set(groups):
            assert len({v for v, h in zip(values, groups, strict=True) if h == g}) == 1, (trait, g)
    colours = traits["primary_color"][1]  # fixed per species: the two species of every genus differ in it
    for genus in {row["genus"] for row in taxonomy}:
        members = [c for c, row in zip(colours, taxonomy, strict=True) if row["genus"] == genus]
        assert len(set(members)) == len(members) == 2, genus
    assert [traits[t][0] for t in ("body_shape", "bill_shape", "crest")] == ["order", "family", "genus"]
    with pytest.raises(FileNotFoundError):
        load_traits(small_world.parent)

"""What every Phylo-NN model shares: the order of its code positions, the level heads and the free part's adversary.

Codes are level-ordered: `levels x codes_per_level` phylo codes, level 0 (the coarsest) first, then the free
codes. The level-l head reads the codes of levels 0..l; the adversary reads the free codes and names a species.
"""

from __future__ import annotations

from torch import nn


class CodeLayout:
    """Positions of the codes, for a model with `levels`, `codes_per_level` and `free_codes` attributes."""

    levels: int
    codes_per_level: int
    free_codes: int

    @property
    def n_phylo(self) -> int:
        return self.levels * self.codes_per_level

    @property
    def sequence_length(self) -> int:
        """Code positions per image: the phylo codes level by level (coarse first), then the free codes."""
        return self.n_phylo + self.free_codes

    def level_positions(self, level: int) -> range:
        """Positions of the codes of levels 0..level (the cumulative prefix the level-l head reads)."""
        return range(0, (level + 1) * self.codes_per_level)

    @property
    def free_positions(self) -> range:
        return range(self.n_phylo, self.sequence_length)


def level_heads(group_counts: list[int], codes_per_level: int, embed_dim: int) -> nn.ModuleList:
    """One linear head per level, the level-l head on the flattened codes of levels 0..l."""
    per_level = codes_per_level * embed_dim
    return nn.ModuleList(nn.Linear((lv + 1) * per_level, n) for lv, n in enumerate(group_counts))


def species_adversary(free_codes: int, embed_dim: int, hidden: int, n_species: int) -> nn.Sequential:
    """An MLP naming the species from the flattened free codes."""
    return nn.Sequential(nn.Linear(free_codes * embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, n_species))

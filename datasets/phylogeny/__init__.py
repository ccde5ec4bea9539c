"""Phylogenies: Newick text and taxonomy tables read into trees, tree distances, and taxonomic levels."""

from datasets.phylogeny.newick import NewickError, Node, parse_newick, write_newick
from datasets.phylogeny.tree import (
    Levels,
    Tree,
    build_levels,
    levels_from_record,
    name_key,
    node_label,
    phylogeny_record,
    rank_cuts,
    read_tree,
    suggest,
)

__all__ = [
    "Levels",
    "NewickError",
    "Node",
    "Tree",
    "build_levels",
    "levels_from_record",
    "name_key",
    "node_label",
    "parse_newick",
    "phylogeny_record",
    "rank_cuts",
    "read_tree",
    "suggest",
    "write_newick",
]

"""Phylo-NN: a VQ autoencoder with per-level phylogenetic codes and a free part, and a conditional code prior."""

from models.phylo.autoencoder import PhyloAutoencoder
from models.phylo.checkpoint import (
    KIND,
    PLAIN_KIND,
    PhyloModel,
    load_phylo,
    load_plain,
    save_phylo,
    save_plain,
)
from models.phylo.prior import CodePrior
from models.phylo.quantizer import VectorQuantizer

__all__ = [
    "KIND",
    "PLAIN_KIND",
    "CodePrior",
    "PhyloAutoencoder",
    "PhyloModel",
    "VectorQuantizer",
    "load_phylo",
    "load_plain",
    "save_phylo",
    "save_plain",
]

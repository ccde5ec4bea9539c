"""Phylo-NN: a stage-1 VQGAN, the phylogenetic disentangler on its features (per-level phylo codes and a free
part), a conditional code prior; and the single VQ autoencoder of earlier runs."""

from models.phylo.autoencoder import PhyloAutoencoder
from models.phylo.checkpoint import (
    KIND,
    PLAIN_KIND,
    VQGAN_KIND,
    PhyloModel,
    load_phylo,
    load_plain,
    load_vqgan,
    save_phylo,
    save_plain,
    save_vqgan,
)
from models.phylo.discriminator import PatchDiscriminator
from models.phylo.disentangler import PhyloDisentangler, PhyloNN
from models.phylo.prior import CodePrior
from models.phylo.quantizer import VectorQuantizer, codebook_commitment
from models.phylo.vqgan import VQGAN

__all__ = [
    "KIND",
    "PLAIN_KIND",
    "VQGAN",
    "VQGAN_KIND",
    "CodePrior",
    "PatchDiscriminator",
    "PhyloAutoencoder",
    "PhyloDisentangler",
    "PhyloModel",
    "PhyloNN",
    "VectorQuantizer",
    "codebook_commitment",
    "load_phylo",
    "load_plain",
    "load_vqgan",
    "save_phylo",
    "save_plain",
    "save_vqgan",
]

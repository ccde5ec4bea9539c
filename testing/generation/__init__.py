"""`generate` modes beyond StyleGAN2 sampling: conditional VAE and Phylo-NN samples, latent or code traversals,
interpolations. Every mode writes `images/<group>/NNNNNN.png`, `grid.png` (one row per group) and
`manifest.jsonl` (one row per image: file, mode, condition, seed, checkpoint hash, and what else defines it),
the layout `vdna make` reads."""

TOP_K = 5  # the default top-k of Phylo-NN prior sampling (its generation script samples with 5)

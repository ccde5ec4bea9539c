"""Phylo-NN training: the trainer (`trainer`: config, data and tree, `train_phylo` running the stages and the
evaluation), the three stages on the shared run lifecycle (`stages`: VQGAN, disentangler, prior) and their
losses (`losses`)."""

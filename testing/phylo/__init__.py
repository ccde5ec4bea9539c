"""Phylo-NN analysis: do the codes follow the tree (`correlations`: per level, code distances against tree
distances), do they carry the traits their level fixes (`traits`: the synthetic world's ground truth), and the
one pass over a split that `train phylo` and `test phylo` report (`evaluate`: the above, the round trip of real
images through the codes and the fidelity of samples)."""

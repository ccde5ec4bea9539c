"""StyleGAN2 training: the trainer (`trainer`: config, networks, the importable `train_step`, snapshots and the
loop on the shared run lifecycle), its losses and regularisers (`losses`) and the discriminator's adaptive
augmentation (`augment`, ADA)."""

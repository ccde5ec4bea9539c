"""VisCoIN training-step throughput (images/s, real + generated) with random weights and random real images.

Measures one optimiser step as `train viscoin` does it: G samples the generated half, f encodes both halves,
Psi/Theta/Omega forward, f classifies the reconstructions, all losses, backward, two Adam steps.
Defaults: 64 px on CPU with the `world` GAN preset's generator; `--size 256 --device cuda` for the paper scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.device import autocast, resolve_device  # noqa: E402
from models.classifiers import Classifier  # noqa: E402
from models.stylegan2 import Generator  # noqa: E402
from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer  # noqa: E402
from training import viscoin_losses as losses  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="real images per step (as many generated)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--concepts", type=int, default=64)
    parser.add_argument("--latent", type=int, default=256)
    parser.add_argument("--channel-base", type=int, default=8192)
    parser.add_argument("--channel-max", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    f = Classifier(args.arch, 200).to(device).eval().requires_grad_(False)
    G = Generator(z_dim=256, c_dim=0, w_dim=256, img_resolution=args.size, img_channels=3,
                  mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=args.channel_base, channel_max=args.channel_max))  # fmt: skip
    G = G.to(device).eval().requires_grad_(False)
    psi = ConceptExtractor(f.feature_channels, args.concepts, args.latent).to(device)
    theta = Explainer(args.concepts, 200).to(device)
    omega = ConceptDecoder.from_generator(G, args.concepts, 3).to(device)
    opt1 = torch.optim.Adam([*psi.parameters(), *theta.parameters()], lr=1e-4)
    opt2 = torch.optim.Adam([p for p in omega.parameters() if p.requires_grad], lr=1e-4)
    real = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1

    def step() -> None:
        with torch.no_grad():
            x = torch.cat([real, G(torch.randn(args.batch, G.z_dim, device=device)).clamp(-1, 1)])
            with autocast(device, args.amp):
                logits_f, feats = f(x)
        with autocast(device, args.amp):
            concepts, support = psi([t.detach() for t in feats])
            logits_t = theta(concepts)
            x_hat, ws = omega(concepts, support)
            logits_hat, _ = f(x_hat)
        loss = losses.reconstruction(x_hat, x, logits_f, logits_hat, None, 0.0, 0.1)["rec"]
        loss = loss + losses.orthogonality(psi.conv5.weight) + losses.w_regulariser(ws, omega.w_avg)
        loss = loss + 0.5 * losses.output_fidelity(logits_f, logits_t) + 0.2 * losses.sparsity(concepts)
        loss.backward()
        opt1.step()
        opt2.step()
        opt1.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 2 * args.batch * args.steps / (time.perf_counter() - start)
    print(f"device {device}, {args.size} px, {args.arch}, K={args.concepts}, batch {args.batch}+{args.batch}, "
          f"amp {args.amp}: {rate:.1f} images/s per training step")  # fmt: skip


if __name__ == "__main__":
    main()

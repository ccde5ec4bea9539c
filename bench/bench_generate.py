"""Benchmark the generation models: training steps/s at their presets' sizes and sampling images/s.

Times the trainers' own step functions on random data of the preset's shape (data loading left out):
`training.cvae.train_step` (tiny: world 32 px; digits: 64-value MLP), `training.phylo.stages.vqgan_step`,
`disentangler_step` and `prior_step` (tiny), and sampling through `testing.generation` (CVAE decode; Phylo-NN prior draw + decode).
bf16 autocast on CUDA unless `--no-amp`. On a CPU shared with other jobs, `OMP_NUM_THREADS=1` per process
avoids OpenMP oversubscription (which slowed these small convolutions 5-10x in our runs).

    python bench/bench_generate.py                      # cuda when available, else cpu
    python bench/bench_generate.py --device cpu --steps 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def timed(fn, device: torch.device, steps: int) -> float:
    """Mean seconds per call over `steps` calls after one warm-up call (bench_gan_training's timer)."""
    from bench.bench_gan_training import _timed

    return _timed(fn, device, steps, warmup=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per measurement (default: 10)")
    parser.add_argument("--sample-batch", type=int, default=64, help="images per sampling call (default: 64)")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA too")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from core.device import resolve_device
    from datasets.phylogeny import Tree, build_levels, parse_newick
    from models.phylo import PatchDiscriminator, PhyloNN
    from models.phylo.checkpoint import PhyloModel
    from testing.generation import cvae as gen_cvae
    from testing.generation import phylo as gen_phylo
    from training import cvae as tc
    from training.phylo import stages as tp
    from training.phylo.trainer import PhyloConfig

    device = resolve_device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    torch.manual_seed(0)
    rows = []

    for preset, x_shape, n_classes, n_attrs in (("tiny", (3, 32, 32), 24, 41), ("digits", (1, 8, 8), 10, 64)):
        cfg = tc.CVAEConfig.preset(preset, {"device": str(device), "amp": amp})
        data = tc.CVAEData(None, None, [str(i) for i in range(n_classes)], [str(i) for i in range(n_attrs)], x_shape,
                           (-1.0, 1.0), {})  # fmt: skip
        model = tc.build_model(cfg, data).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        b = cfg.batch_size
        x = torch.rand(b, *x_shape, device=device) * 2 - 1
        labels = torch.randint(n_classes, (b,), device=device)
        attrs = (torch.rand(b, n_attrs, device=device) < 0.3).float()
        step = timed(lambda: tc.train_step(model, model, opt, x, labels, attrs, cfg), device, args.steps)  # noqa: B023
        rows.append((f"train cvae ({preset}) step, batch {b}", 1 / step, "steps/s"))
        model.eval()
        n = args.sample_batch
        z, c = (
            torch.randn(n, model.latent_dim),
            model.conditions(n, labels=torch.zeros(n, dtype=torch.long, device=device)),
        )
        sample = timed(lambda: gen_cvae.decode(model, z, c, (-1.0, 1.0), n), device, args.steps)  # noqa: B023
        rows.append((f"sample cvae ({preset}), batch {n}", n / sample, "images/s"))

    cfg = PhyloConfig.preset("tiny", {"device": str(device), "amp": amp})
    newick = "(((A:1,B:1)g1:1,(C:1,D:1)g2:1)f1:1,((E:1,F:1)g3:1,(G:1,H:1)g4:1)f2:1)root;"
    levels = build_levels(
        Tree(parse_newick(newick)), list("ABCDEFGH"), [0.5, 0.8]
    )  # 2 orders, 4 genera, 8 species
    assignment = torch.as_tensor(levels.assignment, device=device)
    stage1 = tp.build_vqgan(cfg).to(device)
    disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(device)
    opt_g = torch.optim.Adam(stage1.parameters(), lr=cfg.vqgan_lr, betas=tp.ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.vqgan_lr, betas=tp.ADAM_BETAS)
    b = cfg.vqgan_batch_size
    x = torch.rand(b, 3, cfg.data.image_size, cfg.data.image_size, device=device) * 2 - 1
    after = cfg.disc_start  # the discriminator's phase: both networks step
    step = timed(
        lambda: tp.vqgan_step(stage1, disc, opt_g, opt_d, x, after, cfg, None, 1), device, args.steps
    )
    rows.append((f"train phylo stage 1 (VQGAN + discriminator) step, batch {b}", 1 / step, "steps/s"))
    stage1.eval().requires_grad_(False)
    dis = tp.build_disentangler(cfg, stage1, levels).to(device)
    trainable = [p for name, p in dis.named_parameters() if not name.startswith("adversary.")]
    opt, opt_adv = (
        torch.optim.Adam(trainable, lr=cfg.lr),
        torch.optim.Adam(dis.adversary.parameters(), lr=cfg.lr),
    )
    b = cfg.batch_size
    with torch.no_grad():
        h = stage1.encode_features(x[:1]).expand(b, -1, -1, -1).contiguous()
    groups = assignment[:, torch.randint(8, (b,), device=device)]
    step = timed(lambda: tp.disentangler_step(dis, opt, opt_adv, h, groups, cfg, 1), device, args.steps)
    rows.append((f"train phylo stage 2 (disentangler) step, batch {b}", 1 / step, "steps/s"))
    ae = PhyloNN(stage1, dis.eval())
    prior = tp.build_prior(cfg, ae.sequence_length, levels).to(device)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_lr)
    codes = torch.randint(cfg.n_embed, (512, ae.sequence_length), device=device)
    labels = torch.randint(8, (512,), device=device)
    offsets = torch.tensor(levels.condition_offsets, device=device)
    pb = cfg.prior_batch_size
    step = timed(
        lambda: tp.prior_step(prior, opt, codes, labels, assignment, offsets, levels.n_levels, pb, 1),
        device,
        args.steps,
    )
    rows.append((f"train phylo stage 3 (prior) step, batch {pb}", 1 / step, "steps/s"))
    model = PhyloModel(ae.eval(), prior.eval(), {}, Path("bench"))
    n = args.sample_batch
    seeds = list(range(n))
    sample = timed(lambda: gen_phylo.decode(model, gen_phylo.draw(model, 0, seeds, None, 1.0, 0, n), n), device,
                   max(1, args.steps // 5))  # fmt: skip
    rows.append(
        (f"sample phylo (prior {ae.sequence_length} tokens + decode), batch {n}", n / sample, "images/s")
    )

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device {device}, amp {amp}, torch threads {threads}")
    for name, value, unit in rows:
        print(f"{name:<60} {value:10.1f} {unit}")


if __name__ == "__main__":
    main()

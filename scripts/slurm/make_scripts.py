"""Write the ready-made sbatch scripts of this folder with the launch logic of `python main.py submit`
(core.slurm.render): `python scripts/slurm/make_scripts.py`. tests/test_slurm.py checks they are current."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from core.slurm import SlurmJob, render  # noqa: E402

HOW = (
    "Submit from the repository root: sbatch scripts/slurm/{file}  (edit the #SBATCH lines and the command\n"
    "to taste). A requeued job continues its run directory (runs/.../job-<id>); logs: %x-<id>_<task>.out.\n"
    "Compute nodes offline? On a login node first: {prefetch}"
)


def ready_jobs() -> dict[str, SlurmJob]:
    """File name -> job of each ready-made script."""

    def job(file, command, run_dir, gpus, hours, what, prefetch, resumable=True, cpus=8):
        text = f"{what}\n{HOW.format(file=file, prefetch=prefetch)}"
        return SlurmJob(command=command, run_dir=run_dir, job_name=f"biovis-{file.removesuffix('.sbatch')}",
                        description=text, gpus=gpus, cpus=cpus, time=f"{hours:02d}:00:00", resumable=resumable,
                        output="%x-%A_%a.out", restart_overwrite=not resumable)  # fmt: skip

    jobs = [
        job("train_classifier.sbatch", ["train", "classifier", "--dataset", "cub", "--arch", "resnet50",
            "--weights", "imagenet"], "runs/train-classifier/job-{job}", 4, 12,
            "Train the CUB classifier (ResNet-50 from ImageNet weights) on one node, one task per GPU.",
            "python main.py prefetch all"),
        job("train_gan.sbatch", ["train", "gan", "--dataset", "cub"], "runs/train-gan/job-{job}", 4, 48,
            "Train a StyleGAN2 on CUB on one node, one task per GPU.", "python main.py prefetch cub"),
        job("train_viscoin.sbatch", ["train", "viscoin", "--dataset", "cub", "--classifier",
            "checkpoints/cub/classifier.safetensors", "--generator", "checkpoints/cub/gan.safetensors"],
            "runs/train-viscoin/job-{job}", 1, 24,
            "Train VisCoIN on CUB around a trained classifier and StyleGAN2 (see train_classifier/train_gan).",
            "python main.py prefetch all"),
        job("test_viscoin.sbatch", ["test", "viscoin", "--bundle", "runs/train-viscoin/JOB_ID"],
            "runs/test-viscoin/job-{job}", 1, 4,
            "Evaluate a trained VisCoIN run (set --bundle to its run directory).", "python main.py prefetch all",
            resumable=False),
        job("vdna_make.sbatch", ["vdna", "make", "cub:test", "--out", "vdnas/cub-test"], None, 1, 4,
            "Make the Visual DNA of CUB's test split (set SOURCE and --out).", "python main.py prefetch all",
            resumable=False),
    ]  # fmt: skip
    return {j.job_name.removeprefix("biovis-") + ".sbatch": j for j in jobs}


def main() -> None:
    for name, job in ready_jobs().items():
        (HERE / name).write_text(render(job))
        print(HERE / name)


if __name__ == "__main__":
    main()

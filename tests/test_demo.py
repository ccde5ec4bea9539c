"""The quickstart `demo` command, shortened (small world, a few GAN images and VisCoIN steps): every stage
runs, the final report prints, and every figure it names exists."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_short_demo_runs_every_stage(small_world, tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--world", "small", "--classifier-epochs", "1", "--gan-kimg", "0.1",
                     "--viscoin-iterations", "4", "--device", "cpu", "--out", str(out), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo finished" in result.stdout and "of reconstructions" in result.stdout
    figures = [Path(line.strip()) for line in result.stdout.split("figures:")[1].splitlines() if line.strip()]
    assert len(figures) == 8 and all(f.exists() for f in figures), figures
    assert "cpu budget, 32 px" in result.stdout and "random baseline" in result.stdout
    metrics = json.loads((out / "viscoin-test" / "metrics.json").read_text())
    assert metrics["n"] == 64 and 0 <= metrics["accuracy_f_reconstructions"] <= 1
    for stage in ("classifier", "gan", "viscoin", "concepts", "amplify"):
        assert (out / stage / "run.yaml").is_file(), stage


def test_budget_follows_the_device(monkeypatch):
    """CPU keeps the 32 px budget; a CUDA device (named, or found by auto) gets the 64 px one, whose configs
    validate. The GPU run itself is not measured here."""
    import torch

    from training import demo, viscoin
    from training.gan import trainer as gan

    assert demo.demo_budget("cpu") is demo.BUDGETS["cpu"] and demo.BUDGETS["cpu"].image_size == 32
    if not torch.cuda.is_available():
        assert demo.demo_budget("auto") is demo.BUDGETS["cpu"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    for device in ("auto", "cuda", "cuda:0"):
        assert demo.demo_budget(device) is demo.BUDGETS["cuda"], device
    assert demo.demo_budget("cpu") is demo.BUDGETS["cpu"]
    budget = demo.BUDGETS["cuda"]
    assert budget.image_size == 64 and budget.gan_kimg > 5 * demo.BUDGETS["cpu"].gan_kimg
    gan_cfg = gan.GanConfig.preset(
        budget.gan_preset, {**budget.gan_overrides, "image_size": budget.image_size, "kimg": budget.gan_kimg}
    )
    gan_cfg.validate()
    assert gan_cfg.channel_max > gan.GanConfig.preset("tiny", {}).channel_max
    vc_cfg = viscoin.VisCoINConfig.preset(
        "tiny", {**budget.viscoin_overrides, "iterations": budget.viscoin_iterations}
    )
    vc_cfg.validate()

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
    assert len(figures) == 7 and all(f.exists() for f in figures), figures
    metrics = json.loads((out / "viscoin-test" / "metrics.json").read_text())
    assert metrics["n"] == 64 and 0 <= metrics["accuracy_f_reconstructions"] <= 1
    for stage in ("classifier", "gan", "viscoin", "concepts", "amplify"):
        assert (out / stage / "run.yaml").is_file(), stage

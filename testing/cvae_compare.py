"""CVAE runs side by side (the testbed's `compare_models.py`): one table row per `train cvae` run directory, one
figure of the held-out negative ELBO and the sorted KL per latent dimension under each condition setting, and
for runs on vectors the KL sweep of all of them in one figure (KL and active dimensions against the features
given, one line per run, and the KL with none given against each run's input dimension).

Read from each run: `summary.json` (held-out terms, active dimensions, recognition, the sweep), the weights'
sidecar (`cvae.yaml`: the KL per latent dimension per setting, the model config with its prior) and
`config.yaml`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from core.checkpoint import read_meta
from core.config import saved_settings
from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close
from models.cvae import RUN_FILE


def run_record(run_dir: str | os.PathLike) -> dict:
    """What one run says about itself: config, model, held-out terms per setting, KL per dimension."""
    run_dir = Path(run_dir)
    summary_path, weights = run_dir / "summary.json", run_dir / RUN_FILE
    if not summary_path.is_file() or not weights.is_file():
        raise UserError(f"{run_dir} is not a finished train cvae run (it needs summary.json and {RUN_FILE})")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the run {run_dir}: {err}") from None
    config = saved_settings(config if isinstance(config, dict) else {})
    meta = read_meta(weights)
    if meta.get("kind") != "cvae":
        raise UserError(f"{weights} is not a CVAE checkpoint (kind: {meta.get('kind')!r})")
    return {"run_dir": run_dir, "config": config, "model": meta.get("model") or {}, "summary": summary,
            "kl_per_dim": meta.get("kl_per_dim") or {}}  # fmt: skip


def check_runs(run_dirs: list[str | os.PathLike]) -> None:
    """Every run readable and at least two of them (before any output folder is made)."""
    if len(run_dirs) < 2:
        raise UserError(f"compare at least two runs, got {len(run_dirs)}")
    for path in run_dirs:
        run_record(path)


def labels_for(run_dirs: list[Path]) -> list[str]:
    """Short names: the folder name, with its parent's when two runs share one."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def compare_runs(
    run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, show: bool = False
) -> list[dict]:
    """comparison.csv (one row per run) and comparison.png in `out_dir`; returns the rows."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    check_runs(run_dirs)
    records = [run_record(p) for p in run_dirs]
    names = labels_for([r["run_dir"] for r in records])
    rows = []
    for name, rec in zip(names, records, strict=True):
        cfg, model, summary = rec["config"], rec["model"], rec["summary"]
        row = {"run": name, "dataset": cfg.get("dataset"), "arch": model.get("arch"),
               "prior": model.get("prior", "learned"), "latent_dim": model.get("latent_dim"), "beta": cfg.get("beta"),
               "steps": summary.get("steps")}  # fmt: skip
        for setting, terms in (summary.get("val") or {}).items():
            for key in ("neg_elbo", "rec", "kl"):
                row[f"{setting}_{key}"] = terms.get(key)
        for setting, count in (summary.get("active_dims") or {}).items():
            row[f"{setting}_active_dims"] = count
        for key, value in (summary.get("recognition") or {}).items():
            row[f"recognition_{key}"] = value
        sweep = summary.get("sweep") or []
        if sweep:
            row["input_dim"], row["intrinsic_dim"] = sweep[0]["input_dim"], sweep[0]["intrinsic_dim"]
            row.update({f"kl_given_{r['given']}": r["kl_total"] for r in sweep})
        rows.append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_table(pd.DataFrame(rows), out_dir / "comparison.csv")
    settings = list(dict.fromkeys(s for rec in records for s in rec["kl_per_dim"]))
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(settings), figsize=(4.2 * (1 + len(settings)), 3.8), squeeze=False)
    bars = axes[0][0]
    width = 0.8 / max(len(settings), 1)
    for i, setting in enumerate(settings):
        values = [row.get(f"{setting}_neg_elbo") for row in rows]
        shown = [v if v is not None else np.nan for v in values]
        bars.bar(
            np.arange(len(rows)) + (i - (len(settings) - 1) / 2) * width,
            shown,
            width,
            label=f"given: {setting}",
        )
    bars.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    bars.set_ylabel("held-out negative ELBO (nats)")
    bars.set_xlabel("run")
    bars.set_title("Held-out negative ELBO", fontsize=9)
    bars.legend(fontsize=7)
    for ax, setting in zip(axes[0][1:], settings, strict=True):
        for name, rec in zip(names, records, strict=True):
            kl = sorted(rec["kl_per_dim"].get(setting) or [], reverse=True)
            if kl:
                ax.plot(range(1, len(kl) + 1), kl, "o-", markersize=3, label=name)
        ax.set_yscale("symlog", linthresh=0.05)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("latent dimension, sorted by KL")
        ax.set_ylabel("held-out KL (nats)")
        ax.set_title(f"KL per latent dimension, given: {setting}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir / "comparison.png")
    show_or_close(fig, show)
    sweeps = [{**r, "run": name, "kl_per_dim": []} for name, rec in zip(names, records, strict=True)
              for r in rec["summary"].get("sweep") or []]  # fmt: skip
    if sweeps:
        from testing.cvae import plot_kl_sweep

        plot_kl_sweep(sweeps, out_dir / "kl_sweep.png", show=show)
    return rows

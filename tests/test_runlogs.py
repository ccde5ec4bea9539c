"""`logs` figures: bookkeeping keys are not plotted, train and val of one quantity share a panel, every panel's
y axis says what it measures."""

from __future__ import annotations

import pandas as pd

from testing.runlogs import long_table, plot_curves, y_label


def test_panels_skip_bookkeeping_and_join_train_with_val(tmp_path):
    frame = pd.DataFrame([
        {"step": 10, "split": "train", "time": 1.0, "epoch": 1, "kimg": 0.1, "loss": 2.0, "acc": 0.3, "aug_p": 0.0},
        {"step": 20, "split": "train", "time": 2.0, "epoch": 1, "epoch_acc": 0.4, "epoch_loss": 1.8},
        {"step": 20, "split": "val", "time": 3.0, "epoch": 1, "top1": 0.5, "loss": 1.5, "fd_images": 64,
         "fd_random_resnet18": 12.0, "faithfulness": 0.2, "faithfulness_random": 0.05, "n": 64},
    ])  # fmt: skip
    table = long_table(frame)
    assert not {"kimg", "fd_images", "n", "epoch", "time"} & set(table["metric"])
    panels = table.groupby("panel")["metric"].agg(set).to_dict()
    assert panels["acc"] == {"acc", "epoch_acc", "top1"} and panels["loss"] == {"loss", "epoch_loss"}
    assert panels["faithfulness"] == {"faithfulness", "faithfulness_random"}
    assert y_label("acc") == "top-1 accuracy (fraction)" and y_label("fd_random_resnet18").startswith(
        "Fréchet"
    )
    assert (
        y_label("aug_p") == "augmentation probability p" and y_label("some_new_metric") == "some new metric"
    )
    assert plot_curves(table, tmp_path / "curves.png", "run").stat().st_size > 1000

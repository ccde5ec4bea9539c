"""The shared run lifecycle (training/lifecycle) and the configs' data and hardware blocks: the loss window,
the finiteness guard, logs that hold each event once after a kill, and runs made before the blocks existed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, run_cli, run_main

from core.config import build, flat, saved_settings, to_dict
from core.errors import TrainingDiverged, UserError
from training.classifier import ClassifierConfig
from training.cvae import CVAEConfig
from training.gan.trainer import GanConfig
from training.lifecycle import LossWindow
from training.phylo.trainer import PhyloConfig
from training.retrieval import RetrievalConfig
from training.viscoin import VisCoINConfig

FIXTURES = Path(__file__).parent / "fixtures" / "configs_before_blocks"
OLD_CONFIGS = {"clf": ClassifierConfig, "gan": GanConfig, "viscoin": VisCoINConfig, "cvae": CVAEConfig,
               "phylo": PhyloConfig, "retrieval": RetrievalConfig}  # fmt: skip


def test_loss_window_weighted_means_latest_values_and_state_round_trip():
    window = LossWindow()
    window.add(
        {"loss": torch.tensor(2.0) * 4, "acc": torch.tensor(3.0)}, weight=4, latest={"kl": torch.ones(3)}
    )
    window.add({"loss": torch.tensor(1.0) * 2, "acc": torch.tensor(2.0)}, weight=2)
    restored = LossWindow(window.state())
    means, latest = restored.read()
    assert means == pytest.approx({"loss": 10 / 6, "acc": 5 / 6}) and latest == {"kl": [1.0, 1.0, 1.0]}
    assert restored.empty() and restored.finite()
    restored.add({"loss": torch.tensor(float("nan"))})
    assert not restored.finite()


def test_configs_written_before_the_blocks_load_into_them():
    """config.yaml files exactly as the code before the data/hardware blocks wrote them (tiny presets)."""
    for name, cls in OLD_CONFIGS.items():
        old = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
        if name == "phylo":  # the one-stage design's settings: refused with the reason, in one line
            with pytest.raises(UserError, match="one-stage Phylo-NN .* cannot be resumed"):
                build(cls, old)
            continue
        cfg = build(cls, old)
        settings = flat(cfg)
        assert all(settings[k] == v for k, v in old.items()), name
        assert cfg.hardware.device == old["device"] and saved_settings(to_dict(cfg))["seed"] == old["seed"]
        if name != "retrieval":  # a BIOSCAN file's splits: no data block
            assert cfg.data.world == old["world"]
    gan = build(GanConfig, yaml.safe_load((FIXTURES / "gan.yaml").read_text()))
    assert gan.data.val_fraction == 0.0, "a GAN trains on all of train, as before"


def test_presets_options_and_blocks_combine():
    cfg = CVAEConfig.preset("tiny", {"world": "small", "device": "cpu", "steps": 3})
    assert (cfg.data.world, cfg.data.image_size, cfg.data.bbox_crop) == ("small", 32, True)  # preset's
    assert (cfg.hardware.device, cfg.steps) == ("cpu", 3)
    nested = CVAEConfig.preset("tiny", {"data": {"image_size": 16}})
    assert nested.data.image_size == 16 and nested.data.bbox_crop is True, "an option block beats the preset"
    with pytest.raises(Exception, match="unknown setting"):
        build(CVAEConfig, {"data": {"colour": 1}})


@pytest.mark.slow
def test_old_run_directory_resumes(small_world, tmp_path):
    """A run whose config.yaml is in the flat layout of before continues, and is saved in blocks after."""
    args = ["train", "classifier", "--world", "small", "--batch-size", "16", "--device", "cpu", "--quiet",
            "--no-amp", "--num-workers", "0"]  # fmt: skip
    run = tmp_path / "run"
    assert run_cli(*args, "--epochs", "1", "--out", str(run)).returncode == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert isinstance(config["data"], dict) and isinstance(config["hardware"], dict)
    (run / "config.yaml").write_text(yaml.safe_dump(saved_settings(config), sort_keys=False))
    refused = run_cli(*args, "--epochs", "2", "--image-size", "64", "--out", str(run), "--resume")
    assert_user_error(refused, "cannot change image_size")
    done = run_cli(*args, "--epochs", "2", "--out", str(run), "--resume")
    assert done.returncode == 0, done.stderr
    again = yaml.safe_load((run / "config.yaml").read_text())
    assert again["epochs"] == 2 and again["data"]["world"] == "small" and again["hardware"]["amp"] is False
    epochs = [
        e["epoch"]
        for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if e["split"] == "val"
    ]
    assert epochs == [1, 2]


@pytest.mark.parametrize("trainer", ["cvae", pytest.param("phylo", marks=pytest.mark.slow)])
def test_a_killed_run_resumed_logs_each_event_once(trainer, small_world, tmp_path, monkeypatch):
    """Lines written after the last checkpoint by a run that died are dropped on resume: the log equals the
    uninterrupted run's (times and rates aside)."""
    import training.cvae as tc
    import training.phylo.stages as tp_stages
    import training.phylo.trainer as tp
    from core.rundir import prepare_run_dir

    module, cls, steps, step_name = {  # steps: the module whose step function the run calls
        "cvae": (tc, CVAEConfig, tc, "train_step"),
        "phylo": (tp, PhyloConfig, tp_stages, "disentangler_step"),  # killed in stage 2
    }[trainer]
    values = dict(world="small", device="cpu", amp=False, steps=12, eval_every=6, log_every=2, batch_size=8)
    if trainer == "phylo":
        values.update(
            vqgan_steps=6,
            vqgan_batch_size=8,
            prior_steps=4,
            prior_eval_every=2,
            prior_batch_size=8,
            fidelity_samples=1,
        )
    cfg = cls.preset("tiny", values)
    train = getattr(module, f"train_{trainer}")

    def events(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [
            {k: v for k, v in r.items() if k not in ("time", "images_per_s", "sequences_per_s")} for r in rows
        ]

    whole = prepare_run_dir(tmp_path / "whole", f"train {trainer}")
    train(cfg, whole, quiet=True)

    real_step, calls = getattr(steps, step_name), {"n": 0}

    def dies_at_step_10(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # after the checkpoint at 6 and the log lines at 8
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    killed = prepare_run_dir(tmp_path / "killed", f"train {trainer}")
    monkeypatch.setattr(steps, step_name, dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, killed, quiet=True)
    monkeypatch.setattr(steps, step_name, real_step)
    assert any(e["step"] == 8 for e in events(killed)), "the dead run logged past its checkpoint"
    train(cfg, killed, resume=True, quiet=True)
    assert events(killed) == events(whole)


def test_the_guard_writes_the_diverged_line_then_stops(small_world, tmp_path, monkeypatch):
    import training.cvae as tc
    from core.rundir import prepare_run_dir

    cfg = CVAEConfig.preset("tiny", dict(world="small", device="cpu", amp=False, steps=6,
                            eval_every=6, log_every=2, batch_size=8))  # fmt: skip
    real = tc.train_step

    def nan_after_two(*args, **kwargs):
        out = real(*args, **kwargs)
        if nan_after_two.calls >= 2:
            nan = float("nan")
            out = {
                **out,
                "loss": out["loss"] * nan,
                "kl": out["kl"] * nan,
                "kl_per_dim": out["kl_per_dim"] * nan,
            }
        nan_after_two.calls += 1
        return out

    nan_after_two.calls = 0
    monkeypatch.setattr(tc, "train_step", nan_after_two)
    run = prepare_run_dir(tmp_path / "run", "train cvae")
    with pytest.raises(
        TrainingDiverged, match="training diverged at step 4: the training loss \\(loss, kl\\)"
    ):
        tc.train_cvae(cfg, run, quiet=True)
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["kl"] is None and last["kl_per_dim"] == [None] * cfg.latent_dim
    assert math.isfinite(last["rec"]) and not (run / "last.pt").exists(), "nothing non-finite was saved"


@pytest.mark.parametrize("command", ["cvae", "phylo", "retrieval"])
def test_every_trainer_bounds_the_learning_rate(command, tmp_path, capsys, monkeypatch):
    result = run_main(("train", command, "--lr", "1e30", "--out", str(tmp_path / "run"), "--device", "cpu"), capsys,
                      monkeypatch)  # fmt: skip
    assert_user_error(result, "--lr must be between 0 and 10.0")
    assert not (tmp_path / "run").exists()


def trainer_configs():
    from training.classifier import ClassifierConfig
    from training.cvae import CVAEConfig
    from training.gan.trainer import GanConfig
    from training.phylo.trainer import PhyloConfig
    from training.retrieval import RetrievalConfig
    from training.viscoin import VisCoINConfig

    return [ClassifierConfig, CVAEConfig, GanConfig, PhyloConfig, RetrievalConfig, VisCoINConfig]


def test_restore_loads_every_part_and_names_the_file_and_key_of_a_misfit(tmp_path):
    from core import checkpoint
    from training.lifecycle import TrainingRun

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    checkpoint.save_state(
        tmp_path / "last.pt", {"model": net.state_dict(), "opt": opt.state_dict(), "step": 1}
    )
    cfg = ClassifierConfig(hardware=type(ClassifierConfig().hardware)(device="cpu"))
    run = TrainingRun(cfg, tmp_path, resume=True, tune=False)
    state = run.load_state()
    twin = torch.nn.Linear(3, 2)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    run.restore(state, model=twin, opt=twin_opt, schedule=None)  # None: a part this run does not have
    assert torch.equal(twin.weight, net.weight) and torch.equal(twin.bias, net.bias)
    assert torch.equal(
        twin_opt.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    with pytest.raises(UserError, match=r"last\.pt \[model\] does not fit this architecture: shape mismatch"):
        run.restore(state, model=torch.nn.Linear(4, 2))


@pytest.mark.parametrize("cls", trainer_configs(), ids=lambda c: c.__name__)
def test_every_trainer_config_shares_the_lifecycle_checks(cls):
    from core.errors import UserError
    from training.lifecycle import TrainerConfig

    assert issubclass(cls, TrainerConfig)
    cls().validate()  # the defaults are valid
    for name in cls.LEARNING_RATES:
        for bad, message in ((0.0, "must be positive"), (11.0, "must be between 0 and 10.0")):
            with pytest.raises(UserError, match=f"--{name.replace('_', '-')} {message}"):
                cls(**{name: bad}).validate()
    with pytest.raises(UserError, match="--log-every must be positive, got 0"):
        cls(log_every=0).validate()
    with pytest.raises(UserError, match="--device must be auto"):
        cls(hardware=type(cls().hardware)(device="tpu")).validate()


@pytest.mark.parametrize("cls", trainer_configs(), ids=lambda c: c.__name__)
def test_every_preset_builds_and_each_dataset_has_its_default(cls):
    from core.config import load_presets

    presets, defaults = load_presets(cls.presets_file())
    for name in presets:
        cls.preset(name).validate()
    for dataset, name in defaults.items():
        assert cls.preset(None, {"dataset": dataset}) == cls.preset(name, {"dataset": dataset})
    if cls.__name__ == "GanConfig":  # the defaults differ by trainer: the GAN trains the world at 64 px
        assert (
            cls.preset(None, {}).data.image_size == 64
            and cls.preset(None, {"dataset": "cub"}).data.image_size == 256
        )


def test_an_image_size_out_of_range_is_refused_before_any_folder(tmp_path, capsys, monkeypatch):
    for command in ("classifier", "cvae", "phylo", "retrieval"):
        result = run_main(("train", command, "--image-size", "1", "--out", str(tmp_path / command)), capsys,
                          monkeypatch)  # fmt: skip
        assert_user_error(result, "--image-size must be between 8 and 4096 pixels, got 1")
        assert not (tmp_path / command).exists()

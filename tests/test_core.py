"""core/: run logs, atomic writes, checkpoints, run directories, configs, distributed env, progress."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core import checkpoint
from core.atomic import atomic_path, write_text
from core.config import from_preset, require_positive
from core.distributed import dist_env
from core.errors import UserError
from core.progress import Progress
from core.rundir import mark_run, prepare_run_dir, read_run_info
from core.runlog import RunLog, read_events, read_log


def test_runlog_round_trip_and_partial_last_line(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    log.write(1, "train", loss=torch.tensor(0.5), acc=1.0)
    log.write(2, "val", top1=0.25, bad=float("nan"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')  # a writer killed mid-line
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [1, 2]
    assert events[0]["loss"] == 0.5 and events[1]["bad"] is None
    frame = read_log(tmp_path / "log.jsonl")
    assert list(frame["split"]) == ["train", "val"]


def test_runlog_rejects_foreign_lines(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"msg": "hello"}\n{"step": 1, "split": "val"}\n')
    with pytest.raises(UserError, match="lacks 'step'"):
        read_events(tmp_path)
    disabled = RunLog(tmp_path / "other.jsonl", enabled=False)
    disabled.write(1, "train", loss=1.0)
    assert not (tmp_path / "other.jsonl").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


class FullDisk:
    """A file whose writes fill the disk: the first `room` bytes go through, then ENOSPC (as a real full
    disk does: a short write, then the error)."""

    def __init__(self, file, room: int = 600):
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _assert_full_disk(err, path) -> None:
    assert (err.value.errno, err.value.strerror, err.value.filename) == (
        errno.ENOSPC,
        "No space left on device",
        str(path),
    )


def test_a_full_disk_keeps_the_previous_weights_state_and_text(tmp_path, monkeypatch):
    """save_weights (safetensors' Rust writer), save_state (torch.save) and write_text, each failing on a
    full disk half-way: an OSError naming the final file, the previous file byte for byte, no temporary."""
    import builtins

    from safetensors import SafetensorError

    import core.atomic

    weights, state, text = tmp_path / "w.safetensors", tmp_path / "last.pt", tmp_path / "run.yaml"
    checkpoint.save_weights(weights, {"w": torch.ones(4)}, {"kind": "test"})
    checkpoint.save_state(state, {"step": 1, "w": torch.ones(4)})
    write_text(text, "status: finished\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def rust_writer_fills_the_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", rust_writer_fills_the_disk)
    with pytest.raises(OSError) as err:
        checkpoint.save_weights(weights, {"w": torch.zeros(4)}, {"kind": "test"})
    _assert_full_disk(err, weights)

    full = lambda *a, **k: FullDisk(builtins.open(*a, **k))  # noqa: E731, SIM115 (atomic_file closes it)
    monkeypatch.setattr(core.atomic, "open", full, raising=False)
    with pytest.raises(OSError) as err:
        checkpoint.save_state(state, {"step": 2, "w": torch.zeros(100_000)})
    _assert_full_disk(err, state)
    monkeypatch.undo()

    def write_bytes_on_a_full_disk(self, data):
        with FullDisk(open(self, "wb")) as f:
            return f.write(data)

    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", write_bytes_on_a_full_disk)
    with pytest.raises(OSError) as err:
        write_text(text, "status: running\n" * 100)
    _assert_full_disk(err, text)
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_weights_round_trip_and_mismatch_names_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = checkpoint.save_weights(
        tmp_path / "w.safetensors", model.state_dict(), {"kind": "test", "width": 4}
    )
    state, meta = checkpoint.load_weights(path)
    assert meta["kind"] == "test" and meta["width"] == 4
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    checkpoint.load_state_dict_checked(other, state, "w")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    wrong = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(UserError, match=r"shape mismatch 0.weight \(4, 3\) vs \(5, 3\)"):
        checkpoint.load_state_dict_checked(wrong, state, "w")


def test_resume_state_loads_weights_only(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    checkpoint.save_state(
        tmp_path / "s.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    )
    state = checkpoint.load_state(tmp_path / "s.pt")
    assert state["epoch"] == 3 and torch.equal(state["model"]["weight"], model.weight)

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read resume state"):
        checkpoint.load_state(tmp_path / "evil.pt")


def test_run_dir_refuses_finished_run_unless_told(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train")
    (run / "best.safetensors").write_text("weights")
    mark_run(run, status="finished")
    with pytest.raises(UserError, match="already holds a finished"):
        prepare_run_dir(run, "train")
    assert (run / "best.safetensors").read_text() == "weights"
    prepare_run_dir(run, "train", resume=True)
    assert (run / "best.safetensors").exists() and read_run_info(run)["status"] == "running"
    prepare_run_dir(run, "train", overwrite=True)
    assert not (run / "best.safetensors").exists()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("x")
    with pytest.raises(UserError):
        prepare_run_dir(foreign, "train", overwrite=True)
    assert (foreign / "a.jpg").exists()


@dataclass
class Cfg:
    lr: float = 1.0
    epochs: int = 1
    name: str = "x"


def test_presets_and_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("defaults: {world: small}\nsmall:\n  lr: 0.5\n  epochs: 3\nbroken:\n  speed: 9\n")
    cfg = from_preset(Cfg, path, "small", {"epochs": 7, "name": None})
    assert (cfg.lr, cfg.epochs, cfg.name) == (0.5, 7, "x")
    with pytest.raises(UserError, match="choices: small, broken$"):  # `defaults` is not a preset
        from_preset(Cfg, path, "large")
    assert from_preset(Cfg, path, None, {"epochs": 7}, dataset="world") == Cfg(0.5, 7, "x")  # its default
    with pytest.raises(UserError, match="p.yaml names no preset for --dataset cub: choose one with --preset"):
        from_preset(Cfg, path, None, dataset="cub")
    with pytest.raises(UserError, match="unknown setting"):
        from_preset(Cfg, path, "broken")
    with pytest.raises(UserError, match="--epochs must be positive"):
        require_positive(Cfg(epochs=0), "lr", "epochs")


def test_dist_env_from_torchrun_and_slurm():
    assert dist_env({}).world_size == 1
    tr = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.is_main) == (3, 4, 1, False)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": ""}  # fmt: skip
    sl = dist_env(env)
    assert (sl.world_size, sl.launcher) == (8, "srun")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 4242)
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


def test_plain_progress_prints_periodic_lines(capsys):
    with Progress(10, "work", every=5) as bar:
        for _ in range(10):
            bar.update(1, loss=0.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("work: 10/10") and "loss=0.5" in lines[-1]
    with Progress(3, "quiet", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""


def test_file_hash_changes_with_content(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"1")
    first = checkpoint.file_hash(a)
    a.write_bytes(b"2")
    assert checkpoint.file_hash(a) != first and len(first) == 16
    json.dumps(first)


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A header of 0x..80 bytes starts the file with byte 0x80, pickle's first opcode: still safetensors."""
    from core.checkpoint import load_weights, save_weights, sniff_format

    for width in range(1, 300):  # header lengths vary with the tensors' names: find one ending in 0x80
        path, name = tmp_path / "w.safetensors", "w" * width
        save_weights(path, {name: torch.zeros(1)}, {})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert sniff_format(path) == "safetensors" and torch.equal(load_weights(path)[0][name], torch.zeros(1))

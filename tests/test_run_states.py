"""Run folders that tell the truth and outputs that replace only their own kind: a killed run reads
`killed` (not `running`) and resumes; what a SIGKILLed `--overwrite` left aside is put back, reported or
cleaned up; `--name` stays under runs/<command>/; `--overwrite` refuses another command's run and files that
are not the command's own output (the issue's hostile try-out, round three)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, make_finished_run, run_main, snapshot
from test_safety import no_active_runs  # noqa: F401 (autouse: no unfinished run left registered)

from core.errors import UserError
from core.rundir import (
    _start_time,
    check_output_file,
    mark_run,
    prepare_run_dir,
    read_run_info,
    run_state,
)


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def _record(run: Path, **fields) -> None:
    info = read_run_info(run)
    info.update(fields)
    (run / "run.yaml").write_text(yaml.safe_dump(info))


def _refused(args: tuple[str, ...], message: str, capsys, monkeypatch, unchanged: Path) -> None:
    """`main.py ARGS` fails with exit code 2 and exactly `message`, and nothing under `unchanged` changes."""
    before = snapshot(unchanged)
    result = run_main(args, capsys, monkeypatch)
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {message}")
    assert snapshot(unchanged) == before


@pytest.fixture
def finished(tmp_path) -> Path:
    return make_finished_run(tmp_path / "runs" / "done", "train gan", "G_ema.safetensors")


# ----- a killed run is killed, not running -----


def test_a_killed_run_reads_killed_and_can_be_resumed(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    (run / "last.pt").write_bytes(b"state")
    pid = _dead_pid()
    _record(run, pid=pid)
    assert read_run_info(run)["status"] == "running" and run_state(read_run_info(run)) == "killed"
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as err:
        prepare_run_dir(run, "train gan")
    assert err.value.message == (
        f"{run} already holds a killed `train gan` run (its process {pid} ended without finishing it); "
        "pass --resume to continue it, --overwrite to start again, or another --out"
    )
    assert snapshot(tmp_path) == before
    prepare_run_dir(run, "train gan", resume=True)
    assert (run / "last.pt").read_bytes() == b"state" and read_run_info(run)["pid"] == os.getpid()


@pytest.mark.parametrize("change", ["pid-reused", "another-boot"])
def test_a_reused_pid_or_a_reboot_is_not_the_run_alive(change, tmp_path):
    """The recorded pid runs again, but as another program (another start time) or after a reboot."""
    run = prepare_run_dir(tmp_path / "r", "train gan")
    parent = os.getppid()
    fields = {"pid": parent, "pid_start": _start_time(parent)}
    if change == "pid-reused":
        fields["pid_start"] -= 1
    else:
        fields["boot_id"] = "00000000-0000-0000-0000-000000000000"
    _record(run, **fields)
    assert run_state(read_run_info(run)) == "killed"
    prepare_run_dir(run, "train gan", resume=True)


def test_a_live_run_says_it_is_running(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    _record(run, pid=os.getppid(), pid_start=_start_time(os.getppid()))
    with pytest.raises(UserError) as err:
        prepare_run_dir(run, "train gan")
    assert err.value.message == (
        f"{run} holds a `train gan` run that is still running (process {os.getppid()}); wait for it or stop "
        "it, or choose another --out"
    )


def test_the_cli_reports_a_killed_run_in_one_line(tmp_path, capsys, monkeypatch):
    run = prepare_run_dir(tmp_path / "r", "vdna compare", resumable=False)
    pid = _dead_pid()
    _record(run, pid=pid)
    from core import rundir

    rundir._active.clear()
    result = run_main(("vdna", "compare", "a", "b", "--out", str(run)), capsys, monkeypatch)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"error: {run} already holds a killed `vdna compare` run (its process {pid} ended without finishing "
        "it); pass --overwrite to replace it, or another --out",
    )


# ----- what a SIGKILLed --overwrite leaves behind -----

KILL_DURING_OVERWRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from core.rundir import prepare_run_dir
if sys.argv[2] == "before-start":  # killed between moving the old run aside and starting the new one
    real = os.replace
    def replace_then_die(a, b):
        real(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
run = prepare_run_dir(sys.argv[1], "train gan", overwrite=True)
(run / "last.pt").write_bytes(b"new state")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_during_overwrite(run: Path, when: str) -> Path:
    """Run `--overwrite` of `run` in a process that SIGKILLs itself; the folder it moved the old run to."""
    script = KILL_DURING_OVERWRITE.format(root=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script, str(run), when], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (aside,) = [p for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.replaced-")]
    assert aside.name == f".{run.name}.replaced-{socket.gethostname()}-{aside.name.rsplit('-', 1)[1]}"
    return aside


def test_a_kill_before_the_new_run_started_puts_the_old_run_back(finished, capsys):
    before = snapshot(finished.parent)
    aside = _kill_during_overwrite(finished, "before-start")
    assert not finished.exists() and aside.is_dir()
    with pytest.raises(UserError, match="already holds a finished `train gan` run"):
        prepare_run_dir(finished, "train gan")
    assert capsys.readouterr().err == (
        f"note: put the previous run back into {finished} from {aside} (the --overwrite that moved it was "
        "killed)\n"
    )
    assert snapshot(finished.parent) == before and not aside.exists()


def test_a_kill_during_overwrite_keeps_the_old_run_and_says_where(finished, capsys):
    old = snapshot(finished)
    aside = _kill_during_overwrite(finished, "running")
    assert snapshot(aside) == old and run_state(read_run_info(finished)) == "killed"
    pid = read_run_info(finished)["pid"]

    everything = snapshot(finished.parent)
    with pytest.raises(UserError) as err:  # a plain rerun: refused, with where the old run is
        prepare_run_dir(finished, "train gan")
    assert err.value.message == (
        f"{finished} already holds a killed `train gan` run (its process {pid} ended without finishing it); "
        f"pass --resume to continue it, --overwrite to start again, or another --out (the run it replaced is "
        f"kept in {aside})"
    )
    assert snapshot(finished.parent) == everything

    prepare_run_dir(finished, "train gan", resume=True)  # continue the new run: the old one stays until...
    assert capsys.readouterr().err == (
        f"note: the run that {finished} replaced before is kept in {aside}; it is deleted when this run "
        "finishes\n"
    )
    assert snapshot(aside) == old and (finished / "last.pt").read_bytes() == b"new state"
    mark_run(finished, status="finished")  # ...the new one finishes
    assert sorted(p.name for p in finished.parent.iterdir()) == ["done"]


def test_an_old_run_left_by_a_replacement_that_finished_elsewhere_is_removed(finished, capsys):
    aside = _kill_during_overwrite(finished, "running")
    _record(finished, status="finished")  # as if resumed and finished by a process that knew nothing of it
    with pytest.raises(UserError, match="already holds a finished"):
        prepare_run_dir(finished, "train gan")
    assert capsys.readouterr().err == (
        f"note: removed {aside}, the old run that the finished run in {finished} replaced\n"
    )
    assert not aside.exists()


def test_an_overwrite_of_the_killed_replacement_removes_both_once_it_finishes(finished):
    aside = _kill_during_overwrite(finished, "running")
    prepare_run_dir(finished, "train gan", overwrite=True)
    assert aside.is_dir()
    mark_run(finished, status="finished")
    assert sorted(p.name for p in finished.parent.iterdir()) == ["done"]


# ----- --name stays under runs/<command>/ -----


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".", ".hidden", "a\nb", "/abs"])
def test_names_that_leave_the_command_folder_are_refused(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (("train", "classifier", "--name", name), ("submit", "--dry-run", "--", "train", "gan",
                                                          "--name", name)):  # fmt: skip
        folder = "train-classifier" if args[0] == "train" else "train-gan"
        result = run_main(args, capsys, monkeypatch)
        assert (result.returncode, result.stderr.strip()) == (
            2,
            f"error: --name {name!r} is not a plain folder name (no '/', no control characters, not '.' or "
            f"'..', no leading '.'); it names the run under runs/{folder}/, use --out for another place",
        )
    assert list(tmp_path.iterdir()) == []


# ----- --overwrite replaces only the command's own output -----


def test_overwrite_refuses_a_run_of_another_command(finished, capsys, monkeypatch):
    before = snapshot(finished.parent)
    with pytest.raises(UserError) as err:
        prepare_run_dir(finished, "test classifier", overwrite=True, resumable=False)
    assert err.value.message == (
        f"--overwrite refused: {finished} holds a `train gan` run, which `test classifier` does not replace; "
        "choose another --out"
    )
    _refused(("vdna", "compare", "a", "b", "--out", str(finished), "--overwrite"),
             f"--overwrite refused: {finished} holds a `train gan` run, which `vdna compare` does not replace; "
             "choose another --out", capsys, monkeypatch, unchanged=finished.parent)  # fmt: skip
    assert snapshot(finished.parent) == before


def test_check_output_file_is_the_shared_rule(tmp_path):
    mine, theirs = tmp_path / "mine.h5", tmp_path / "notes.txt"
    mine.write_bytes(b"OWN")
    theirs.write_text("a user's notes")
    own = lambda p: p.read_bytes() == b"OWN"  # noqa: E731
    assert check_output_file(tmp_path / "new.h5", False, own, "an HDF5 export") == tmp_path / "new.h5"
    assert check_output_file(mine, True, own, "an HDF5 export") == mine
    with pytest.raises(UserError) as err:
        check_output_file(mine, False, own, "an HDF5 export")
    assert err.value.message == f"{mine} already exists; pass --overwrite to replace it, or another --out"
    with pytest.raises(UserError) as err:
        check_output_file(theirs, True, own, "an HDF5 export")
    assert err.value.message == (
        f"--overwrite refused: {theirs} is not an HDF5 export, so it is kept; choose another --out"
    )
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, True, own, "an HDF5 export")

    def broken(path):
        raise ValueError("a reader that fails on a foreign file")

    with pytest.raises(UserError, match="is not an HDF5 export"):
        check_output_file(mine, True, broken, "an HDF5 export")
    assert theirs.read_text() == "a user's notes" and mine.read_bytes() == b"OWN"


@pytest.mark.parametrize("case", ["foreign-json", "foreign-npz", "npz-alone"])
def test_vdna_make_overwrite_refuses_files_that_are_not_a_vdna(case, tmp_path, capsys, monkeypatch):
    from core.vdna import VDNA, save_vdna

    out = tmp_path / "mine"
    if case == "foreign-json":
        (tmp_path / "mine.json").write_text('{"my": "settings"}')
        np.savez(tmp_path / "mine.npz", table=np.arange(3))
    elif case == "foreign-npz":
        vdna = VDNA(
            "histogram", "histogram-4", {"l": torch.zeros(2, 4, dtype=torch.int64)}, 3, "x", {"l": 2}, 4
        )
        save_vdna(vdna, out)
        np.savez(tmp_path / "mine.npz", table=np.arange(3))
    else:
        np.savez(tmp_path / "mine.npz", table=np.arange(3))
    wrong = tmp_path / ("mine.json" if case == "foreign-json" else "mine.npz")
    _refused(("vdna", "make", "world:small:test", "--out", str(out), "--overwrite"),
             f"--overwrite refused: {wrong} is not one of a VDNA pair (<name>.json + <name>.npz), so it is kept; "
             "choose another --out", capsys, monkeypatch, unchanged=tmp_path)  # fmt: skip


def test_import_gan_overwrite_refuses_weights_it_did_not_write(tmp_path, capsys, monkeypatch):
    from core.checkpoint import save_weights

    snap = tmp_path / "network-snapshot.pkl"
    snap.write_bytes(b"not read: the target is refused first")
    out = tmp_path / "classifier.safetensors"
    save_weights(out, {"w": torch.zeros(2)}, {"kind": "classifier", "source": "train classifier"})
    _refused(("import-gan", str(snap), "--out", str(out), "--overwrite"),
             f"--overwrite refused: {out} is not a generator written by import-gan, so it is kept; choose another "
             "--out", capsys, monkeypatch, unchanged=tmp_path)  # fmt: skip


def test_logs_replaces_only_its_own_tables_and_figure(tmp_path, capsys, monkeypatch):
    from core.runlog import RunLog

    run = tmp_path / "run"
    log = RunLog(run / "log.jsonl")
    for step in (1, 2, 3):
        log.write(step, "train", loss=1.0 / step)
    out = tmp_path / "figures"
    for _ in range(2):  # the second time, the folder holds logs' own output: replaced
        result = run_main(("logs", str(run), "--out", str(out)), capsys, monkeypatch)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "curves.png", "summary.csv"]
    for name, content in (("summary.csv", b"my,own\n1,2\n"), ("curves.png", b"\x89PNG my plot")):
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_bytes(content)
        result = run_main(("logs", str(run), "--out", str(mine)), capsys, monkeypatch)
        assert (result.returncode, result.stderr.strip()) == (
            2,
            f"error: --out {mine} holds a {name} that `logs` did not write; it is kept, choose another --out",
        )
        assert [p.name for p in mine.iterdir()] == [name] and (mine / name).read_bytes() == content

"""Nothing lost, nothing executed: poisoned caches, --overwrite that cannot destroy, one-line errors, run
states, resume logs and file permissions (the hostile try-out's findings, one test each)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_finished_run, snapshot

from core import checkpoint
from core.config import build
from core.errors import UserError
from core.rundir import abandon_active_runs, prepare_run_dir, read_run_info
from core.runlog import RunLog, read_events

TRAIN = ["train", "classifier", "--dataset", "world", "--world", "small", "--image-size", "32", "--quiet",
         "--no-amp", "--device", "cpu"]  # fmt: skip


class Payload:
    """Unpickling this runs code: it creates the file named in MARKER."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    Payload.marker = str(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": Payload()}, path)


def cli(capsys, *args: str) -> tuple[int, str]:
    """`python main.py ARGS` in this process (fast): exit code and stderr."""
    import main

    argv = sys.argv
    sys.argv = ["main.py", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main()
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(autouse=True)
def no_active_runs():
    """Each test starts and ends with no unfinished run registered in this process."""
    from core import rundir

    rundir._active.clear()
    yield
    rundir._active.clear()


@pytest.fixture
def finished_run(tmp_path) -> Path:
    return make_finished_run(tmp_path / "runs" / "done", "train classifier", "best.safetensors")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, small_world) -> Path:
    from training.classifier import ClassifierConfig, train_classifier

    run = prepare_run_dir(tmp_path_factory.mktemp("clf") / "run", "train classifier")
    cfg = build(
        ClassifierConfig, dict(world="small", image_size=32, epochs=1, batch_size=16, device="cpu", amp=False)
    )
    train_classifier(cfg, run, quiet=True)
    return run


# ----- 1. nothing from a cache or a file runs code -----


def test_planted_hub_weights_are_refused_without_running(tmp_path, monkeypatch, capsys, small_world):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    plant(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", marker)
    from models.classifiers import build_classifier

    with pytest.raises(UserError, match="does not have the content its name promises"):
        build_classifier("resnet18", 10, "imagenet")
    code, err = cli(
        capsys, *TRAIN, "--arch", "resnet18", "--weights", "imagenet", "--out", str(tmp_path / "r")
    )
    assert_one_line(code, err, "resnet18-f37072fd.pth", "delete it")
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_hash_matching_pickle_is_still_read_as_data_only(tmp_path, monkeypatch):
    from core.weights import load_url_state_dict, sha256_of

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    planted = tmp_path / "torch" / "hub" / "checkpoints" / "model-00000000.pth"
    plant(planted, marker)
    digest = sha256_of(planted)
    with pytest.raises(UserError, match="nothing was executed") as err:
        load_url_state_dict("https://example.org/model-00000000.pth", "weights", "hint", sha256_prefix=digest)
    assert "weights_only" not in str(err.value) and not marker.exists()


def test_tampered_native_library_is_rebuilt_not_loaded(cache_dir, monkeypatch):
    from core.vdna import native

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    native.binning_kernel.cache_clear()
    kernel = native.binning_kernel()
    assert kernel is not None and native._trusted(kernel.path)
    replacement = kernel.path.with_name("planted")
    replacement.write_bytes(b"\x7fELF not the library we built")
    os.replace(replacement, kernel.path)  # a new file: the loaded one stays mapped
    assert not native._trusted(kernel.path)
    native.binning_kernel.cache_clear()
    rebuilt = native.binning_kernel()
    assert rebuilt.path == kernel.path and native._trusted(rebuilt.path)
    os.chmod(rebuilt.path.parent, 0o777)  # a folder others may write to: never trusted, built privately
    native.binning_kernel.cache_clear()
    private = native.binning_kernel()
    assert cache_dir not in private.path.parents and private.path.parent.stat().st_mode & 0o077 == 0
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    counts = torch.zeros(1, 4 + private.spare_columns, dtype=torch.int32)
    private.bin_rows(
        x, torch.zeros(1, dtype=torch.float64), torch.full((1,), 4.0, dtype=torch.float64), 4, counts
    )
    assert int(counts.sum()) == 4
    native.binning_kernel.cache_clear()


# ----- 2. --overwrite cannot destroy -----


def test_overwrite_with_a_missing_data_folder_changes_nothing(finished_run, capsys):
    before = snapshot(finished_run.parent)
    code, err = cli(capsys, "train", "classifier", "--dataset", "folder", "--data-dir", "/nonexistent",
                    "--out", str(finished_run), "--overwrite")  # fmt: skip
    assert_one_line(code, err, "/nonexistent", "does not exist")
    assert snapshot(finished_run.parent) == before


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails(finished_run, tmp_path, capsys):
    empty = tmp_path / "no-images"
    empty.mkdir()
    before = snapshot(finished_run.parent)
    code, err = cli(capsys, "train", "classifier", "--dataset", "folder", "--data-dir", str(empty),
                    "--out", str(finished_run), "--overwrite", "--quiet")  # fmt: skip
    assert_one_line(code, err, "previous run", "kept")
    assert snapshot(finished_run.parent) == before
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["done"]  # nothing left aside


def test_an_output_folder_may_not_hold_the_inputs(classifier_run, capsys):
    before = snapshot(classifier_run)
    code, err = cli(capsys, "test", "classifier", "--checkpoint", str(classifier_run), "--out",
                    str(classifier_run), "--overwrite", "--quiet")  # fmt: skip
    assert_one_line(code, err, "own input")
    code, err = cli(capsys, "test", "classifier", "--checkpoint", str(classifier_run / "best.safetensors"),
                    "--out", str(classifier_run.parent), "--overwrite", "--quiet")  # fmt: skip
    assert_one_line(code, err, "own input")
    assert snapshot(classifier_run) == before


def test_overwrite_replaces_a_run_once_the_new_one_finished(classifier_run, tmp_path, capsys):
    out = tmp_path / "eval"
    for _ in range(2):
        code, err = cli(capsys, "test", "classifier", "--checkpoint", str(classifier_run), "--out", str(out),
                        "--overwrite", "--quiet")  # fmt: skip
        assert code in (0, None), err
    assert read_run_info(out)["status"] == "finished" and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


# ----- 3. one line instead of a traceback -----


def test_yaml_tags_are_refused_in_one_line_and_never_constructed(classifier_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    run = tmp_path / "tagged"
    shutil.copytree(classifier_run, run)
    (run / "run.yaml").write_text(f"command: {tag}")
    code, err = cli(capsys, *TRAIN, "--out", str(run), "--resume")
    assert_one_line(code, err, "run.yaml", "not plain YAML")
    weights = tmp_path / "w"
    weights.mkdir()
    shutil.copy(classifier_run / "best.safetensors", weights / "best.safetensors")
    (weights / "best.yaml").write_text(f"kind: {tag}")
    code, err = cli(capsys, "test", "classifier", "--checkpoint", str(weights / "best.safetensors"), "--quiet",
                    "--out", str(tmp_path / "eval"))  # fmt: skip
    assert_one_line(code, err, "best.yaml", "not plain YAML")
    assert not marker.exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--lr", "nan", "--lr must be a finite number"),
        ("--lr", "inf", "--lr must be a finite number"),
        ("--lr", "1e38", "--lr must be between 0 and 10"),
        ("--weight-decay", "-1", "--weight-decay must be at least 0"),
        ("--num-workers", "-1", "--num-workers must be at least 0"),
        ("--image-size", "100000", "--image-size must be between 8 and 4096"),
        ("--device", "mps", "--device mps"),
    ],
)
def test_absurd_settings_are_refused_with_the_valid_range(option, value, fragment, tmp_path, capsys):
    if value == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    code, err = cli(capsys, *TRAIN, option, value, "--out", str(tmp_path / "r"))
    assert_one_line(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_gan_lr_inf_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "train", "gan", "--world", "small", "--lr", "inf", "--out", str(tmp_path / "g"))
    assert_one_line(code, err, "--lr must be a finite number")


def test_unreadable_weights_and_folders_say_what_they_are(classifier_run, viscoin, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for weights, fragment in ((garbage, "cannot read"), (tmp_path, "is a folder")):
        code, err = cli(
            capsys, *TRAIN, "--arch", "resnet18", "--weights", str(weights), "--out", str(tmp_path / "r")
        )
        assert_one_line(code, err, str(weights), fragment)
    code, err = cli(capsys, "test", "classifier", "--checkpoint", str(viscoin.bundle), "--quiet",
                    "--out", str(tmp_path / "e"))  # fmt: skip
    assert_one_line(code, err, "torch.save file", "not .safetensors")
    code, err = cli(capsys, "to-pickle", str(viscoin.run_dir), "--out", str(tmp_path))
    assert_one_line(code, err, "is a folder", "viscoin.pt")


def test_refused_pickle_names_the_object_not_the_unsafe_workaround(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError) as err:
        checkpoint.load_foreign_state_dict(tmp_path / "evil.pt")
    message = str(err.value)
    assert "nothing was executed" in message and "Python objects besides tensors (getattr)" in message
    assert "weights_only" not in message and not marker.exists()


def test_read_only_destination_is_one_line(capsys):
    target = Path("/sys/biovis-test-run")
    try:
        target.mkdir()
    except PermissionError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    code, err = cli(capsys, *TRAIN, "--out", str(target))
    assert_one_line(code, err, str(target), "permission denied")


def test_environment_errors_become_one_line():
    import errno

    import main

    error = main.environment_error(PermissionError(errno.EACCES, "Permission denied", "/data/cache/x"))
    assert "/data/cache/x" in error.message and "permission denied" in error.message
    assert main.environment_error(OSError(errno.ENOSPC, "No space left on device", "/out/x")) is not None
    assert main.environment_error(OSError(errno.EIO, "I/O error")) is None


# ----- 4. absurd values and diverged runs -----


def test_diverged_classifier_stops_and_never_becomes_best(small_world, tmp_path, monkeypatch):
    import training.classifier as tc
    from core.errors import TrainingDiverged

    real = tc.evaluate_classifier

    def nan_after_first_epoch(net, *args, **kwargs):
        result = real(net, *args, **kwargs)
        if tc_calls.append(1) or len(tc_calls) > 1:
            result["loss"] = float("nan")
        return result

    tc_calls: list = []
    monkeypatch.setattr(tc, "evaluate_classifier", nan_after_first_epoch)
    run = prepare_run_dir(tmp_path / "run", "train classifier")
    cfg = build(tc.ClassifierConfig, dict(world="small", image_size=32, epochs=3, batch_size=16, device="cpu",
                                          amp=False))  # fmt: skip
    with pytest.raises(TrainingDiverged, match="step"):
        tc.train_classifier(cfg, run, quiet=True)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert checkpoint.read_meta(run / "best.safetensors")["epoch"] == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--num-images", "-3"], "--num-images must be at least 1"),
        (["--image-size", "0"], "--image-size must be between 8"),
    ],
)
def test_vdna_sizes_never_mean_all(args, fragment, tmp_path, capsys):
    code, err = cli(capsys, "vdna", "make", "world:small:test", "--out", str(tmp_path / "dna"), *args)
    assert_one_line(code, err, fragment)


def test_viscoin_test_limits_are_checked(viscoin, tmp_path, capsys):
    base = ["test", "viscoin", "--bundle", str(viscoin.bundle), "--quiet", "--out", str(tmp_path / "t")]
    assert_one_line(*cli(capsys, *base, "--max-images", "0"), "--max-images must be at least 1")
    assert_one_line(
        *cli(capsys, *base, "--concept-threshold", "1.5"), "--concept-threshold must be in [0, 1)"
    )
    assert not (tmp_path / "t").exists()


# ----- 5. run states that tell the truth -----


def test_failed_run_records_its_reason_and_can_be_resumed_or_replaced(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    (run / "last.pt").write_bytes(b"state")
    notes = abandon_active_runs("the data folder vanished")
    assert notes == [f"run {run.resolve()} marked failed"]
    info = read_run_info(run)
    assert info["status"] == "failed" and info["reason"] == "the data folder vanished"
    with pytest.raises(
        UserError, match=r"failed `train gan` run \(the data folder vanished\); pass --resume"
    ):
        prepare_run_dir(run, "train gan")
    prepare_run_dir(run, "train gan", resume=True)
    assert "reason" not in read_run_info(run) and (run / "last.pt").exists()


def test_a_run_that_produced_nothing_leaves_no_folder(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    assert abandon_active_runs("bad input") == [] and not run.exists()


def test_resume_refuses_a_run_of_another_command(classifier_run, capsys):
    before = snapshot(classifier_run)
    code, err = cli(capsys, "train", "gan", "--world", "small", "--out", str(classifier_run), "--resume")
    assert_one_line(code, err, "`train classifier` run", "`train gan` cannot continue it")
    assert snapshot(classifier_run) == before


def test_commands_without_resume_do_not_suggest_it(finished_run):
    with pytest.raises(UserError) as err:
        prepare_run_dir(finished_run, "test classifier", resumable=False)
    assert "--overwrite" in str(err.value) and "--resume" not in str(err.value)


def test_a_live_run_is_not_taken_over(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    info = read_run_info(run)
    from core.rundir import _start_time

    info["pid"], info["pid_start"] = os.getppid(), _start_time(os.getppid())  # alive, and not this process
    (run / "run.yaml").write_text(yaml.safe_dump(info))
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(UserError, match="still running"):
            prepare_run_dir(run, "train gan", **kwargs)


# ----- 6. resume keeps one row per event and no stale temporaries -----


def test_resumed_log_drops_rows_past_the_resumed_step(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for step in (10, 20, 30):
        log.write(step, "train", loss=1.0)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 40, "split": "tr')  # killed mid-line
    RunLog(tmp_path / "log.jsonl", resume_step=20).write(30, "train", loss=0.5)
    assert [(e["step"], e["loss"]) for e in read_events(tmp_path)] == [(10, 1.0), (20, 1.0), (30, 0.5)]


def test_resume_removes_temporaries_of_killed_saves(tmp_path):
    run = prepare_run_dir(tmp_path / "r", "train gan")
    stale = [run / ".last.pt.k2j3h4.pt.tmp", run / "samples" / ".fakes.png.abc.png.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    (run / "keep.txt").write_text("x")
    abandon_active_runs("killed")
    prepare_run_dir(run, "train gan", resume=True)
    assert not any(p.exists() for p in stale) and (run / "keep.txt").exists()


# ----- 7. files others can read -----


def test_outputs_follow_the_umask(tmp_path):
    from core.atomic import atomic_dir, write_text
    from core.plotting import pyplot, save_figure

    old = os.umask(0o022)
    try:
        checkpoint.save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(2)}, {"kind": "test"})
        write_text(tmp_path / "a.json", "{}")
        fig = pyplot().figure()
        save_figure(fig, tmp_path / "f.png")
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "x").write_text("x")
        os.umask(0o027)
        write_text(tmp_path / "group.json", "{}")
    finally:
        os.umask(old)
    for name in ("w.safetensors", "w.yaml", "a.json", "f.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o640


# ----- 9. hints that lead somewhere -----


def test_prefetch_offline_does_not_suggest_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    code, err = cli(capsys, "prefetch", "weights", "vgg16")
    assert_one_line(code, err, "internet access")
    assert "prefetch weights" not in err


def test_offline_fid_and_lpips_weights_name_their_own_option(tmp_path, monkeypatch):
    from models.lpips import LPIPS

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError, match="--lpips-weights PATH"):
        LPIPS("imagenet")


# ----- the commands that landed later, tried the same way -----


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "classifier", "--bogus"], "No such option: --bogus"),
        (["train", "classifier", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["retrieve", "query", "--model", "/nonexistent", "--dna", "ACGT"], "does not exist"),
        (["logs"], "Missing argument"),
        (["submit", "--dry-run", "--time", "99x", "--", "train", "classifier"], "--time takes"),
        (["submit", "--dry-run", "--array", "3-1", "--", "train", "classifier"], "--array takes"),
        (["submit", "--dry-run", "--mem", "lots", "--", "train", "classifier"], "--mem takes"),
        (["submit", "--dry-run", "--", "nonsense"], "not a main.py command"),
        (["train", "retrieval", "--lr", "nan"], "--lr must be a finite number"),
        (["train", "cvae", "--image-size", "100000"], "--image-size must be between 8 and 4096"),
        (["train", "phylo", "--cuts", "2,1"], "--cuts must be"),
    ],
)
def test_usage_and_new_command_errors_are_one_line(args, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, *args)
    assert_one_line(code, err, fragment)
    assert not any(tmp_path.iterdir())  # nothing written


def test_new_commands_refuse_a_checkpoint_of_another_family(classifier_run, capsys, tmp_path):
    out = ["--out", str(tmp_path / "out")]
    for args in (["retrieve", "query", "--model", str(classifier_run), "--dna", "ACGT"],
                 ["generate", "cvae", "-c", str(classifier_run), "--class", "1", *out],
                 ["generate", "phylo", "-c", str(classifier_run), "--species", "all", *out],
                 ["test", "phylo", "--checkpoint", str(classifier_run), *out]):  # fmt: skip
        code, err = cli(capsys, *args)
        assert_one_line(code, err, str(classifier_run))
    assert not (tmp_path / "out").exists()


def test_to_pickle_overwrite_replaces_only_a_bundle(viscoin, tmp_path, capsys):
    """A resume state is a torch zip too, but not a bundle: --overwrite keeps it."""
    state = tmp_path / "last.pt"
    torch.save({"step": 3, "w": torch.ones(2)}, state)
    before = state.read_bytes()
    code, err = cli(capsys, "to-pickle", str(viscoin.run_dir), "--out", str(state), "--overwrite")
    assert (code, err) == (
        2,
        f"error: --overwrite refused: {state} is not a VisCoIN bundle written by to-pickle, so it is kept; "
        "choose another --out",
    )
    assert state.read_bytes() == before
    bundle = tmp_path / "bundle.pt"
    shutil.copy(viscoin.bundle, bundle)
    code, err = cli(capsys, "to-pickle", str(viscoin.run_dir), "--out", str(bundle), "--overwrite")
    assert code == 0, err


def test_a_full_disk_while_saving_weights_is_one_line_and_keeps_the_old_run(classifier_run, tmp_path, capsys,
                                                                             monkeypatch):  # fmt: skip
    """safetensors' writer runs out of space during `train classifier --overwrite`: one line naming the file,
    exit 2, and the run that was there before is back byte for byte."""
    from safetensors import SafetensorError

    run = tmp_path / "run"
    shutil.copytree(classifier_run, run)
    before = snapshot(tmp_path)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    code, err = cli(capsys, *TRAIN, "--epochs", "1", "--batch-size", "16", "--out", str(run), "--overwrite")
    assert (code, err) == (
        2,
        f"error: cannot write {run / 'last.safetensors'}: No space left on device; free some space or choose "
        f"another --out (the file there before, if any, is unchanged) [the previous run in {run.resolve()} was "
        "kept]",
    )
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_saving_a_bundle_keeps_the_old_one(viscoin, tmp_path, capsys, monkeypatch):
    """torch.save runs out of space (a short write, then ENOSPC) while to-pickle replaces its bundle."""
    import builtins

    from test_core import FullDisk

    import core.atomic

    bundle = tmp_path / "bundle.pt"
    shutil.copy(viscoin.bundle, bundle)
    before = snapshot(tmp_path)
    full = lambda *a, **k: FullDisk(builtins.open(*a, **k), room=4096)  # noqa: E731, SIM115
    monkeypatch.setattr(core.atomic, "open", full, raising=False)
    code, err = cli(capsys, "to-pickle", str(viscoin.run_dir), "--out", str(bundle), "--overwrite")
    assert (code, err) == (
        2,
        f"error: cannot write {bundle}: No space left on device; free some space or choose another --out (the "
        "file there before, if any, is unchanged)",
    )
    assert snapshot(tmp_path) == before

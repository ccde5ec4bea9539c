"""`import-gan` and `generate gan` as a user runs them: NVlabs snapshot -> safetensors -> PNG folder."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_user_error, run_cli, snapshot
from PIL import Image
from test_stylegan2 import (  # noqa: F401  (nvlabs_modules is a fixture)
    ShellPayload,
    nvlabs_modules,
    randomise_extras,
    tiny_generator,
    write_snapshot,
)

from core.checkpoint import file_hash, save_weights
from datasets.transforms import to_uint8_images
from models.stylegan2.checkpoint import load_generator, save_generator
from testing.sampling import seed_grid, z_from_seeds

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def cli(capsys, monkeypatch):
    """`python main.py ARGS` in this process (no torch start-up per call): (exit code, stdout, stderr)."""
    import main

    def invoke(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["main.py", *map(str, args)])
        try:
            main.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return invoke


def _generate(cli, checkpoint, out, *extra):
    return cli(
        "generate", "gan", "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--quiet", *extra
    )


def _pngs(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))])


@pytest.fixture
def generator(tmp_path):
    G = tiny_generator(16, seed=5, conv_clamp=256)
    randomise_extras(G)
    path = save_generator(tmp_path / "g.safetensors", G, {"source": "test"})
    return G, path


def test_import_nvlabs_snapshot_then_generate(tmp_path, nvlabs_modules, cli) -> None:  # noqa: F811
    marker = tmp_path / "executed"
    G = tiny_generator(16, seed=5, conv_clamp=256)
    randomise_extras(G)
    snap = tmp_path / "network-snapshot-000100.pkl"
    write_snapshot(snap, G, nvlabs_modules, f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "ckpt" / "gan.safetensors"
    result = run_cli("import-gan", str(snap), "--out", str(out), "--dataset", "cub")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    meta = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert meta["kind"] == "stylegan2-generator" and meta["generator"] == G.config
    assert meta["source"] == f"import-gan {file_hash(snap, length=64)}" and meta["dataset"] == {"name": "cub"}
    loaded, _ = load_generator(out)
    for key, value in G.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    gen = tmp_path / "gen"
    result = _generate(cli, out, gen, "--n", "5", "--seed", "3", "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = to_uint8_images(G(z_from_seeds([3, 4, 5, 6, 7], 16), noise_mode="const"))
    assert np.array_equal(_pngs(gen), expected)

    before = snapshot(out.parent)
    assert_user_error(cli("import-gan", snap, "--out", out), "already exists", "--overwrite")
    assert snapshot(out.parent) == before
    assert cli("import-gan", snap, "--out", out, "--overwrite").returncode == 0


def test_import_refuses_code_carrying_pickle(tmp_path) -> None:
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": ShellPayload(f"touch {pwned}")}, protocol=4))
    out = tmp_path / "out.safetensors"
    assert_user_error(run_cli("import-gan", str(path), "--out", str(out)), "refuses to load", "system")
    assert not pwned.exists() and not out.exists() and not out.with_suffix(".yaml").exists()
    assert_user_error(run_cli("import-gan", str(tmp_path / "missing.pkl"), "--out", str(out)), "not a file")


def test_generate_is_deterministic_with_manifest(generator, tmp_path, cli) -> None:
    G, path = generator
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        result = _generate(
            cli, path, out, "--n", "6", "--seed", "10", "--batch-size", "4", "--truncation", "0.7"
        )
        assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (a / "images").iterdir())
    assert files == [f"{i:06d}.png" for i in range(6)]
    assert snapshot(a / "images") == snapshot(b / "images")  # byte-identical PNGs
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
    rows = [json.loads(line) for line in (a / "manifest.jsonl").read_text().splitlines()]
    digest = file_hash(path)
    assert rows == [
        {
            "file": f"images/{i:06d}.png",
            "mode": "gan",
            "condition": None,
            "seed": 10 + i,
            "truncation": 0.7,
            "noise_mode": "const",
            "checkpoint": digest,
        }
        for i in range(6)
    ]
    grid = np.asarray(Image.open(a / "grid.png"))
    assert np.array_equal(grid, seed_grid(_pngs(a), 10))  # labelled: rows of seeds, columns of offsets
    with torch.no_grad():  # truncation pulls towards w_avg exactly as G does
        expected = to_uint8_images(G(z_from_seeds([14, 15], 16), truncation_psi=0.7, noise_mode="const"))
    assert np.array_equal(_pngs(a)[4:], expected)

    # Any image alone from its seed: equal up to the float rounding of another batch size.
    alone = tmp_path / "alone"
    assert _generate(cli, path, alone, "--n", "1", "--seed", "13", "--truncation", "0.7").returncode == 0
    assert np.abs(_pngs(alone)[0].astype(int) - _pngs(a)[3]).max() <= 1

    # A finished run is kept unless --overwrite.
    before = snapshot(a)
    assert_user_error(_generate(cli, path, a, "--n", "2"), "already holds a finished", "--overwrite")
    assert snapshot(a) == before
    assert _generate(cli, path, a, "--n", "2", "--overwrite").returncode == 0
    assert len(list((a / "images").iterdir())) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--truncation", "1.5"], "--truncation must be in [0, 1]"),
        (["--truncation", "-0.1"], "--truncation must be in [0, 1]"),
        (["--n", "0"], "--n must be positive"),
        (["--batch-size", "-2"], "--batch-size must be positive"),
        (["--noise-mode", "loud"], "--noise-mode must be one of const, random"),
    ],
)
def test_generate_bad_options(generator, tmp_path, cli, args, message) -> None:
    out = tmp_path / "out"
    assert_user_error(_generate(cli, generator[1], out, *args), message)
    assert not out.exists()


def test_generate_bad_truncation_as_a_user_runs_it(generator, tmp_path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "generate", "gan", "--checkpoint", str(generator[1]), "--truncation", "2", "--out", str(out)
    )
    assert_user_error(result, "--truncation must be in [0, 1]")
    assert not out.exists()


def test_generate_refuses_other_checkpoints(generator, tmp_path, cli) -> None:
    G, path = generator
    classifier = save_weights(tmp_path / "clf.safetensors", {"w": torch.zeros(2)}, {"kind": "classifier"})
    out = tmp_path / "out"
    assert_user_error(_generate(cli, classifier, out), "not a StyleGAN2 generator checkpoint", "'classifier'")
    meta = yaml.safe_load(path.with_suffix(".yaml").read_text())
    meta["generator"]["img_resolution"] = meta["img_resolution"] = 32
    meta["num_ws"] = 8
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    assert_user_error(_generate(cli, path, out), "does not fit this architecture", "synthesis.b32")
    assert_user_error(_generate(cli, tmp_path, out), "G_ema.safetensors")
    assert not out.exists()

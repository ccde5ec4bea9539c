"""conda.yml and flake.nix install the packages of requirements.txt and requirements-test.txt (the same names;
conda with the same version specifiers), and `prefetch all` covers every download a command can make."""

from __future__ import annotations

import re

import yaml
from conftest import ROOT, run_cli, run_main

NIX_NAMES = {"torch-bin": "torch", "torchvision-bin": "torchvision", "faiss": "faiss-cpu"}
# the browser tests' system packages (Debian's on CI), not Python's
SYSTEM_TOOLS = {"chromium", "chromedriver"}


def _split(spec: str) -> tuple[str, str]:
    name, version = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", spec).groups()
    return name.lower().replace("_", "-"), version.split("#")[0].replace(" ", "")


def requirements() -> dict[str, str]:
    specs = {}
    for file in ("requirements.txt", "requirements-test.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                name, version = _split(line)
                specs[name] = version
    return specs


def conda() -> dict[str, str]:
    deps = yaml.safe_load((ROOT / "conda.yml").read_text())["dependencies"]
    specs = [d for d in deps if isinstance(d, str)] + [
        p for d in deps if isinstance(d, dict) for p in d["pip"]
    ]
    return {n: v for n, v in map(_split, specs) if n not in ("python", "pip")}


def nix() -> set[str]:
    text = (ROOT / "flake.nix").read_text()
    listed = re.search(r"withPackages \(ps: with ps;(?:\s+let\s.*?\sin)?\s+\[(.*?)\]\);", text, re.S).group(1)
    names = re.findall(r"^\s*\(?([A-Za-z0-9_\-]+)", re.sub(r"#.*", "", listed), re.M)
    tools = re.findall(r"pkgs\.([a-z0-9\-]+)", re.search(r"packages = \[(.*?)\];", text).group(1))
    return {NIX_NAMES.get(n, n) for n in names + tools} - SYSTEM_TOOLS


def test_conda_and_nix_list_the_requirements():
    wanted = requirements()
    assert {"torch", "torchvision", "lpips", "pytest"} <= set(wanted)
    assert conda() == wanted
    assert nix() == set(wanted)


def test_prefetch_all_covers_every_download():
    from models.classifiers import ARCHS as CLASSIFIERS
    from models.extractors import ARCHS as EXTRACTORS

    result = run_cli("prefetch", "all", "--dry-run")
    assert result.returncode == 0, result.stderr
    targets = result.stdout.split()
    assert {"world", "cub", "vgg16", "vit_b_16", "inception_v3"} <= set(targets)
    assert set(CLASSIFIERS) - {"tiny"} <= set(targets) and set(EXTRACTORS) <= set(targets)
    if (ROOT / "testing" / "fid.py").is_file():
        assert "fid-inception" in targets
    assert "cub" not in run_cli("prefetch", "all", "--no-cub", "--dry-run").stdout.split()


def test_prefetch_world_and_cub_fill_their_caches(small_world, tmp_path, capsys, monkeypatch):
    """`prefetch world` generates the preset into --data-dir; `prefetch cub` reports the copy kagglehub hands
    back (here the small world, which has CUB's layout: no network in tests), passing --force on."""
    import kagglehub

    result = run_main(
        ("prefetch", "world", "--preset", "small", "--data-dir", str(tmp_path)), capsys, monkeypatch
    )
    assert result.returncode == 0, result.stderr
    root = next(tmp_path.glob("world-*/CUB_200_2011"))
    assert "world 'small': 128 images, 8 species at" in result.stdout and (root / "images.txt").is_file()
    calls = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, force_download: calls.append(
        (handle, force_download)) or str(small_world.parent))  # fmt: skip
    result = run_main(("prefetch", "cub", "--force"), capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert calls == [("wenewone/cub2002011/versions/7", True)]
    assert result.stdout.startswith("wenewone/cub2002011/versions/7: 128 images, 8 classes at")

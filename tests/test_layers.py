"""The layering of docs/ARCHITECTURE.md, checked on every import statement (module level and inside functions):
cli -> training/testing -> models/datasets -> core, the page (explore) beside cli; no trainer imports another
trainer or holds run plumbing of its own (training/lifecycle does)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "explore", "training", "testing", "models", "datasets", "core")
# what each layer may import from the project
ALLOWED = {
    "cli": {"cli", "explore", "training", "testing", "models", "datasets", "core"},
    "explore": {"explore", "testing", "models", "datasets", "core"},
    "training": {"training", "testing", "models", "datasets", "core"},
    "testing": {"testing", "models", "datasets", "core"},
    "models": {"models", "datasets", "core"},
    "datasets": {"datasets", "core"},
    "core": {"core"},
}
TRAINERS = ("classifier", "cvae", "phylo", "retrieval", "viscoin", "gan")
PLUMBING = ("core.preemption", "core.distributed", "core.rundir", "core.runlog", "core.progress")


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project package in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def sources(package: str):
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def test_imports_point_downwards_only():
    wrong = []
    for package in PACKAGES:
        for path in sources(package):
            for line, module in project_imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_trainers_share_the_lifecycle_and_import_no_other_trainer():
    """A trainer holds its models, optimisers, step, evaluation and artifacts; distributed setup, resume files,
    preemption, run records, logs and progress are training/lifecycle's."""
    wrong = []
    for name in TRAINERS:
        files = sources(f"training/{name}") or [ROOT / "training" / f"{name}.py"]
        for path in files:
            for line, module in project_imports(path):
                other = module.split(".")[1] if module.startswith("training.") else None
                if other in TRAINERS and other != name:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports the {other} trainer")
                if module.startswith(PLUMBING):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports run plumbing {module}")
            text = path.read_text(encoding="utf-8")
            for call in (
                "checkpoint.load_state(",
                "checkpoint.save_state(",
                "preemption.watch(",
                "mark_run(",
            ):
                if call in text:
                    wrong.append(f"{path.relative_to(ROOT)} calls {call[:-1]}")
    assert not wrong, "\n".join(wrong)


def test_the_architecture_document_names_every_package_on_disk():
    """Every subpackage and top-level module of the layers is where docs/ARCHITECTURE.md says it is."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = []
    for package in PACKAGES:
        if not (ROOT / package).is_dir():
            continue
        for path in (ROOT / package).iterdir():
            if path.name.startswith(("_", ".")) or path.suffix not in (".py", ""):
                continue
            if path.is_dir() and not (path / "__init__.py").is_file():
                continue
            shown = f"{package}/{path.name}" + ("/" if path.is_dir() else "")
            if shown not in text and path.name not in text:
                missing.append(shown)
    assert not missing, "not in docs/ARCHITECTURE.md: " + ", ".join(missing)


FAMILIES = ("classifier", "cvae", "gan", "phylo", "retrieval", "stylegan2", "vdna", "viscoin")


def test_three_modules_of_one_family_make_a_subpackage():
    """The layout rule: a folder holds at most two flat modules of one model family (`viscoin.py`,
    `losses_viscoin.py`); a third makes the family a subpackage (`testing/phylo/`, `training/gan/`)."""
    crowded = []
    for package in PACKAGES:
        for folder in [ROOT / package, *(p.parent for p in (ROOT / package).rglob("*/__init__.py"))]:
            names = [p.stem for p in folder.glob("*.py") if not p.name.startswith("_")]
            for family in FAMILIES:
                members = sorted(n for n in names if family in n.split("_"))
                if len(members) >= 3:
                    crowded.append(f"{folder.relative_to(ROOT)}: {', '.join(members)}")
    assert not crowded, "make these families subpackages: " + "; ".join(crowded)

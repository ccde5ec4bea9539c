"""What `explore` was given: each path recognised as one tab, or refused in one line.

- a VisCoIN bundle (`to-pickle` file) or training run / checkpoint -> Concepts
- a retrieval run or checkpoint, optionally with an index folder (`retrieve index --out`) -> Retrieval;
  an index folder alone opens the model it was built with
- a Phylo-NN or CVAE run or checkpoint -> Generation
- a run directory of any other kind, or a folder of run directories (anything holding `log.jsonl`) -> Runs
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

KINDS = ("concepts", "retrieval", "phylo", "cvae", "runs")
ACCEPTED = ("a VisCoIN bundle or run, a retrieval run or index, a Phylo-NN or CVAE run, or a folder of run "
            "directories (holding log.jsonl)")  # fmt: skip
CHECKPOINT_KINDS = {"viscoin": "concepts", "retrieval": "retrieval", "phylo-nn": "phylo", "cvae": "cvae"}
RUN_FILES = {"phylo.safetensors": "phylo", "cvae.safetensors": "cvae"}
RUN_SEARCH_DEPTH = 3  # how deep a folder of runs is searched for log.jsonl


@dataclass
class Source:
    kind: str  # one of KINDS
    path: Path
    index: Path | None = None  # retrieval: the index folder paired with the model
    runs: list[Path] = field(default_factory=list)  # runs: the run directories found

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name or str(self.path)


def _checkpoint_kind(path: Path) -> str | None:
    from core.checkpoint import read_meta

    try:
        return read_meta(path).get("kind")
    except UserError:
        return None


def _index_manifest(folder: Path) -> dict | None:
    from testing.retrieval.store import FORMAT

    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def find_runs(folder: Path, depth: int = RUN_SEARCH_DEPTH) -> list[Path]:
    """Run directories (folders holding log.jsonl) at or below `folder`, sorted; hidden folders skipped."""
    found = []
    level = [folder]
    for _ in range(depth + 1):
        following = []
        for current in level:
            if (current / "log.jsonl").is_file():
                found.append(current)
            try:  # scandir: the entry types come with the listing (cheap on folders of many images)
                with os.scandir(current) as entries:
                    children = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
            except OSError:
                continue
            following.extend(sorted(children))
        level = following
    return sorted(found)


def _file_kind(path: Path) -> str:
    from core.checkpoint import sniff_format

    form = sniff_format(path)
    if form == "safetensors":
        kind = _checkpoint_kind(path)
        if kind in CHECKPOINT_KINDS:
            return CHECKPOINT_KINDS[kind]
        raise UserError(f"{path} is a {kind!r} checkpoint; explore opens {ACCEPTED}")
    if form == "torch":  # a `to-pickle` bundle is a torch zip archive of tensors and plain values
        return "concepts"
    raise UserError(f"{path} is not something explore opens ({form} file); give {ACCEPTED}")


def _folder_kind(path: Path) -> str:
    if _index_manifest(path) is not None:
        return "index"
    for name, kind in RUN_FILES.items():
        if (path / name).is_file():
            return kind
    for name in ("best.safetensors", "final.safetensors", "last.safetensors"):
        kind = _checkpoint_kind(path / name) if (path / name).is_file() else None
        if kind in ("viscoin", "retrieval"):
            return CHECKPOINT_KINDS[kind]
    return "runs"


def recognise(path: str | os.PathLike) -> Source:
    """The kind of one path (an index folder has kind "index" until `recognise_all` pairs it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give {ACCEPTED}")
    kind = _file_kind(path) if path.is_file() else _folder_kind(path)
    if kind != "runs":
        return Source(kind, path)
    runs = find_runs(path)
    if not runs:
        raise UserError(f"{path} is none of what explore opens and holds no run (log.jsonl); give {ACCEPTED}")
    return Source("runs", path, runs=runs)


def recognise_all(paths: list[str | os.PathLike]) -> list[Source]:
    """One source per path, in order; an index folder joins the retrieval model it was built with (matched by
    the model's content hash), or opens that model itself when it was not given."""
    from core.checkpoint import file_hash

    if not paths:
        raise UserError(f"nothing to explore: give {ACCEPTED}")
    sources = [recognise(p) for p in paths]
    models = [s for s in sources if s.kind == "retrieval"]
    hashes = {id(s): file_hash(s.path / "best.safetensors" if s.path.is_dir() else s.path) for s in models}
    out = []
    for source in sources:
        if source.kind != "index":
            out.append(source)
            continue
        manifest = _index_manifest(source.path) or {}
        match = [s for s in models if hashes[id(s)] == manifest.get("model_hash")]
        if match:
            if match[0].index is not None:
                raise UserError(f"two indexes given for the retrieval model {match[0].path}; give one")
            match[0].index = source.path
            continue
        model = Path(str(manifest.get("model_path", "")))
        if not model.exists():
            raise UserError(
                f"the index {source.path} was built with the model {model}, which is not here; give that "
                "model's run too (it is matched to the index by its content hash)"
            )
        out.append(Source("retrieval", model, index=source.path))
    return out

"""A taxonomy table (the CSV of rank columns researchers keep) as a tree with one level per rank.

Columns named after a Linnaean rank (`order`, `family`, `genus`, `species`, ... in any case, in any order in
the file) are read, coarse to fine; other columns (ids, authorities, notes) are ignored. The finest rank
column names the leaves (the classes). Each row is one leaf; every rank cell must be filled, a leaf may
appear once, and a name may have one parent per rank (a genus in two families is refused: taxonomies that
reuse a name in different places must disambiguate it). The tree has no branch lengths: rank k lies at depth
k, so `tree.rank_cuts` cuts it into one level per rank.
"""

from __future__ import annotations

import csv
from pathlib import Path

from core.errors import UserError
from datasets.phylogeny.newick import Node

RANKS = ("domain", "kingdom", "phylum", "subphylum", "superclass", "class", "subclass", "infraclass",
         "superorder", "order", "suborder", "infraorder", "superfamily", "family", "subfamily", "tribe",
         "subtribe", "genus", "subgenus", "species", "subspecies")  # fmt: skip


def read_taxonomy_table(path: str | Path) -> tuple[Node, list[str]]:
    """(root, rank names coarse to fine) of the table at `path` (.tsv: tab-separated, else comma)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read taxonomy table {path}: {err}") from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise UserError(f"taxonomy table {path} is empty; it needs a header row of rank names")
    header = [cell.strip().lower() for cell in rows[0]]
    columns = sorted((RANKS.index(name), i) for i, name in enumerate(header) if name in RANKS)
    if len(columns) < 2:
        raise UserError(
            f"taxonomy table {path}: the header {', '.join(rows[0])!s} names {len(columns)} rank column(s); "
            f"give at least two of {', '.join(RANKS[7:])} (the finest names the classes)"
        )
    ranks = [RANKS[r] for r, _ in columns]
    if len({r for r, _ in columns}) != len(columns):
        raise UserError(f"taxonomy table {path}: a rank column appears twice in the header")
    root = Node("root")
    children: list[dict[str, Node]] = [{} for _ in ranks]  # per rank: name -> node
    for line, row in enumerate(rows[1:], start=2):
        cells = [row[i].strip() if i < len(row) else "" for _, i in columns]
        parent = root
        for depth, (rank, name) in enumerate(zip(ranks, cells, strict=True)):
            if not name:
                raise UserError(f"taxonomy table {path}, row {line}: the {rank} cell is empty; fill every rank "
                                "column (or drop the column)")  # fmt: skip
            node = children[depth].get(name)
            if node is None:
                node = Node(name, parent=parent)
                parent.children.append(node)
                children[depth][name] = node
            elif depth == len(ranks) - 1:
                raise UserError(f"taxonomy table {path}, row {line}: {rank} {name!r} appears twice")
            elif node.parent is not parent:
                raise UserError(
                    f"taxonomy table {path}, row {line}: {rank} {name!r} sits under {node.parent.name!r} and "
                    f"under {parent.name!r}; give each its own name"
                )
            parent = node
    if not root.children:
        raise UserError(f"taxonomy table {path} has a header but no rows")
    return root, ranks

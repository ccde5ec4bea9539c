"""A parsed phylogeny (root distances, patristic distances) and its taxonomic levels, cut at one common depth.

Levels: for a cut `c` in (0, 1) the tree is cut at height h = c * H, where H is the depth of its deepest leaf
(branch lengths summed, or branches counted when the tree has no lengths). A leaf's group is the clade hanging
below the cut on its path: its deepest ancestor N at depth <= h when every child of N reaches below h (the
ultrametric case: N's whole clade lies below the cut), else the child of N on the leaf's path; a leaf that ends
above the cut is a group of its own. Groups are therefore always clades, and the groups of a deeper cut nest
inside those of a shallower one, on any rooted tree. (Phylo-NN cuts each leaf at a fraction of its own depth,
which on a tree whose leaves are not equally deep groups species that form no clade.) A tree whose branch
lengths are all zero is cut by its topology, as one without lengths; a level that would put every species in
one group is refused, since it holds nothing to learn.

The level-`l` distance between two species is the tree distance between their level-`l` groups (0 within a
group); the last level is the species itself, with the full patristic distance. Names are matched to class
names with CUB's `NNN.` prefix dropped and underscores and blanks alike (`Genus_epithet` = `Genus epithet`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError
from datasets.phylogeny.newick import Node, no_collection, parse_newick, write_newick

_CLASS_PREFIX = re.compile(r"^\d+\.")  # CUB class folders: "001.Black_footed_Albatross"
_PLAIN = re.compile(r"[^\s_\d][^\s_]*")  # a name that is its own key
TABLE_SUFFIXES = (".csv", ".tsv")


def name_key(name: str) -> str:
    """How names are matched: CUB's numeric class prefix dropped, underscores and blanks alike."""
    if _PLAIN.fullmatch(name):
        return name
    return " ".join(_CLASS_PREFIX.sub("", name).replace("_", " ").split())


def suggest(name: str, choices) -> str:
    """`closest: 'y'` for the nearest choice (difflib, on names compared as `name_key`, ignoring case), else
    the first few choices."""
    choices = list(choices)
    keys = {name_key(c).lower(): c for c in reversed(choices)}
    near = difflib.get_close_matches(name_key(name).lower(), list(keys), n=1, cutoff=0.5)
    if near:
        return f"closest: {keys[near[0]]!r}"
    shown = ", ".join(repr(c) for c in choices[:5]) + (", ..." if len(choices) > 5 else "")
    return f"choices: {shown}"


class Tree:
    """A parsed phylogeny with root distances, leaf lookup and patristic distances.

    `metric` says what a distance counts: "branch lengths", or "branches" when the tree has no lengths or
    all of them are zero (then every branch counts 1). `ranks` names the levels of a tree built from a
    taxonomy table (coarse to fine, the species last), None otherwise."""

    def __init__(self, root: Node, source: str = "tree", ranks: list[str] | None = None):
        with no_collection():
            self._build(root, source, ranks)

    def _build(self, root: Node, source: str, ranks: list[str] | None) -> None:
        self.root, self.source, self.ranks = root, source, ranks
        self.nodes = list(root.preorder())
        branches = self.nodes[1:]
        given = [n.length is not None for n in branches]
        if any(given) and not all(given):
            first = next(n for n in branches if n.length is None)
            raise UserError(
                f"{source}: some branches have lengths and others not (node {first.name!r} at {first.where} "
                "has none); give all or none (none = every branch counts 1)"
            )
        bad = next((n for n in branches if n.length is not None and n.length < 0), None)
        if bad is not None:
            raise UserError(f"{source}: node {bad.name!r} at {bad.where} has a negative branch length")
        lengths = bool(branches) and all(given) and any(n.length > 0 for n in branches)
        self.metric = "branch lengths" if lengths else "branches"
        if all(given) and branches and not lengths:
            self.metric = "branches (all branch lengths are zero)"
        self._depth: dict[int, float] = {id(root): 0.0}
        for node in branches:  # preorder: a parent before its children
            self._depth[id(node)] = self._depth[id(node.parent)] + (node.length if lengths else 1.0)
        self.leaves = [n for n in self.nodes if n.is_leaf]
        self.height = max(self._depth[id(leaf)] for leaf in self.leaves)
        self.by_key: dict[str, Node] = {}
        for leaf in self.leaves:
            key = name_key(leaf.name)
            if not key:
                raise UserError(f"{source}: the leaf at {leaf.where or 'the root'} has no name")
            if key in self.by_key:
                raise UserError(f"{source}: leaf {leaf.name!r} appears twice ({leaf.where})")
            self.by_key[key] = leaf
        self._index: dict[int, int] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Tree:
        """A Newick file, or a taxonomy table (.csv/.tsv with rank columns) turned into a tree."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tree file {path} does not exist")
        if path.suffix.lower() in TABLE_SUFFIXES:
            from datasets.phylogeny.taxonomy import read_taxonomy_table

            root, ranks = read_taxonomy_table(path)
            return cls(root, str(path), ranks)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read tree file {path}: {err}") from None
        return cls(parse_newick(text, str(path)), str(path))

    @property
    def ultrametric(self) -> bool:
        """Whether every leaf lies at the same depth (up to rounding)."""
        return all(
            abs(self.depth(leaf) - self.height) <= 1e-9 * max(self.height, 1.0) for leaf in self.leaves
        )

    def depth(self, node: Node) -> float:
        """Distance from the root along the branches (each counting 1 when `metric` is "branches")."""
        return self._depth[id(node)]

    def index(self, node: Node) -> int:
        """The node's preorder index."""
        if self._index is None:
            self._index = {id(n): i for i, n in enumerate(self.nodes)}
        return self._index[id(node)]

    def leaf(self, name: str) -> Node:
        node = self.by_key.get(name_key(name))
        if node is None:
            raise UserError(
                f"no species {name!r} in {self.source}; {suggest(name, [n.name for n in self.leaves])}"
            )
        return node

    def lineage(self, node: Node) -> list[Node]:
        """The node and its ancestors, root last."""
        path = [node]
        while path[-1].parent is not None:
            path.append(path[-1].parent)
        return path

    def mrca(self, a: Node, b: Node) -> Node:
        above_a = {id(n) for n in self.lineage(a)}
        return next(n for n in self.lineage(b) if id(n) in above_a)

    def distance(self, a: Node, b: Node) -> float:
        """Patristic distance: the branch lengths summed along the path between two nodes."""
        return self.depth(a) + self.depth(b) - 2 * self.depth(self.mrca(a, b))

    def group(self, leaf: Node, cut: float) -> Node:
        """The root of the leaf's clade below the cut at `cut` x the tree's height (see the module docstring)."""
        limit = cut * self.height * (1 + 1e-12)  # a node exactly at the cut counts as above it
        path = self.lineage(leaf)
        i = next(i for i, node in enumerate(path) if self.depth(node) <= limit)
        if i == 0:
            return leaf  # the leaf ends above the cut
        above = path[i]
        if all(self.depth(child) > limit for child in above.children):
            return above
        return path[i - 1]

    def newick(self) -> str:
        return write_newick(self.root)


def node_label(tree: Tree, node: Node) -> str:
    """A node's name, or `@k` (its preorder index) for an unnamed internal node."""
    return node.name or f"@{tree.index(node)}"


def rank_cuts(n_ranks: int) -> list[float]:
    """Cuts giving one level per rank of a taxonomy tree of `n_ranks` ranks (species included): the rank-k
    nodes lie at depth k of the height n_ranks, so the cut (k + 0.5) / n_ranks falls between rank k and k+1."""
    return [(k + 0.5) / n_ranks for k in range(1, n_ranks)]


@dataclass
class Levels:
    """Species (in class order) grouped at each level, coarse to fine; the last level is the species."""

    species: list[str]
    cuts: list[float]
    groups: list[list[str]]  # per level: group labels in first-appearance order
    assignment: np.ndarray  # [levels, species] group index of each species
    distances: np.ndarray  # [levels, species, species] tree distance between the species' groups
    names: list[str] | None = None  # per level, the rank it stands for (taxonomy tables), else None
    notes: list[str] = field(default_factory=list)  # how the tree was cut, when that needs saying

    @property
    def n_levels(self) -> int:
        return len(self.groups)

    def find_node(self, name: str, level: int | None = None) -> tuple[int, int]:
        """(level, group index) of a group by label; the finest level holding it unless `level` is given."""
        if level is not None and not 0 <= level < self.n_levels:
            raise UserError(f"--level must be in 0..{self.n_levels - 1}, got {level}")
        levels = [level] if level is not None else range(self.n_levels - 1, -1, -1)
        key = name_key(name)
        for lv in levels:
            for g, label in enumerate(self.groups[lv]):
                if name_key(label) == key:
                    return lv, g
        known = sorted({label for lv in levels for label in self.groups[lv]})
        where = f"at level {level}" if level is not None else "at any level"
        raise UserError(f"no node {name!r} is a group {where} of the tree; {suggest(name, known)}")

    def members(self, level: int, group: int) -> list[int]:
        """Species indices in group `group` of level `level`."""
        return np.flatnonzero(self.assignment[level] == group).tolist()

    @property
    def condition_offsets(self) -> list[int]:
        """Groups numbered across levels: group g of level l is condition `offsets[l] + g` (species last)."""
        sizes = [len(g) for g in self.groups]
        return [sum(sizes[:level]) for level in range(len(sizes))]

    def summary(self) -> list[dict]:
        """Per level: cut, rank name (if any), number of groups, and each group's member species (levels.json)."""
        rows = []
        for lv, labels in enumerate(self.groups):
            members = {label: [] for label in labels}
            for s, g in enumerate(self.assignment[lv]):
                members[labels[g]].append(self.species[s])
            cut = self.cuts[lv] if lv < len(self.cuts) else 1.0
            row = {"level": lv, "cut": cut, "groups": len(labels), "members": members}
            if self.names:
                row["rank"] = self.names[lv]
            if self.notes and lv == 0:
                row["notes"] = list(self.notes)
            rows.append(row)
        return rows


def _single_group_error(tree: Tree, level: int, cut: float, n: int, label: str) -> UserError:
    if all(leaf.parent is tree.root for leaf in tree.leaves):
        return UserError(f"{tree.source} is a star tree (every leaf hangs from the root): it has no clades to "
                         "cut into levels; give a resolved tree or a taxonomy table")  # fmt: skip
    return UserError(
        f"{tree.source}: level {level} (cut {cut:g} of the height {tree.height:g}) puts all {n} species into "
        f"one group {label!r}, which leaves that level nothing to learn; raise the cut or drop it"
    )


def _check_rank_cuts(tree: Tree, cuts: list[float]) -> None:
    """A taxonomy table has one level per rank: refuse cuts that give two levels of one rank."""
    ranks = [
        int(c * len(tree.ranks) * (1 + 1e-12)) for c in cuts
    ]  # rank k nodes lie at depth k of len(ranks)
    for a, b in zip(ranks[:-1], ranks[1:], strict=True):
        if a == b:
            suggested = ",".join(f"{c:g}" for c in rank_cuts(len(tree.ranks)))
            raise UserError(
                f"cuts {cuts} give two levels at the rank {tree.ranks[a - 1] if a else 'root'} of {tree.source}; a "
                f"taxonomy table has one level per rank: leave the cuts out or give --cuts {suggested}"
            )


def _notes(tree: Tree) -> list[str]:
    notes = []
    if tree.metric != "branch lengths":
        notes.append(f"depths count {tree.metric}")
    if not tree.ultrametric:
        depths = [tree.depth(leaf) for leaf in tree.leaves]
        notes.append(f"leaves lie at depths {min(depths):g} to {max(depths):g}: cut at fractions of the "
                     "deepest; a leaf above a cut is a group of its own")  # fmt: skip
    return notes


def build_levels(tree: Tree, class_names: list[str], cuts: list[float] | None) -> Levels:
    """Groups and distances of the dataset's classes at each cut (ascending), then at the species level.
    `cuts=None` takes one level per rank of a tree read from a taxonomy table."""
    if cuts is None:
        if not tree.ranks:
            raise UserError(f"{tree.source} is a Newick tree: give the level cuts (e.g. --cuts 0.5,0.8,0.95)")
        cuts = rank_cuts(len(tree.ranks))
    cuts = sorted(float(c) for c in cuts)
    if any(not 0 < c < 1 for c in cuts):
        raise UserError(f"level cuts must lie strictly between 0 and 1 (relative depths), got {cuts}")
    if tree.ranks:
        _check_rank_cuts(tree, cuts)
    missing = [name for name in class_names if name_key(name) not in tree.by_key]
    if missing:
        hint = suggest(name_key(missing[0]), [n.name for n in tree.leaves])
        raise UserError(
            f"{len(missing)} of {len(class_names)} classes are not leaves of {tree.source}, e.g. "
            f"{missing[0]!r} ({hint}; names match with underscores and blanks alike, CUB's 'NNN.' prefix dropped)"
        )
    leaves = [tree.by_key[name_key(name)] for name in class_names]
    n = len(leaves)
    groups, assignment, distances = [], [], []
    for level, cut in enumerate([*cuts, None]):
        nodes = leaves if cut is None else [tree.group(leaf, cut) for leaf in leaves]
        order: dict[int, int] = {}
        for node in nodes:
            order.setdefault(id(node), len(order))
        unique = {id(node): node for node in nodes}
        labels = [node_label(tree, unique[k]) for k in order]
        if cut is not None and len(labels) == 1 and n > 1:
            raise _single_group_error(tree, level, cut, n, labels[0])
        groups.append(labels)
        assignment.append([order[id(node)] for node in nodes])
        matrix = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i, j] = matrix[j, i] = tree.distance(nodes[i], nodes[j])
        distances.append(matrix)
    species = [name_key(name) for name in class_names]
    names = list(tree.ranks) if tree.ranks and cuts == rank_cuts(len(tree.ranks)) else None
    return Levels(species, cuts, groups, np.asarray(assignment), np.stack(distances), names, _notes(tree))


def read_tree(path: str | os.PathLike) -> Tree:
    """`Tree.read`: a Newick file or a taxonomy table."""
    return Tree.read(path)


def phylogeny_record(path: str | os.PathLike, cuts: list[float] | None, class_names: list[str]) -> dict:
    """What a checkpoint keeps of its tree: the Newick text (so it is self-contained; a taxonomy table is kept
    as the tree it was turned into, with its ranks), cuts and class names."""
    tree = Tree.read(path)
    if tree.ranks:
        used = sorted(cuts) if cuts is not None else rank_cuts(len(tree.ranks))
        return {"newick": tree.newick(), "source": str(path), "cuts": used, "class_names": list(class_names),
                "ranks": list(tree.ranks)}  # fmt: skip
    return {"newick": Path(path).read_text(encoding="utf-8"), "source": str(path), "cuts": sorted(cuts),
            "class_names": list(class_names)}  # fmt: skip


def levels_from_record(record: dict) -> Levels:
    """The `Levels` a checkpoint was trained with, rebuilt from its `phylogeny_record`."""
    source = record.get("source", "the checkpoint's tree")
    tree = Tree(parse_newick(record["newick"], source), source, record.get("ranks"))
    return build_levels(tree, record["class_names"], record["cuts"])

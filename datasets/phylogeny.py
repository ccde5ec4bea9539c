"""Phylogenies: a Newick reader, tree distances, and taxonomic levels cut at relative depths.

The reader takes the common Newick dialect: nested clades, names on leaves and internal nodes, `:length`
branch lengths (scientific notation too), single-quoted labels (`''` is a quote inside one), `[...]`
comments anywhere (NHX annotations included), whitespace and line breaks between tokens. A file that does
not parse raises a `NewickError` naming the line and column. Unquoted underscores are kept as they are;
names are matched to class names with underscores and blanks treated alike (`Genus_epithet` = `Genus epithet`).

Levels follow Phylo-NN: for a cut `d` in (0, 1), the group of a leaf at root distance `D` is its deepest
ancestor at root distance <= d * D, so cuts are relative depths measured from the root (0.5 = halfway to the
leaves). The level-`l` distance between two species is the tree distance between their level-`l` groups
(0 within a group); the last level is the species itself, with the full patristic distance.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError

_PUNCTUATION = "(),:;[]'"
_CLASS_PREFIX = re.compile(r"^\d+\.")  # CUB class folders: "001.Black_footed_Albatross"


class NewickError(UserError):
    """A Newick text that does not parse; the message says where."""


@dataclass(eq=False)
class Node:
    """One node: its label (may be empty), the length of the branch above it (None if not given), children."""

    name: str = ""
    length: float | None = None
    children: list[Node] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)
    where: str = ""  # "line L, column C" of the node's label, for messages

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def preorder(self):
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def leaves(self) -> list[Node]:
        return [n for n in self.preorder() if n.is_leaf]


class _Reader:
    """Recursive-descent Newick parser over a string, tracking the position for error messages."""

    def __init__(self, text: str, source: str):
        self.text, self.source, self.pos = text, source, 0

    def where(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {column}"

    def fail(self, what: str, pos: int | None = None) -> NewickError:
        return NewickError(f"{self.source} is not valid Newick at {self.where(pos)}: {what}")

    def skip(self) -> None:
        """Skip whitespace and [comments]."""
        text = self.text
        while self.pos < len(text):
            if text[self.pos].isspace():
                self.pos += 1
            elif text[self.pos] == "[":
                end = text.find("]", self.pos)
                if end < 0:
                    raise self.fail("a comment '[' is never closed")
                self.pos = end + 1
            else:
                return

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def label(self) -> str:
        """A quoted or unquoted label at the current position ('' when there is none)."""
        text = self.text
        if self.peek() == "'":
            start, self.pos, chars = self.pos, self.pos + 1, []
            while True:
                end = text.find("'", self.pos)
                if end < 0:
                    raise self.fail("a quoted label is never closed", start)
                chars.append(text[self.pos : end])
                if text.startswith("''", end):
                    chars.append("'")
                    self.pos = end + 2
                else:
                    self.pos = end + 1
                    return "".join(chars)
        start = self.pos
        while self.pos < len(text) and text[self.pos] not in _PUNCTUATION and not text[self.pos].isspace():
            self.pos += 1
        return text[start : self.pos]

    def node(self, depth: int = 0) -> Node:
        if depth > 5000:
            raise self.fail("clades nested more than 5000 deep")
        node = Node()
        if self.peek() == "(":
            self.pos += 1
            while True:
                child = self.node(depth + 1)
                child.parent = node
                node.children.append(child)
                token = self.peek()
                if token == ",":
                    self.pos += 1
                elif token == ")":
                    self.pos += 1
                    break
                else:
                    found = repr(token) if token else "the end of the text"
                    raise self.fail(f"expected ',' or ')' after a clade member, found {found}")
        self.peek()
        node.where = self.where()
        node.name = self.label()
        if self.peek() == ":":
            self.pos += 1
            self.peek()
            start, raw = self.pos, self.label()
            try:
                node.length = float(raw)
            except ValueError:
                raise self.fail(f"branch length {raw!r} is not a number", start) from None
        token = self.peek()
        if token and token not in ",);":
            raise self.fail(f"unexpected {token!r} after node {node.name!r}")
        return node

    def tree(self) -> Node:
        if not self.peek():
            raise self.fail("the text is empty")
        root = self.node()
        if self.peek() != ";":
            token = self.peek()
            if token == ")":
                raise self.fail("')' without a matching '('")
            raise self.fail("the tree does not end with ';'")
        self.pos += 1
        if self.peek():
            raise self.fail("text after the closing ';' (one tree per file)")
        return root


def parse_newick(text: str, source: str = "Newick text") -> Node:
    """The root of the tree written in `text`; `NewickError` (a UserError) names where it fails."""
    return _Reader(text, source).tree()


def name_key(name: str) -> str:
    """How names are matched: CUB's numeric class prefix dropped, underscores and blanks alike."""
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
    """A parsed phylogeny with root distances, leaf lookup and patristic distances."""

    def __init__(self, root: Node, source: str = "tree"):
        self.root, self.source = root, source
        self.nodes = list(root.preorder())
        branches = [n for n in self.nodes if n is not root]
        given = [n.length is not None for n in branches]
        if any(given) and not all(given):
            first = next(n for n in branches if n.length is None)
            raise UserError(
                f"{source}: some branches have lengths and others not (node {first.name!r} at {first.where} "
                "has none); give all or none (none = every branch counts 1)"
            )
        if any(n.length is not None and n.length < 0 for n in branches):
            bad = next(n for n in branches if n.length is not None and n.length < 0)
            raise UserError(f"{source}: node {bad.name!r} at {bad.where} has a negative branch length")
        self._depth: dict[int, float] = {id(root): 0.0}
        for node in self.nodes[1:]:
            step = 1.0 if node.length is None else node.length
            self._depth[id(node)] = self._depth[id(node.parent)] + step
        self.leaves = root.leaves()
        self.by_key: dict[str, Node] = {}
        for leaf in self.leaves:
            key = name_key(leaf.name)
            if not key:
                raise UserError(f"{source}: the leaf at {leaf.where} has no name")
            if key in self.by_key:
                raise UserError(f"{source}: leaf {leaf.name!r} appears twice ({leaf.where})")
            self.by_key[key] = leaf

    @classmethod
    def read(cls, path: str | os.PathLike) -> Tree:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tree file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read tree file {path}: {err}") from None
        return cls(parse_newick(text, str(path)), str(path))

    def depth(self, node: Node) -> float:
        """Distance from the root along the branches."""
        return self._depth[id(node)]

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
        """The leaf's group at relative depth `cut`: its deepest ancestor at root distance <= cut * its own."""
        limit = cut * self.depth(leaf) + 1e-12 * max(1.0, self.depth(leaf))
        return next(n for n in self.lineage(leaf)[1:] if self.depth(n) <= limit)


def node_label(tree: Tree, node: Node) -> str:
    """A node's name, or `@k` (its preorder index) for an unnamed internal node."""
    return node.name or f"@{tree.nodes.index(node)}"


@dataclass
class Levels:
    """Species (in class order) grouped at each level, coarse to fine; the last level is the species."""

    species: list[str]
    cuts: list[float]
    groups: list[list[str]]  # per level: group labels in first-appearance order
    assignment: np.ndarray  # [levels, species] group index of each species
    distances: np.ndarray  # [levels, species, species] tree distance between the species' groups

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

    @property
    def condition_offsets(self) -> list[int]:
        """Groups numbered across levels: group g of level l is condition `offsets[l] + g` (species last)."""
        sizes = [len(g) for g in self.groups]
        return [sum(sizes[:level]) for level in range(len(sizes))]

    def summary(self) -> list[dict]:
        """Per level: cut, number of groups, and each group's member species (for levels.json)."""
        rows = []
        for lv, labels in enumerate(self.groups):
            members = {label: [] for label in labels}
            for s, g in enumerate(self.assignment[lv]):
                members[labels[g]].append(self.species[s])
            cut = self.cuts[lv] if lv < len(self.cuts) else 1.0
            rows.append({"level": lv, "cut": cut, "groups": len(labels), "members": members})
        return rows


def build_levels(tree: Tree, class_names: list[str], cuts: list[float]) -> Levels:
    """Groups and distances of the dataset's classes at each cut (ascending), then at the species level."""
    cuts = sorted(float(c) for c in cuts)
    if any(not 0 < c < 1 for c in cuts):
        raise UserError(f"level cuts must lie strictly between 0 and 1 (relative depths), got {cuts}")
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
    for cut in [*cuts, None]:
        nodes = leaves if cut is None else [tree.group(leaf, cut) for leaf in leaves]
        order: dict[int, int] = {}
        for node in nodes:
            order.setdefault(id(node), len(order))
        unique = {id(node): node for node in nodes}
        groups.append([node_label(tree, unique[k]) for k in order])
        assignment.append([order[id(node)] for node in nodes])
        matrix = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i, j] = matrix[j, i] = tree.distance(nodes[i], nodes[j])
        distances.append(matrix)
    species = [name_key(name) for name in class_names]
    return Levels(species, cuts, groups, np.asarray(assignment), np.stack(distances))


def phylogeny_record(path: str | os.PathLike, cuts: list[float], class_names: list[str]) -> dict:
    """What a checkpoint keeps of its tree: the Newick text (so it is self-contained), cuts and class names."""
    return {"newick": Path(path).read_text(encoding="utf-8"), "source": str(path), "cuts": sorted(cuts),
            "class_names": list(class_names)}  # fmt: skip


def levels_from_record(record: dict) -> Levels:
    """The `Levels` a checkpoint was trained with, rebuilt from its `phylogeny_record`."""
    source = record.get("source", "the checkpoint's tree")
    return build_levels(
        Tree(parse_newick(record["newick"], source), source), record["class_names"], record["cuts"]
    )

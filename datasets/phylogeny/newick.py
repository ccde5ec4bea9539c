"""Newick text <-> a tree of `Node`s, in linear time and without recursion.

The reader takes the common dialect: nested clades, names on leaves and internal nodes, `:length` branch
lengths (scientific notation too), single-quoted labels (`''` is a quote inside one), `[...]` comments anywhere
(NHX annotations included), whitespace and line breaks between tokens. One pass over the text with an explicit
stack of open clades, so a tree nested 100,000 deep parses like a flat one; a node remembers only the offset
of its label, and "line L, column C" is computed from a table of line starts only when a message needs it.
A text that does not parse, or a branch length that is not a finite number, raises a `NewickError`
naming the line and column.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import math
import re

from core.errors import UserError

# One token after optional whitespace: a [comment], a 'quoted label', punctuation, or a bare word.
_TOKEN = re.compile(r"\s*((\[[^\]]*\])|'((?:[^']|'')*)'|([(),:;])|([^\s(),:;\[\]']+))")
_SPACE = re.compile(r"\s*")
# The fast path, one match per node end: '(' alone, or [label] [:length] then ',' ')' or ';'.
_NODE = re.compile(
    r"\s*(?:(\()|(?:([^\s(),:;\[\]']+)|'((?:[^']|'')*)')?\s*(?:(:)\s*([^\s(),:;\[\]']+)\s*)?([,);]))"
)
_NEEDS_QUOTES = re.compile(r"[\s(),:;\[\]']")


class NewickError(UserError):
    """A Newick text that does not parse; the message says where."""


class Source:
    """The text a tree was read from, to turn character offsets into "line L, column C" on demand."""

    __slots__ = ("name", "text", "_starts")

    def __init__(self, text: str, name: str):
        self.text, self.name, self._starts = text, name, None

    def where(self, pos: int) -> str:
        if self._starts is None:  # built once, on the first message: offsets of every line start
            self._starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        line = bisect.bisect_right(self._starts, pos)
        return f"line {line}, column {pos - self._starts[line - 1] + 1}"


class Node:
    """One node: its label (may be empty), the length of the branch above it (None if not given), children."""

    __slots__ = ("name", "length", "children", "parent", "pos", "source")

    def __init__(self, name: str = "", length: float | None = None, parent: Node | None = None, pos: int = -1,
                 source: Source | None = None):  # fmt: skip
        self.name, self.length, self.children, self.parent = name, length, [], parent
        self.pos, self.source = pos, source

    def __repr__(self) -> str:
        return f"Node({self.name!r}, length={self.length}, children={len(self.children)})"

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def where(self) -> str:
        """Where the label starts: "line L, column C" of the source text ("" for a node built in code)."""
        return self.source.where(self.pos) if self.source is not None and self.pos >= 0 else ""

    def preorder(self):
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def leaves(self) -> list[Node]:
        return [n for n in self.preorder() if n.is_leaf]


@contextlib.contextmanager
def no_collection():
    """The cyclic garbage collector paused: building millions of linked nodes would otherwise trigger full
    collections that find nothing to free (half of a 1M-leaf parse's time)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _length(raw: str, fail, pos: int) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise fail(f"branch length {raw!r} is not a number", pos) from None
    if not math.isfinite(value):
        raise fail(f"branch length {raw!r} is not a finite number", pos)
    return value


def parse_newick(text: str, source: str = "Newick text") -> Node:
    """The root of the tree written in `text`; `NewickError` (a UserError) names where it fails."""
    src = Source(text, source)
    with no_collection():
        if "[" not in text:  # no comments: one regex match per node; anything unusual goes the careful way
            root = _parse_plain(text, src)
            if root is not None:
                return root
        return _parse_tokens(text, src)


def _parse_plain(text: str, src: Source) -> Node | None:
    """The tree of a comment-free text, or None when the text is not plain well-formed Newick (the token
    parser then finds and names the fault)."""
    match, stack, pending, root, pos, after = _NODE.match, [], None, None, 0, "("
    while True:
        m = match(text, pos)
        if m is None:
            return None
        pos = m.end()
        opening, word, quoted, colon, length, end = m.groups()
        if opening:
            if after not in "(,":  # '(' only begins a clade member
                return None
            node = Node("", None, stack[-1] if stack else None, m.start(1), src)
            if stack:
                stack[-1].children.append(node)
            elif root is None:
                root = node
            else:
                return None
            stack.append(node)
            after = "("
            continue
        if pending is None:  # a leaf
            if after == ")":
                return None
            parent = stack[-1] if stack else None
            pending = Node("", None, parent, -1, src)
            if parent is not None:
                parent.children.append(pending)
            elif root is None:
                root = pending
            else:
                return None
        if word is not None:
            pending.name, pending.pos = word, m.start(2)
        elif quoted is not None:
            pending.name, pending.pos = quoted.replace("''", "'"), m.start(3) - 1
        else:  # no label: where it would be
            pending.pos = m.start(4) if colon else m.start(6)
        if length is not None:
            try:
                pending.length = float(length)
            except ValueError:
                return None
            if not math.isfinite(pending.length):
                return None
        if end == ",":
            if not stack:
                return None
            pending = None
        elif end == ")":
            if not stack:
                return None
            pending = stack.pop()
        else:  # ';'
            if stack or _SPACE.match(text, pos).end() != len(text):
                return None
            return root
        after = end


def _parse_tokens(text: str, src: Source) -> Node:
    """The token-by-token parser: comments anywhere, and a precise message for every fault."""
    source = src.name

    def fail(what: str, pos: int) -> NewickError:
        return NewickError(f"{source} is not valid Newick at {src.where(pos)}: {what}")

    match, end = _TOKEN.match, len(text)
    stack: list[Node] = []  # open clades, innermost last
    node: Node | None = None  # the node whose label, length or end comes next
    root: Node | None = None
    state = "start"  # start: a node begins; label: after a node's start or ')'; length: after ':'; end: , ) ;
    pos = 0
    while True:
        m = match(text, pos)
        if m is None:
            pos = _SPACE.match(text, pos).end()
            if pos >= end:
                break
            what = "a comment '[' is never closed" if text[pos] == "[" else "a quoted label is never closed"
            raise fail(what, pos)
        _, comment, quoted, punct, word = m.groups()
        start, pos = m.start(1), m.end()
        if comment is not None:
            continue
        if state == "start":
            parent = stack[-1] if stack else None
            if punct == "(":
                opened = Node(parent=parent, pos=start, source=src)
                if parent is not None:
                    parent.children.append(opened)
                else:
                    root = opened
                stack.append(opened)
                continue
            node = Node(parent=parent, pos=start, source=src)  # a leaf; its label (if any) is this token
            if parent is not None:
                parent.children.append(node)
            else:
                root = node
            state = "label"
        if state == "label":
            node.pos = start
            state = "after-label"
            if punct is None:
                node.name = quoted.replace("''", "'") if quoted is not None else word
                continue
        if state == "after-label" and punct == ":":
            state = "length"
            continue
        if state == "length":
            if punct is not None:
                raise fail(f"a branch length is missing before {punct!r}", start)
            node.length = _length(word if word is not None else quoted, fail, start)
            state = "end"
            continue
        # end of a node: ',' (a sibling follows), ')' (its clade closes) or ';' (the tree ends)
        if punct == ",":
            if not stack:
                raise fail("',' outside any clade (wrap the members in parentheses)", start)
            state = "start"
        elif punct == ")":
            if not stack:
                raise fail("')' without a matching '('", start)
            node, state = stack.pop(), "label"
            node.pos = pos
        elif punct == ";":
            if stack:
                raise fail("expected ',' or ')' after a clade member, found ';'", start)
            state = "done"
            break
        else:
            token = quoted if quoted is not None else (word or punct)
            raise fail(f"unexpected {token!r} after node {node.name!r}", start)
    if state == "done":
        rest = _TOKEN.match(text, pos)
        while rest is not None and rest.group(2) is not None:  # comments after ';' are fine
            pos, rest = rest.end(), _TOKEN.match(text, rest.end())
        pos = _SPACE.match(text, pos).end()
        if pos < end:
            if text[pos] == "[":
                raise fail("a comment '[' is never closed", pos)
            raise fail("text after the closing ';' (one tree per file)", pos)
        return root
    if root is None and state == "start":
        raise fail("the text is empty", end)
    if stack:
        raise fail("expected ',' or ')' after a clade member, found the end of the text", end)
    raise fail("the tree does not end with ';'", end)


def _label(name: str) -> str:
    if name and _NEEDS_QUOTES.search(name):
        return "'" + name.replace("'", "''") + "'"
    return name


def write_newick(root: Node) -> str:
    """The tree as one line of Newick (labels quoted where needed, lengths as Python writes floats)."""
    out: list[str] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if node is None:
            out.append(",")
            continue
        if node.children and not closing:
            out.append("(")
            stack.append((node, True))
            for i, child in enumerate(reversed(node.children)):
                stack.append((child, False))
                if i < len(node.children) - 1:
                    stack.append((None, False))  # a comma between siblings
            continue
        if node.children:
            out.append(")")
        out.append(_label(node.name))
        if node.length is not None:
            out.append(f":{node.length!r}")
    return "".join(out) + ";"

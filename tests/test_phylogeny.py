"""Phylogenies: the Newick reader (both paths, every fault named, no recursion), the writer, tree distances, levels
cut at one common depth (clades that nest, on any rooted tree), degenerate trees, and taxonomy tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.errors import UserError
from datasets.phylogeny import (
    NewickError,
    Tree,
    build_levels,
    levels_from_record,
    node_label,
    parse_newick,
    phylogeny_record,
    rank_cuts,
    write_newick,
)
from datasets.phylogeny.newick import Source, _parse_plain, _parse_tokens
from datasets.world import DNA_RATES, RANKS, load_taxonomy

# ((A:1,B:2)AB:3,(C:1,'D e':1)CD:0.5)root;  depths: AB 3, A 4, B 5, CD 0.5, C 1.5, D 1.5
TREE = "((A:1,B:2)AB:3,(C:1,'D e':1)CD:0.5)root;"
ISSUE_TREE = "((((A,C)x,D)y,B)z,(E,F)w)root;"  # issue 21: leaves at depths 2, 3 and 4, no lengths


def tree(text: str = TREE) -> Tree:
    return Tree(parse_newick(text), "test tree")


def shape(node) -> tuple:
    """Everything a node holds, recursively (iterative for deep trees is not needed at these sizes)."""
    return (node.name, node.length, node.pos, tuple(shape(c) for c in node.children))


# ---------------------------------------------------------------------------------------------- reader


def test_newick_names_lengths_nesting_quotes_and_comments():
    root = parse_newick("[a comment] ( (A:1, B:2.5e-1)AB:3 ,\n ('it''s D':1,[NHX]C:1E0)CD:0.5 )'the root';\n")
    assert root.name == "the root" and root.length is None
    ab, cd = root.children
    assert (ab.name, ab.length, [c.name for c in ab.children]) == ("AB", 3.0, ["A", "B"])
    assert [c.length for c in ab.children] == [1.0, 0.25]
    assert [c.name for c in cd.children] == ["it's D", "C"] and cd.children[1].length == 1.0
    assert all(leaf.is_leaf for leaf in root.leaves()) and len(root.leaves()) == 4
    assert ab.children[0].parent is ab and ab.parent is root
    assert cd.children[0].where == "line 2, column 3"  # where its label starts


@pytest.mark.parametrize(
    "text",
    [TREE, ISSUE_TREE, "(,);", "A;", "(A,(B,C)):2;", " ( A : 1 , B ) ; \n", "((A:1,'B x':2.5e-1)AB:3 ,\n"
     " ('it''s D':1,C:1E0)CD:0.5 )'the root';\n", "(A:0,B:0.0)r;", "((a,b,c),(d));"],
)  # fmt: skip
def test_fast_path_reads_what_the_token_parser_reads(text):
    """The one-match-per-node path and the token-by-token parser agree on structure and label positions."""
    fast = _parse_plain(text, Source(text, "t"))
    assert fast is not None and shape(fast) == shape(_parse_tokens(text, Source(text, "t")))


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("(A,B", "line 1, column 5", "expected ',' or ')'"),
        ("(A,B)", "line 1, column 6", "does not end with ';'"),
        ("(A:x,B);", "line 1, column 4", "branch length 'x' is not a number"),
        ("(A:nan,B:1);", "line 1, column 4", "branch length 'nan' is not a finite number"),
        ("(A:1,B:-inf);", "line 1, column 8", "branch length '-inf' is not a finite number"),
        ("(A:,B);", "line 1, column 4", "a branch length is missing before ','"),
        ("(A,\n'B);", "line 2, column 1", "quoted label is never closed"),
        ("(A,B);C;", "line 1, column 7", "text after the closing ';'"),
        ("(A,B));", "line 1, column 6", "')' without a matching '('"),
        ("  \n", "line 2, column 1", "the text is empty"),
        ("(A,B)[oops;", "line 1, column 6", "comment '[' is never closed"),
        ("(A B);", "line 1, column 4", "unexpected 'B' after node 'A'"),
        ("A,B;", "line 1, column 2", "',' outside any clade"),
        ("(A)(B);", "line 1, column 4", "unexpected '(' after node ''"),
        ("((A:1,B:1):1,\n(C:1,D:1):1;\n", "line 2, column 12", "expected ',' or ')' after a clade member, found ';'"),
    ],
)  # fmt: skip
def test_newick_errors_say_where(text, where, what):
    with pytest.raises(NewickError) as err:
        parse_newick(text, "t.nwk")
    message = err.value.message
    assert message.startswith(f"t.nwk is not valid Newick at {where}: ") and what in message, message
    assert "\n" not in message


def test_deep_nesting_parses_without_recursion():
    depth = 100_000
    text = "(" * depth + "l0," + ",".join(f"l{i})" for i in range(1, depth + 1)) + ";"
    t = tree(text)
    assert t.height == depth and len(t.leaves) == depth + 1
    assert t.distance(t.leaf("l0"), t.leaf(f"l{depth}")) == depth + 1
    assert write_newick(t.root) == text  # and back, iteratively


def test_writer_round_trips_names_lengths_and_quotes():
    text = "((A:1,'B x':0.25)AB:3,('it''s D':1,'a,b':2)'C;D':0.5,(:1,'':2):0)'the root';"
    root = parse_newick(text)
    assert (
        write_newick(root)
        == "((A:1.0,'B x':0.25)AB:3.0,('it''s D':1.0,'a,b':2.0)'C;D':0.5,(:1.0,:2.0):0.0)'the root';"
    )
    again = parse_newick(write_newick(root))
    strip = lambda n: (n.name, n.length, tuple(strip(c) for c in n.children))  # noqa: E731
    assert strip(again) == strip(root)


# ----------------------------------------------------------------------------------------------- trees


def test_tree_distances_by_hand():
    t = tree()
    a, b, c, d = (t.leaf(n) for n in ("A", "B", "C", "D_e"))  # underscores match blanks
    assert (t.depth(a), t.depth(b), t.depth(c)) == (4.0, 5.0, 1.5) and t.height == 5.0
    assert t.distance(a, b) == 3.0 and t.distance(c, d) == 2.0
    assert t.distance(a, c) == 4.0 + 1.5 and t.distance(a, a) == 0.0
    assert t.mrca(a, b).name == "AB" and t.mrca(b, d) is t.root
    unit = tree("((A,B),C);")  # no lengths: every branch counts 1
    assert unit.distance(unit.leaf("A"), unit.leaf("C")) == 3.0 and unit.metric == "branches"
    with pytest.raises(UserError, match="some branches have lengths"):
        tree("((A:1,B),C:1);")
    with pytest.raises(UserError, match="'A' appears twice"):
        tree("((A:1,B:1):1,A:1);")
    with pytest.raises(UserError, match="no species 'E' in test tree; closest"):
        t.leaf("E")
    with pytest.raises(UserError, match="negative branch length"):
        tree("((A:1,B:-1):1,C:1);")


def test_issue_tree_cuts_give_clades_that_nest():
    """Issue 21's tree: per-leaf relative cuts gave y:{A,C} and z:{B,D} at 0.5 although D sits inside y."""
    t = tree(ISSUE_TREE)  # depths: A, C 4; D 3; B, E, F 2; height 4
    levels = build_levels(t, list("ABCDEF"), [0.5, 0.8])
    # 0.5 x 4 = 2: y (depth 2) has both children below the cut, so its clade {A, C, D} is one group; B, E, F
    # end at the cut and stand alone (w has children at the cut, so it is no group).
    assert levels.groups[0] == ["y", "B", "E", "F"]
    assert levels.assignment[0].tolist() == [0, 1, 0, 0, 2, 3]
    # 0.8 x 4 = 3.2: x (3) holds {A, C}; D (3) ends above the cut.
    assert levels.groups[1] == ["x", "B", "D", "E", "F"]
    assert levels.assignment[1].tolist() == [0, 1, 0, 2, 3, 4]
    assert levels.groups[2] == list("ABCDEF")
    assert levels.distances[0][0, 1] == 2 + 2 - 2 * 1  # y (2) to B (2) through z (1)
    assert levels.distances[0][0, 3] == 0 and levels.distances[1][0, 3] == 2  # x (3) to D (3) through y (2)
    assert any("depths 2 to 4" in note for note in levels.notes)


def test_level_cuts_and_group_distances():
    t = tree()
    levels = build_levels(t, ["001.A", "002.B", "003.C", "004.D_e"], [0.5, 0.9])
    # height 5. At 2.5 the root's child CD (0.5) lies above the cut, so the group below the cut on A's path is
    # AB (3), not the root; C and D (1.5) end above it. At 4.5, A (4) ends above it and B's group is B itself.
    assert levels.groups[0] == ["AB", "C", "D e"] and levels.assignment[0].tolist() == [0, 0, 1, 2]
    assert levels.groups[1] == ["A", "B", "C", "D e"]
    assert levels.groups[2] == ["A", "B", "C", "D e"]
    assert levels.distances[0][0, 2] == pytest.approx(3 + 1.5) and levels.distances[0][0, 1] == 0
    assert levels.distances[1][0, 1] == pytest.approx(3.0) and levels.distances[0][2, 3] == pytest.approx(2.0)
    assert levels.find_node("AB") == (0, 0) and levels.find_node("C", level=1) == (1, 2)
    assert levels.condition_offsets == [0, 3, 7] and levels.members(0, 0) == [0, 1]
    with pytest.raises(UserError, match="no node .ABB. is a group at any level of the tree; closest: 'AB'"):
        levels.find_node("ABB")
    with pytest.raises(UserError, match="classes are not leaves"):
        build_levels(t, ["A", "Zed"], [0.5])
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        build_levels(t, ["A", "B"], [1.0])
    with pytest.raises(UserError, match="give the level cuts"):
        build_levels(t, ["A", "B"], None)


def random_tree(rng: np.random.Generator, leaves: int) -> str:
    """Random polytomies (2-3 children) with lengths from {0, 0.5, 1, 2} (ties, zero branches, unequal depths)."""
    clades = [f"s{i}:{rng.choice([0.0, 0.5, 1.0, 2.0])}" for i in range(leaves)]
    while len(clades) > 1:
        k = min(len(clades), int(rng.integers(2, 4)))
        picked = sorted(rng.choice(len(clades), k, replace=False).tolist(), reverse=True)
        members = [clades.pop(i) for i in picked]
        clades.append(f"({','.join(members)}):{rng.choice([0.0, 0.5, 1.0, 2.0])}")
    return clades[0].rsplit(":", 1)[0] + ";"


@pytest.mark.parametrize("seed", range(40))
def test_levels_on_random_trees_are_clades_that_nest(seed):
    rng = np.random.default_rng(seed)
    t = tree(random_tree(rng, int(rng.integers(4, 30))))
    names = [leaf.name for leaf in t.leaves]
    cuts = sorted(rng.uniform(0.05, 0.95, size=3).tolist())
    try:
        levels = build_levels(t, names, cuts)
    except UserError as err:  # a cut above every clade: said so, never mis-cut
        assert "puts all" in err.message or "star tree" in err.message
        return
    for level, cut in enumerate(cuts):
        for leaf in t.leaves:  # every group is the clade under its node: all of that node's leaves, no other
            node = t.group(leaf, cut)
            below = {n.name for n in node.leaves()}
            label = node_label(t, node)
            members = {names[s] for s in levels.members(level, levels.groups[level].index(label))}
            assert members == below, (level, label, members, below)
    for coarse, fine in itertools.pairwise(levels.assignment):  # level l+1 refines level l
        same_fine = fine[:, None] == fine[None, :]
        assert not (same_fine & (coarse[:, None] != coarse[None, :])).any()


def test_zero_lengths_cut_by_topology_and_star_trees_refused():
    zero = tree("((A:0,B:0):0,(C:0,D:0):0)r;")
    assert zero.metric == "branches (all branch lengths are zero)" and zero.height == 2
    levels = build_levels(zero, list("ABCD"), [0.5])
    assert levels.groups[0] == ["@1", "@4"] and levels.distances[1][0, 2] == 4  # by topology, not all zeros
    assert "depths count branches (all branch lengths are zero)" in levels.notes
    with pytest.raises(UserError, match="star tree .every leaf hangs from the root."):
        build_levels(tree("(A,B,C,D);"), list("ABCD"), [0.5])
    with pytest.raises(UserError, match="star tree"):
        build_levels(tree("(A:0,B:0,C:0);"), list("ABC"), [0.3])
    with pytest.raises(
        UserError, match=r"level 0 \(cut 0.2 of the height 2\) puts all 4 species into one group 'r'"
    ):
        build_levels(tree("((A,B),(C,D))r;"), list("ABCD"), [0.2, 0.7])


def test_world_tree_levels_are_its_taxonomy(small_world):
    """The world's tree.nwk, cut at the tiny preset's depths, gives orders, families, genera, species, and
    the group distances are the DNA rates of the ranks between them."""
    from training.phylo.trainer import PhyloConfig, level_cuts

    taxonomy = load_taxonomy(small_world)
    names = [row["species"] for row in taxonomy]
    cfg = PhyloConfig.preset("tiny")
    t = Tree.read(small_world / "tree.nwk")
    assert t.ultrametric and t.height == pytest.approx(sum(DNA_RATES.values()))
    levels = build_levels(t, names, level_cuts(cfg, t))
    assert levels.notes == []
    for level, rank in enumerate(RANKS):
        expected = [row[rank].replace("_", " ") for row in taxonomy]
        assert [levels.groups[level][g].replace("_", " ") for g in levels.assignment[level]] == expected
    for level, rank in enumerate(RANKS):  # two groups of rank r meet where their lineages split
        for i, j in itertools.product(range(len(names)), repeat=2):
            split = next((k for k, r in enumerate(RANKS) if taxonomy[i][r] != taxonomy[j][r]), None)
            below = (
                0.0 if split is None or split > level else sum(DNA_RATES[r] for r in RANKS[split : level + 1])
            )
            assert levels.distances[level][i, j] == pytest.approx(2 * below), (rank, i, j)


# -------------------------------------------------------------------------------------- taxonomy tables


def write_table(path, small_world, delimiter=",", extra=True):
    rows = load_taxonomy(small_world)
    header = (
        ["id", "Species", "genus", "family", "order", "note"]
        if extra
        else ["order", "family", "genus", "species"]
    )
    lines = [delimiter.join(header)]
    for row in rows:
        values = {"id": str(row["class_id"]), "species": row["species"], "genus": row["genus"],
                  "family": row["family"], "order": row["order"], "note": "x"}  # fmt: skip
        lines.append(delimiter.join(values[h.lower()] for h in header))
    path.write_text("\n".join(lines) + "\n")
    return path, [row["species"] for row in rows]


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_taxonomy_table_gives_one_level_per_rank(small_world, tmp_path, suffix, delimiter):
    path, names = write_table(tmp_path / f"taxonomy{suffix}", small_world, delimiter)
    t = Tree.read(path)
    assert t.ranks == ["order", "family", "genus", "species"] and t.height == 4
    levels = build_levels(t, names, None)
    assert levels.cuts == rank_cuts(4) == [0.375, 0.625, 0.875] and levels.names == t.ranks
    world = build_levels(Tree.read(small_world / "tree.nwk"), names, [0.5, 0.8, 0.95])
    assert levels.groups == world.groups and np.array_equal(levels.assignment, world.assignment)
    record = phylogeny_record(path, None, names)
    again = levels_from_record(record)  # a checkpoint keeps the table as the tree it became, ranks included
    assert again.groups == levels.groups and again.names == levels.names and again.cuts == levels.cuts
    assert [row["rank"] for row in again.summary()] == t.ranks
    with pytest.raises(UserError, match=r"give two levels at the rank genus .* --cuts 0.375,0.625,0.875"):
        build_levels(t, names, [0.5, 0.8, 0.95])  # the Newick preset's cuts: genus twice, never silently
    assert (
        build_levels(t, names, [0.3, 0.6]).groups[:2] == world.groups[:2]
    )  # any cut inside each rank's band


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("id,name\n1,a\n", "names 0 rank column(s)"),
        ("genus,species\nA,A_x\n,A_y\n", "row 3: the genus cell is empty"),
        ("genus,species\nA,A_x\nA,A_x\n", "row 3: species 'A_x' appears twice"),
        ("family,genus,species\nF,A,A_x\nG,A,A_y\n", "row 3: genus 'A' sits under 'F' and under 'G'"),
        ("genus,species,Genus\nA,x,A\n", "a rank column appears twice"),
    ],
)
def test_taxonomy_table_faults_are_named(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        Tree.read(path)
    assert message in err.value.message and "\n" not in err.value.message

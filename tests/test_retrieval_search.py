"""Exact search (equal to brute force, deterministic ties across chunks, faiss agreement), the protocol's
micro/macro/H.M. on constructed predictions, and the novelty flag's AUROC and calibration by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core.search
from core.errors import UserError
from core.search import faiss_available, search
from testing.retrieval.novelty import auroc, calibrate
from testing.retrieval.protocol import chance, harmonic_mean, hits, macro, micro, paper_table, score_queries


def brute_force(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def bf16_only(monkeypatch) -> None:
    """Make the bfloat16 pass score every chunk, however many candidates: no float32 pass, no dense steps."""
    passes = core.search._pass_scores

    def only_bf16(kind, *args):
        assert kind == "bf16", "the search left the bfloat16 pass"
        return passes(kind, *args)

    monkeypatch.setattr(core.search, "_DENSE_SHARE", 1.0)
    monkeypatch.setattr(core.search, "_pass_scores", only_bf16)


@pytest.mark.parametrize("bf16_pass", [False, True])
@pytest.mark.parametrize("chunk", [None, 7, 64, 130])
def test_exact_search_equals_brute_force(chunk, bf16_pass, monkeypatch):
    if bf16_pass:
        bf16_only(monkeypatch)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 16)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    scores, index = search(queries, keys.astype(np.float16), 5, chunk=chunk, query_batch=16, normalize=True,
                           bf16_pass=bf16_pass)  # fmt: skip
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected_scores, expected_index = brute_force(unit, keys.astype(np.float16).astype(np.float32), 5)
    assert (index == expected_index).all()
    assert np.allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("path", ["bf16", "resident"])
def test_pass_keeps_keys_closer_than_it_can_tell(monkeypatch, path):
    """Query i has key i at cosine a and key n + i at a + 1e-5 (in a later chunk or the same), and bfloat16
    often ranks the two the wrong way (float16, CUDA's pass, too): each query still finds its key n + i, with
    its float32 score, in query batches and chunks of several sizes."""
    rng = np.random.default_rng(3)
    n, dim = 200, 64
    queries = rng.standard_normal((n, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def at_cosine(c: float) -> np.ndarray:
        side = rng.standard_normal((n, dim))
        side -= (side * queries).sum(1, keepdims=True) * queries
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        return c * queries + np.sqrt(1 - c**2) * side

    a = 0.900390625 + 2e-6
    keys = np.concatenate([at_cosine(a), at_cosine(a + 1e-5)]).astype(np.float32)
    queries = queries.astype(np.float32)
    rough = (torch.from_numpy(queries).bfloat16() @ torch.from_numpy(keys).bfloat16().T).float().numpy()
    assert (rough[np.arange(n), n + np.arange(n)] < rough[np.arange(n), np.arange(n)]).sum() > n // 10
    if path == "bf16":
        bf16_only(monkeypatch)
    else:
        on("cpu-resident", monkeypatch)
    for query_batch, chunk in ((7, n), (1024, n), (1024, 2 * n)):  # in the second chunk or in the same one
        scores, index = search(queries, keys, 1, chunk=chunk, query_batch=query_batch, bf16_pass=True)
        assert (index[:, 0] == n + np.arange(n)).all()
        assert np.allclose(scores[:, 0], a + 1e-5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2])
def test_bf16_pass_keeps_a_key_that_rounding_puts_two_steps_low(chunk, monkeypatch):
    """The bound's worst case by construction: every component of the query and of key B sits just below a
    bfloat16 rounding midpoint, so B's bfloat16 score (7.0) is two grid steps below its float32 one (7.0537);
    key A's components round up instead, so A (7.0527) looks best in bfloat16 (7.0625). With B in its own
    chunk the floor comes from A's float32 score, in one chunk from A's bfloat16 score: either way only the
    bound keeps B, the true best. (Each of the two floors without its bound returns A.)"""
    bf16_only(monkeypatch)
    t = np.float32(1 + 0.49 * 2**-7)  # bfloat16 rounds it down to 1
    query, b = np.full(7, t, np.float32), np.full(7, t, np.float32)
    score_b = float(query.astype(np.float64) @ b)
    a = 1 + 0.51 * 2**-7  # rounded up
    keys = np.stack([np.array([a] * 6 + [(score_b - 1e-3) / t - 6 * a], np.float32), b])
    rough = torch.from_numpy(query).bfloat16() @ torch.from_numpy(keys).bfloat16().T
    assert rough.tolist() == [7.0625, 7.0]
    scores, index = search(query[None], keys, 1, chunk=chunk, bf16_pass=True)
    assert index.tolist() == [[1]] and scores[0, 0] == pytest.approx(score_b, abs=1e-5)


def test_bf16_pass_scores_equal_keys_equally_at_full_size():
    """Specimens with one barcode give equal keys. At d = 512 (where float32 kernels round differently) equal
    keys in one chunk or in different chunks get the same score, ties go to the lower index, and a key's score
    does not depend on the chunking; keys are float16, as an index stores them."""
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((3000, 512)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 512)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    keys[[5, 9, 2900]] = queries[0] + 0.01 * keys[[5, 5, 5]]  # one vector at rows 5, 9 (chunk 0) and 2900
    keys = keys.astype(np.float16)
    results = [search(queries, keys, 4, chunk=chunk, bf16_pass=True) for chunk in (1000, 2950, None)]
    for scores, index in results:
        assert index[0, :3].tolist() == [5, 9, 2900] and scores[0, 0] == scores[0, 1] == scores[0, 2]
        assert (index == results[0][1]).all() and (scores == results[0][0]).all()
    exact = search(queries, keys, 4, bf16_pass=False)  # NumPy's sgemm: the same up to float32 rounding
    assert np.allclose(results[0][0], exact[0], rtol=0, atol=2e-6)
    apart = (np.diff(exact[0], axis=1) < -2e-6).all(1)
    assert apart.sum() > 30 and (results[0][1][apart] == exact[1][apart]).all()


@pytest.mark.parametrize("case", ["all near-duplicates", "one query on a cluster", "huge norms"])
def test_hard_batches_stay_exact(case, monkeypatch):
    """A query with most of a chunk's keys as candidates has them rescored in bounded steps (not padded into a
    block that grows with the cluster); norms whose bfloat16 products could overflow take the float32 pass.
    Either way the result is the float32 pass's, bit for bit."""
    rng = np.random.default_rng(5)
    centre = rng.standard_normal(64).astype(np.float32)
    keys = rng.standard_normal((500, 64)).astype(np.float32)
    queries = rng.standard_normal((8, 64)).astype(np.float32)
    if case == "all near-duplicates":
        keys = centre + 1e-3 * keys
        queries = centre + 1e-3 * queries
    elif case == "one query on a cluster":
        keys[100:400] = centre + 1e-3 * keys[100:400]
        queries[3] = centre
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if case == "huge norms":
        keys, queries = keys * 1e16, queries * 1e16
    kinds, dense = [], []
    passes, padded = core.search._pass_scores, core.search._padded
    monkeypatch.setattr(core.search, "_pass_scores", lambda kind, *a: kinds.append(kind) or passes(kind, *a))
    monkeypatch.setattr(core.search, "_padded", lambda rows, *a: dense.append(len(rows)) or padded(rows, *a))
    fast = search(queries, keys, 5, chunk=100, query_batch=4, bf16_pass=True)
    assert set(kinds) == ({"f32"} if case == "huge norms" else {"bf16"})
    assert max(dense, default=0) <= 4 * (100 // 8)  # at most an eighth of a chunk per query is padded
    exact = search(queries, keys, 5, chunk=100, query_batch=4, bf16_pass=False)
    assert (fast[1] == exact[1]).all() and (fast[0] == exact[0]).all() and np.isfinite(fast[0]).all()


@pytest.mark.parametrize("bf16_pass", [False, True])
def test_ties_go_to_the_lower_index_across_chunks(bf16_pass, monkeypatch):
    """Keys 3, 9, 14 and 20 are the same vector: the top-3 is 3, 9, 14 whatever the chunking."""
    if bf16_pass:
        bf16_only(monkeypatch)
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((24, 8)).astype(np.float32) * 0.1
    target = np.ones(8, dtype=np.float32)
    for i in (3, 9, 14, 20):
        keys[i] = target
    for chunk in (None, 2, 5, 10, 11):
        _, index = search(target[None], keys, 3, chunk=chunk, bf16_pass=bf16_pass)
        assert index[0].tolist() == [3, 9, 14], chunk
    equal = np.ones((6, 4), dtype=np.float32)  # all tied: the order is the index order
    top = search(np.ones((1, 4), np.float32), equal, 6, chunk=4, bf16_pass=bf16_pass)[1]
    assert top[0].tolist() == list(range(6))


def reference_top(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every key's score by the reference kernel (products summed over the last dimension, float32), then the
    top-k by (score descending, index ascending)."""
    q, kk = torch.from_numpy(queries), torch.from_numpy(keys)
    with torch.inference_mode():
        scores = torch.cat([(q[i : i + 20, None] * kk).sum(2) for i in range(0, len(q), 20)]).numpy()
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


DEVICES = ["cpu", "cpu-resident"] + (["cuda"] if torch.cuda.is_available() else [])


def on(device: str, monkeypatch) -> str:
    """`cpu-resident` runs the CUDA path (float16 keys held, float16 pass, float32 rescoring) on the CPU."""
    if device == "cpu-resident":
        monkeypatch.setattr(core.search, "_RESIDENT_ON_CPU", True)
        return "cpu"
    return device


@pytest.fixture(scope="module")
def duplicated() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """250 vectors, each at 4 random rows of 1,000 keys (float16, d = 768); 200 queries, half near one of
    them; the reference top-10."""
    rng = np.random.default_rng(6)
    distinct = rng.standard_normal((250, 768)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    keys = distinct[rng.permutation(np.repeat(np.arange(250), 4))].astype(np.float16)
    queries = rng.standard_normal((200, 768)).astype(np.float32)
    queries[:100] = distinct[rng.integers(0, 250, 100)] + 0.05 * queries[:100] / np.sqrt(768)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return (keys, queries, *reference_top(queries, keys.astype(np.float32), 10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16_pass", [False, True])
def test_duplicated_keys_tie_in_index_order_for_many_queries(duplicated, bf16_pass, device, monkeypatch):
    """Identical barcodes give identical keys: on every path equal keys score equally, their order is the
    index order, and the top-10 is the reference kernel's, whatever the chunking and query batching."""
    keys, queries, expected_scores, expected = duplicated
    reference_device = device
    device = on(device, monkeypatch)
    for chunk, query_batch in ((None, 1024), (333, 64), (999, 37)):
        scores, index = search(queries, keys, 10, device=device, chunk=chunk, query_batch=query_batch,
                               bf16_pass=bf16_pass)  # fmt: skip
        assert (index == expected).all(), (chunk, query_batch)
        if reference_device != "cuda":  # CUDA's own kernel rounds the last bits differently
            assert (scores == expected_scores).all()
        same = np.diff(scores, axis=1) == 0
        assert (np.diff(index, axis=1)[same] > 0).all() and same.sum() > 250  # many ties, each in index order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16_pass", [False, True])
def test_nan_keys_are_skipped_and_nan_queries_refused(bf16_pass, device, monkeypatch):
    device = on(device, monkeypatch)
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((120, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = keys[[3, 50, 51]] + 0.01
    bad = [3, 17, 50, 119]
    damaged = keys.copy()
    damaged[bad, 5] = np.nan
    damaged[17] = np.inf
    scores, index = search(queries, damaged, 6, chunk=40, device=device, bf16_pass=bf16_pass)
    good = np.setdiff1d(np.arange(120), bad)
    expected_scores, expected = search(queries, keys[good], 6, chunk=40, device=device, bf16_pass=bf16_pass)
    assert (index == good[expected]).all() and np.allclose(scores, expected_scores, atol=1e-6)
    few = search(queries, damaged[:4], 6, device=device, bf16_pass=bf16_pass)[1]  # 4 keys, 3 finite
    assert few.shape == (3, 3) and 3 not in few
    queries[1, 0] = np.nan
    with pytest.raises(UserError, match="query 1 holds NaN or infinite values"):
        search(queries, keys, 3, device=device)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_agrees():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((500, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    ours = search(queries, keys, 5, chunk=128)
    theirs = search(queries, keys, 5, backend="faiss")
    assert (ours[1] == theirs[1]).all() and np.allclose(ours[0], theirs[0], atol=1e-5)


def test_search_refuses_bad_arguments():
    with pytest.raises(UserError, match="--backend must be one of torch, faiss"):
        search(np.ones((1, 2)), np.ones((2, 2)), 1, backend="annoy")
    with pytest.raises(UserError, match="--k must be at least 1"):
        search(np.ones((1, 2)), np.ones((2, 2)), 0)


def test_micro_macro_harmonic_by_hand():
    true = np.array(["a", "a", "a", "b"])
    predicted = np.array([["a", "b"], ["b", "a"], ["b", "b"], ["b", "a"]])
    hit = hits(true, predicted, ks=(1, 2))
    assert hit[1].tolist() == [True, False, False, True] and hit[2].tolist() == [True, True, False, True]
    assert micro(hit[1]) == pytest.approx(0.5)  # 2 of 4 queries
    assert macro(hit[1], true) == pytest.approx((1 / 3 + 1) / 2)  # class a: 1 of 3, class b: 1 of 1
    assert micro(hit[2]) == pytest.approx(0.75) and macro(hit[2], true) == pytest.approx((2 / 3 + 1) / 2)
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.8, 0.0) == 0.0
    assert chance(np.array(["a", "c"]), np.array(["a", "a", "b", "c"])) == pytest.approx((0.5 + 0.25) / 2)


def test_protocol_rows_and_paper_table():
    """Two seen and two unseen queries, three keys; a not_classified query counts (and misses a named key)."""
    ranks = ("order", "family", "genus", "species")
    keys = {r: np.array([f"{r}1", f"{r}2", f"{r}2"], dtype=object) for r in ranks}
    seen = {r: np.array([f"{r}1", f"{r}2"], dtype=object) for r in ranks}
    unseen = {
        r: np.array([f"{r}2", "not_classified" if r == "species" else f"{r}1"], dtype=object) for r in ranks
    }
    top = np.array([[0, 1], [0, 2]])  # query 0 -> key 0 first, query 1 -> key 0 first
    rows = []
    for split, labels in (("val_seen", seen), ("val_unseen", unseen)):
        for row in score_queries(labels, keys, top, ks=(1, 2)):
            rows.append({"query": "dna", "key": "dna", "split": split, "kind": split.split("_")[1], **row})
    table = paper_table(rows).set_index(["metric", "k"])
    assert table.loc[("micro", 1), "genus_seen"] == pytest.approx(0.5)  # query 0 right, query 1 wrong
    assert table.loc[("micro", 2), "genus_seen"] == pytest.approx(1.0)
    assert table.loc[("micro", 1), "genus_unseen"] == pytest.approx(0.5)
    assert table.loc[("micro", 1), "species_unseen"] == pytest.approx(0.0)  # species2 and not_classified miss
    assert table.loc[("micro", 1), "genus_hm"] == pytest.approx(0.5)
    assert table.loc[("chance", 1), "genus_seen"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_novelty_auroc_and_threshold_by_hand():
    seen = np.array([0.9, 0.85, 0.6, 0.8])
    unseen = np.array([0.7, 0.5, 0.4])
    # (unseen, seen) pairs with the unseen score lower: 0.7 under 3 of 4, 0.5 and 0.4 under all 4 -> 11 of 12
    assert auroc(seen, unseen) == pytest.approx(11 / 12)
    assert auroc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)
    # Youden's J: below 0.55 flags 2/3 unseen and no seen (J 0.67); below 0.75 all unseen and 1/4 seen (J 0.75)
    result = calibrate(seen, unseen)
    assert 0.7 < result["threshold"] < 0.8 and result["tpr"] == 1.0 and result["fpr"] == pytest.approx(0.25)

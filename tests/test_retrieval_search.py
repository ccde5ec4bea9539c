"""Exact search (equal to brute force, deterministic ties across chunks, faiss agreement), the protocol's
micro/macro/H.M. on constructed predictions, and the novelty flag's AUROC and calibration by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.search import faiss_available, search
from testing.retrieval.novelty import auroc, calibrate
from testing.retrieval.protocol import chance, harmonic_mean, hits, macro, micro, paper_table, score_queries


def brute_force(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("bf16_pass", [False, True])
@pytest.mark.parametrize("chunk", [None, 7, 64, 130])
def test_exact_search_equals_brute_force(chunk, bf16_pass):
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


def test_bf16_pass_keeps_keys_closer_than_bfloat16_can_tell():
    """Query i has key i at cosine a (first chunk) and key n + i at a + 1e-5 (second chunk). bfloat16 values
    near 0.9 are 2^-8 apart and a sits just above the midpoint 0.900390625 of two of them, so a's rounding goes
    up while about half of the bfloat16 scores of the keys n + i go down, below it. The candidate pass must
    keep every key that may beat the running best: each query finds its key n + i, with its float32 score."""
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
    for query_batch in (7, 1024):
        scores, index = search(queries, keys, 1, chunk=n, query_batch=query_batch, bf16_pass=True)
        assert (index[:, 0] == n + np.arange(n)).all()
        assert np.allclose(scores[:, 0], a + 1e-5, rtol=0, atol=1e-6)


def test_ties_go_to_the_lower_index_across_chunks():
    """Keys 3, 9, 14 and 20 are the same vector: the top-3 is 3, 9, 14 whatever the chunking."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((24, 8)).astype(np.float32) * 0.1
    target = np.ones(8, dtype=np.float32)
    for i in (3, 9, 14, 20):
        keys[i] = target
    for bf16_pass in (False, True):
        for chunk in (None, 2, 5, 10, 11):
            _, index = search(target[None], keys, 3, chunk=chunk, bf16_pass=bf16_pass)
            assert index[0].tolist() == [3, 9, 14], (chunk, bf16_pass)
        equal = np.ones((6, 4), dtype=np.float32)  # all tied: the order is the index order
        top = search(np.ones((1, 4), np.float32), equal, 6, chunk=4, bf16_pass=bf16_pass)[1]
        assert top[0].tolist() == list(range(6))


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
    """Two seen and two unseen queries, three keys; not_classified queries do not count at their rank."""
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
    assert table.loc[("micro", 1), "species_unseen"] == pytest.approx(0.0)  # only query 0 counts
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

"""Exact nearest neighbours by inner product (cosine on unit vectors), chunked so that memory stays bounded.

Keys may be a NumPy array or memory map (float16/float32) of any size: they are streamed in chunks; on CUDA
they are held in float16 (half the memory) and each chunk is scored in float32. Each chunk's top-k is merged
into a running top-k. Ties are broken deterministically by the lower key index, also at a chunk's top-k
boundary. `backend="faiss"` runs faiss' exact `IndexFlatIP` instead (when faiss is installed).

On a CPU that multiplies bfloat16 natively (AVX512-BF16, AMX), a chunk is first scored in bfloat16, at about
twice the float32 rate, and only the keys that may still enter a query's top-k are scored again in float32, by
a per-pair dot product: those whose bfloat16 score reaches the running k-th float32 score (or, before there
is one, the chunk's own k-th bfloat16 score) minus a proven bound. Before the rounding of its output, a
bfloat16 score differs from the float32 one by at most |q| |k| (2u + u^2 + d 2^-22) with u = 2^-8
(Cauchy-Schwarz over the rounded products, two float32 accumulations); the output rounding is monotone, so
a floor rounded down to bfloat16 keeps every key at or above it, and no key of the top-k is missed. Every
score of a query batch comes from one float32 kernel, so equal keys score equally and ties go to the lower
index; scores may differ from an sgemm's (faiss', the float32 path's) in the last bits, so near-ties closer
than that may order differently than there. A query with over an eighth of a chunk's keys as candidates
(near-duplicate keys) or extreme norms sends its query batch to the float32 path: memory stays bounded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError

BACKENDS = ("torch", "faiss")
_TOP_INDEX = np.iinfo(np.int64).max
_U = 2.0**-8  # bfloat16's unit roundoff
_BLOCK = 64  # keys per block maximum when looking for candidates in a bfloat16 score chunk
_RESCORED = 1 << 22  # floats gathered per side when rescoring candidate pairs (16 MB; 8,192 pairs at d = 512)
_DENSE_SHARE = 1 / 8  # a query with more of a chunk's keys as candidates: the bfloat16 pass does not pay
_TINY, _HUGE = 2.0**-60, 2.0**100  # |q| |k| outside: bfloat16 products may underflow or overflow


class _Dense(Exception):
    """The bfloat16 pass cannot help this query batch (too many candidates for a query, extreme norms)."""


def _ordered(scores, indices, k: int):
    """The first k of (scores, indices) rows sorted by score descending, then index ascending."""
    import torch

    by_index = torch.sort(indices, dim=1, stable=True)
    scores = scores.gather(1, by_index.indices)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True)
    return by_score.values[:, :k], by_index.values.gather(1, by_score.indices)[:, :k]


def _chunk_topk(scores, k: int, offset: int):
    """Top-k of one score chunk [Q, C] with exact lower-index tie-breaking. The (k+1)-th score tells whether
    the k-th is tied with an unselected key; only such rows are re-ranked on every key holding that score."""
    import torch

    kk = min(k + 1, scores.shape[1])
    values, index = scores.topk(kk, dim=1)
    if kk == k:  # the chunk has at most k keys: all of them are in
        return values, index + offset
    tied = values[:, k] == values[:, k - 1]
    values, index = values[:, :k], index[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub, kth = scores[rows], values[rows, k - 1 :]
        cols = torch.arange(sub.shape[1], device=sub.device).expand_as(sub)
        # every key at or above the k-th
        cand = torch.where(sub >= kth, cols, torch.full_like(cols, _TOP_INDEX))
        values[rows], index[rows] = _ordered(torch.where(cand < _TOP_INDEX, sub, -torch.inf), cand, k)
    return values, index + offset


def search(queries, keys, k: int, backend: str = "torch", device: str = "cpu", normalize: bool = False,
           chunk: int | None = None, query_batch: int = 1024, max_bytes: int | None = None,
           bf16_pass: bool | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top-k keys per query: (float32 scores [Q, k], int64 indices [Q, k]), best first, ties to lower index.

    `normalize` scales queries to unit length (keys are expected unit-length already). Memory: one score
    block of `query_batch x chunk` (chosen within `max_bytes` when `chunk` is None: 16 MB on the CPU, 256 MB
    on CUDA) plus one key chunk (with the bfloat16 pass, also up to 16 MB of candidate rows). `bf16_pass` (CPU only; None: when the CPU has native bfloat16 and the keys
    fill more than three chunks) finds candidates in bfloat16 first; the top-k is the float32 one (module
    docstring: up to near-ties in the last bits).
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    n_keys = len(keys)
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    if n_keys == 0:
        raise UserError("the index holds no keys")
    k = min(k, n_keys)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if normalize:
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    if backend == "faiss":
        return _faiss_search(queries, keys, k)
    return _torch_search(queries, keys, k, device, chunk, query_batch, max_bytes, bf16_pass)


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX; read from /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _torch_search(queries: np.ndarray, keys: Any, k: int, device: str, chunk: int | None, query_batch: int,
                  max_bytes: int | None, bf16_pass: bool | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    import torch

    dev = torch.device(device)
    n_keys = len(keys)
    cuda = dev.type == "cuda"
    query_batch = max(1, min(query_batch, len(queries)))
    max_bytes = max_bytes or (1 << 28 if cuda else 1 << 24)
    bf16_chunk = chunk or max(k, min(n_keys, max_bytes // (2 * query_batch)))  # 2-byte scores
    chunk = chunk or max(k, min(n_keys, max_bytes // (4 * query_batch)))
    auto = native_bf16() and n_keys > 3 * bf16_chunk  # measured: below, the float32 path is as fast or faster
    bf16 = not cuda and (auto if bf16_pass is None else bf16_pass)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_index = np.empty((len(queries), k), dtype=np.int64)
    if cuda:
        resident = torch.from_numpy(np.asarray(keys, dtype=np.float16)).to(dev)
        _search_blocks(queries, keys, k, dev, resident, chunk, query_batch, out_scores, out_index)
        return out_scores, out_index
    for q0 in range(0, len(queries), query_batch):
        batch, rows = queries[q0 : q0 + query_batch], slice(q0, q0 + query_batch)
        if bf16:
            try:
                out_scores[rows], out_index[rows] = _bf16_batch(batch, keys, k, bf16_chunk)
                continue
            except _Dense:  # the pass cannot help this batch: float32 it is
                pass
        _cpu_float32(batch, keys, k, chunk, out_scores[rows], out_index[rows])
    return out_scores, out_index


def _cpu_float32(queries, keys, k, chunk, out_scores, out_index) -> None:
    """The float32 search of a query batch on the CPU, with NumPy's BLAS."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's idle OpenMP threads spin and slow NumPy's BLAS threads down
    try:
        cpu = torch.device("cpu")
        _search_blocks(queries, keys, k, cpu, None, chunk, len(queries), out_scores, out_index)
    finally:
        torch.set_num_threads(threads)


def _float32(block) -> np.ndarray:
    """A key chunk as float32; float16 converted by torch (NumPy's half conversion is several times slower)."""
    import torch

    if getattr(block, "dtype", None) == np.float16:  # a copy: index memory maps are read-only
        return torch.from_numpy(np.array(block, dtype=np.float16)).float().numpy()
    return np.asarray(block, dtype=np.float32)


def _search_blocks(queries, keys, k, dev, resident, chunk, query_batch, out_scores, out_index) -> None:
    """Fill out_scores / out_index [Q, k] block by block: one query batch against every key chunk."""
    import torch

    cuda, n_keys = resident is not None, len(keys)
    with torch.inference_mode():
        for q0 in range(0, len(queries), query_batch):
            q_host = queries[q0 : q0 + query_batch]
            q = torch.from_numpy(q_host).to(dev)
            best_s = best_i = None
            for c0 in range(0, n_keys, chunk):
                if cuda:
                    block = resident[c0 : c0 + chunk].float()
                    scores = q @ block.T
                else:  # NumPy's BLAS (OpenBLAS, as faiss'): 1.5x torch's MKL sgemm on a 2-core AMD EPYC
                    block = _float32(keys[c0 : c0 + chunk])
                    scores = torch.from_numpy(q_host @ block.T)
                s, i = _chunk_topk(scores, min(k, block.shape[0]), c0)
                best_s, best_i = _merge(best_s, best_i, s, i, k)
            out_scores[q0 : q0 + len(q)] = best_s.cpu().numpy()
            out_index[q0 : q0 + len(q)] = best_i.cpu().numpy()


def _merge(best_s, best_i, s, i, k: int):
    """The running top-k merged with new (scores, indices) rows (the first ones: just ordered)."""
    import torch

    if best_s is None:
        return _ordered(s, i, k)
    return _ordered(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)


def _at_least(scores, floor, cap: int):
    """(rows, cols) of the entries of scores [Q, C] that are >= floor [Q], row-major; the column blocks whose
    maximum is below the floor are skipped without looking at their entries again. Raises `_Dense`, before
    any pair is listed, when a row has more than `cap` of them."""
    import torch

    n_rows, width = scores.shape
    whole = width - width % _BLOCK
    blocks = scores[:, :whole].view(n_rows, whole // _BLOCK, _BLOCK)
    b_rows, b_cols = (blocks.amax(2) >= floor[:, None]).nonzero(as_tuple=True)
    inside = blocks[b_rows, b_cols] >= floor[b_rows, None]  # [candidate blocks, _BLOCK]
    tail = scores[:, whole:] >= floor[:, None]
    counts = torch.bincount(b_rows, weights=inside.sum(1), minlength=n_rows) + tail.sum(1)
    if n_rows and int(counts.max()) > cap:
        raise _Dense
    hit, offset = inside.nonzero(as_tuple=True)
    rows, cols = b_rows[hit], b_cols[hit] * _BLOCK + offset
    if whole < width:
        t_rows, t_cols = tail.nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, t_rows]), torch.cat([cols, t_cols + whole])
        order = torch.sort(rows, stable=True).indices
        rows, cols = rows[order], cols[order]
    return rows, cols


def _padded(rows, values, indices, n_rows: int):
    """Row-major (rows, values, indices) triples as [n_rows, m] blocks, padded with -inf / _TOP_INDEX."""
    import torch

    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if len(rows) else 0
    position = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
    out_s = torch.full((n_rows, width), -torch.inf)
    out_i = torch.full((n_rows, width), _TOP_INDEX, dtype=torch.int64)
    out_s[rows, position], out_i[rows, position] = values, indices
    return out_s, out_i


def _bf16_floor(x):
    """The largest bfloat16 value at most x (float32): every rounding of a score >= x stays >= it."""
    import torch

    rounded = x.bfloat16()
    return torch.where(
        rounded.float() > x, torch.nextafter(rounded, torch.full_like(rounded, -torch.inf)), rounded
    )


def _rescore(q, block, rows, cols):
    """float32 scores of the (query row, key column) pairs, a bounded number of pairs at a time."""
    import torch

    step = max(1, _RESCORED // q.shape[1])
    parts = [(q[r] * block[c]).sum(1) for r, c in zip(rows.split(step), cols.split(step), strict=True)]
    return torch.cat(parts)


def _bf16_batch(queries: np.ndarray, keys: Any, k: int, chunk: int):
    """Top-k of one query batch with a bfloat16 candidate pass per chunk (module docstring); raises `_Dense`
    when the pass cannot help, before anything is returned."""
    import torch

    n_keys, dim = len(keys), queries.shape[1]
    slack = 2 * _U + _U * _U + dim * 2.0**-22
    best_s = best_i = None
    with torch.inference_mode():
        q = torch.from_numpy(queries if queries.flags.writeable else queries.copy())
        q_bf16, q_norm = q.bfloat16(), torch.linalg.vector_norm(q, dim=1)
        for c0 in range(0, n_keys, chunk):
            block = _float32(keys[c0 : c0 + chunk])
            block = torch.from_numpy(block if block.flags.writeable else block.copy())
            scale = q_norm * torch.linalg.vector_norm(block, dim=1).max()
            if not bool(((scale >= _TINY) & (scale <= _HUGE)).all()):  # also catches NaN
                raise _Dense
            bound = scale * slack
            approx = q_bf16 @ block.bfloat16().T
            # a key of the top-k reaches the running k-th score, and the chunk's k-th: its bfloat16 score less
            # the bound and the output's rounding
            if best_s is not None and best_s.shape[1] == k:
                floor = best_s[:, k - 1] - bound
            elif block.shape[0] >= k:
                kth = approx.topk(k, dim=1).values[:, k - 1].float()
                floor = kth - 2 * bound - 3 * _U * kth.abs()
            else:
                floor = torch.full_like(bound, -torch.inf)
            floor = _bf16_floor(floor - (floor.abs() + bound) * 2.0**-22)  # and the subtraction's rounding
            rows, cols = _at_least(approx, floor, max(k, int(_DENSE_SHARE * block.shape[0])))
            if len(rows):
                s, i = _padded(rows, _rescore(q, block, rows, cols), cols + c0, len(q))
                best_s, best_i = _merge(best_s, best_i, s, i, k)
    return best_s.numpy(), best_i.numpy()


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_search(queries: np.ndarray, keys: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    if not faiss_available():
        raise UserError(
            "--backend faiss needs the faiss package (pip install faiss-cpu); or use --backend torch"
        )
    import faiss

    index = faiss.IndexFlatIP(queries.shape[1])
    step = 1 << 18
    for c0 in range(0, len(keys), step):
        index.add(np.ascontiguousarray(keys[c0 : c0 + step], dtype=np.float32))
    scores, indices = index.search(queries, k)
    return scores.astype(np.float32), indices.astype(np.int64)

"""Exact nearest neighbours by inner product (cosine on unit vectors), chunked so that memory stays bounded.

The contract, on every path and device: the score of a (query, key) pair is its *reference score*, a float32
dot product computed by one kernel (`_rescore`: elementwise products summed in a fixed order, whatever the
pair's position in a chunk or a batch), so equal keys score equally; the top-k is the exact top-k of those
scores, ties to the lower key index. Keys with a NaN or infinite value are skipped (never returned); a query
with one is refused.

Each key chunk is first scored by a fast *candidate pass*, and only the keys whose pass score lies within a
proven bound of a query's running k-th reference score (or, before there is one, the chunk's own k-th pass
score less twice the bound) are scored again by `_rescore` and merged into the running top-k. The pass is:
- on a CPU that multiplies bfloat16 natively (AVX512-BF16, AMX), a bfloat16 product: |pass - exact| <=
  |q| |k| (2u + u^2 + d 2^-22), u = 2^-8 (Cauchy-Schwarz over the rounded products, float32 accumulation);
  its output is rounded to bfloat16, which is monotone, so the floor is rounded down to that grid;
- otherwise on the CPU, NumPy's sgemm (OpenBLAS, as faiss'), float32: |pass - exact| <= gamma_d |q| |k| with
  gamma_d = d 2^-24 / (1 - d 2^-24), and the reference score is within the same of exact: bound 2 gamma_d;
- on CUDA, float16 keys held on the device (half the memory) times float16 queries into float32:
  |pass - exact| <= |q| |k| (2u + u^2 + d 2^-23) + 2^-24 sqrt(d) (|q| + |k|) + ..., u = 2^-11 (the last term
  covers float16's underflow); the reference scores use the float32 keys (kept on the device when they fit,
  else the candidates' rows are fetched from the host), so the float32 top-k is returned exactly.
The bound is applied with every norm as its maximum over the chunk; a query with norms outside the pass's safe
range (bfloat16/float16 underflow or overflow) is scored by the float32 pass. A query whose candidates fill
more than an eighth of a chunk (near-duplicate keys) has them rescored in bounded steps, so memory stays
bounded however many keys tie. `backend="faiss"` runs faiss' exact `IndexFlatIP` instead (when installed).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError

BACKENDS = ("torch", "faiss")
_TOP_INDEX = np.iinfo(np.int64).max
_BLOCK = 64  # keys per block when looking for candidates in a pass score chunk
_RESCORED = 1 << 22  # floats gathered per side when rescoring candidate pairs (16 MB; 8,192 pairs at d = 512)
_DENSE_SHARE = 1 / 8  # a query with more of a chunk's keys as candidates is rescored on its own, in steps
_RESIDENT_ON_CPU = False  # tests: run the CUDA path's float16 pass on the CPU (products in float32, as there)


def _in_range(kind: str, q_norm, k_norm) -> bool:
    """Whether the pass's rounding bound holds for these norms: bfloat16 products neither underflow nor
    overflow (|q| |k| in [2^-60, 2^100]); float16 elements stay below its largest value (norms <= 2^15)."""
    if kind == "bf16":
        scale = q_norm * k_norm
        return bool(((scale >= 2.0**-60) & (scale <= 2.0**100)).all())
    if kind == "f16":
        return bool((q_norm <= 2.0**15).all()) and float(k_norm) <= 2.0**15
    return True


def _slack(kind: str, dim: int) -> float:
    """The pass's error bound per unit of |q| |k| (module docstring)."""
    if kind == "bf16":
        u = 2.0**-8
        return 2 * u + u * u + dim * 2.0**-22
    if kind == "f16":
        u = 2.0**-11
        return 2 * u + u * u + dim * 2.0**-23
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    return 2 * gamma


def search(queries, keys, k: int, backend: str = "torch", device: str = "cpu", normalize: bool = False,
           chunk: int | None = None, query_batch: int = 1024, max_bytes: int | None = None,
           bf16_pass: bool | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top-k keys per query: (float32 reference scores [Q, k'], int64 indices [Q, k']), best first, ties to the
    lower index; k' = k, or the number of finite keys when fewer.

    `normalize` scales queries to unit length (keys are expected unit-length already). Memory: one pass score
    block of `query_batch x chunk` (chosen within `max_bytes` when `chunk` is None: 16 MB on the CPU, 256 MB on
    CUDA), one key chunk and up to 16 MB of candidate rows. `bf16_pass` (CPU only; None: when the CPU has native
    bfloat16 and the keys fill more than three chunks) selects the bfloat16 candidate pass over sgemm's.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    n_keys = len(keys)
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    if n_keys == 0:
        raise UserError("the index holds no keys")
    k = min(k, n_keys)
    queries = np.array(queries, dtype=np.float32, order="C", ndmin=2)  # a writable copy of the caller's rows
    finite = np.isfinite(queries).all(1)
    if not finite.all():
        raise UserError(
            f"query {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values; it cannot be searched"
        )
    if queries.shape[1] != keys.shape[1]:
        raise UserError(
            f"queries of dimension {queries.shape[1]} cannot search keys of dimension {keys.shape[1]}"
        )
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
    cuda = dev.type == "cuda" or _RESIDENT_ON_CPU
    query_batch = max(1, min(query_batch, len(queries)))
    max_bytes = max_bytes or (1 << 28 if cuda else 1 << 24)
    bf16_chunk = chunk or max(k, min(n_keys, max_bytes // (2 * query_batch)))  # 2-byte pass scores
    f32_chunk = chunk or max(k, min(n_keys, max_bytes // (4 * query_batch)))
    auto = native_bf16() and n_keys > 3 * bf16_chunk  # measured: below, sgemm's pass is as fast or faster
    kind = "f16" if cuda else ("bf16" if (auto if bf16_pass is None else bf16_pass) else "f32")
    source = _Keys(keys, dev, cuda)
    out_s, out_i = [], []
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1 if kind == "f32" else threads)  # torch's idle threads slow NumPy's BLAS down
    try:
        with torch.inference_mode():
            for q0 in range(0, len(queries), query_batch):
                q = torch.from_numpy(queries[q0 : q0 + query_batch]).to(dev)
                s, i = _candidate_batch(q, source, k, bf16_chunk if kind == "bf16" else f32_chunk, kind)
                out_s.append(s.cpu().numpy())
                out_i.append(i.cpu().numpy())
    finally:
        torch.set_num_threads(threads)
    scores, index = np.concatenate(out_s), np.concatenate(out_i)
    filled = int((index[0] != _TOP_INDEX).sum())  # every query sees the same keys: fewer finite than k
    return scores[:, :filled], index[:, :filled]


class _Keys:
    """The keys as chunks for the pass and rows for rescoring: on CUDA a float16 copy on the device, and a
    float32 one when it fits in a quarter of the free memory (else candidate rows come from the host)."""

    def __init__(self, keys: Any, dev, cuda: bool):
        import torch

        self.keys, self.dev, self.cuda = keys, dev, cuda
        self.n, self.dim = len(keys), keys.shape[1]
        self.half = self.full = self.norms = None
        if cuda:
            step = 1 << 16
            self.half = torch.empty(self.n, self.dim, dtype=torch.float16, device=dev)
            self.norms = torch.empty(self.n, dtype=torch.float32, device=dev)
            free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 1 << 40
            fits = self.n * self.dim * 4 < free // 4
            self.full = torch.empty(self.n, self.dim, dtype=torch.float32, device=dev) if fits else None
            for c0 in range(0, self.n, step):
                block = torch.from_numpy(_float32(keys[c0 : c0 + step])).to(dev)
                self.norms[c0 : c0 + len(block)] = torch.linalg.vector_norm(block, dim=1)
                self.half[c0 : c0 + len(block)] = block.nan_to_num(0, 0, 0).clamp(-65504, 65504).half()
                if self.full is not None:
                    self.full[c0 : c0 + len(block)] = block

    def block(self, c0: int, c1: int):
        """float32 keys [c1 - c0, d] (None on CUDA: the pass reads the float16 copy). A float32 memory map is
        read in place (never written: torch's warning about read-only arrays does not apply)."""
        import warnings

        import torch

        if self.cuda:
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(_float32(self.keys[c0:c1]))

    def rows(self, block, c0: int, cols):
        """float32 rows of the chunk starting at c0 for the chunk-relative indices `cols`."""
        import torch

        if block is not None:
            return block[cols]
        if self.full is not None:
            return self.full[cols + c0]
        unique, inverse = torch.unique(cols, return_inverse=True)
        host = np.array(_float32(self.keys[(unique + c0).cpu().numpy()]), dtype=np.float32)
        return torch.from_numpy(host).to(self.dev)[inverse]


def _float32(block) -> np.ndarray:
    """Keys as float32 (float32 arrays as they are; float16 converted by torch: NumPy's half conversion is
    several times slower)."""
    import torch

    if getattr(block, "dtype", None) == np.float16:
        return torch.from_numpy(np.array(block, dtype=np.float16)).float().numpy()
    return np.asarray(block, dtype=np.float32)


def _ordered(scores, indices, k: int):
    """The first k of (scores, indices) rows sorted by score descending, then index ascending."""
    import torch

    by_index = torch.sort(indices, dim=1, stable=True)
    scores = scores.gather(1, by_index.indices)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True)
    return by_score.values[:, :k], by_index.values.gather(1, by_score.indices)[:, :k]


def _merge(best_s, best_i, s, i, k: int):
    """The running top-k merged with new (scores, indices) rows (the first ones: just ordered)."""
    import torch

    if best_s is None:
        return _ordered(s, i, k)
    return _ordered(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)


def _rescore(q, rows_of, rows, cols):
    """Reference float32 scores of the (query row, key column) pairs, a bounded number at a time: products
    summed over the last dimension of [pairs, d] tensors, the same for every pair wherever it sits."""
    import torch

    step = max(1, _RESCORED // q.shape[1])
    parts = [(q[r] * rows_of(c)).sum(1) for r, c in zip(rows.split(step), cols.split(step), strict=True)]
    return torch.cat(parts) if parts else torch.empty(0, device=q.device)


def _pass_scores(kind: str, q, block, source: _Keys, c0: int, c1: int):
    """The candidate pass's scores [Q, c1 - c0] (float32, or bfloat16 for the bfloat16 pass)."""
    import torch

    if kind == "bf16":
        return q.bfloat16() @ block.bfloat16().T
    if kind == "f16":
        q16 = q.clamp(-65504, 65504).half()
        if q.is_cuda:  # float16 inputs, float32 accumulation and output (tensor cores)
            return torch.mm(q16, source.half[c0:c1].T, out_dtype=torch.float32)
        return q16.float() @ source.half[c0:c1].float().T  # the same arithmetic: float16 products are exact
    return torch.from_numpy(q.numpy() @ block.numpy().T)  # NumPy's BLAS: 1.5x torch's MKL sgemm measured here


def _at_least(scores, floor, cap: int):
    """(rows, cols) of the entries of scores [Q, C] that are >= floor [Q], row-major, for the rows with at most
    `cap` of them, and the rows with more (`dense`, left to the caller). Column blocks whose maximum is below
    the floor are skipped without looking at their entries again."""
    import torch

    n_rows, width = scores.shape
    whole = width - width % _BLOCK
    blocks = scores[:, :whole].view(n_rows, whole // _BLOCK, _BLOCK)
    b_rows, b_cols = (blocks.amax(2) >= floor[:, None]).nonzero(as_tuple=True)
    inside = blocks[b_rows, b_cols] >= floor[b_rows, None]  # [candidate blocks, _BLOCK]
    tail = scores[:, whole:] >= floor[:, None]
    counts = tail.sum(1)
    if len(b_rows):
        counts = counts.index_add(0, b_rows, inside.sum(1))
    dense = counts > cap
    keep_blocks = ~dense[b_rows]
    b_rows, b_cols, inside = b_rows[keep_blocks], b_cols[keep_blocks], inside[keep_blocks]
    hit, offset = inside.nonzero(as_tuple=True)
    rows, cols = b_rows[hit], b_cols[hit] * _BLOCK + offset
    if whole < width:
        t_rows, t_cols = (tail & ~dense[:, None]).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, t_rows]), torch.cat([cols, t_cols + whole])
        order = torch.sort(rows, stable=True).indices
        rows, cols = rows[order], cols[order]
    return rows, cols, dense.nonzero().squeeze(1)


def _padded(rows, values, indices, n_rows: int):
    """Row-major (rows, values, indices) triples as [n_rows, m] blocks, padded with -inf / _TOP_INDEX."""
    import torch

    device = values.device
    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if len(rows) else 0
    position = torch.arange(len(rows), device=device) - (torch.cumsum(counts, 0) - counts)[rows]
    out_s = torch.full((n_rows, width), -torch.inf, device=device)
    out_i = torch.full((n_rows, width), _TOP_INDEX, dtype=torch.int64, device=device)
    out_s[rows, position], out_i[rows, position] = values, indices
    return out_s, out_i


def _floor_on_grid(kind: str, x):
    """For the bfloat16 pass, the largest bfloat16 value at most x: its output rounding is monotone, so every
    score >= x stays >= it. Float32 pass scores are compared as they are."""
    import torch

    if kind != "bf16":
        return x
    rounded = x.bfloat16()
    return torch.where(
        rounded.float() > x, torch.nextafter(rounded, torch.full_like(rounded, -torch.inf)), rounded
    )


def _candidate_batch(q, source: _Keys, k: int, chunk: int, kind: str):
    """Top-k reference scores and indices [Q, k] of one query batch (module docstring)."""
    import torch

    n_keys, dim = source.n, source.dim
    q_norm = torch.linalg.vector_norm(q, dim=1)
    best_s = torch.full((len(q), k), -torch.inf, device=q.device)
    best_i = torch.full((len(q), k), _TOP_INDEX, dtype=torch.int64, device=q.device)
    have = False  # whether best_s holds k reference scores of finite keys for every query
    for c0 in range(0, n_keys, chunk):
        c1 = min(n_keys, c0 + chunk)
        block = source.block(c0, c1)
        norms = torch.linalg.vector_norm(block, dim=1) if block is not None else source.norms[c0:c1]
        finite = torch.isfinite(norms)  # a key with a NaN or infinite value (or norm) is skipped
        all_finite = bool(finite.all())
        k_norm = norms.max() if all_finite else norms.masked_fill(~finite, 0).max()
        if block is not None and not all_finite:
            block = torch.where(finite[:, None], block, 0)  # skipped below; zeros keep the pass finite
        scale = q_norm * k_norm
        step_kind = kind if _in_range(kind, q_norm, k_norm) else "f32"
        if step_kind == "f32" and block is None:  # CUDA without float32 rows at hand: fetch the chunk
            block = source.rows(None, c0, torch.arange(c1 - c0, device=q.device)).cpu()
            block = torch.where(finite.cpu()[:, None], block, 0)
        qq = q if step_kind != "f32" or block is None or not q.is_cuda else q.cpu()
        approx = _pass_scores(step_kind, qq.cpu() if step_kind == "f32" else qq, block, source, c0, c1).to(
            q.device
        )
        if not all_finite:
            approx = approx.masked_fill(~finite[None, :].to(approx.device), -torch.inf)
        bound = scale * _slack(step_kind, dim)
        extra = 2.0**-24 * math.sqrt(dim) * (q_norm + k_norm) if step_kind == "f16" else 0
        bound = bound + extra
        width = c1 - c0
        if have:
            floor = best_s[:, k - 1] - bound
        elif width >= k:
            kth = approx.topk(k, dim=1).values[:, k - 1].float()
            floor = kth - 2 * bound - (3 * 2.0**-8 * kth.abs() if step_kind == "bf16" else 0)
        else:
            floor = torch.full_like(bound, -torch.inf)
        floor = torch.where(torch.isfinite(floor), floor - (floor.abs() + bound) * 2.0**-22, floor)
        floor = _floor_on_grid(step_kind, floor).to(approx.dtype)
        floor = floor.clamp(min=torch.finfo(approx.dtype).min)  # skipped keys (-inf) are never candidates
        rows, cols, dense = _at_least(approx, floor, max(k, int(_DENSE_SHARE * width)))

        def rows_of(c, block=block, c0=c0):
            return source.rows(block.to(q.device) if block is not None else None, c0, c)

        if len(rows):
            s, i = _padded(rows, _rescore(q, rows_of, rows, cols), cols + c0, len(q))
            best_s, best_i = _merge(best_s, best_i, s, i, k)
        for r in dense.tolist():  # near-duplicate keys: this query's candidates rescored in bounded steps
            cand = (approx[r] >= floor[r]).nonzero().squeeze(1)
            for part in cand.split(max(1, _RESCORED // dim)):
                s = _rescore(q, rows_of, torch.full_like(part, r), part)
                top_s, top_i = _merge(best_s[r : r + 1], best_i[r : r + 1], s[None], (part + c0)[None], k)
                best_s[r], best_i[r] = top_s[0], top_i[0]
        have = have or bool(torch.isfinite(best_s[:, k - 1]).all())
    return best_s, best_i


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

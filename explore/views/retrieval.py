"""Retrieval: identify a specimen from an uploaded photo, a pasted DNA barcode or FASTA text (per-rank
prediction, nearest keys with thumbnails, taxonomy and cosine, the novelty flag), and a 2-D projection of the
index where clicking a point queries with that key.

Queries are `retrieve query`'s (`run_query` and its `answer`), DNA text is checked by the same `clean_dna` /
FASTA reader, the index is the cached one `retrieve index` builds (or a folder it exported), and the
projection is `retrieve plot`'s PCA (`pca_2d`), fitted jointly on the index's image and DNA keys.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from core.errors import UserError
from explore.media import open_upload, png_of
from explore.views import Blob, Cache, NotFound, Request, View, finite, integer

MAX_K = 50
MAX_POINTS = 20_000  # points drawn in the projection (a fixed random subset of a larger index)
THUMB = 96


class RetrievalView(View):
    kind = "retrieval"

    def __init__(self, tab_id, source, ctx):
        super().__init__(tab_id, source, ctx)
        from models.retrieval import load_retrieval_model
        from testing.retrieval.store import EmbeddingIndex, build_index

        opts = ctx.options
        self.net, meta, model_hash = load_retrieval_model(source.path, str(ctx.device))
        if source.index is not None:
            self.index = EmbeddingIndex.load(source.index)
            self.index.check_model(model_hash, source.path)
        else:  # as `retrieve query` without --index: the cached index of the training data's all_keys
            data = Path(str((meta.get("dataset") or {}).get("path", "")))
            if not data.is_file():
                raise UserError(
                    f"{source.path}: its training data {data} is not here and no index was given; give an index "
                    "folder (`retrieve index --out`) after the model"
                )
            self.index, _ = build_index(self.net, model_hash, source.path, data, "all_keys",
                                        self.net.spec.modalities, ctx.device, quiet=opts.quiet)  # fmt: skip
        data = Path(str(self.index.manifest.get("data", {}).get("path", "")))
        self.data = data if data.is_file() else None
        self.split = self.index.manifest.get("data", {}).get("split", "all_keys")
        self.rows = {}
        for row, key in enumerate(self.index.labels["id"]):
            self.rows.setdefault(str(key), row)
        self.thumbs = Cache()
        self._projection: dict = {}

    @property
    def title(self) -> str:
        return self.source.path.name if self.source.path.is_dir() else self.source.path.parent.name

    def describe(self) -> dict:
        from datasets.bioscan.taxonomy import RANKS

        queries = [m for m in ("image", "dna") if m in self.net.spec.modalities]
        return {**super().describe(), "queries": queries, "keys": self.index.modalities, "count": len(self.index),
                "ranks": list(RANKS), "novelty": self.index.novelty(), "thumbnails": self.data is not None,
                "index": str(self.index.folder), "max_upload": self.ctx.options.max_upload, "max_k": MAX_K}  # fmt: skip

    def actions(self) -> dict:
        return {"query": ("POST", self.query), "point": ("POST", self.point), "thumb": ("GET", self.thumb),
                "projection": ("GET", self.projection)}  # fmt: skip

    def _options(self, values: dict) -> tuple[str, int]:
        keys = str(
            values.get("keys") or ("dna" if "dna" in self.index.modalities else self.index.modalities[0])
        )
        if keys not in self.index.modalities:
            raise UserError(f"keys {keys!r}: the index holds {', '.join(self.index.modalities)} keys")
        return keys, integer(values.get("k", 5), "k (neighbours)", 1, MAX_K)

    def query(self, request: Request) -> dict:
        """An uploaded image (body) or `{"dna": text}` (a barcode or FASTA records) -> one answer per query."""
        from datasets.bioscan.dna import clean_dna, parse_fasta
        from testing.retrieval.query import run_query

        images, sequences, name = [], [], "upload"
        if request.is_upload:
            keys, k = self._options(request.params)
            if "image" not in self.net.spec.modalities:
                raise UserError("this model has no image encoder; query it with a DNA barcode")
            open_upload(request.body, request.filename)  # a clear message for a file that is not an image
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.filename)[-80:] or "upload"
        else:
            body = request.json()
            keys, k = self._options(body)
            text = str(body.get("dna") or "").strip()
            unknown = "n" if body.get("unknown_as_n") else "error"
            if not text:
                raise UserError("paste a DNA barcode (A, C, G, T, N) or FASTA records to identify")
            if "dna" not in self.net.spec.modalities:
                raise UserError("this model has no DNA encoder; query it with an image")
            if text.startswith(">"):
                sequences = parse_fasta(text, "the pasted FASTA text", "pasted", unknown)
            else:
                sequences = [("barcode", clean_dna(text, unknown, source="the DNA barcode"))]
        device = self.ctx.device

        def work():
            with tempfile.TemporaryDirectory(prefix="biovis-explore-") as folder:
                if request.is_upload:  # `retrieve query` reads image files: the upload as one, for this query
                    images.append(Path(folder) / name)
                    images[0].write_bytes(request.body)
                return list(run_query(self.net, self.index, images, sequences, keys, k, None, device))

        results = self.ctx.worker.run(self.slot(request, "query"), work)
        for result in results:
            if result["modality"] == "image":
                result["query"] = request.filename
        return {"results": [self._rows(r) for r in results]}

    def _rows(self, result: dict) -> dict:
        for neighbour in result["neighbours"]:
            neighbour["row"] = self.rows.get(neighbour["id"])
            neighbour["score"] = finite(neighbour["score"])
        result["best_score"] = finite(result["best_score"])
        return result

    def point(self, request: Request) -> dict:
        """Query with the key at `row` of `modality` (a clicked point of the projection)."""
        from testing.retrieval.query import answer

        body = request.json()
        keys, k = self._options(body)
        modality = str(body.get("modality"))
        if modality not in self.index.modalities:
            raise UserError(f"modality {modality!r}: the index holds {', '.join(self.index.modalities)} keys")
        row = integer(body.get("row"), "row", 0, len(self.index) - 1)
        vector = np.asarray(self.index.keys(modality)[row], dtype=np.float32)[None]
        pair = f"{modality}:{keys}"
        threshold = self.index.novelty().get(pair, {}).get("threshold")  # as run_query picks it

        def work():
            return answer(self.index, vector, keys, k, threshold, device=str(self.ctx.device))[0]

        result = self.ctx.worker.run(self.slot(request, "query"), work)
        name = f"{self.split} key {self.index.labels['id'][row]} ({modality})"
        return {"results": [self._rows({"query": name, "modality": modality, "keys": keys, **result})]}

    def thumb(self, request: Request) -> Blob:
        """The photo of the key at `row`, read from the index's data file."""
        from datasets.bioscan.hdf5 import decode_image, open_hdf5

        if self.data is None:
            raise NotFound("the index's data file is not on this machine; no thumbnails")
        row = integer(request.params.get("row"), "row", 0, len(self.index) - 1)

        def read() -> bytes:
            with open_hdf5(self.data) as f:
                group = f[self.split]
                raw = group["image"][row]
                if "image_mask" in group:
                    raw = raw[: int(group["image_mask"][row])]
                pixels = decode_image(bytes(np.asarray(raw, dtype=np.uint8)), THUMB, f"{self.split}[{row}]")
            return png_of(pixels.transpose(1, 2, 0))

        return Blob(self.thumbs.get(row, read))

    def projection(self, request: Request) -> dict:
        """PCA of the index's keys (image and DNA jointly, as `retrieve plot`), coloured by a rank."""
        from datasets.bioscan.taxonomy import RANKS
        from testing.retrieval.plots import pca_2d

        rank = request.params.get("rank", "genus")
        if rank not in RANKS:
            raise UserError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
        if "coords" not in self._projection:
            modalities = [m for m in ("image", "dna") if m in self.index.modalities] or self.index.modalities[
                :1
            ]
            n = len(self.index)
            rows = np.arange(n)
            if n > MAX_POINTS // len(modalities):
                rows = np.sort(
                    np.random.default_rng(0).choice(n, MAX_POINTS // len(modalities), replace=False)
                )
            vectors = np.concatenate(
                [np.asarray(self.index.keys(m)[rows], dtype=np.float32) for m in modalities]
            )
            coords = pca_2d(vectors)
            self._projection = {"coords": coords, "rows": np.tile(rows, len(modalities)),
                                "modality": np.repeat(np.arange(len(modalities)), len(rows)), "modalities": modalities}  # fmt: skip
        p = self._projection
        labels = self.index.labels[rank][p["rows"]]
        taxa, taxon = np.unique(labels.astype(str), return_inverse=True)
        counts = np.bincount(taxon, minlength=len(taxa))
        return {"x": [finite(v, 4) for v in p["coords"][:, 0]], "y": [finite(v, 4) for v in p["coords"][:, 1]],
                "row": p["rows"].tolist(), "modality": p["modality"].tolist(), "modalities": p["modalities"],
                "taxon": taxon.tolist(), "taxa": taxa.tolist(), "counts": counts.tolist(), "rank": rank,
                "total": len(self.index), "shown": int(len(p["rows"]) // len(p["modalities"]))}  # fmt: skip

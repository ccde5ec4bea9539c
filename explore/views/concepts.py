"""Concepts (VisCoIN): pick an image, see f's and Theta's top-5 and the relevance of each concept to the
explained class (the paper's tau rule marks the explaining concepts), scale concepts with sliders and see the
image regenerated through Omega and G, a concept's heat map, and its card (the images where it fires most,
from the `concepts` cache, and its best-aligned attributes with their AUC).

Every model call is the `amplify` command's: `encode_tensor`, `plan_encoded` (selection by the paper's rule),
`decode_and_classify` on `scale_concepts(...)`; heat maps are `concepts heatmaps`' `heat_maps`, the card reads
`concept_arrays` (the cache `concepts` fills) and `attribute_auc` (`test viscoin`'s alignment).
"""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError
from explore.media import data_url, open_upload, overlay, png_of, pngs
from explore.views import Blob, Cache, Request, View, finite, integer, number
from models.viscoin import concept_activations

MAX_MULTIPLIER = 16.0  # the sliders span 0..4; typed values may go further
TOP_CLASSES = 5
CARD_IMAGES = 8
CARD_ATTRIBUTES = 5
THUMB = 96  # gallery thumbnails: at most this many pixels a side
VERSIONS = itertools.count(1)  # each explanation's number: the page drops slider images of an older one


def short_name(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (as the CLI's figures print class names)."""
    return name.split(".", 1)[-1].replace("_", " ")


class ConceptsView(View):
    kind = "concepts"

    def __init__(self, tab_id, source, ctx):
        super().__init__(tab_id, source, ctx)
        from testing.viscoin.concepts import open_analysis

        opts = ctx.options
        self.analysis = open_analysis(source.path, opts.dataset, opts.data_dir, opts.split, opts.device,
                                      quiet=opts.quiet)  # fmt: skip
        self.models = self.analysis.models
        self.device = self.analysis.device
        self.n = len(self.analysis.data)
        self.labels = np.asarray(self.analysis.data.labels)
        self.names = [short_name(n) for n in self.analysis.class_names]
        self.thumbs = Cache()
        self._card_lock = threading.Lock()
        self._card: dict = {"status": "idle"}

    def describe(self) -> dict:
        from testing.viscoin.metrics import DEFAULT_THRESHOLD

        spec = self.analysis.spec
        return {**super().describe(), "dataset": spec.dataset, "split": self.analysis.split, "n_images": self.n,
                "n_concepts": self.models.n_concepts, "image_size": self.models.image_size,
                "class_names": self.names, "labels": self.labels.tolist(), "tau": DEFAULT_THRESHOLD,
                "max_multiplier": MAX_MULTIPLIER, "max_upload": self.ctx.options.max_upload}  # fmt: skip

    def actions(self) -> dict:
        return {"image": ("GET", self.image), "select": ("POST", self.select), "explain": ("POST", self.explain),
                "render": ("POST", self.render), "heatmap": ("POST", self.heatmap), "card": ("GET", self.card)}  # fmt: skip

    # ------------------------------------------------------------------ images of the split

    def image(self, request: Request) -> Blob:
        """The split's image `i` as the model sees it (eval transform), PNG; `size=thumb`: at most 96 px."""
        i = integer(request.params.get("i"), "i", 0, self.n - 1)
        thumb = request.params.get("size") == "thumb"

        def make() -> bytes:
            from PIL import Image

            from datasets.transforms import to_uint8_images

            pixels = to_uint8_images(self.analysis.data[i]["image"][None])[0]
            if thumb and max(pixels.shape[:2]) > THUMB:
                picture = Image.fromarray(pixels)
                picture.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
                pixels = np.asarray(picture)
            return png_of(pixels)

        return Blob(self.thumbs.get((i, thumb), make))

    # ------------------------------------------------------------------ choosing an image and a class

    def select(self, request: Request) -> dict:
        """Encode a split image (`{"index": i}`) or an uploaded file, and explain Theta's predicted class."""
        if request.is_upload:
            picture = open_upload(request.body, request.filename)
            x = self.analysis.data.transform(picture)[None]
            chosen = {"image_id": request.filename, "index": None, "label": None}
        else:
            i = integer(request.json().get("index"), "index", 0, self.n - 1)
            x = self.analysis.data[i]["image"][None]
            chosen = {"image_id": i, "index": i, "label": int(self.labels[i])}

        def work():
            from testing.viscoin.amplify import encode_tensor

            logits_f, concepts, support, logits_theta = encode_tensor(self.models, x, self.device)
            return {"x": x, "codes": (concepts, support, logits_theta), "logits_f": logits_f, **chosen}

        encoded = self.ctx.worker.run(self.slot(request, "select"), work)
        request.state.clear()
        request.state.update(encoded)
        return self._explain(request.state, None, request)

    def explain(self, request: Request) -> dict:
        """Explain another class (e.g. one of Theta's top-5) for the chosen image."""
        state = self._chosen(request)
        target = integer(request.json().get("target"), "target", 0, self.models.num_classes - 1)
        return self._explain(state, target, request)

    def _chosen(self, request: Request) -> dict:
        if "codes" not in request.state:
            raise UserError("choose an image first (the gallery or an upload)")
        return request.state

    def _explain(self, state: dict, target: int | None, request: Request) -> dict:
        from testing.viscoin.amplify import Selection, decode_and_classify, plan_encoded
        from testing.viscoin.metrics import DEFAULT_THRESHOLD

        def work():
            target_t = None if target is None else torch.tensor([target])
            plan = plan_encoded(self.models, self.device, [state["image_id"]], state["x"], state["codes"],
                                Selection("threshold", DEFAULT_THRESHOLD), [], target=target_t)  # fmt: skip
            concepts, support = plan.concepts.to(self.device), plan.support.to(self.device)
            recon, p_recon = decode_and_classify(self.models, concepts, support, plan.target.to(self.device))
            relevance = self.models.explainer.relevance(concepts, plan.target.to(self.device)).float().cpu()
            return plan, recon.cpu(), float(p_recon), relevance[0]

        plan, recon, p_recon, relevance = self.ctx.worker.run(self.slot(request, "select"), work)
        state["plan"] = plan
        c = int(plan.target[0])
        p_f = F.softmax(state["logits_f"].float(), dim=1)[0]
        p_theta = F.softmax(state["codes"][2].float(), dim=1)[0]
        selected = plan.selected[0].nonzero().flatten()
        order = plan.normalised[0, selected].argsort(descending=True)
        state["version"] = next(VERSIONS)
        return {
            "version": state["version"],
            "image_id": state["image_id"], "index": state["index"], "label": state["label"],
            "label_name": None if state["label"] is None else self.names[state["label"]],
            "original": data_url(pngs(state["x"])[0]), "reconstruction": data_url(pngs(recon)[0]),
            "target": c, "target_name": self.names[c], "theta_prediction": int(p_theta.argmax()),
            "p_original": finite(p_f[c]), "p_reconstruction": finite(p_recon),
            "top_f": self._top(p_f), "top_theta": self._top(p_theta),
            "relevance": [finite(v, 5) for v in plan.normalised[0].tolist()],
            "raw_relevance": [finite(v, 5) for v in relevance.tolist()],
            "activation": [finite(v, 5) for v in concept_activations(plan.concepts)[0].tolist()],
            "selected": selected[order].tolist(),
        }  # fmt: skip

    def _top(self, probabilities: torch.Tensor) -> list[dict]:
        values, classes = probabilities.topk(min(TOP_CLASSES, len(probabilities)))
        return [{"class": int(c), "name": self.names[int(c)], "p": finite(p)}
                for p, c in zip(values.tolist(), classes.tolist(), strict=True)]  # fmt: skip

    # ------------------------------------------------------------------ sliders and heat maps

    def concept(self, value) -> int:
        """A concept index from the page, checked against the bundle's K."""
        k = self.models.n_concepts
        try:
            concept = int(str(value).strip())
        except ValueError:
            raise UserError(
                f"a concept is given by its index, a whole number in 0..{k - 1}; got {value!r}"
            ) from None
        if not 0 <= concept < k:
            raise UserError(f"concept {concept} is out of range: the bundle has K={k} concepts (0..{k - 1})")
        return concept

    def factors(self, multipliers: dict) -> torch.Tensor:
        """{concept: multiplier} (JSON keys are strings) -> (1, K) factors, the others 1."""
        k = self.models.n_concepts
        if not isinstance(multipliers, dict):
            raise UserError("multipliers must map concept indices to numbers")
        factors = torch.ones(1, k)
        for key, value in multipliers.items():
            concept = self.concept(key)
            factors[0, concept] = number(value, f"the multiplier of concept {concept}", 0.0, MAX_MULTIPLIER)
        return factors

    def render(self, request: Request) -> dict:
        """The chosen image regenerated with each concept scaled by its multiplier, and f's p(class) on it."""
        from testing.viscoin.amplify import decode_and_classify
        from testing.viscoin.metrics import scale_concepts

        start = time.perf_counter()
        body = request.json()
        state = self._chosen(request)
        factors = self.factors(body.get("multipliers", {}))
        plan, version = state["plan"], state["version"]

        def work():
            concepts = scale_concepts(plan.concepts.to(self.device), factors.to(self.device))
            image, p = decode_and_classify(self.models, concepts, plan.support.to(self.device),
                                           plan.target.to(self.device))  # fmt: skip
            return pngs(image.cpu())[0], float(p)

        png, p = self.ctx.worker.run(self.slot(request, "render"), work)
        return {"image": data_url(png), "p": finite(p), "version": version,
                "server_ms": round(1000 * (time.perf_counter() - start), 2)}  # fmt: skip

    def heatmap(self, request: Request) -> dict:
        """Where concept k fires on the chosen image: its map upsampled, over the image (jet, as the CLI)."""
        from datasets.transforms import to_uint8_images
        from testing.viscoin.heatmaps import heat_maps

        state = self._chosen(request)
        k = self.concept(request.json().get("concept"))
        plan = state["plan"]
        heat = heat_maps(plan.concepts[:, [k]], plan.images.shape[-1])[0, 0].numpy()
        picture = overlay(to_uint8_images(plan.images)[0], heat)
        maps = plan.concepts[0, k]
        return {"concept": k, "image": data_url(png_of(picture)), "activation": finite(maps.amax()),
                "relevance": finite(plan.normalised[0, k]), "grid": maps.shape[-1]}  # fmt: skip

    # ------------------------------------------------------------------ concept cards

    def card(self, request: Request) -> dict:
        """Concept k's card: computing (with progress) until the split's activations are cached, then the
        images where k fires most and the attributes it detects best (AUC over the split)."""
        k = self.concept(request.params.get("concept"))
        with self._card_lock:
            if self._card["status"] == "idle":
                self._card = {"status": "computing", "done": 0, "total": None, "started": time.time()}
                threading.Thread(
                    target=self._compute_card_arrays, name="explore-concepts", daemon=True
                ).start()
            card = dict(self._card)
        if card["status"] == "computing":
            return {"status": "computing", "concept": k, "done": card["done"], "total": card["total"],
                    "seconds": round(time.time() - card["started"], 1), "n_images": self.n,
                    "message": f"computing concept activations over the {self.n} {self.analysis.split} images "
                               "(first use; cached for the next time, as `concepts` does)"}  # fmt: skip
        if card["status"] == "failed":
            raise UserError(f"the concept activations could not be computed: {card['error']}")
        acts, index, auc, names = card["activations"], card["index"], card["auc"], card["attribute_names"]
        order = np.argsort(-acts[:, k], kind="stable")[:CARD_IMAGES]
        images = [{"index": int(index[i]), "activation": finite(acts[i, k]), "label": int(self.labels[index[i]]),
                   "label_name": self.names[int(self.labels[index[i]])]} for i in order]  # fmt: skip
        attributes = []
        if auc is not None:
            row = auc[k]
            strength = np.where(np.isnan(row), -1.0, np.abs(row - 0.5))
            for a in np.argsort(-strength, kind="stable")[:CARD_ATTRIBUTES]:
                if strength[a] >= 0:
                    attributes.append({"name": names[a], "auc": finite(row[a], 4)})
        return {"status": "ready", "concept": k, "images": images, "attributes": attributes,
                "has_attributes": auc is not None, "n_images": int(len(acts)), "cache_hit": card["hit"],
                "mean_activation": finite(acts[:, k].mean()), "max_activation": finite(acts[:, k].max())}  # fmt: skip

    def _compute_card_arrays(self) -> None:
        """The `concepts` cache entry of the split (one pass over it when missing) and the concept-attribute
        AUCs; runs once, beside the inference worker, with its progress reported to the card."""
        from core.progress import observe
        from testing.viscoin.concepts import concept_arrays
        from testing.viscoin.metrics import attribute_auc

        def progress(_description, count, total):
            self._card.update(done=count, total=total)

        try:
            with observe(progress):
                result = concept_arrays(self.analysis, quiet=True)
            acts, index = result.arrays["activations"], result.arrays["index"]
            found = self._attributes()
            auc = None
            if found is not None:
                names, matrix = found
                attrs = torch.from_numpy(matrix[self.analysis.data.indices[index]].astype(np.float32))
                auc = attribute_auc(torch.from_numpy(acts), attrs).numpy()
            card = {"status": "ready", "activations": acts, "index": index, "auc": auc, "hit": result.hit,
                    "attribute_names": found[0] if found else []}  # fmt: skip
        except UserError as error:
            card = {"status": "failed", "error": error.message}
        except Exception as error:  # a bug: its traceback on the console, a short note on the page
            import traceback

            traceback.print_exc()
            card = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error} (see the server's console)",
            }
        with self._card_lock:
            self._card = card

    def _attributes(self):
        from datasets.cub import read_attributes

        data = self.analysis.data
        if data.attributes is not None:
            return data.attribute_names, data.attributes
        return read_attributes(data.root, len(data.meta.paths))

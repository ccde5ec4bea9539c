"""Generation, conditional VAE: condition pickers (class, attribute toggles), samples under the condition, and
latent traversal sliders (the seed's prior draw with chosen dimensions set, in prior standard units).

Samples go through `generate cvae`'s `sample` (image i from seed + i); a slider image is `decode` of the
seed's draw with the slider dimensions replaced, i.e. one frame of `generate traverse` when one slider moved.
"""

from __future__ import annotations

from core.errors import UserError
from explore.media import data_url, pngs
from explore.views import Request, View, integer, number
from explore.views.collect import MemoryWriter

MAX_SAMPLES = 64
BATCH = 64  # `generate`'s default --batch-size
MAX_SPAN = 10.0  # slider values beyond +-10 prior standard deviations are refused
SLIDERS = 6


class CVAEView(View):
    kind = "cvae"

    def __init__(self, tab_id, source, ctx):
        super().__init__(tab_id, source, ctx)
        from models.cvae import load_cvae
        from testing.generation.commands import family

        _, weights = family(source.path)
        self.model, self.meta, self.weights = load_cvae(weights, ctx.device)

    def describe(self) -> dict:
        from testing.generation.cvae import KL_SETTING

        kl = self.meta.get("kl_per_dim") or {}
        return {**super().describe(), "class_names": list(self.meta.get("class_names") or []),
                "attribute_names": list(self.meta.get("attribute_names") or []),
                "latent_dim": self.model.latent_dim, "settings": sorted(set(KL_SETTING.values())),
                "kl_per_dim": {k: list(v) for k, v in kl.items()}, "sliders": SLIDERS, "max_span": MAX_SPAN,
                "max_n": MAX_SAMPLES}  # fmt: skip

    def actions(self) -> dict:
        return {"sample": ("POST", self.sample), "traverse": ("POST", self.traverse)}

    def condition(self, body: dict):
        """`{"class": index or null, "attributes": {index: value}}` -> the command's Condition."""
        from testing.generation.cvae import Condition

        names = self.meta.get("class_names") or []
        label = body.get("class")
        label = None if label in (None, "") else integer(label, "class", 0, len(names) - 1)
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise UserError("attributes must map attribute indices to values")
        count = self.model.num_attributes
        if attributes and not count:
            raise UserError("this CVAE was trained without attribute conditions")
        given = {integer(i, "attribute index", 0, count - 1): number(v, "attribute value", -10, 10)
                 for i, v in attributes.items()}  # fmt: skip
        return Condition(label, given)

    def _seed(self, body: dict, n: int) -> int:
        from testing.generation.conditions import check_seed

        seed = integer(body.get("seed", 0), "seed", 0, 2**32 - 1)
        check_seed(seed, n)
        return seed

    def sample(self, request: Request) -> dict:
        from testing.generation.cvae import sample, top_dimensions

        body = request.json()
        condition = self.condition(body)
        n = integer(body.get("n", 8), "n", 1, MAX_SAMPLES)
        seed = self._seed(body, n)

        def work():
            writer = MemoryWriter()
            sample(self.model, self.meta, writer, [condition], n, seed, BATCH)
            return writer

        writer = self.ctx.worker.run(self.slot(request, "sample"), work)
        try:
            dims = top_dimensions(self.meta, condition.kl_setting(), min(SLIDERS, self.model.latent_dim))
        except UserError:
            dims = list(range(min(SLIDERS, self.model.latent_dim)))
        return {"images": [data_url(item["png"]) for item in writer.items], "seeds": [i["seed"] for i in writer.items],
                "condition": condition.describe(self.meta), "setting": condition.kl_setting(), "dims": dims}  # fmt: skip

    def traverse(self, request: Request) -> dict:
        """`{"class", "attributes", "seed", "eps": {dimension: value}}` -> one image."""
        from testing.generation.cvae import decode
        from testing.sampling import z_from_seeds

        body = request.json()
        condition = self.condition(body)
        seed = self._seed(body, 1)
        values = body.get("eps") or {}
        if not isinstance(values, dict):
            raise UserError("eps must map latent dimensions to values")
        eps = z_from_seeds([seed], self.model.latent_dim)
        for d, v in values.items():
            eps[0, integer(d, "latent dimension", 0, self.model.latent_dim - 1)] = number(
                v, f"the value of dimension {d}", -MAX_SPAN, MAX_SPAN
            )
        value_range = tuple(self.meta.get("value_range", (-1.0, 1.0)))

        def work():
            return decode(self.model, eps, condition.vector(self.model), value_range, 1).cpu()

        image = self.ctx.worker.run(self.slot(request, "traverse"), work)
        return {"image": data_url(pngs(image)[0])}

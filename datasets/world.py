"""The synthetic species world: procedurally drawn "birds" with known taxonomy, traits, boxes and DNA barcodes.

Written in the CUB-200-2011 file layout so the CUB loader reads it unchanged. Because every trait is known,
it measures what real data cannot: whether learned concepts align with true attributes, whether retrieval
recovers taxonomy for unseen species, whether phylogeny-guided codes follow the tree. Everything is a pure
function of the `WorldConfig`: the same config gives byte-identical files, whatever the drawing order.

Heritable traits are fixed per tree level (order: body and tail shape; family: bill; genus: wing pattern and
crest; species: three colours); nuisances (pose, scale, position, background, colour jitter) vary per image.
With `colour_rank="genus"` the genus fixes the primary colour too and its species differ in wing colour
(while the palette lasts) and head colour, so congeneric species look alike, as they often do in nature (the
`bioscan` preset). A small image encoder trained on the default world tells species apart by colour alone and
places an unseen species by its colours, not its genus; on this one it finds the genus (README, retrieval).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from core.atomic import atomic_dir
from core.errors import UserError

# Part of the key: bump it whenever drawing or file contents change, so cached worlds never go stale.
WORLD_VERSION = 1
# Birds are drawn on a canvas of about this side (2-4x the image), then downsampled for anti-aliasing.
CANVAS = 128
MARGIN = 2  # pixels kept free around the bird at the final size

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (240, 215, 45),
    "green": (50, 160, 60),
    "blue": (45, 90, 210),
    "purple": (135, 55, 175),
    "brown": (115, 70, 35),
    "white": (245, 245, 240),
}
TRAITS: dict[str, tuple[str, ...]] = {
    "body_shape": ("round", "long", "tall"),
    "tail_shape": ("fan", "pointed", "forked", "square"),
    "bill_shape": ("short", "long", "hooked", "cone"),
    "wing_pattern": ("plain", "striped", "spotted", "barred"),
    "crest": ("yes", "no"),
    "primary_color": tuple(PALETTE),
    "wing_color": tuple(PALETTE),
    "head_color": tuple(PALETTE),
}
TRAIT_RANK = {
    "body_shape": "order",
    "tail_shape": "order",
    "bill_shape": "family",
    "wing_pattern": "genus",
    "crest": "genus",
    "primary_color": "species",
    "wing_color": "species",
    "head_color": "species",
}
ATTRIBUTES: tuple[tuple[str, str], ...] = tuple((t, v) for t, values in TRAITS.items() for v in values)
RANKS = ("order", "family", "genus", "species")
# Share of barcode sites substituted on the edge above a node of each rank (also the Newick branch lengths).
DNA_RATES = {"order": 0.08, "family": 0.05, "genus": 0.03, "species": 0.015}
SPECIMEN_RATE = 0.003
BASES = np.frombuffer(b"ACGT", dtype=np.uint8)

ProgressFn = Callable[[int, int], None]  # progress(done, total)

# Independent random streams: every draw is seeded by (config.seed, stream, ids...), never by draw order.
_NAMES, _TRAITS, _IMAGE, _SPLIT, _DNA, _SPECIMEN = range(1, 7)
_COLOUR_TRAITS = ("primary_color", "wing_color", "head_color")
COLOUR_RANKS = ("species", "genus")
_COUNTS = ("n_orders", "families_per_order", "genera_per_family", "species_per_genus", "barcode_length")


def trait_rank(config: WorldConfig, trait: str) -> str:
    """The tree level that fixes `trait` in worlds of this config."""
    return config.colour_rank if trait == "primary_color" else TRAIT_RANK[trait]


def attribute_names() -> list[str]:
    """CUB-style attribute names, `has_<trait>::<value>`, in attribute-id order (id = index + 1)."""
    return [f"has_{trait}::{value}" for trait, value in ATTRIBUTES]


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; its `key()` names the folder it is cached in."""

    seed: int = 0
    n_orders: int = 3
    families_per_order: int = 2
    genera_per_family: int = 2
    species_per_genus: int = 2
    images_per_species: int = 40
    test_fraction: float = 0.5
    image_size: int = 64
    barcode_length: int = 650
    colour_rank: str = "species"  # the rank that fixes the primary colour: species or genus

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` for values no world can be built from."""
        if self.colour_rank not in COLOUR_RANKS:
            raise UserError(
                f"world colour_rank must be one of {', '.join(COLOUR_RANKS)}, got {self.colour_rank!r}"
            )
        for f in fields(self):
            if f.name == "colour_rank":
                continue
            value = getattr(self, f.name)
            number = (int, float) if f.name == "test_fraction" else int
            if isinstance(value, bool) or not isinstance(value, number):
                raise UserError(f"world {f.name} must be a number of type {f.type}, got {value!r}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"world test_fraction must be strictly between 0 and 1, got {self.test_fraction}")
        if self.seed < 0:
            raise UserError(f"world seed must be >= 0, got {self.seed}")
        for name in _COUNTS:
            if getattr(self, name) < 1:
                raise UserError(f"world {name} must be positive, got {getattr(self, name)}")
        if self.images_per_species < 2:
            n = self.images_per_species
            raise UserError(f"world images_per_species must be >= 2 (one train, one test), got {n}")
        if self.image_size < 16:
            raise UserError(f"world image_size must be at least 16 pixels, got {self.image_size}")
        pairs = len(PALETTE) ** 2  # a genus of colour_rank genus has one primary colour
        if self.colour_rank == "genus" and self.species_per_genus > pairs:
            raise UserError(
                f"world species_per_genus must be at most {pairs} with colour_rank genus (one primary colour, "
                f"{pairs} wing and head colour pairs), got {self.species_per_genus}"
            )

    def key(self) -> str:
        """Short stable hash of the config and the generator version (12 hex digits)."""
        payload = json.dumps({"version": WORLD_VERSION, **self.recorded()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def recorded(self) -> dict:
        """The fields as the key and world.json record them: `colour_rank` came later and is left out at its
        default, so worlds made before it keep their key and files."""
        config = asdict(self)
        if config["colour_rank"] == "species":
            del config["colour_rank"]
        return config

    @property
    def n_species(self) -> int:
        return self.n_orders * self.families_per_order * self.genera_per_family * self.species_per_genus

    @property
    def n_images(self) -> int:
        return self.n_species * self.images_per_species


@dataclass(frozen=True)
class Species:
    """One leaf of the tree: 1-based class id, global indices of its ancestors, names and true traits."""

    class_id: int
    lineage: tuple[int, int, int]  # global index of its order, family and genus
    order: str
    family: str
    genus: str
    name: str  # "Genus_epithet", no spaces
    traits: dict[str, str]

    @property
    def folder(self) -> str:
        return f"{self.class_id:03d}.{self.name}"


def _rng(seed: int, stream: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *ids])


# ----------------------------------------------------------------------------------------------- taxonomy

_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "br", "cr", "gr", "tr", "ph")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "au")
_CODAS = ("", "", "", "n", "r", "l", "s", "x")
_ENDINGS = {
    "order": ("iformes",),
    "family": ("idae",),
    "genus": ("us", "a", "ax", "is", "ops", "ornis", "ella", "ura"),
    "species": ("a", "us", "ensis", "ii", "ata", "ina", "eus", "icola"),
}


def _latin(rng: np.random.Generator, rank: str) -> str:
    """A pronounceable pseudo-Latin word: 2-3 consonant-vowel syllables, a coda, a rank-typical ending."""
    n_syllables = int(rng.choice((2, 2, 3)))
    stem = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(n_syllables))
    stem += str(rng.choice(_CODAS))
    ending = str(rng.choice(_ENDINGS[rank]))
    if ending[0] in "aeiou":
        stem = stem.rstrip("aeiou")
    word = stem + ending
    return word.lower() if rank == "species" else word.capitalize()


def _unique_names(rng: np.random.Generator, rank: str, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        word = _latin(rng, rank)
        if word not in names:
            names.append(word)
    return names


def _spread(i: int, m: int, n: int) -> tuple[int, int]:
    """Bijection of range(m*n) onto index pairs in which consecutive i differ in the first factor."""
    return i % m, (i // m + i % m) % n


def _pick(trait: str, permutation: np.ndarray, i: int) -> str:
    return TRAITS[trait][permutation[i % len(permutation)]]


def _higher_traits(config: WorldConfig, rng: np.random.Generator) -> list[dict[str, str]]:
    """Traits fixed above the species, one dict per genus: siblings get different values while they last."""
    n = {trait: len(values) for trait, values in TRAITS.items()}
    body, tail = rng.permutation(n["body_shape"]), rng.permutation(n["tail_shape"])
    genera = []
    for o in range(config.n_orders):
        b, t = _spread(o % (len(body) * len(tail)), len(body), len(tail))
        order = {"body_shape": _pick("body_shape", body, b), "tail_shape": _pick("tail_shape", tail, t)}
        bills = rng.permutation(n["bill_shape"])
        for f in range(config.families_per_order):
            family = {**order, "bill_shape": _pick("bill_shape", bills, f)}
            patterns, crests = rng.permutation(n["wing_pattern"]), rng.permutation(n["crest"])
            for g in range(config.genera_per_family):
                p, c = _spread(g % (len(patterns) * len(crests)), len(patterns), len(crests))
                pattern, crest = _pick("wing_pattern", patterns, p), _pick("crest", crests, c)
                genera.append({**family, "wing_pattern": pattern, "crest": crest})
    return genera


def _species_colours(config: WorldConfig, rng: np.random.Generator, genera: list[dict]) -> list[dict]:
    """Colour triples per species; full tuples never repeat. By default siblings differ in primary colour while
    they last; with `colour_rank="genus"` a genus has one primary colour and its species differ in wing colour
    while they last."""
    colours = list(PALETTE)
    triples = [(a, b, c) for a in colours for b in colours for c in colours]
    by_genus = config.colour_rank == "genus"
    # drawn only for by_genus, so default worlds stay byte-identical to those made before the option
    genus_primaries = rng.permutation(len(colours)) if by_genus else None
    used: set[tuple[str, ...]] = set()
    traits = []
    for g, higher in enumerate(genera):
        varied = rng.permutation(len(colours))
        primary = colours[genus_primaries[g % len(colours)]] if by_genus else None
        for s in range(config.species_per_genus):
            preferred = colours[varied[s % len(colours)]]
            shuffled = (triples[i] for i in rng.permutation(len(triples)))
            if by_genus:
                candidates = sorted((t for t in shuffled if t[0] == primary), key=lambda t: t[1] != preferred)
            else:  # stable sort: the preferred primary colour first
                candidates = sorted(shuffled, key=lambda t: t[0] != preferred)
            fixed = tuple(higher.values())
            choice = next((t for t in candidates if fixed + t not in used), None)
            if choice is None:
                raise UserError("world too large for distinct species traits; use fewer species")
            used.add(fixed + choice)
            traits.append({**higher, **dict(zip(_COLOUR_TRAITS, choice, strict=True))})
    return traits


def build_species(config: WorldConfig) -> list[Species]:
    """The taxonomy with names and true traits, in class-id order (a pure function of the config)."""
    names = _rng(config.seed, _NAMES)
    n_families = config.n_orders * config.families_per_order
    n_genera = n_families * config.genera_per_family
    orders = _unique_names(names, "order", config.n_orders)
    families = _unique_names(names, "family", n_families)
    genera = _unique_names(names, "genus", n_genera)
    epithets = [_unique_names(names, "species", config.species_per_genus) for _ in range(n_genera)]
    rng = _rng(config.seed, _TRAITS)
    species = []
    for i, traits in enumerate(_species_colours(config, rng, _higher_traits(config, rng))):
        g, s = divmod(i, config.species_per_genus)
        f = g // config.genera_per_family
        o = f // config.families_per_order
        name = f"{genera[g]}_{epithets[g][s]}"
        species.append(Species(i + 1, (o, f, g), orders[o], families[f], genera[g], name, traits))
    return species


# ---------------------------------------------------------------------------------------------- drawing


class _Body(NamedTuple):
    """Body semi-axes, head centre and radius, tail root, tail and bill directions (degrees, y down)."""

    axes: tuple[float, float]
    head: tuple[float, float]
    head_r: float
    tail: tuple[float, float]
    tail_deg: float
    bill_deg: float


_BODY = {
    "round": _Body((1.0, 0.85), (0.85, -0.7), 0.46, (-0.8, -0.1), 192, 10),
    "long": _Body((1.4, 0.55), (1.3, -0.42), 0.42, (-1.2, -0.05), 185, 8),
    "tall": _Body((0.7, 1.1), (0.25, -1.2), 0.46, (-0.4, 0.85), 125, 5),
}
_TAIL = {  # (u along the tail, v across it), in body units
    "fan": [(-0.2, -0.15), (0.75, -0.5), (0.92, -0.25), (0.98, 0.0), (0.92, 0.25), (0.75, 0.5), (-0.2, 0.15)],
    "pointed": [(-0.2, -0.17), (1.2, 0.0), (-0.2, 0.17)],
    "forked": [(-0.2, -0.15), (1.0, -0.45), (0.55, 0.0), (1.0, 0.45), (-0.2, 0.15)],
    "square": [(-0.2, -0.2), (0.8, -0.24), (0.8, 0.24), (-0.2, 0.2)],
}
_BILL = {  # (u forward, v down)
    "short": [(-0.05, -0.13), (0.3, 0.0), (-0.05, 0.13)],
    "long": [(-0.05, -0.09), (0.9, 0.03), (-0.05, 0.09)],
    "hooked": [(-0.05, -0.15), (0.3, -0.13), (0.47, 0.0), (0.44, 0.22), (0.33, 0.08), (-0.05, 0.12)],
    "cone": [(-0.05, -0.22), (0.4, 0.0), (-0.05, 0.22)],
}
_SPOTS = ((-0.5, -0.2), (-0.05, 0.3), (0.4, -0.2), (0.1, -0.45))
_FIXED_COLOURS = {"bill": (45, 42, 40), "eye": (15, 15, 15), "legs": (80, 65, 50)}


@lru_cache(maxsize=8)
def _circle(n: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _rotation(deg: float) -> np.ndarray:
    """Matrix R such that `points @ R` rotates row-vector points by `deg` (clockwise on screen, y down)."""
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def _ellipse(centre, a: float, b: float, n: int = 24, tilt: float = 0.0) -> np.ndarray:
    return (_circle(n) * (a, b)) @ _rotation(tilt) + centre


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _along(root, deg: float, uv) -> np.ndarray:
    """Map (u, v) points given along direction `deg` (u) and across it (v) to body coordinates at `root`."""
    return np.asarray(uv, dtype=float) @ _rotation(deg) + root


def _wing_pattern(pattern: str, a: float, b: float) -> list[np.ndarray]:
    """Pattern shapes inside an axis-aligned wing ellipse of semi-axes (a, b) centred at the origin."""
    if pattern == "striped":  # two bands along the wing, cut to fit inside it
        half = 0.15
        widths = [(c, 0.92 * a * np.sqrt(1 - (abs(c) + half) ** 2)) for c in (-0.38, 0.38)]
        return [_rect(-w, (c - half) * b, w, (c + half) * b) for c, w in widths]
    if pattern == "barred":  # three bars across the wing
        half = 0.12
        heights = [(c, 0.92 * b * np.sqrt(1 - (abs(c) + half) ** 2)) for c in (-0.5, 0.0, 0.5)]
        return [_rect((c - half) * a, -h, (c + half) * a, h) for c, h in heights]
    if pattern == "spotted":
        r = 0.24 * min(a, b)
        return [_ellipse((x * a, y * b), r, r, 10) for x, y in _SPOTS]
    return []


def _crest(head, r: float) -> list[np.ndarray]:
    """Three feathers raised from the top-back of the head."""
    feathers = []
    for deg in (205.0, 230.0, 255.0):
        feathers.append(_along(head, deg, [(0.6 * r, -0.16), (r + 0.45, 0.0), (0.6 * r, 0.16)]))
    return feathers


@lru_cache(maxsize=4096)
def _bird_parts(traits_items: tuple[tuple[str, str], ...]) -> tuple[tuple[np.ndarray, str], ...]:
    """The bird of a species as (polygon, colour role) pairs in back-to-front order, facing +x, y down."""
    traits = dict(traits_items)
    body = _BODY[traits["body_shape"]]
    (a, b), head, r = body.axes, np.asarray(body.head), body.head_r
    parts = [(_along(body.tail, body.tail_deg, _TAIL[traits["tail_shape"]]), "wing")]
    parts += [(_rect(x - 0.04, 0.8 * b, x + 0.04, b + 0.4), "legs") for x in (-0.25 * a, 0.2 * a)]
    parts.append((_ellipse((0.0, 0.0), a, b, 32), "primary"))
    wing_centre, wa, wb, tilt = np.array([-0.15 * a, 0.02 * b]), 0.72 * a, 0.52 * b, -8.0
    parts.append((_ellipse(wing_centre, wa, wb, 24, tilt), "wing"))
    pattern = _wing_pattern(traits["wing_pattern"], wa, wb)
    parts += [(shape @ _rotation(tilt) + wing_centre, "pattern") for shape in pattern]
    if traits["crest"] == "yes":
        parts += [(feather, "head") for feather in _crest(head, r)]
    parts.append((_ellipse(head, r, r, 24), "head"))
    bill_root = _along(head, body.bill_deg, [(0.85 * r, 0.0)])[0]
    parts.append((_along(bill_root, body.bill_deg, _BILL[traits["bill_shape"]]), "bill"))
    parts.append((_ellipse(head + (0.35 * r, -0.15 * r), 0.2 * r, 0.2 * r, 10), "eye"))
    return tuple(parts)


@lru_cache(maxsize=8)
def _ramp_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return tuple(np.meshgrid(c, c))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth gradient between two muted random colours plus mild uniform noise, float32 HxWx3."""
    ends = (rng.uniform(85, 185, (2, 1)) + rng.normal(0, 15, (2, 3))).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    x, y = _ramp_grid(size)
    cos, sin = (np.float32(v / np.sqrt(0.5)) for v in (np.cos(angle), np.sin(angle)))
    ramp = x * cos + y * sin + np.float32(0.5)
    noise = (rng.random((size, size, 3), dtype=np.float32) - np.float32(0.5)) * np.float32(12.0)
    return ends[0] + ramp[..., None] * (ends[1] - ends[0]) + noise


def _colours(traits: dict[str, str], rng: np.random.Generator) -> dict[str, tuple[int, ...]]:
    """RGBA fill per colour role, with a small per-image jitter of the species' named colours."""
    jittered = {}
    for role in ("primary", "wing", "head"):
        base = np.asarray(PALETTE[traits[f"{role}_color"]], dtype=float)
        jittered[role] = np.clip(base * (1 + rng.normal(0, 0.05) + rng.normal(0, 0.015, 3)), 0, 255)
    jittered["pattern"] = jittered["wing"] * 0.45
    fills = {role: (*np.round(rgb).astype(int).tolist(), 255) for role, rgb in jittered.items()}
    return {**fills, **{role: (*rgb, 255) for role, rgb in _FIXED_COLOURS.items()}}


def _supersample(size: int) -> int:
    return min(max(round(CANVAS / size), 2), 4)


def _place(points: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Pose, scale and position: face left or right, rotate a little, fit fully inside the image."""
    if rng.random() < 0.5:
        points = points * (-1.0, 1.0)
    points = points @ _rotation(rng.uniform(-15, 15))
    lo, extent = points.min(axis=0), np.ptp(points, axis=0)
    usable = size - 2 * MARGIN
    scale = rng.uniform(0.55, 0.9) * usable / extent.max()
    offset = MARGIN + rng.random(2) * (usable - extent * scale)
    return ((points - lo) * scale + offset) * _supersample(size)


def render_bird(traits: dict[str, str], rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple]:
    """Draw one image of a species: (uint8 HxWx3 RGB, tight box (x, y, w, h) of the drawn bird in pixels)."""
    parts = _bird_parts(tuple(sorted(traits.items())))
    fills = _colours(traits, rng)
    points = _place(np.concatenate([p for p, _ in parts]), rng, size)
    big = size * _supersample(size)
    canvas = Image.new("RGBa", (big, big))  # premultiplied: no conversion to resize, compositing is one add
    draw = ImageDraw.Draw(canvas)
    start = 0
    for polygon, role in parts:
        draw.polygon(points[start : start + len(polygon)].ravel().tolist(), fill=fills[role])
        start += len(polygon)
    bird = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    alpha = bird[..., 3:] / np.float32(255)
    image = _background(rng, size) * (1 - alpha) + bird[..., :3]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), _mask_box(alpha[..., 0] >= 0.25)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


# ------------------------------------------------------------------------------------------------- DNA


def _mutate(seq: np.ndarray, rng: np.random.Generator, n_sites: int) -> np.ndarray:
    """Point substitutions at `n_sites` distinct sites, each to a different base."""
    seq = seq.copy()
    sites = rng.choice(len(seq), size=min(n_sites, len(seq)), replace=False)
    seq[sites] = (seq[sites] + rng.integers(1, 4, len(sites))) % 4
    return seq


def species_sequences(config: WorldConfig, species: list[Species]) -> list[np.ndarray]:
    """Per species barcode (codes 0..3): a root sequence mutated along the order/family/genus/species edges."""
    length = config.barcode_length
    root = _rng(config.seed, _DNA, 0).integers(0, 4, length).astype(np.uint8)
    nodes: dict[tuple[int, int], np.ndarray] = {}

    def node(level: int, index: int, parent: np.ndarray) -> np.ndarray:
        if (level, index) not in nodes:
            n_sites = round(DNA_RATES[RANKS[level]] * length)
            nodes[level, index] = _mutate(parent, _rng(config.seed, _DNA, level + 1, index), n_sites)
        return nodes[level, index]

    sequences = []
    for sp in species:
        seq = root
        for level, index in enumerate((*sp.lineage, sp.class_id - 1)):
            seq = node(level, index, seq)
        sequences.append(seq)
    return sequences


def specimen_barcode(config: WorldConfig, species_seq: np.ndarray, image_index: int) -> str:
    """One specimen's barcode: its species' sequence plus ~SPECIMEN_RATE private substitutions."""
    rng = _rng(config.seed, _SPECIMEN, image_index)
    seq = _mutate(species_seq, rng, int(rng.binomial(len(species_seq), SPECIMEN_RATE)))
    return BASES[seq].tobytes().decode()


def newick(species: list[Species]) -> str:
    """The taxonomy as Newick with named internal nodes and the DNA substitution rates as branch lengths."""

    def children(members: list[Species], level: int) -> str:
        groups: dict[int, list[Species]] = {}
        for sp in members:
            groups.setdefault(sp.lineage[level] if level < 3 else sp.class_id, []).append(sp)
        return "(" + ",".join(clade(group, level) for group in groups.values()) + ")"

    def clade(members: list[Species], level: int) -> str:
        rank = RANKS[level]
        if rank == "species":
            return f"{members[0].name}:{DNA_RATES[rank]}"
        return f"{children(members, level + 1)}{getattr(members[0], rank)}:{DNA_RATES[rank]}"

    return children(species, 0) + "root;\n"


# ---------------------------------------------------------------------------------------------- writing


def _split(config: WorldConfig, class_id: int) -> np.ndarray:
    """Per species train mask: a seeded random test_fraction of its images are test (at least one of each)."""
    n = config.images_per_species
    n_test = min(max(round(n * config.test_fraction), 1), n - 1)
    is_train = np.ones(n, dtype=bool)
    is_train[_rng(config.seed, _SPLIT, class_id).permutation(n)[:n_test]] = False
    return is_train


def _write(path: Path, rows: Iterable[Iterable]) -> None:
    """One space-separated record per line, the CUB text format."""
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


def render_specimen(config: WorldConfig, sp: Species, k: int) -> tuple[np.ndarray, tuple]:
    """Image `k` (0-based) of species `sp`: the same pixels and box whenever and in whatever order drawn."""
    index = (sp.class_id - 1) * config.images_per_species + k
    return render_bird(sp.traits, _rng(config.seed, _IMAGE, index), config.image_size)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(pixels: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG of uint8 HxWx3 pixels, about 4x faster than PIL's encoder at the same size.

    Every row uses the PNG "Sub" filter (difference to the pixel on the left, vectorised), which suits the
    smooth gradients; zlib then only Huffman-codes the small residuals of the noise instead of searching
    for matches that noise never has.
    """
    h, w, _ = pixels.shape
    rows = pixels.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # wraps modulo 256, as PNG defines
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = packer.compress(raw.tobytes()) + packer.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, deflate, per-row filters
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _draw_images(folder: Path, config: WorldConfig, species: list[Species], progress) -> list[tuple]:
    """Draw and save every image; return (image_id, relative path, class_id, is_train, box) per image."""
    records, total = [], config.n_images
    if progress is not None:
        progress(0, total)
    for sp in species:
        (folder / "images" / sp.folder).mkdir(parents=True)
        is_train = _split(config, sp.class_id)
        for k in range(config.images_per_species):
            index = (sp.class_id - 1) * config.images_per_species + k
            pixels, box = render_specimen(config, sp, k)
            relative = f"{sp.folder}/{sp.name}_{k + 1:04d}.png"
            (folder / "images" / relative).write_bytes(png_bytes(pixels))
            records.append((index + 1, relative, sp.class_id, int(is_train[k]), box))
            if progress is not None and ((index + 1) % 64 == 0 or index + 1 == total):
                progress(index + 1, total)
    return records


def _species_info(sp: Species) -> dict:
    info = {key: getattr(sp, key) for key in ("class_id", "name", "order", "family", "genus", "traits")}
    info["attribute_ids"] = [i + 1 for i, (t, v) in enumerate(ATTRIBUTES) if sp.traits[t] == v]
    return info


def _world_info(config: WorldConfig, species: list[Species], n_train: int) -> dict:
    """world.json: the config, counts and the ground truth (traits, attributes, species) in machine form."""
    n_families = config.n_orders * config.families_per_order
    return {
        "version": WORLD_VERSION,
        "key": config.key(),
        "config": config.recorded(),
        "counts": {
            "orders": config.n_orders,
            "families": n_families,
            "genera": n_families * config.genera_per_family,
            "species": config.n_species,
            "images": config.n_images,
            "train": n_train,
            "test": config.n_images - n_train,
            "attributes": len(ATTRIBUTES),
        },
        "traits": {
            trait: {"rank": trait_rank(config, trait), "values": list(vs)} for trait, vs in TRAITS.items()
        },
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "attributes": [
            {"id": i, "name": name, "trait": trait, "value": value}
            for i, (name, (trait, value)) in enumerate(zip(attribute_names(), ATTRIBUTES, strict=True), 1)
        ],
        "dna": {"rates": DNA_RATES, "specimen_rate": SPECIMEN_RATE, "length": config.barcode_length},
        "species": [_species_info(sp) for sp in species],
    }


def _write_attributes(folder: Path, species: list[Species], records: list[tuple]) -> None:
    """attributes.txt, certainties.txt, per-image labels (true traits, certainty 4) and per-class percentages."""
    folder.mkdir()
    _write(folder / "attributes.txt", enumerate(attribute_names(), 1))
    _write(folder / "certainties.txt", enumerate(("not visible", "guessing", "probably", "definitely"), 1))
    present = {sp.class_id: [int(sp.traits[t] == v) for t, v in ATTRIBUTES] for sp in species}
    labels = ((r[0], a, p, 4, "0.0") for r in records for a, p in enumerate(present[r[2]], 1))
    _write(folder / "image_attribute_labels.txt", labels)
    percentages = ([f"{100.0 * p:.1f}" for p in present[sp.class_id]] for sp in species)
    _write(folder / "class_attribute_labels_continuous.txt", percentages)


def _write_tables(folder: Path, config: WorldConfig, species: list[Species], records: list[tuple]) -> None:
    """The CUB text files plus the world's extras (taxonomy, tree, barcodes, world.json)."""
    _write(folder / "images.txt", (r[:2] for r in records))
    _write(folder / "classes.txt", ((sp.class_id, sp.folder) for sp in species))
    _write(folder / "image_class_labels.txt", ((r[0], r[2]) for r in records))
    _write(folder / "train_test_split.txt", ((r[0], r[3]) for r in records))
    _write(folder / "bounding_boxes.txt", ((r[0], *(f"{v:.1f}" for v in r[4])) for r in records))
    _write_attributes(folder / "attributes", species, records)
    _write(folder / "taxonomy.txt", ((sp.class_id, sp.order, sp.family, sp.genus, sp.name) for sp in species))
    (folder / "tree.nwk").write_text(newick(species), encoding="utf-8")
    sequences = species_sequences(config, species)
    barcodes = ((r[0], specimen_barcode(config, sequences[r[2] - 1], r[0] - 1)) for r in records)
    _write(folder / "dna_barcodes.txt", barcodes)
    info = _world_info(config, species, sum(r[3] for r in records))
    (folder / "world.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def generate_world(root: Path, config: WorldConfig, progress: ProgressFn | None = None) -> Path:
    """Write the world into `root` (which must not exist yet) atomically and return `root`.

    `progress(done, total)` is called now and then while images are drawn.
    """
    root = Path(root)
    config.validate()
    if root.exists():
        raise UserError(f"world folder {root} already exists; remove it or choose another folder")
    species = build_species(config)
    with atomic_dir(root) as folder:
        records = _draw_images(folder, config, species, progress)
        _write_tables(folder, config, species, records)
    return root


def ensure_world(data_root: Path, config: WorldConfig, progress: ProgressFn | None = None) -> Path:
    """`data_root/world-<key>/CUB_200_2011`, generated on first use and returned untouched afterwards."""
    root = Path(data_root) / f"world-{config.key()}" / "CUB_200_2011"
    if (root / "world.json").is_file():  # written last inside an atomically renamed folder: a complete world
        return root
    try:
        return generate_world(root, config, progress)
    except (OSError, UserError):
        if (root / "world.json").is_file():  # another process finished the same world first
            return root
        raise


def load_taxonomy(root: Path) -> list[dict]:
    """taxonomy.txt as dicts with class_id, order, family, genus and species names, in class-id order."""
    rows = []
    for line in (Path(root) / "taxonomy.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            class_id, order, family, genus, species = line.split()
            names = dict(order=order, family=family, genus=genus, species=species)
            rows.append({"class_id": int(class_id), **names})
    return sorted(rows, key=lambda row: row["class_id"])


def load_barcodes(root: Path) -> dict[int, str]:
    """dna_barcodes.txt as image_id -> sequence of A/C/G/T."""
    barcodes = {}
    for line in (Path(root) / "dna_barcodes.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            image_id, sequence = line.split()
            barcodes[int(image_id)] = sequence
    return barcodes


def load_traits(root: Path) -> tuple[list[str], dict[str, tuple[str, list[str]]]]:
    """The ground truth of a generated world, read from its world.json: (species names in class-id order,
    {trait: (the rank that fixes it, its value for each species)})."""
    info = json.loads((Path(root) / "world.json").read_text(encoding="utf-8"))
    species = sorted(info["species"], key=lambda sp: sp["class_id"])
    traits = {
        name: (trait["rank"], [sp["traits"][name] for sp in species])
        for name, trait in info["traits"].items()
    }
    return [sp["name"] for sp in species], traits

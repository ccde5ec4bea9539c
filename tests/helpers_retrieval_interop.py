"""BarcodeBERT and CLIBD checkpoints in their exact file formats, rebuilt from small committed fixtures.

`tests/fixtures/retrieval/make_fixtures.py` (run by hand against a checkout of the reference code) builds
each reference model with the reference's own classes at a tiny size, fills every parameter with the
deterministic values `seeded_state` gives for its name and shape, saves it as the reference saves it, and
computes embeddings with the reference's own code. It commits only what is needed to redo that here: the
parameter names and shapes (in the reference's order), the configurations the files hold, the inputs and the
reference's embeddings (`interop.json`, `interop.npz`). The tests write the same files again (`write_*`) and
compare our embeddings with the reference's.
"""

from __future__ import annotations

import argparse
import collections
import json
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "retrieval"
_MASK64 = (1 << 64) - 1


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def splitmix(n: int, seed: int) -> np.ndarray:
    """n floats in [0, 1) from SplitMix64 started at a mix of `seed`: the same on every machine and NumPy
    version (integer arithmetic only)."""
    with np.errstate(over="ignore"):
        start = _mix(np.array([seed & _MASK64], dtype=np.uint64) * _GOLDEN)
        x = _mix(start + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def seeded_tensor(name: str, shape, seed: int) -> torch.Tensor:
    """Deterministic values for the parameter `name`: LayerNorm scales near 1, everything else uniform in
    +-0.1 (biases +-0.02), so that attention and every layer do something."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = splitmix(n, seed ^ zlib.crc32(name.encode())) * 2 - 1
    parts = name.split(".")
    norm = len(parts) > 1 and (parts[-2] == "LayerNorm" or parts[-2].startswith("norm"))
    if norm and name.endswith("weight"):
        values = 1 + 0.2 * u
    elif name.endswith("bias"):
        values = 0.02 * u
    else:
        values = 0.1 * u
    return torch.from_numpy(values.astype(np.float32)).reshape(tuple(shape))


def seeded_state(keys: list, seed: int) -> collections.OrderedDict:
    """`OrderedDict` of name -> tensor for the (name, shape) pairs `keys`, in that order."""
    return collections.OrderedDict((name, seeded_tensor(name, shape, seed)) for name, shape in keys)


def fixture() -> tuple[dict, dict]:
    """(interop.json, interop.npz arrays)."""
    meta = json.loads((FIXTURES / "interop.json").read_text())
    with np.load(FIXTURES / "interop.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return meta, arrays


def write_v1(path: Path, entry: dict) -> Path:
    """BarcodeBERT v1: `torch.save` of a DDP-wrapped BertForMaskedLM's state dict (`module.` prefixes)."""
    state = seeded_state(entry["keys"], entry["seed"])
    tied = entry.get("tied", {})
    for (
        name,
        source,
    ) in tied.items():  # HF ties the MLM decoder to the word embeddings: one storage, two names
        state[name] = state[source]
    # transformers before 4.31 also saved the position index buffer (model_41.pth holds it)
    positions = next(shape for name, shape in entry["keys"] if name.endswith("position_embeddings.weight"))[0]
    state["bert.embeddings.position_ids"] = torch.arange(positions)[None]
    torch.save(collections.OrderedDict((f"module.{k}", v) for k, v in state.items()), path)
    return path


def write_v2(path: Path, entry: dict) -> Path:
    """BarcodeBERT v2: its `safe_save_model` dict {model, optimizer, scheduler, config (argparse.Namespace),
    bert_config, counters} of a BertForTokenClassification, optimiser and schedule stepped once."""
    state = seeded_state(entry["keys"], entry["seed"])
    for name, source in entry.get("tied", {}).items():
        state[name] = state[source]
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=10)
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    schedule.step()
    labels = range(entry["num_labels"])
    bert_config = {**entry["bert_config"], "id2label": {i: f"LABEL_{i}" for i in labels},
                   "label2id": {f"LABEL_{i}": i for i in labels}}  # fmt: skip
    data = {"model": state, "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "config": argparse.Namespace(**entry["config"]), **entry["extra"], "bert_config": bert_config}  # fmt: skip
    torch.save(data, path)
    return path


def write_clibd(path: Path, entry: dict) -> Path:
    """CLIBD: `torch.save(SimpleCLIP.state_dict())`."""
    state = seeded_state(entry["keys"], entry["seed"])
    for name, source in entry.get("tied", {}).items():
        state[name] = state[source]
    torch.save(state, path)
    return path


def seeded_images(count: int, size: int, seed: int) -> torch.Tensor:
    """[count, 3, size, size] pixels in [0, 1], multiples of 1/255 (as a decoded 8-bit image)."""
    u = splitmix(count * 3 * size * size, seed)
    return torch.from_numpy(np.floor(u * 256).clip(0, 255).astype(np.float32) / 255).reshape(
        count, 3, size, size
    )

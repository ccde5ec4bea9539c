"""Read NVlabs stylegan2-ada-pytorch snapshot pickles without executing any code from them.

An NVlabs snapshot is a plain pickle of `{G, D, G_ema, augment_pipe, training_set_kwargs}`. Its networks are
`torch_utils.persistence` objects: each one unpickles by calling `_reconstruct_persistent_obj(meta)`, which
`exec()`s the Python source embedded in `meta["module_src"]`. Loading such a file with `pickle.load` therefore
runs whatever code the file carries.

Here a restricted unpickler resolves only an explicit allow-list of globals. The persistence hook is replaced
by a stand-in that merely records `meta` (class name, the source text, which is never executed, and the
object's `__dict__` with `_parameters`, `_buffers`, `_modules`, `_init_args`, `_init_kwargs`); tensors are
rebuilt from their storages, whose byte payloads go through `torch.load(..., weights_only=True)`. Any other
global (`os.system`, `builtins.eval`, ...) stops the load with a `UserError`. From the recorded `G_ema` we
rebuild the constructor kwargs and a flat NVlabs-named state dict, and load it into our own `Generator`.
"""

from __future__ import annotations

import collections
import inspect
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from models.stylegan2.networks import Generator, MappingNetwork, SynthesisNetwork

SNAPSHOT_KEY = "G_ema"
_GENERATOR_ARGS = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
)
_GENERATOR_REQUIRED = _GENERATOR_ARGS[:5]


class PersistentObject:
    """Inert record of an NVlabs persistent object: what `_reconstruct_persistent_obj(meta)` was asked to build.

    `module_src` is kept as text for inspection only; nothing here ever compiles or executes it.
    """

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta

    @property
    def class_name(self) -> str:
        return str(self.meta.get("class_name", ""))

    @property
    def module_src(self) -> str:
        return str(self.meta.get("module_src", ""))

    @property
    def state(self) -> dict[str, Any]:
        state = self.meta.get("state")
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"PersistentObject(class_name={self.class_name!r})"


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access): here simply a dict."""


def _capture_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise UserError(
            "refuses to load: a torch_utils.persistence record without a class name (corrupt file?)"
        )
    return PersistentObject(meta)


def _storage_from_bytes(payload: Any) -> Any:
    """Storage bytes as NVlabs/torch pickles them (a legacy `torch.save`), read with torch's safe loader."""
    if not isinstance(payload, bytes):
        raise UserError("refuses to load: a tensor storage payload is not bytes (corrupt file?)")
    try:
        storage = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch's safe loader rejects anything but plain tensor data
        raise UserError(
            f"refuses to load: a tensor storage did not pass torch's weights-only loader ({exc})"
        ) from exc
    if not isinstance(storage, torch.TypedStorage):
        raise UserError(f"refuses to load: a tensor storage payload holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(
    storage: Any, storage_offset: int, size: Any, stride: Any, *_hooks_and_metadata: Any
) -> torch.Tensor:
    """Tensor view on a storage; requires_grad, backward hooks and metadata are dropped (weights only)."""
    if not isinstance(storage, torch.TypedStorage):
        raise UserError(
            f"refuses to load: a tensor is rebuilt from a {type(storage).__name__}, not a storage"
        )
    return torch._utils._rebuild_tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_requires_grad_hooks_state: Any) -> torch.Tensor:
    """A pickled `nn.Parameter` as its plain tensor data."""
    if not isinstance(data, torch.Tensor):
        raise UserError(f"refuses to load: a parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list: (module, name) -> the object the unpickler may hand out. Exact matches only."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _capture_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = multiarray.scalar
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and refuses persistent ids."""

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is None:
            raise UserError(
                f"{self._source}: refuses to load: the pickle asks for {module}.{name}, which an NVlabs StyleGAN "
                "snapshot never needs; the file may run code when unpickled, so it is not opened"
            )
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            f"{self._source}: refuses to load: the pickle uses persistent ids ({str(pid)[:60]}), which NVlabs "
            "snapshots do not; is it a torch.save checkpoint rather than a StyleGAN2-ADA .pkl?"
        )


def load_restricted_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path` with the allow-list; NVlabs persistent objects come back as `PersistentObject` records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not a file; pass the path of an NVlabs StyleGAN2-ADA snapshot .pkl")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except UserError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        raise UserError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    except (RuntimeError, RecursionError) as exc:
        raise UserError(f"{path}: corrupt pickle ({type(exc).__name__}: {exc})") from exc


def _to_plain(value: Any, where: str) -> Any:
    """Config values as plain Python (dict/list/str/int/float/bool/None); anything else is refused."""
    if isinstance(value, dict):
        return {str(k): _to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, where) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise UserError(f"unsupported value of type {type(value).__name__} in the generator's {where}")


def _flatten_state(obj: PersistentObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect `_parameters` and persistent `_buffers` of `obj` and its `_modules`, with dotted names."""
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{prefix}{name} holds a {type(tensor).__name__}, not a tensor")
            out[f"{prefix}{name}"] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise UserError(
                f"submodule {prefix}{name} is a {type(child).__name__}, not an NVlabs network module"
            )
        _flatten_state(child, f"{prefix}{name}.", out)


def _accepted_kwargs(cls: type, fixed: tuple[str, ...]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", *fixed}


def _generator_config(obj: PersistentObject) -> dict[str, Any]:
    """Constructor kwargs of the recorded NVlabs Generator, validated against what our Generator accepts."""
    state = obj.state
    args = obj.meta.get("init_args", state.get("_init_args", ()))
    kwargs = obj.meta.get("init_kwargs", state.get("_init_kwargs", {}))
    if (
        not isinstance(args, (list, tuple))
        or not isinstance(kwargs, dict)
        or len(args) > len(_GENERATOR_ARGS)
    ):
        raise UserError("the generator record has no usable init arguments (_init_args/_init_kwargs)")
    config = _to_plain(
        {**dict(zip(_GENERATOR_ARGS[: len(args)], args, strict=True)), **kwargs}, "init kwargs"
    )

    missing = [k for k in _GENERATOR_REQUIRED if k not in config]
    unknown = sorted(set(config) - set(_GENERATOR_ARGS))
    if missing or unknown:
        raise UserError(
            f"the generator's init kwargs do not match StyleGAN2-ADA: missing {missing}, unknown {unknown}"
        )
    config.setdefault("mapping_kwargs", {})
    config.setdefault("synthesis_kwargs", {})
    checks = [
        ("mapping_kwargs", MappingNetwork, ("z_dim", "c_dim", "w_dim", "num_ws")),
        ("synthesis_kwargs", SynthesisNetwork, ("w_dim", "img_resolution", "img_channels")),
    ]
    for key, cls, fixed in checks:
        if not isinstance(config[key], dict):
            raise UserError(f"the generator's {key} is not a dict")
        extra = sorted(set(config[key]) - _accepted_kwargs(cls, fixed))
        if extra:
            raise UserError(f"the generator's {key} has options this StyleGAN2 does not implement: {extra}")
    return config


def read_nvlabs_generator(
    path: str | os.PathLike, key: str = SNAPSHOT_KEY
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return `(config, state_dict)` of the generator stored under `key` (default `G_ema`) in an NVlabs snapshot.

    `config` is `Generator(**config)`-ready; `state_dict` uses NVlabs tensor names.
    """
    data = load_restricted_pickle(path)
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: not an NVlabs StyleGAN2-ADA snapshot: expected a dict with {key!r}, got a {type(data).__name__}"
        )
    if key not in data:
        raise UserError(
            f"{path}: not an NVlabs StyleGAN2-ADA snapshot: no {key!r} entry (keys: {sorted(map(str, data))[:8]})"
        )
    obj = data[key]
    if not isinstance(obj, PersistentObject) or obj.class_name != "Generator":
        raise UserError(f"{path}: {key!r} is not an NVlabs Generator record (got {obj!r})")
    try:
        config = _generator_config(obj)
        state_dict: dict[str, torch.Tensor] = {}
        _flatten_state(obj, "", state_dict)
    except UserError as exc:
        raise UserError(f"{path}: {exc.message}") from exc
    return config, state_dict


def load_nvlabs_generator(
    path: str | os.PathLike, key: str = SNAPSHOT_KEY, device: str | torch.device = "cpu"
) -> Generator:
    """Build our `Generator` from an NVlabs snapshot and load its weights strictly; returned in eval mode."""
    config, state_dict = read_nvlabs_generator(path, key)
    try:
        G = Generator(**config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: unsupported generator configuration: {exc}") from exc
    ours = G.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    mismatched = sorted(k for k in set(ours) & set(state_dict) if ours[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        raise UserError(
            f"{path}: weights do not fit a StyleGAN2 generator of this config (StyleGAN3 or a modified network?): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {mismatched[:4]}"
        )
    G.load_state_dict(state_dict, strict=True)
    return G.eval().to(device)

"""Reading other projects' `torch.save` files (BarcodeBERT, CLIBD) without running anything they hold.

A `.pth` is a zip of one pickle (`data.pkl`) and raw tensor storages. The pickle is read by an unpickler that
resolves a short allow-list of names to harmless builders (ordered dicts, tensors rebuilt from the zip's
storages by our own code, `argparse.Namespace` as a plain dict) and turns every other name into an inert
`Opaque` record that is never imported or called. BarcodeBERT v2 files hold an optimiser, a scheduler (with a
bound method when saved by torch 2.0) and their argparse configuration: those load as `Opaque` records and are
ignored, where `torch.load(weights_only=True)` refuses the whole file. `find_opaque` tells a caller whether a
part it wants to use holds such a record, so that a planted object in the configuration is refused by name.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}  # fmt: skip


class Opaque:
    """A name from the file that the reader does not resolve, and what the file did with it (never run)."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(
        self, state
    ) -> None:  # BUILD: the state is kept as data, nothing is set on a real object
        self.state = state

    def __setitem__(self, key, value) -> None:  # SETITEMS / APPENDS on a record: kept as data
        self.__dict__.setdefault("items", []).append((key, value))

    def append(self, value) -> None:
        self.__dict__.setdefault("items", []).append(value)

    def extend(self, values) -> None:
        self.__dict__.setdefault("items", []).extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self.global_name}>"


class NamespaceDict(dict):
    """An `argparse.Namespace` read as a plain dict of its attributes."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.update(state)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and dtype, read without its data (`read_torch_file(..., tensors=False)`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if isinstance(storage, _Storage):
        return TensorInfo(size, storage.dtype)
    if not isinstance(storage, torch.Tensor):
        raise UserError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if any(s < 0 for s in size + stride) or offset < 0:
        raise UserError("a tensor has a negative size, stride or offset; the file is damaged")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else offset - 1
    if last >= storage.numel():
        raise UserError("a tensor reaches past its storage; the file is truncated or damaged")
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data, *_rest):
    return data


def _opaque(module: str, name: str) -> type:
    return type(name, (Opaque,), {"global_name": f"{module}.{name}"})


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, tensors: bool, source: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._tensors, self._source = archive, prefix, tensors, source
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("argparse", "Namespace"): NamespaceDict,
            ("torch", "Size"): tuple,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UserError(
                f"{self._source}: unknown persistent id {str(pid)[:60]}; is it a torch.save file?"
            )
        _, dtype, key, _location, numel = pid
        key = str(key)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{self._source}: a storage of unknown type {dtype!r}; the file is not readable")
        if key not in self._storages:
            if not self._tensors:
                self._storages[key] = _Storage(dtype, key, int(numel))
            else:
                try:
                    raw = self._archive.read(f"{self._prefix}data/{key}")
                except (KeyError, zipfile.BadZipFile, OSError, EOFError) as err:
                    raise UserError(
                        f"{self._source}: tensor storage {key} is missing or damaged ({err})"
                    ) from None
                itemsize = torch.empty(0, dtype=dtype).element_size()
                if len(raw) < int(numel) * itemsize:
                    raise UserError(f"{self._source}: tensor storage {key} is truncated")
                flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                self._storages[key] = (
                    flat[: int(numel) * itemsize].view(dtype) if numel else torch.empty(0, dtype=dtype)
                )
        return self._storages[key]


def read_torch_file(path: str | os.PathLike, tensors: bool = True) -> Any:
    """The object a `torch.save` zip file holds, with tensors as CPU tensors (or `TensorInfo` when not
    `tensors`), argparse namespaces as dicts and every other Python object as an inert `Opaque` record."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the checkpoint file (.pth, .pt)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        head = path.read_bytes()[:2] if path.stat().st_size else b""
        if head[:1] == b"\x80":
            raise UserError(
                f"{path} is a torch file in the format before torch 1.6; load it in a current torch and save it "
                "again (torch.save), or convert it to .safetensors"
            ) from None
        raise UserError(f"{path} is not a torch.save file, or it is truncated ({err})") from None
    with archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(names) != 1:
            raise UserError(f"{path} is a zip file but not a torch.save checkpoint (no single data.pkl)")
        prefix = names[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise UserError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        try:
            return _Unpickler(archive.read(names[0]), archive, prefix, tensors, str(path)).load()
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                RuntimeError, RecursionError, zipfile.BadZipFile, OSError) as err:  # fmt: skip
            raise UserError(
                f"{path} is not a readable torch.save file ({type(err).__name__}: {err})"
            ) from err


def find_opaque(value: Any, where: str = "") -> str | None:
    """The location and name of the first `Opaque` record inside `value` (dicts, lists, tuples), or None."""
    if isinstance(value, Opaque):
        return f"{where or 'the file'} holds {value.global_name}"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, Opaque):
            return f"a key of {where or 'the file'} is {key.global_name}"
        found = find_opaque(item, f"{where}[{key!r}]" if where else repr(key))
        if found:
            return found
    return None

"""Read PyTorch checkpoint files without importing torch.

`torch.save` (torch >= 1.6) writes a ZIP archive (entries stored, not compressed) whose entries
all sit under one top-level folder, named after the file or ``archive``:

* ``<name>/data.pkl``: a protocol-2 pickle of the saved object. Tensors appear as calls to
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
  and their storages as *persistent ids* ``('storage', torch.FloatStorage, key, location,
  numel)``; the storage's bytes live in a separate entry.
* ``<name>/data/<key>``: the raw bytes of one storage (``numel`` elements of its dtype).
* ``<name>/byteorder`` (``little``/``big``, optional, default little), ``<name>/version``,
  ``<name>/.format_version``, ``<name>/.storage_alignment`` and
  ``<name>/.data/serialization_id``: bookkeeping. Each entry's data is aligned to 64 bytes by
  padding its local header's extra field (id ``FB``), which allows memory-mapped loading.

The reader unpickles ``data.pkl`` with an allow-list: the tensor-rebuilding functions, storage
types, ``collections.OrderedDict``, ``torch.Size`` and a few inert builtins. Every other global
(Lightning's hyper-parameter containers, optimizer and callback objects, and anything hostile such
as ``os.system``) becomes an inert placeholder that only records its arguments, so no pickled
code ever runs. Tensors stay lazy references until the state dict has been picked out, so the
storages of optimizer states are never read.

Safetensors files are an 8-byte little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}`` and the raw bytes; they are read with the ``safetensors``
package (its numpy loader names bfloat16 by the dtype ``ml_dtypes`` registers with numpy).

The writer the tests use to make such files lives in ``tests/torch_writer.py``.
"""

from __future__ import annotations

import collections
import functools
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # also registers numpy's "bfloat16", which safetensors' numpy loader asks for
import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import load_file as load_safetensors_file

from reducio_jax.errors import InputError
from reducio_jax.storage.paths import Path, PathLike, as_path, is_remote

__all__ = ["STORAGE_DTYPES", "CheckpointFormatError", "load_state_dict"]

# torch's storage class names and the numpy dtype of their elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class CheckpointFormatError(InputError):
    """A checkpoint file is missing, of an unknown format, truncated or corrupt."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _Placeholder:
    """Inert stand-in for a pickled global outside the allow-list; it records, never runs."""

    pickle_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.dict_items, obj.list_items = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickle_global}>"


@functools.lru_cache(maxsize=256)
def _placeholder_class(module: str, name: str) -> type[_Placeholder]:
    return type("Placeholder", (_Placeholder,), {"pickle_global": f"{module}.{name}"})


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor's storage is not a checkpoint storage reference")
    return _LazyTensor(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Callable[..., Any], _new_type: Any, args: Any, *_: Any) -> Any:
    return func(*args)  # func itself came through find_class, so it is allow-listed or inert.


def _codecs_encode(text: Any, encoding: str = "utf-8", *_: Any) -> Any:
    """Protocol 2 pickles ``bytes`` as ``_codecs.encode(str, 'latin1')``; allow only that."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return _placeholder_class("_codecs", "encode")(text, encoding)


def _bytes(*args: Any) -> Any:
    """Protocol 2 pickles ``b''`` as ``bytes()``; anything else stays inert."""
    return b"" if not args else _placeholder_class("builtins", "bytes")(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    ("torch", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): _bytes,
    ("_codecs", "encode"): _codecs_encode,
}


def _resolve_global(module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
        return _ALLOWED_GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    return _placeholder_class(module, name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals through an allow-list and storages to lazy refs."""

    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _TorchArchive:
    """The entries of one `torch.save` zip file, with a cache of decoded storages."""

    def __init__(self, zf: zipfile.ZipFile, path: Path) -> None:
        self._zf = zf
        self._prefix = _archive_prefix(zf, path)
        self._big_endian = self._read_byteorder() == "big"
        self._storages: dict[str, np.ndarray] = {}

    def _read_byteorder(self) -> str:
        name = f"{self._prefix}/byteorder"
        if name not in self._zf.NameToInfo:
            return "little"
        return self._zf.read(name).decode("ascii").strip()

    def unpickle(self) -> Any:
        with self._zf.open(f"{self._prefix}/data.pkl") as fh:
            return _RestrictedUnpickler(fh).load()

    def storage(self, ref: _StorageRef) -> np.ndarray:
        if ref.key not in self._storages:
            raw = self._zf.read(f"{self._prefix}/data/{ref.key}")
            if len(raw) < ref.numel * ref.dtype.itemsize:
                raise EOFError(f"storage {ref.key} has {len(raw)} bytes, fewer than it declares")
            flat = np.frombuffer(raw, ref.dtype, count=ref.numel)
            self._storages[ref.key] = flat.byteswap() if self._big_endian else flat
        return self._storages[ref.key]

    def materialize(self, tensor: _LazyTensor) -> np.ndarray:
        flat = self.storage(tensor.storage)
        shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
        if min((*shape, *stride, offset), default=0) < 0 or len(shape) != len(stride):
            raise ValueError(f"tensor on storage {tensor.storage.key} has an invalid layout")
        if 0 in shape:
            return np.zeros(shape, flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if last >= flat.size:
            raise EOFError(f"a tensor reads past the end of storage {tensor.storage.key}")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=shape, strides=tuple(s * itemsize for s in stride)
        )
        return view.copy(order="C")


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    for name in zf.namelist():
        folder, _, leaf = name.partition("/")
        if leaf == "data.pkl":
            return folder
    raise CheckpointFormatError(
        f"Checkpoint {path} is a zip file without a '<name>/data.pkl' entry, so it was not "
        "written by torch.save; pass a torch.save (.ckpt/.pt/.pth) or .safetensors file."
    )


def _select_tensors(obj: Any, path: Path) -> dict[str, _LazyTensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"Checkpoint {path} holds {_describe(obj)} rather than a dict of tensors; save "
            "model.state_dict() (or a Lightning checkpoint) instead."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _LazyTensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointFormatError(
            f"Checkpoint {path} contains no tensors at its top level or under 'state_dict' "
            f"(top-level keys: {keys}); save model.state_dict() or a Lightning checkpoint."
        )
    return tensors


def _describe(obj: Any) -> str:
    if isinstance(obj, _LazyTensor):
        return "a single tensor"
    if isinstance(obj, _Placeholder):
        return f"a {obj.pickle_global} object"
    return f"a {type(obj).__name__}"


def _load_torch_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as fh, zipfile.ZipFile(fh) as zf:  # a bucket's file is read in ranges
            archive = _TorchArchive(zf, path)
            lazy = _select_tensors(archive.unpickle(), path)
            return {key: archive.materialize(tensor) for key, tensor in lazy.items()}
    except CheckpointFormatError:
        raise
    except Exception as err:  # any zipfile/pickle/layout failure means a damaged file
        raise _corrupt(path, err) from err


def _corrupt(path: Path, err: BaseException) -> CheckpointFormatError:
    detail = f"{type(err).__name__}: {err}"[:200]
    return CheckpointFormatError(
        f"Checkpoint {path} is truncated or corrupt ({detail}); re-download or re-save it."
    )


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if is_remote(path):
            return dict(load_safetensors_bytes(path.read_bytes()))
        return dict(load_safetensors_file(str(path)))
    except Exception as err:  # the package's parser rejects a damaged or truncated file
        raise _corrupt(path, err) from err


def _sniff(path: Path) -> str:
    """Return 'zip', 'safetensors', 'legacy' (pre-1.6 torch pickle) or 'unknown'."""
    with path.open("rb") as fh:
        head = fh.read(9)
    size = path.stat().length
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"  # let the parser report precisely what is wrong
    if head[:1] == b"\x80":
        return "legacy"
    return "unknown"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointFormatError(f"Checkpoint {path} does not exist; check the path.")
    if not path.is_file():
        raise CheckpointFormatError(f"Checkpoint {path} is not a regular file; pass a file.")


def _strip_module_prefix(tensors: Mapping[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        short = key.removeprefix("module.")
        if short in out:
            raise CheckpointFormatError(
                f"Checkpoint {path} has two tensors named '{short}' once the 'module.' prefix is "
                "stripped; rename one of them before converting."
            )
        out[short] = value
    return out


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Load the tensors of a torch.save (.ckpt/.pt/.pth) or .safetensors file as numpy arrays.

    Lightning checkpoints yield their ``state_dict``; a bare dict yields its tensor values. A
    leading ``module.`` is stripped from every key. bfloat16 comes back as ``ml_dtypes.bfloat16``.
    Raises `CheckpointFormatError` for a missing, unrecognised, truncated or corrupt file.
    """
    path = as_path(path)
    _check_file(path)
    try:
        kind = _sniff(path)
    except OSError as err:
        raise CheckpointFormatError(f"Checkpoint {path} cannot be read ({err}); check it.") from err
    if kind == "zip":
        tensors = _load_torch_zip(path)
    elif kind == "safetensors":
        tensors = _load_safetensors(path)
    elif kind == "legacy":
        raise CheckpointFormatError(
            f"Checkpoint {path} uses torch's legacy (pre-1.6) pickle format, which is not "
            "supported; re-save it with a recent torch.save or as .safetensors."
        )
    else:
        raise CheckpointFormatError(
            f"Checkpoint {path} is neither a torch.save zip archive nor a safetensors file; "
            "pass a .ckpt/.pt/.pth written by torch.save or a .safetensors file."
        )
    if not tensors:
        raise CheckpointFormatError(f"Checkpoint {path} contains no tensors; check the file.")
    return _strip_module_prefix(tensors, path)

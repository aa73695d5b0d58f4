"""Read and write PyTorch checkpoint files without importing torch.

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
package, falling back to a small parser of our own.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import pickle
import secrets
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file as _st_load_file
from safetensors.numpy import save_file as _st_save_file

__all__ = [
    "CheckpointFormatError",
    "load_state_dict",
    "save_safetensors",
    "save_torch_checkpoint",
]

PathLike = str | os.PathLike[str]

_STORAGE_DTYPES: dict[str, np.dtype] = {
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
_STORAGE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_ALIGNMENT = 64
_ZIP_LOCAL_HEADER_SIZE = 30
_ZIP64_LOCAL_EXTRA_SIZE = 20
_PAD_EXTRA_ID = 0x4246  # b"FB" little-endian, the id torch uses for its padding field.


class CheckpointFormatError(ValueError):
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
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
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
        with zipfile.ZipFile(path) as zf:
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
        return dict(_st_load_file(str(path)))
    except Exception:  # old safetensors without bf16, or a damaged file: our parser decides
        return _read_safetensors_raw(path)


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        return {
            name: _safetensors_array(data, 8 + header_len, info)
            for name, info in header.items()
            if name != "__metadata__"
        }
    except Exception as err:
        raise _corrupt(path, err) from err


def _safetensors_array(data: bytes, base: int, info: Mapping[str, Any]) -> np.ndarray:
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(int(n) for n in info["shape"])
    begin, end = (base + int(off) for off in info["data_offsets"])
    count = math.prod(shape)
    if end - begin != count * dtype.itemsize or end > len(data):
        raise EOFError(f"tensor bytes [{begin}, {end}) do not fit the file or the shape")
    return np.frombuffer(data, dtype, count=count, offset=begin).reshape(shape).copy()


def _sniff(path: Path) -> str:
    """Return 'zip', 'safetensors', 'legacy' (pre-1.6 torch pickle) or 'unknown'."""
    with path.open("rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
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
    path = Path(path)
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for the few types a checkpoint needs, torch-free.

    The standard pickler cannot name ``torch._utils._rebuild_tensor_v2`` without importing
    torch, so tensors (numpy arrays) are written opcode by opcode, exactly as torch does.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self.storages: list[np.ndarray] = []

    def dump(self, obj: Any) -> bytes:
        self._out += b"\x80\x02"  # PROTO 2
        self._save(obj)
        self._out += b"."  # STOP
        return bytes(self._out)

    def _save(self, obj: Any) -> None:
        if obj is None:
            self._out += b"N"
        elif isinstance(obj, bool | np.bool_):
            self._out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int | np.integer):
            self._save_int(int(obj))
        elif isinstance(obj, float | np.floating):
            self._out += b"G" + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            self._save_str(obj)
        elif isinstance(obj, np.ndarray):
            self._save_tensor(obj)
        elif isinstance(obj, dict):
            self._save_dict(obj)
        elif isinstance(obj, list):
            self._out += b"]("
            for item in obj:
                self._save(item)
            self._out += b"e"  # APPENDS
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch checkpoint")

    def _save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self._out += b"K" + struct.pack("<B", value)
        elif 0 <= value < 65536:
            self._out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self._out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self._out += b"\x8a" + struct.pack("<B", len(raw)) + raw  # LONG1

    def _save_str(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self._out += b"X" + struct.pack("<I", len(raw)) + raw

    def _save_global(self, module: str, name: str) -> None:
        self._out += f"c{module}\n{name}\n".encode("ascii")

    def _save_tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self._out += b")"
            return
        self._out += b"("
        for item in items:
            self._save(item)
        self._out += b"t"

    def _save_dict(self, obj: dict[Any, Any]) -> None:
        if isinstance(obj, collections.OrderedDict):
            self._save_global("collections", "OrderedDict")
            self._out += b")R"  # OrderedDict()
        else:
            self._out += b"}"
        if obj:
            self._out += b"("
            for key, value in obj.items():
                self._save(key)
                self._save(value)
            self._out += b"u"  # SETITEMS

    def _save_tensor(self, array: np.ndarray) -> None:
        storage_name = _STORAGE_NAMES.get(array.dtype.newbyteorder("="))
        if storage_name is None:
            raise TypeError(f"cannot write a tensor of dtype {array.dtype} into a checkpoint")
        array = array.astype(array.dtype.newbyteorder("="), order="C", copy=False)
        key = str(len(self.storages))
        self.storages.append(array)
        self._save_global("torch._utils", "_rebuild_tensor_v2")
        self._out += b"(("  # MARK args, MARK persistent id
        self._save_str("storage")
        self._save_global("torch", storage_name)
        self._save_str(key)
        self._save_str("cpu")
        self._save_int(array.size)
        self._out += b"tQ"  # TUPLE, BINPERSID
        self._save_int(0)
        self._save_tuple(array.shape)
        self._save_tuple(_contiguous_strides(array.shape))
        self._out += b"\x89"  # requires_grad=False
        self._save_dict(collections.OrderedDict())  # backward hooks
        self._out += b"tR"  # TUPLE, REDUCE


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _padding_extra(header_offset: int, name: str, data_size: int) -> bytes:
    """An 'FB' extra field that puts the entry's data on a 64-byte boundary."""
    zip64 = _ZIP64_LOCAL_EXTRA_SIZE if data_size * 1.05 > zipfile.ZIP64_LIMIT else 0
    start = header_offset + _ZIP_LOCAL_HEADER_SIZE + len(name.encode("utf-8")) + 4 + zip64
    pad = -start % _ALIGNMENT
    return struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"Z" * pad


def _write_entry(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.extra = _padding_extra(zf.fp.tell(), name, len(data))
    zf.writestr(info, data)


def _write_archive(path: Path, pickled: bytes, storages: list[np.ndarray]) -> None:
    entries = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", sys.byteorder.encode()),
        *((f"data/{i}", array.tobytes()) for i, array in enumerate(storages)),
        ("version", b"3\n"),
        (".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode()),
    ]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            _write_entry(zf, f"archive/{name}", data)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_tensors(state_dict: Mapping[str, Any]) -> collections.OrderedDict[str, np.ndarray]:
    tensors: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__}")
        tensors[key] = np.asarray(value)
    return tensors


def save_torch_checkpoint(
    path: PathLike, state_dict: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``state_dict`` in torch.save's zip format, without torch.

    The file loads with ``torch.load(path, weights_only=True)`` and with `load_state_dict`. With
    ``extra`` the top-level object is ``{**extra, "state_dict": state_dict}`` (Lightning layout;
    extra values may be None/bool/int/float/str/ndarray and lists, tuples, dicts of them),
    otherwise it is the bare ordered dict of tensors.
    """
    tensors = _as_tensors(state_dict)
    top: Any = tensors if extra is None else {**extra, "state_dict": tensors}
    writer = _PickleWriter()
    pickled = writer.dump(top)
    _atomic_write(Path(path), lambda tmp: _write_archive(tmp, pickled, writer.storages))


def save_safetensors(
    path: PathLike, state_dict: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` (numpy-convertible arrays, bfloat16 included) as a safetensors file."""
    tensors = {
        k: v.astype(v.dtype, order="C", copy=False) for k, v in _as_tensors(state_dict).items()
    }
    _atomic_write(Path(path), lambda tmp: _st_save_file(tensors, str(tmp), metadata=metadata))

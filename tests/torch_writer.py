"""A torch-free writer of torch.save zip checkpoints and safetensors files, for the tests.

The package only reads these formats (`reducio_jax.convert.torch_format`); the tests need to
make such files without torch, exactly as torch.save lays them out: a protocol-2 pickle whose
tensors are `torch._utils._rebuild_tensor_v2` calls on persistent storage ids, one stored
zip entry per storage, every entry's data aligned to 64 bytes by an 'FB' padding extra field.
"""

from __future__ import annotations

import collections
import os
import secrets
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from reducio_jax.convert.torch_format import STORAGE_DTYPES

PathLike = str | os.PathLike[str]

_STORAGE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_ALIGNMENT = 64
_ZIP_LOCAL_HEADER_SIZE = 30
_ZIP64_LOCAL_EXTRA_SIZE = 20
_PAD_EXTRA_ID = 0x4246  # b"FB" little-endian, the id torch uses for its padding field.


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
    tensors = {k: np.asarray(v, order="C") for k, v in _as_tensors(state_dict).items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

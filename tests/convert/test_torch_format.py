"""Tests for the torch-free reader and writer of PyTorch / safetensors checkpoints."""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import re
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
from torch_writer import save_safetensors, save_torch_checkpoint

from reducio_jax.convert.torch_format import CheckpointFormatError, load_state_dict

LIGHTNING_EXTRA = {
    "epoch": 3,
    "global_step": 20000,
    "pytorch-lightning_version": "2.0.1",
    "optimizer_states": [],
    "lr_schedulers": [],
}


def _sample_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "module.conv.weight": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "module.norm.bias": rng.standard_normal(5).astype(np.float16),
        "attn.qkv": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "pos": rng.standard_normal((2, 2)),
        "steps": np.arange(6, dtype=np.int64).reshape(3, 2),
        "idx": np.array([1, -2], np.int32),
        "pixels": np.array([0, 255], np.uint8),
        "mask": np.array([True, False]),
        "scale": np.array(0.5, np.float32),
        "count": np.array(7, np.int64),
        "half_scalar": np.array(1.5, ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for key, expected in want.items():
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert got[key].tobytes() == np.ascontiguousarray(expected).tobytes(), key


def _stripped(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize("extra", [None, LIGHTNING_EXTRA], ids=["bare", "lightning"])
def test_round_trip_all_dtypes(tmp_path: pathlib.Path, extra: dict | None) -> None:
    state = _sample_state_dict()
    path = tmp_path / "model.ckpt"
    save_torch_checkpoint(path, state, extra=extra)
    _assert_same(load_state_dict(path), _stripped(state))


def test_written_entries_are_64_byte_aligned(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.pt"
    save_torch_checkpoint(path, _sample_state_dict())
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names
        for info in zf.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_safetensors_round_trip(tmp_path: pathlib.Path) -> None:
    state = _sample_state_dict()
    path = tmp_path / "model.safetensors"
    save_safetensors(path, state)
    _assert_same(load_state_dict(path), _stripped(state))


def test_module_prefix_collision_is_reported(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "dup.ckpt"
    save_torch_checkpoint(path, {"w": np.ones(2, np.float32), "module.w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointFormatError, match="module"):
        load_state_dict(path)


class _HParams(dict):
    """A dict subclass such as Lightning's AttributeDict: unknown to the reader."""


class _Callbacks(list):
    """A list subclass unknown to the reader."""


def test_reads_files_written_by_torch(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    param = torch.nn.Parameter(torch.randn(3))
    tensors = {
        "module.transposed": base.t(),
        "strided": base[:, ::2],
        "offset": base[1:, 2:],
        "contiguous": base,
        "param": param,
        "fp16": torch.randn(2, 3).half(),
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "long": torch.arange(5),
        "mask": torch.tensor([True, False]),
    }
    optimizer = torch.optim.Adam([param])
    param.grad = torch.ones(3)
    optimizer.step()
    checkpoint = {
        **LIGHTNING_EXTRA,
        "state_dict": tensors,
        "hyper_parameters": argparse.Namespace(lr=1e-4, name="vae"),
        "hparams_dict": _HParams(channels=4),
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.1)}},
        "loops": _Callbacks([1, 2]),
        "optimizer_states": [optimizer.state_dict()],
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    expected = {k.removeprefix("module."): v.detach().clone() for k, v in tensors.items()}
    got = load_state_dict(path)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        as_numpy = (
            value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            if key == "bf16"
            else value.numpy()
        )
        _assert_same({key: got[key]}, {key: as_numpy})

    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bare)
    assert load_state_dict(bare).keys() == {"weight", "bias"}


def test_torch_reads_our_files(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    state = _sample_state_dict()
    extra = {**LIGHTNING_EXTRA, "big": 2**40, "neg": -70000, "lr": 1e-4, "pair": (1, "a")}
    path = tmp_path / "ours.ckpt"
    save_torch_checkpoint(path, state, extra=extra)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert {k: v for k, v in loaded.items() if k != "state_dict"} == extra
        got = {}
        for key, value in loaded["state_dict"].items():
            if value.dtype == torch.bfloat16:
                got[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                got[key] = value.numpy()
        _assert_same(got, state)


def test_reads_safetensors_written_by_torch(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    value = torch.randn(2, 3).to(torch.bfloat16)
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file({"module.w": value}, str(path))
    got = load_state_dict(path)
    assert got["w"].dtype == ml_dtypes.bfloat16
    assert got["w"].view(np.int16).tolist() == value.view(torch.int16).tolist()


class _Evil:
    """Unpickling this would create the marker file if the reader executed pickled code."""

    def __init__(self, marker: pathlib.Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _zip_with_pickle(path: pathlib.Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("how", ["system", "exec"])
def test_malicious_pickle_is_not_executed(tmp_path: pathlib.Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _zip_with_pickle(path, pickle.dumps({"payload": _Evil(marker, how)}, protocol=2))
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path))):
        load_state_dict(path)
    assert not marker.exists()


def test_malicious_extra_field_loads_as_placeholder(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    weight = torch.ones(2, 2)
    torch.save({"state_dict": {"w": weight}, "callbacks": _Evil(marker, "system")}, path)
    got = load_state_dict(path)
    assert not marker.exists()
    np.testing.assert_array_equal(got["w"], weight.numpy())


def _cut_in_half(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_storage_byte(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
    raw[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(raw))


def _drop_storage(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist() if n != "archive/data/0"}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def _text(path: pathlib.Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _random_bytes(path: pathlib.Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(4096))


def _empty_zip(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path, "w"):
        pass


@pytest.mark.parametrize(
    "damage", [_cut_in_half, _flip_storage_byte, _drop_storage, _text, _random_bytes, _empty_zip]
)
def test_damaged_torch_file_raises(tmp_path: pathlib.Path, damage) -> None:
    path = tmp_path / "model.ckpt"
    save_torch_checkpoint(path, {"w": np.arange(64, dtype=np.float32)}, extra=LIGHTNING_EXTRA)
    damage(path)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path))):
        load_state_dict(path)


def test_truncated_safetensors_raises(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.arange(64, dtype=np.float32)})
    _cut_in_half(path)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path))):
        load_state_dict(path)


def test_missing_file_and_no_tensors_raise(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointFormatError, match=re.escape(str(missing))):
        load_state_dict(missing)
    no_tensors = tmp_path / "meta.ckpt"
    save_torch_checkpoint(no_tensors, {}, extra={"epoch": 1})
    with pytest.raises(CheckpointFormatError, match="no tensors"):
        load_state_dict(no_tensors)
    assert issubclass(CheckpointFormatError, ValueError)

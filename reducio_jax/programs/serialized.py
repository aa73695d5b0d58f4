"""A compiled program in a file, loaded by another process (MaxText's `compiled_trainstep_file`).

`write(path, compiled, identity, devices)` stores XLA's executable (jax's
`serialize_executable`) with what it was compiled for: the jax, jaxlib and PJRT plugin (libtpu,
CUDA) versions, the platform, the device kind and count, and `identity`, a JSON-able dict of
what made the program (for the train step: the config less the loop's own settings, the loss
weights, the mesh). `read(path, identity, devices)` checks all of them against this process
and its program before loading: a file compiled by another jax or libtpu, for other chips or
another program is refused with one line that names the difference. A pod job compiles its
step once with `python -m reducio_jax compile --serialize FILE` (on any host, for the TPU
topology) and every start and restart loads it (`train.compiled_step`).

The file is a pickle: load only files you wrote.
"""

from __future__ import annotations

import importlib.metadata
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

from reducio_jax.errors import InputError
from reducio_jax.programs import store
from reducio_jax.storage.paths import PathLike, as_path, write_bytes

FORMAT = "reducio_jax compiled program 1"
PLUGINS = ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin")  # PJRT plugins, by package
RECOMPILE = (
    "compile it again with this jax and chips (`python -m reducio_jax compile ... --serialize`)"
)


def environment(devices: Sequence[jax.Device]) -> dict[str, Any]:
    """What an executable is bound to: library versions, platform, device kind and count."""
    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
    }
    for name in PLUGINS:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if env["platform"] != "tpu":
        env.pop("libtpu", None)  # installed beside a CPU/GPU run, it plays no part in it
    return env


def write(
    path: PathLike, compiled: jax.stages.Compiled, identity: dict, devices: Sequence[jax.Device]
) -> None:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    record = {
        "format": FORMAT,
        "environment": environment(devices),
        "identity": identity,
        "executable": payload,
        "trees": (in_tree, out_tree),
    }
    write_bytes(path, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))


def read(path: PathLike, identity: dict, devices: Sequence[jax.Device]) -> jax.stages.Compiled:
    """The executable in `path`, loaded onto `devices`, once its versions, chips and identity
    match this process and `identity`; `InputError` (one line) otherwise."""
    file = as_path(path)
    if not file.exists():
        raise InputError(f"no compiled program at {path} (write one with `compile --serialize`)")
    try:
        record = pickle.loads(file.read_bytes())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError("not written by `compile --serialize`")
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file, one line
        raise InputError(f"{path} is not a compiled program of this version ({err})") from err
    where = differences(record["environment"], environment(devices))
    if where:
        raise InputError(f"{path} was compiled for another set-up ({where}): {RECOMPILE}")
    what = differences(record["identity"], identity)
    if what:
        raise InputError(
            f"{path} is another program than this run's ({what}): compile it with this run's "
            "config and flags"
        )
    in_tree, out_tree = record["trees"]
    store.mark_loaded()
    try:
        return serialize_executable.deserialize_and_load(
            record["executable"], in_tree, out_tree, execution_devices=list(devices)
        )
    except Exception as err:  # noqa: BLE001 - the runtime's refusal, one line
        first = str(err).strip().splitlines()[0][:300]
        raise InputError(f"{path} cannot be loaded here ({first}): {RECOMPILE}") from err


def differences(stored: Any, here: Any, limit: int = 4) -> str:
    """The first `limit` leaves that differ, as "key: stored in the file, here"; '' if none."""
    found: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        elif a != b:
            found.append(f"{key or 'value'}: {a!r} in the file, {b!r} here")

    walk(stored, here, "")
    more = f"; {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more

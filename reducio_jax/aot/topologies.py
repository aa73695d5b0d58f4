"""The chips a program is compiled for: TPU topologies (libtpu's compile-only devices, on any
host), H100s (the CUDA plugin's compile-only target), and each chip's HBM."""

from __future__ import annotations

import importlib.util
import os
import re

import jax

from reducio_jax.errors import InputError
from reducio_jax.programs import budget

GIB = 1 << 30
# HBM per chip, by `device_kind`, from the chips' spec pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e "system architecture"; nvidia.com H100/H200 datasheets). The TPU compiler
# itself checks against slightly less (v5e: 15.75 GiB available of 16), so "fits" here means
# the compile succeeded and the program's total is within the chip's HBM less the headroom.
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 84_978_434_048,  # XLA's H100 description (H100_TARGET below)
    "NVIDIA H200": 141 * 10**9,
}
TOPOLOGY_PATTERN = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
GPU_PATTERN = re.compile(r"^h100:(\d+)$")  # H100 SXM, N GPUs on one host
CPU_PATTERN = re.compile(r"^cpu:(\d+)$")  # this host's first N CPU devices
TPU_INSTALL_HINT = 'pip install -e ".[tpu]"  (libtpu for the installed jax)'
GPU_INSTALL_HINT = 'pip install "jax[cuda12]==<the installed jax>"  (about 5.5 GB)'
# The H100 SXM as XLA's GPU compiler sees it (the fields of XLA's GpuTargetConfigProto, values
# from XLA's xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb): with it the CUDA plugin builds a
# compile-only topology on a host without a GPU.
H100_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
def tpu_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology such as "v5e:4x4" or "v5p:2x2x1" (libtpu)."""
    if not TOPOLOGY_PATTERN.match(topology):
        raise InputError(
            f"topology '{topology}' is not GEN:AxB or GEN:AxBxC with GEN v4, v5e, v5p or v6e "
            "(e.g. v5e:4x4, v5p:2x2x1), nor h100:N, nor cpu:N"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise InputError(f"compiling for a TPU topology needs libtpu: {TPU_INSTALL_HINT}")
    from jax.experimental import topologies

    # compile-only: no chip is opened, so several such processes (and a TPU job) may coexist
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as err:  # libtpu refuses sizes it does not know
        raise InputError(f"libtpu cannot build topology '{topology}': {err}") from err


def gpu_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of "h100:N" (N H100s on one host), from the CUDA plugin with
    XLA's H100 target description; no GPU needed (autotuning is off without one, so kernel
    choices and temporaries may differ somewhat from a compile on the GPU itself)."""
    count = int(GPU_PATTERN.match(topology).group(1))
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise InputError(f"compiling for {topology} needs the CUDA plugin: {GPU_INSTALL_HINT}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=H100_TARGET
        )
    except Exception as err:  # noqa: BLE001 - the plugin's own error, one line
        raise InputError(
            f"the CUDA plugin cannot build {topology} (run with JAX_PLATFORMS=cpu on a host "
            f"without a GPU): {str(err).splitlines()[0]}"
        ) from err
    return list(desc.devices)


def cpu_devices(topology: str) -> list[jax.Device]:
    """This host's first N CPU devices for "cpu:N" (more with
    XLA_FLAGS=--xla_force_host_platform_device_count=N): a program `train` here can load."""
    count = int(CPU_PATTERN.match(topology).group(1))
    devices = jax.devices("cpu")
    if not 1 <= count <= len(devices):
        raise InputError(
            f"{topology}: this host has {len(devices)} CPU device(s) (more with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return devices[:count]


def target_devices(topology: str) -> list[jax.Device]:
    """`tpu_devices`, `gpu_devices` or `cpu_devices`, by the topology's name."""
    if GPU_PATTERN.match(topology):
        return gpu_devices(topology)
    if CPU_PATTERN.match(topology):
        return cpu_devices(topology)
    return tpu_devices(topology)


def chip_hbm(device: jax.Device) -> int:
    """The chip's memory; for a CPU device, the memory this host has free for a program."""
    if device.platform == "cpu":
        return budget.available_memory(device)[0]
    kind = device.device_kind
    if kind not in HBM_BYTES:
        raise InputError(f"no HBM size known for device kind '{kind}' (aot.HBM_BYTES)")
    return HBM_BYTES[kind]

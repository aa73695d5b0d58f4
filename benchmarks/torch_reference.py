"""The official PyTorch Reducio-VAE beside `ReducioVAE.reconstruct`: same weights, same input.

The official code is imported from the user's checkout by `reducio_jax.runs.parity` (with its
stand-ins for xformers, taming and Lightning); nothing of it is copied here. Weights: the
parity fixtures' recipe (tests/recipe.py: every value a function of its key name and shape)
over the keys of the official model, written once as a torch-format checkpoint with the
project's own writer, then read by both sides (`ReducioVAE.from_torch_checkpoint`,
`parity.build_reference`). The reference runs the same stages as `reconstruct` (content
features of the middle frame, posterior mean, LayerNorm, decode) with torch threads = cores.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
from harness import (
    ROOT,
    BenchmarkError,
    Case,
    PeakMemory,
    case_config,
    input_video,
    measure,
    record,
    vae_program,
)

TOLERANCE_F32 = 1e-3  # max |jax - torch| of the float32 reconstructions


class ReferenceMismatch(RuntimeError):
    """The two reconstructions disagree beyond the float32 tolerance (exit status 1)."""


def recipe_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The fixtures' recipe value for every key of a torch model's state_dict."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import recipe
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return {
        key: recipe.recipe_value(key, list(t.shape), str(t.dtype).removeprefix("torch."))
        for key, t in model.state_dict().items()
    }


def load_reference(path: str, cfg: Any, checkpoint: pathlib.Path) -> tuple[Any, Any]:
    """(ReducioVAE, official torch model), both on the recipe weights written to `checkpoint`."""
    import torch

    from reducio_jax.api import ReducioVAE
    from reducio_jax.convert.torch_format import load_state_dict
    from reducio_jax.runs import parity

    try:
        module = parity.import_reference(path)
    except parity.ParityError as err:
        raise BenchmarkError(f"--torch-reference: {err}") from err
    with contextlib.redirect_stdout(sys.stderr):  # the official code prints while it builds
        weights = recipe_state_dict(parity.reference_model(module, cfg))
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in weights.items()}}, checkpoint)
        reference = parity.build_reference(module, cfg, load_state_dict(checkpoint))
    return ReducioVAE.from_torch_checkpoint(checkpoint, cfg), reference


def time_reference(
    reference: Any, video: np.ndarray, repeats: int
) -> tuple[list[float], Any, dict | None]:
    """One warm-up, then `repeats` timed runs of the reference's reconstruction stages; their
    times, the reconstruction and their peak memory (`harness.PeakMemory`, as ours)."""
    import torch

    from reducio_jax.runs import parity

    torch.set_num_threads(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    with contextlib.redirect_stdout(sys.stderr), PeakMemory() as peak:
        parity.reference_stages(reference, video)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            stages = parity.reference_stages(reference, video)
            times.append(time.perf_counter() - t)
    return times, stages["recon"], peak.result


def compare(case: Case, path: str, repeats: int) -> dict:
    """The reconstruct record of `case`, with the official model's time and the difference."""
    import torch

    if case.op != "reconstruct":
        raise BenchmarkError("--torch-reference compares the reconstruct op only")
    cfg = case_config(case)
    video = input_video(case.batch, case.frames, int(cfg.data.resolution))
    with tempfile.TemporaryDirectory() as tmp:
        vae, reference = load_reference(path, cfg, pathlib.Path(tmp) / "recipe.ckpt")
    program = vae_program("reconstruct", cfg, video, vae)
    timing = measure(program, repeats)
    torch_times, torch_recon, torch_peak = time_reference(reference, video, repeats)
    diff = float(np.max(np.abs(np.asarray(timing.output, np.float32) - torch_recon)))
    torch_median = statistics.median(torch_times)
    extra = {
        "weights": "recipe (tests/recipe.py) via a torch-format checkpoint",
        "torch_reference": {
            "path": str(path),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "times_s": [round(t, 4) for t in torch_times],
            "median_s": round(torch_median, 4),
            "max_abs_diff": diff,
            "peak_bytes": torch_peak,
            "jax_over_torch": round(timing.median_s / torch_median, 4),
        },
    }
    return record(case, cfg, timing, extra)


def check(rec: dict) -> None:
    """Raises ReferenceMismatch when float32 outputs differ by more than TOLERANCE_F32."""
    diff = rec["torch_reference"]["max_abs_diff"]
    if rec["dtype"] == "float32" and not diff <= TOLERANCE_F32:
        raise ReferenceMismatch(
            f"jax and torch reconstructions differ by {diff:.3e} (max abs) > {TOLERANCE_F32:g} "
            f"for {rec['config']} {rec['frames']}x{rec['resolution']}x{rec['resolution']}"
        )

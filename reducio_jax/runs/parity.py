"""Parity report: this port against the official PyTorch Reducio-VAE, stage by stage.

    python -m reducio_jax.runs.parity --ckpt reducio-ft4.ckpt --config configs/reducio_ft4.py \
        --reference-repo ~/src/Reducio-VAE [--num-clips 2 --resolution 64 --num-frames 16]

Runs both models on the same synthetic clips (posterior mean, no sampling) and prints the
max / mean absolute error of the content features, posterior mean and logvar, the normalised
latent and the reconstruction, plus the PSNR between the two reconstructions.

The official code is imported from the user's own checkout (``--reference-repo``, which must
hold ``ldm/models/reducio_vae.py``); it is never vendored. It needs torch. Optional
dependencies of the official module that are not installed are replaced by generic stand-ins
written here: ``xformers.ops.memory_efficient_attention`` (torch's fused softmax attention, scale
1/sqrt(d)), ``taming.modules.losses.lpips.LPIPS`` (unused for inference; fails if built) and
``pytorch_lightning.LightningModule`` (a ``torch.nn.Module``). The reference model is built
without its loss; checkpoint keys under ``loss.`` are not loaded into it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reducio_jax.errors import InputError

REFERENCE_FILE = pathlib.Path("ldm/models/reducio_vae.py")
SHIM_MODULE = "_reducio_parity_shims"
STAGES = ("content", "mean", "logvar", "latent", "recon")
NEEDS = (
    "needs --reference-repo PATH: a checkout of the official Reducio-VAE repository "
    "(github.com/microsoft/Reducio-VAE) holding ldm/models/reducio_vae.py, and torch installed"
)


class ParityError(InputError):
    """The reference cannot be loaded or run (missing checkout, torch, or keys)."""


# -- comparison core (no torch) -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageError:
    """Absolute error between the two implementations at one stage."""

    stage: str
    max_abs: float
    mean_abs: float
    shape: str  # "(B, T, ...)", or "N arrays" for multi-scale content features


def flatten_arrays(value: Any) -> list[np.ndarray]:
    """Nested lists/tuples of arrays (e.g. tiled content features) -> flat list, in order."""
    if isinstance(value, list | tuple):
        return [a for v in value for a in flatten_arrays(v)]
    return [] if value is None else [np.asarray(value, np.float32)]


def stage_error(stage: str, ours: Any, ref: Any) -> StageError:
    """Max / mean |ours - ref| over all arrays of a stage (which must match in shape)."""
    a, b = flatten_arrays(ours), flatten_arrays(ref)
    if len(a) != len(b):
        raise ParityError(f"stage {stage}: {len(a)} arrays here vs {len(b)} in the reference")
    diffs = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ParityError(f"stage {stage}[{i}]: shape {x.shape} here vs {y.shape} reference")
        diffs.append(np.abs(x - y).ravel())
    d = np.concatenate(diffs)
    shape = str(a[0].shape) if len(a) == 1 else f"{len(a)} arrays"
    return StageError(stage, float(d.max()), float(d.mean()), shape)


def recon_psnr(ours: np.ndarray, ref: np.ndarray) -> float:
    """PSNR (dB) between two reconstructions, frames clamped and mapped to [0, 1], mean per frame."""
    x = (np.clip(np.asarray(ours, np.float64), -1, 1) + 1) / 2
    y = (np.clip(np.asarray(ref, np.float64), -1, 1) + 1) / 2
    mse = np.mean(np.square(x - y).reshape(-1, *x.shape[-3:]), axis=(1, 2, 3))
    return float(np.mean(-10.0 * np.log10(mse + 1e-8)))


def compare_stages(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Errors of every stage in STAGES and the PSNR between the reconstructions."""
    errors = [stage_error(s, ours[s], ref[s]) for s in STAGES]
    return {"errors": errors, "recon_psnr": recon_psnr(ours["recon"], ref["recon"])}


def format_report(report: dict[str, Any], title: str = "JAX vs PyTorch reference") -> str:
    lines = [title, f"{'stage':<10} {'shape':<24} {'max |err|':>12} {'mean |err|':>12}"]
    for e in report["errors"]:
        lines.append(f"{e.stage:<10} {e.shape:<24} {e.max_abs:>12.3e} {e.mean_abs:>12.3e}")
    lines.append(
        f"reconstruction PSNR between the two: {report['recon_psnr']:.2f} dB "
        "(80 dB is the ceiling: mean squared error below 1e-8)"
    )
    return "\n".join(lines)


# -- the JAX side ---------------------------------------------------------------------------------


def jax_stages(vae: Any, video: np.ndarray) -> dict[str, Any]:
    """Stage outputs of a `ReducioVAE` for clips (B, T, H, W, 3) in [-1, 1] (posterior mean)."""
    from reducio_jax.models import content_frame_index

    frame = video[:, content_frame_index(video.shape[1])]
    posterior = vae.encode(video)
    latent = vae.latent(posterior)
    return {
        "content": [np.asarray(f) for f in flatten_arrays(vae.content_features(frame))],
        "mean": np.asarray(posterior.mean),
        "logvar": np.asarray(posterior.logvar),
        "latent": np.asarray(latent),
        "recon": np.asarray(vae.decode(latent, frame)),
    }


def synthetic_clips(num_clips: int, num_frames: int, resolution: int) -> np.ndarray:
    """The data layer's synthetic clips as float32 (N, T, H, W, 3) in [-1, 1]."""
    from reducio_jax.data.sources import SyntheticSource
    from reducio_jax.data.video import ClipSpec

    spec = ClipSpec(num_frames=num_frames, fps=16.0, height=resolution, width=resolution)
    source = SyntheticSource(num_clips, spec)
    clips = np.stack([source.load(i, None) for i in range(num_clips)])
    return clips.astype(np.float32) / 127.5 - 1.0


# -- the reference side (torch) -------------------------------------------------------------------


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__reducio_shim__ = True
    return module


def _attention(q, k, v, attn_bias=None, **_: Any):
    """xformers' memory_efficient_attention on (B, N, d) inputs: softmax attention, scale
    1/sqrt(d), through torch's fused `scaled_dot_product_attention`, which like xformers never
    holds the whole (N, M) score matrix (so memory figures of the official code are fair)."""
    import torch.nn.functional as F

    if attn_bias is not None:
        raise NotImplementedError("the attention stand-in supports attn_bias=None only")
    # (B, 1, N, d): torch's CPU flash kernel takes 4-D inputs only (3-D ones take the plain path)
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def install_shims() -> list[str]:
    """Stand-ins for the official module's optional imports that are not installed."""
    import torch

    installed = []
    if _missing("xformers"):
        ops = _module("xformers.ops", memory_efficient_attention=_attention)
        sys.modules.update({"xformers": _module("xformers", ops=ops), "xformers.ops": ops})
        installed.append("xformers")
    if _missing("taming"):

        class LPIPS(torch.nn.Module):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ParityError("the taming LPIPS stand-in cannot be built (inference only)")

        names = ["taming", "taming.modules", "taming.modules.losses"]
        sys.modules.update({n: _module(n) for n in names})
        sys.modules["taming.modules.losses.lpips"] = _module(
            "taming.modules.losses.lpips", LPIPS=LPIPS
        )
        installed.append("taming")
    if _missing("pytorch_lightning"):
        sys.modules["pytorch_lightning"] = _module(
            "pytorch_lightning", LightningModule=_lightning_module(torch)
        )
        installed.append("pytorch_lightning")
    sys.modules[SHIM_MODULE] = _module(SHIM_MODULE, NoLoss=_no_loss(torch))
    return installed


def _lightning_module(torch: Any) -> type:
    class LightningModule(torch.nn.Module):
        """What the reference's inference path uses of Lightning: a Module with .device."""

        @property
        def device(self) -> Any:
            return next(self.parameters()).device

        def log(self, *args: Any, **kwargs: Any) -> None:
            return None

    return LightningModule


def _no_loss(torch: Any) -> type:
    class NoLoss(torch.nn.Module):
        """Loss stand-in: the reference constructor reads only `disc_loss_scale`."""

        disc_loss_scale = 1.0

    return NoLoss


def import_reference(repo: str | pathlib.Path) -> Any:
    """`ldm.models.reducio_vae` from the user's checkout (shims installed where needed)."""
    repo = pathlib.Path(repo).expanduser().resolve()
    if not (repo / REFERENCE_FILE).is_file():
        raise ParityError(f"{repo} has no {REFERENCE_FILE}; {NEEDS}")
    if _missing("torch"):
        raise ParityError(f"torch is not installed; {NEEDS}")
    install_shims()
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        return importlib.import_module("ldm.models.reducio_vae")
    except ImportError as err:
        raise ParityError(f"cannot import the reference from {repo}: {err}") from err


def reference_model(module: Any, cfg: Any) -> Any:
    """The official ReducioVAE for `cfg.model`, without its loss, with torch's random init."""
    m = cfg.model
    return module.ReducioVAE(
        lossconfig={"target": f"{SHIM_MODULE}.NoLoss"},
        ddconfig=dict(m.ddconfig),
        ddconfig_2d=dict(m.ddconfig_2d),
        embed_dim=int(m.embed_dim),
        use_tiling=bool(m.use_tiling),
        tile_sample_min_size=int(m.tile_sample_min_size),
        tile_overlap_factor=float(m.tile_overlap_factor),
    )


def build_reference(module: Any, cfg: Any, state_dict: dict[str, np.ndarray]) -> Any:
    """The official ReducioVAE for `cfg.model`, with the VAE weights of `state_dict`, in eval."""
    import torch

    model = reference_model(module, cfg)
    tensors = {
        k: torch.from_numpy(np.asarray(v, np.float32).copy())
        for k, v in state_dict.items()
        if not k.startswith("loss.") and np.asarray(v).dtype.kind in "fV"
    }
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("loss.")]
    if missing or result.unexpected_keys:
        raise ParityError(
            f"reference model and checkpoint differ: {len(missing)} missing "
            f"({', '.join(missing[:5])}), {len(result.unexpected_keys)} unexpected "
            f"({', '.join(result.unexpected_keys[:5])})"
        )
    return model.eval()


def _to_last(x: Any) -> np.ndarray:
    """(B, C, ...) torch tensor -> channels-last numpy."""
    a = x.detach().float().cpu().numpy()
    return np.moveaxis(a, 1, -1)


def reference_stages(model: Any, video: np.ndarray) -> dict[str, Any]:
    """Stage outputs of the official model for clips (B, T, H, W, 3) in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(video, -1, 1)))  # (B, C, T, H, W)
    frame = x[:, :, (x.shape[2] - 1) // 2]
    window = int(model.tile_sample_min_size * (1 + model.tile_overlap_factor))
    tiled = bool(model.use_tiling and x.shape[3] > window)
    with torch.no_grad():
        feats = model.encode_2d(frame, tiled)
        posterior = model.encode_3d(x, tiled)
        z = posterior.mode()
        latent = F.layer_norm(z, z.shape[1:])
        recon = model.decode(latent, feats, tiled)
    return {
        "content": [_to_last(f) for f in _flatten_tensors(feats)],
        "mean": _to_last(posterior.mean),
        "logvar": _to_last(posterior.logvar),
        "latent": _to_last(latent),
        "recon": _to_last(recon),
    }


def _flatten_tensors(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flatten_tensors(v)]
    return [] if value is None else [value]


# -- the report -----------------------------------------------------------------------------------


def run_report(
    vae: Any, reference: Callable[[np.ndarray], dict[str, Any]], video: np.ndarray
) -> dict[str, Any]:
    """Compares `jax_stages(vae, video)` with `reference(video)` (any callable)."""
    return compare_stages(jax_stages(vae, video), reference(video))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m reducio_jax.runs.parity",
        description="Stage-by-stage errors of this port against the official PyTorch code.",
        epilog="Exit status 0 on success, 2 when the reference or inputs are unusable.",
    )
    p.add_argument("--ckpt", required=True, help="released .ckpt/.pt/.safetensors checkpoint")
    p.add_argument("--config", required=True, help="configs/*.py or the official YAML")
    p.add_argument("--reference-repo", help="checkout of the official Reducio-VAE repository")
    p.add_argument("--num-clips", type=int, default=2, help="synthetic clips to compare")
    p.add_argument("--resolution", type=int, default=64, help="frame size (multiple of 32)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    return p.parse_args(argv)


def _report(args: argparse.Namespace) -> str:
    from reducio_jax.api import ReducioVAE, load_config
    from reducio_jax.convert.pretrained import convert_state_dict_to_modules
    from reducio_jax.convert.torch_format import load_state_dict

    if not args.reference_repo:
        raise ParityError(f"no reference given; {NEEDS}")
    module = import_reference(args.reference_repo)
    cfg = load_config(args.config)
    state_dict = load_state_dict(args.ckpt)  # read once, used by both models
    weights = convert_state_dict_to_modules(state_dict, cfg)
    vae = ReducioVAE(weights.vae, cfg, weights)
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints while it builds
        reference = build_reference(module, cfg, state_dict)
    video = synthetic_clips(args.num_clips, args.num_frames, args.resolution)
    report = run_report(vae, lambda v: reference_stages(reference, v), video)
    shape = f"{args.num_clips} clip(s) {args.num_frames}x{args.resolution}x{args.resolution}"
    return format_report(report, f"JAX vs PyTorch reference ({args.reference_repo}), {shape}")


def main(argv: Sequence[str] | None = None) -> int:
    from reducio_jax.errors import BAD_INPUT, InputError, error_line

    args = parse_args(argv)
    try:
        print(_report(args))
    except (InputError, FileNotFoundError) as err:
        print(error_line(err), file=sys.stderr)
        return BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

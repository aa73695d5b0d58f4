"""Evaluation metrics: PSNR/SSIM (Reducio reference), Fréchet distance, I3D features, FVD."""

from reducio_jax.metrics.frechet import RunningStats, frechet_distance, gaussian_stats
from reducio_jax.metrics.fvd import FVDAccumulator
from reducio_jax.metrics.i3d import (
    InceptionI3d,
    convert_i3d_state_dict,
    i3d_state_dict_shapes,
    load_i3d,
    resize_video,
)
from reducio_jax.metrics.image import psnr, psnr_per_image, ssim, ssim_per_image

__all__ = [
    "FVDAccumulator",
    "InceptionI3d",
    "RunningStats",
    "convert_i3d_state_dict",
    "frechet_distance",
    "gaussian_stats",
    "i3d_state_dict_shapes",
    "load_i3d",
    "psnr",
    "psnr_per_image",
    "resize_video",
    "ssim",
    "ssim_per_image",
]

"""Reducio-VAE ft4 weights with spatial tiling for 1024px frames (320 px tiles every 256 px).

The released `_1024px` config: configs/reducio_ft4.py with `use_tiling` on and 1024 px frames.
"""

import pathlib

from reducio_jax.config import load_config


def get_config():
    cfg = load_config(pathlib.Path(__file__).with_name("reducio_ft4.py"))
    cfg.model.use_tiling = True
    cfg.model.ddconfig.resolution = 1024
    cfg.model.ddconfig_2d.resolution = 1024
    cfg.data.resolution = 1024
    return cfg

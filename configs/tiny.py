"""The tiny Reducio-VAE of the parity fixtures (tests/fixtures): the released ft4 recipe
(configs/reducio_ft4.py) at width 32 with one res block per level, 64 px, discriminator width 16.
The parity tests use it as is; the CPU training demo is configs/demo.py.
"""

import pathlib

from reducio_jax.config import load_config


def get_config():
    cfg = load_config(pathlib.Path(__file__).with_name("reducio_ft4.py"))
    for ddconfig in (cfg.model.ddconfig, cfg.model.ddconfig_2d):
        ddconfig.update(ch=32, num_res_blocks=1, resolution=64)
    cfg.model.ddconfig.ch_in = 32
    cfg.loss.disc_ch = 16
    cfg.data.resolution = 64
    return cfg

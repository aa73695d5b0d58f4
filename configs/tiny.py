"""The tiny Reducio-VAE of the parity fixtures (width 32): for tests, demos and CPU runs."""

from reducio_jax.config import make_config
from reducio_jax.official import tiny_params


def get_config():
    cfg = make_config(tiny_params())
    # The CPU demo `python train.py --config configs/tiny.py` (measured in docs/training.md):
    # 32 px x batch 1 is ~70 GFLOP a training step (64 px x batch 2 is 4x8 = 8x more).
    cfg.data.resolution = 32
    cfg.data.batch_size = 1
    cfg.train.num_steps = 100
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 50
    cfg.train.preview_every = 50
    return cfg

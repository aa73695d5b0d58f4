"""The tiny Reducio-VAE of the parity fixtures (width 32), with a CPU training demo.

The model and loss blocks are the fixture's tiny topology and recipe (parity tests use them).
The data/optim/train blocks are the demo `python train.py --config configs/tiny.py`: on a
2-core CPU it trains for a few minutes and the L1 loss falls clearly (measured in
docs/training.md). For that it cycles over 4 synthetic clips (the untrained model needs far
more than a few hundred steps to generalise over an unbounded source) at a learning rate of
3e-4 instead of the released fine-tuning rate 2e-5 (kept in the fixture's and the released
configs), and skips rematerialisation (nothing to save at 32 px).
"""

from reducio_jax.config import make_config
from reducio_jax.official import tiny_params

DEMO_LEARNING_RATE = 3e-4


def get_config():
    cfg = make_config(tiny_params())
    # 32 px x batch 1: 55 GFLOP a training step (64 px x batch 2 is 8x more).
    cfg.data.resolution = 32
    cfg.data.batch_size = 1
    cfg.data.synthetic_size = 4
    cfg.optim.base_learning_rate = DEMO_LEARNING_RATE
    cfg.model.remat = False
    cfg.train.num_steps = 150
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 50
    cfg.train.preview_every = 50
    return cfg

"""CPU training demo: `python train.py --config configs/demo.py` (the tiny model, synthetic clips).

The tiny fixture model (configs/tiny.py) made to train for a few minutes on a 2-core CPU with a
clearly falling L1 loss (measured in docs/training.md): it cycles over 4 synthetic clips (the
untrained model needs far more than a few hundred steps to generalise over an unbounded source)
at 32 px, batch 1, at a learning rate of 3e-4 instead of the released fine-tuning rate 2e-5,
and skips rematerialisation (nothing to save at 32 px).
"""

import pathlib

from reducio_jax.config import load_config


def get_config():
    cfg = load_config(pathlib.Path(__file__).with_name("tiny.py"))
    # 32 px x batch 1: 55 GFLOP a training step (64 px x batch 2 is 8x more).
    cfg.data.resolution = 32
    cfg.data.batch_size = 1
    cfg.data.synthetic_size = 4
    cfg.optim.base_learning_rate = 3e-4
    cfg.model.remat = False
    cfg.train.num_steps = 150
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 50
    cfg.train.preview_every = 50
    return cfg

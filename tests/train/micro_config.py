"""A cut-down tiny Reducio-VAE for the training system tests (fast to compile and run on a CPU).

The tiny topology (f_t=2, content fusion at one level and in the mid block) with 3 levels of
width 32 and 4-frame clips at 32 px: about 6 GFLOP for a training step on one clip. Not for
parity (that is configs/tiny.py).
"""

from configs import tiny


def get_config():
    cfg = tiny.get_config()
    cfg.model.ddconfig.update(temp_res=4, ch_mult=[1, 1, 1], ch_fuse=[-1, 1, -1])
    cfg.model.ddconfig_2d.ch_mult = [1, 1, 1]
    cfg.model.remat = False
    cfg.model.dtype = "bfloat16"  # float32 parameters and optimizer states
    cfg.data.resolution = 32
    cfg.data.num_frames = 4
    cfg.data.batch_size = 2
    cfg.data.synthetic_size = 64
    cfg.mesh.shape = {"data": -1, "fsdp": 1}
    cfg.train.num_steps = 2
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 1000
    cfg.train.preview_every = 0
    cfg.train.async_checkpointing = True
    cfg.train.fast_compile = True  # compile time dominates these few-step runs
    return cfg

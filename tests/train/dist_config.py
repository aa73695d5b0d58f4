"""Micro model on a data=4 x fsdp=2 mesh, global batch 8, float32: the 8-device in-process run
and the two-process run (4 devices each) of test_sharded_step.py and test_distributed.py."""

import micro_config

COMPARED = (
    "total_loss_ae", "l1", "kl_loss", "disc_loss", "logits_real", "d_weight", "grad_norm_vae",
    "grad_norm_disc",
)  # fmt: skip


def get_config():
    cfg = micro_config.get_config()
    cfg.mesh.shape = {"data": 4, "fsdp": 2}
    cfg.model.dtype = "float32"  # tight multi-process comparisons
    cfg.data.batch_size = 8
    cfg.train.num_steps = 2
    cfg.train.preview_every = 2
    cfg.loss.disc_start = 1  # the second step trains with the GAN term
    return cfg

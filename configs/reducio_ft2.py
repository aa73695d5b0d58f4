"""Reducio-VAE 2x temporal compression (16x8x8x8 latents at 256px): reducio-ft2-fs32-attn23."""

from reducio_jax.config import make_config

# The released model's `model.params` (the official YAML), values as published.
PARAMS = {
    "base_learning_rate": 2e-5,
    "embed_dim": 16,
    "enable_2d": True,
    "use_tiling": False,
    "tile_overlap_factor": 0.25,
    "tile_sample_min_size": 256,
    "scheduler_config": {
        "warm_up_steps": [0],
        "cycle_lengths": [1_000_000],
        "f_start": [1.0],
        "f_max": [1.0],
        "f_min": [0.01],
    },
    "scheduler_disc_config": {
        "warmup_factor": 0.1,
        "warmup_start_iters": 5000,
        "warmup_iters": 1000,
    },
    "lossconfig": {
        "disc_start": 10001,
        "kl_weight": 1e-6,
        "disc_weight": 0.05,
        "use_adaptive_gan": True,
        "enable_2d": False,
        "rec_weight": 1.0,
        "loss_norm": "l1",
        "perceptual_weight": 0.1,
        "disc_loss_scale": 0.1,
        "use_groupnorm": False,
        "act_tanh": False,
    },
    "ddconfig_2d": {
        "ch": 128,
        "z_channels": 4,
        "out_ch": 3,
        "resolution": 256,
        "in_channels": 3,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
        "out_z": False,
        "use_checkpoint": True,
        "fp32_attention": True,
    },
    "ddconfig": {
        "ch": 128,
        "ch_in": 128,
        "f_t": 1,
        "out_ch": 3,
        "z_channels": 16,
        "resolution": 256,
        "in_channels": 3,
        "temp_res": 16,
        "ch_mult": [1, 2, 2, 4, 4, 4],
        "ch_fuse": [-1, -1, 2, 3, -1, -1],
        "fuse_type": "attn",
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "use_3d_conv": True,
        "upsample_first": True,
        "fuse_mid": True,
        "use_checkpoint": True,
        "pos_embed_mode": "t",
        "fp32_attention": True,
        "window_size": 128,
    },
}


def get_config():
    return make_config(PARAMS)

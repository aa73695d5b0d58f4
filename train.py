"""Train Reducio-VAE: `python train.py --config configs/demo.py` (= `python -m reducio_jax train`)."""

from reducio_jax.cli import script

if __name__ == "__main__":
    script("train")

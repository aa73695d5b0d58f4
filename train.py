"""Train Reducio-VAE: `python train.py --config configs/demo.py` (see docs/training.md)."""

from reducio_jax.train.cli import main

if __name__ == "__main__":
    main()

"""Reconstruction metrics: `python eval.py --checkpoint CKPT --data DATA` (= `python -m reducio_jax eval`)."""

from reducio_jax.cli import script

if __name__ == "__main__":
    script("eval")

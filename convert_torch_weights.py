"""Torch checkpoint -> pretrained directory (= `python -m reducio_jax convert`; see --help)."""

from reducio_jax.cli import script

if __name__ == "__main__":
    script("convert")

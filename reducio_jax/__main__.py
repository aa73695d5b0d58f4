"""`python -m reducio_jax COMMAND [flags]`: see `reducio_jax.cli` (`--help` lists the commands)."""

import sys

from reducio_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())

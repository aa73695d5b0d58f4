"""The data config block shared by training, evaluation and latent extraction.

Keys (all read by :func:`reducio_jax.data.make_loader` / :func:`make_host_dataset`):

* ``source``: ``"synthetic"`` | ``"folder"`` | ``"tfds"``.
* ``path``: folder of videos (searched recursively for mp4/webm/mov/avi/mkv/m4v), or a
  text file listing one video path per line (relative paths are relative to the list
  file); for ``"tfds"`` the TFDS ``data_dir``.
* ``tfds_name``: TFDS dataset name, optionally with a version (``"my_videos:1.0.0"``).
* ``split``: TFDS split (``"train"``, ``"validation[:10%]"`` ...); unused by the
  other sources.
* ``num_frames``: frames per clip (16).
* ``fps``: frame rate clips are resampled to (16). TFDS records are assumed to be stored
  at this rate already (the builder in :mod:`reducio_jax.data.tfds_builder` does that).
* ``resolution``: output size, an int (square) or ``(H, W)`` (256). Frames are resized
  so that they cover it (short side for square outputs), then cropped.
* ``random_crop``: train only: random spatial crop (else centre crop). Train clips also
  start at a random time; eval clips start at the first frame, centre-cropped.
* ``batch_size``: global batch size (all processes together).
* ``num_workers``: Grain worker processes that decode (``mp_prefetch``); 0 decodes in
  the main process (with one prefetch thread).
* ``seed``: seed of the shuffle and of the random crops.
* ``shuffle``: train only: shuffle clip order (reshuffled every epoch).
* ``num_epochs``: passes over the data; ``None`` repeats forever (train). Eval makes a
  single pass when it is ``None``.
* ``synthetic_size``: number of distinct synthetic clips.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the default data block (synthetic source, 16 frames at 16 fps, 256 px)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"
    c.path = ""
    c.tfds_name = ""
    c.split = "train"
    c.num_frames = 16
    c.fps = 16
    # int or (H, W): a FieldReference of type object so either may be assigned.
    c.resolution = ml_collections.FieldReference(256, field_type=object)
    c.random_crop = True
    c.batch_size = 8
    c.num_workers = 0
    c.seed = 0
    c.shuffle = True
    c.num_epochs = config_dict.placeholder(int)
    c.synthetic_size = 1024
    return c


def frame_size(resolution) -> tuple[int, int]:
    """`data.resolution` (an int for square frames, or (H, W)) as (H, W)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return int(h), int(w)

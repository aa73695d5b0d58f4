"""Where things are kept: every user path, local or `gs://` (`paths`), and the one checkpoint
layout of pretrained directories and training steps (`checkpoints`)."""

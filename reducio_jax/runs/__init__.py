"""What a command's run over videos or a dataset needs: its set-up (`runtime`: options, meshes,
the model, the data block), SIGTERM as "stop after this step" (`preemption`), and the runs
themselves: `reconstruct` (video files), `evaluate` (metrics over a dataset) and `parity` (the
report against the official PyTorch code)."""

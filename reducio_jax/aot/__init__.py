"""Ahead-of-time compiles for a topology from any host: the chips (`topologies`: TPU
topologies from libtpu's compile-only client, H100s from the CUDA plugin, each chip's HBM) and
the per-chip memory and FLOPs of the training step and the inference programs (`sizing`)."""

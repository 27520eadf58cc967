"""Flax NNX models built on `sparse_attention.ops`."""

"""Flax NNX models built on `sparse_attention.ops`.

litv2  LITv2 (HiLo attention) image classifier, with a PyTorch state-dict loader.
"""

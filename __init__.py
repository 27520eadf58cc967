"""sparse_attention: fast structured attention for JAX (block-sparse, hierarchical, HiLo).

Subpackages:
  ops             public API: masks, reference ops, block-sparse attention.
  pallas_kernels  Pallas kernels behind the ops (GPU Triton lowering, TPU Mosaic).
  models          Flax NNX modules built on the ops.
  train           training loop, checkpoints, sharding.
  configs         `get_config()` files for train/main.py.
"""

__version__ = "0.1.0"

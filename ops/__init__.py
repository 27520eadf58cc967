"""Public API: block masks, reference attention, block-sparse, HiLo, MoBA and NSA attention.

Every attention op takes `implementation=None | "reference" | "xla" | "pallas"`
(None picks the best available for the platform, as
`jax.nn.dot_product_attention` does).
"""

from sparse_attention.ops import masks
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.decoding import decode_attention
from sparse_attention.ops.hilo import hilo_attention
from sparse_attention.ops.moba import moba_attention
from sparse_attention.ops.nsa import nsa_attention
from sparse_attention.ops.reference import reference_attention
from sparse_attention.ops.rettention import Calibration, calibrate_attention
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes

__all__ = [
  "BlockMask",
  "Calibration",
  "TokenRoutes",
  "block_sparse_attention",
  "calibrate_attention",
  "decode_attention",
  "hilo_attention",
  "masks",
  "moba_attention",
  "nsa_attention",
  "reference_attention",
]

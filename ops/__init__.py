"""Public API: block masks, reference attention, block-sparse, HiLo, MoBA and NSA attention.

Every attention op takes `implementation=None | "reference" | "xla" | "pallas"`
(None picks the best available for the platform, as
`jax.nn.dot_product_attention` does).
"""

from sparse_attention.ops import masks, score_mods
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.block_sparse import IMPLEMENTATIONS as BLOCK_SPARSE_IMPLEMENTATIONS
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.checks import check_values_in_range
from sparse_attention.ops.decoding import decode_attention
from sparse_attention.ops.hilo import IMPLEMENTATIONS as HILO_IMPLEMENTATIONS
from sparse_attention.ops.hilo import hilo_attention, padded_grid
from sparse_attention.ops.kmeans import kmeans, kmeans_inertia, kmeans_plusplus_init
from sparse_attention.ops.moba import IMPLEMENTATIONS as MOBA_IMPLEMENTATIONS
from sparse_attention.ops.moba import chunk_ids, moba_attention, moba_selection, num_chunks
from sparse_attention.ops.nsa import IMPLEMENTATIONS as NSA_IMPLEMENTATIONS
from sparse_attention.ops.nsa import (
  CompressedSlots,
  compress_mean,
  compressed_blocks,
  compressed_slots,
  nsa_attention,
  nsa_selection,
  num_compressed_blocks,
)
from sparse_attention.ops.permuted import PermutedLayout, permuted_attention, permuted_layout
from sparse_attention.ops.reference import reference_attention
from sparse_attention.ops.rettention import Calibration, calibrate_attention
from sparse_attention.ops.sparse_decoding import (
  block_topk_decode_attention,
  moba_decode_attention,
  moba_gate_keys,
  nsa_decode_attention,
)
from sparse_attention.ops.tile_scores import estimate_tile_scores
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes

__all__ = [
  "BLOCK_SPARSE_IMPLEMENTATIONS",
  "HILO_IMPLEMENTATIONS",
  "PermutedLayout",
  "MOBA_IMPLEMENTATIONS",
  "NSA_IMPLEMENTATIONS",
  "BlockMask",
  "Calibration",
  "CompressedSlots",
  "TokenRoutes",
  "block_sparse_attention",
  "block_topk_decode_attention",
  "calibrate_attention",
  "check_values_in_range",
  "chunk_ids",
  "compress_mean",
  "compressed_blocks",
  "compressed_slots",
  "decode_attention",
  "estimate_tile_scores",
  "hilo_attention",
  "kmeans",
  "kmeans_inertia",
  "kmeans_plusplus_init",
  "masks",
  "moba_attention",
  "moba_decode_attention",
  "moba_gate_keys",
  "moba_selection",
  "nsa_attention",
  "nsa_decode_attention",
  "nsa_selection",
  "num_chunks",
  "num_compressed_blocks",
  "padded_grid",
  "permuted_attention",
  "permuted_layout",
  "reference_attention",
  "score_mods",
]

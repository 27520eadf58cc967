"""`estimate_tile_scores`: a tile-level estimate of attention, for dynamic masks.

The dynamic-sparsity builders (`masks.topk_blocks`, `masks.topp_blocks`) rank kv tiles
per q tile by a score. This module computes the usual one from mean-pooled queries and
keys (Kinetics, ZipVL, MoBA's gate): for q tile r and kv tile c,

    score[r, c] = scale * mean(q over tile r) . mean(k over tile c) + log |tile c|

Cost: O(B * S * H * D) to pool plus O(B * H * Qb * Kb * D) for the tile matmul, a
factor block_q * block_kv below dense attention's logits; memory O(B * H * Qb * Kb).

What it estimates, exactly: by bilinearity the first term is the MEAN logit of the
tile's block_q x block_kv pairs, so exp(score) is the tile's attention mass as if every
pair had that mean logit (`log |tile c|` counts a ragged last tile's fewer keys). The
true mass sum(exp(logit)) is at least that (Jensen), with equality only for constant
logits: the estimate is biased against tiles whose logits vary, i.e. a tile holding a
few strongly matching keys among many weak ones ranks lower than its real mass. The
softmax over a row of scores is thus a smoothed, tile-averaged attention map, good for
ranking coherent regions (neighbouring tokens attending alike, as in images, video and
trained LMs), weak for isolated spikes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks
from sparse_attention.ops.block_mask import num_blocks


def _pool(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x [B, S, H, D] -> (tile means float32 [B, H, Sb, D], rows per tile int32 [Sb])."""
  b, s, h, d = x.shape
  sb = num_blocks(s, block)
  xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, sb * block - s), (0, 0), (0, 0)))
  rows = jnp.minimum(s - jnp.arange(sb) * block, block)
  sums = xf.reshape(b, sb, block, h, d).sum(axis=2)
  return jnp.swapaxes(sums / rows[None, :, None, None], 1, 2), rows


def estimate_tile_scores(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  *,
  block_q: int,
  block_kv: int,
  scale: float | None = None,
) -> jax.Array:
  """Tile logits from mean-pooled queries and keys: float32 `[B, Hq, Qb, Kb]`.

  score[b, h, r, c] = scale * mean(q[b, tile r, h]) . mean(k[b, tile c, h // G]) +
  log(keys in tile c) (GQA: query head h reads kv head h // G). See the module
  docstring for what it estimates and its bias. Feed it to `masks.topk_blocks` or
  `masks.topp_blocks` (with the same tiles) for a dynamic mask; no masking here (pass
  causal=True to the builder).

  Args:
    q, k: as `block_sparse_attention`'s (k heads divide q heads).
    block_q, block_kv: the tile sizes (the mask's).
    scale: the logits' scale, default head_dim ** -0.5 (the attention's).
  """
  op = "estimate_tile_scores"
  shape = checks.check_qkv(q, k, k, op)
  for name, x in (("block_q", block_q), ("block_kv", block_kv)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
      raise ValueError(f"{op}: {name} must be an int >= 1, got {x!r}.")
  scale = checks.check_scale(scale, shape, op)
  q_mean, _ = _pool(q, block_q)  # [B, Hq, Qb, D]
  k_mean, k_rows = _pool(k, block_kv)  # [B, Hkv, Kb, D]
  b, hq, qb, d = q_mean.shape
  hkv = k_mean.shape[1]
  q_mean = q_mean.reshape(b, hkv, hq // hkv, qb, d)
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_mean, k_mean, precision=jax.lax.Precision.HIGHEST)
  s = s.reshape(b, hq, qb, -1) * scale
  return s + jnp.log(k_rows.astype(jnp.float32))


__all__ = ["estimate_tile_scores"]

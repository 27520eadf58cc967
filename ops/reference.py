"""The reference attention: the naive O(S^2) definition every kernel must match.

Float32 throughout (matmuls at HIGHEST precision), never fast. It is the oracle
of the tests, and `implementation="reference"` of the ops.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks
from sparse_attention.ops.block_mask import BlockMask

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  *,
  mask: BlockMask | jax.Array | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  score_mod: Any = None,
  score_mod_params: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """softmax(q k^T * scale, masked) v, computed naively in float32.

  Args:
    q, k, v: `[batch, seq, heads, head_dim]`, one float dtype. k/v heads must
      divide q heads (grouped-query attention: q head h reads kv head
      h // (q_heads // kv_heads)). v's head_dim may differ from q/k's.
    mask: None (all visible), a `BlockMask`, or a bool array
      `[batch|1, heads|1, q_len, kv_len]` (True = visible; heads = q heads).
    scale: softmax scale; default `head_dim ** -0.5`.
    return_lse: also return the natural-log logsumexp of the scaled, masked
      scores, float32 `[batch, q_heads, q_len]`.
    score_mod, score_mod_params: as in `block_sparse_attention`: the scaled float32
      scores become `score_mod(score, b, h, q_idx, kv_idx[, score_mod_params])` before
      the mask.

  Returns:
    The output `[batch, q_len, q_heads, v_head_dim]` in q's dtype (and the lse).
    A query with no visible key gets output 0 and lse -inf; outputs and
    gradients stay finite.
  """
  op = "reference_attention"
  shape = checks.check_qkv(q, k, v, op)
  scale = checks.check_scale(scale, shape, op)
  if isinstance(mask, BlockMask):
    mask = checks.check_block_mask(mask, shape, op).to_dense()
  elif mask is not None:
    mask = checks.check_dense_mask(mask, shape, op)

  b, sq, hq, d = q.shape
  g = shape.group
  qf = q.astype(jnp.float32).reshape(b, sq, shape.kv_heads, g, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=_HIGHEST)
  s = s * scale  # [batch, kv_heads, group, q_len, kv_len]
  if score_mod is not None:
    mod = checks.check_score_mod(score_mod, score_mod_params, op)
    bi = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None]
    hi = jnp.arange(hq, dtype=jnp.int32).reshape(1, shape.kv_heads, g, 1, 1)
    qi = jnp.arange(sq, dtype=jnp.int32)[:, None]
    ki = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
    s = mod(s, bi, hi, qi, ki, score_mod_params).astype(jnp.float32)
  if mask is not None:
    bm, hm = mask.shape[:2]
    mask = mask.reshape(bm, shape.kv_heads, g, sq, -1) if hm > 1 else mask[:, :, None]
    s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # empty rows: any finite shift
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)  # [b, hkv, g, q_len]
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=_HIGHEST)
  o = o / jnp.moveaxis(l_safe, -1, 1)[..., None]
  out = o.reshape(b, sq, hq, shape.v_head_dim).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(nonempty, m[..., 0] + jnp.log(l_safe), -jnp.inf)
  return out, lse.reshape(b, hq, sq)

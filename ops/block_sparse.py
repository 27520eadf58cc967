"""`block_sparse_attention`: the public block-sparse attention op."""

from __future__ import annotations

import jax

from sparse_attention.ops import checks
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.block_sparse_xla import block_sparse_attention_xla
from sparse_attention.ops.reference import reference_attention

IMPLEMENTATIONS = ("reference", "xla")


def block_sparse_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: BlockMask,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention over the tiles a `BlockMask` keeps; every other tile is skipped.

  Dense attention is `masks.dense(...)`: the same path with every tile kept.

  Args:
    q, k, v: `[batch, seq, heads, head_dim]`, one dtype (float32, bfloat16 or
      float16). k/v heads must divide q heads (GQA/MQA; never repeated in
      memory). v's head_dim may differ from q/k's.
    mask: a `BlockMask` for exactly (q_len, kv_len); its batch/head dims are 1
      or match q's (heads are query heads).
    scale: softmax scale, default `head_dim ** -0.5`.
    implementation: None (the best available for the platform), "reference"
      (naive O(S^2) float32 oracle) or "xla" (pure JAX, O(S) memory, work
      proportional to the kept tiles; runs on every backend, differentiable).
    return_lse: also return the natural-log logsumexp, float32
      `[batch, q_heads, q_len]`.

  Returns:
    `[batch, q_len, q_heads, v_head_dim]` in q's dtype (and the lse). Queries
    that see no key give 0 and lse -inf, with finite gradients.

  Raises:
    ValueError: on mismatched shapes/dtypes/heads or an unknown
      implementation, before anything is computed.
  """
  op = "block_sparse_attention"
  shape = checks.check_qkv(q, k, v, op)
  checks.check_block_mask(mask, shape, op)
  scale = checks.check_scale(scale, shape, op)
  if implementation is None:
    implementation = "xla"
  if implementation == "reference":
    out, lse = reference_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
  elif implementation == "xla":
    out, lse = block_sparse_attention_xla(q, k, v, mask, scale=scale)
  else:
    raise ValueError(
      f"{op}: implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}."
    )
  return (out, lse) if return_lse else out

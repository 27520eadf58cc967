"""Ready-made score_mods: logit softcapping, ALiBi and T5's relative position bias.

A score_mod is `fn(score, b, h, q_idx, kv_idx[, params]) -> score` on the scaled
float32 logits, before the mask and the softmax (FlexAttention's contract; README,
"Programmable attention"); `block_sparse_attention` and `decode_attention` take one as
`score_mod=` and its learned parameters as `score_mod_params=`. These are the common
ones, written with elementwise `jnp` and indexed parameter reads only, so that every
implementation, the Pallas kernels included, fuses them and differentiates them. The
configured ones are frozen dataclasses: hashable by value, so two equal instances are
one static function to `jit` (no retrace).

    from sparse_attention.ops import block_sparse_attention, masks, score_mods

    out = block_sparse_attention(q, k, v, causal, score_mod=score_mods.Softcap(30.0))
    out = block_sparse_attention(
      q, k, v, docs, score_mod=score_mods.alibi, score_mod_params=slopes  # f32 [q_heads]
    )
    out = block_sparse_attention(
      q, k, v, full, score_mod=score_mods.T5Bias(32, 128), score_mod_params=table  # [32, Hq]
    )
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array, or inside a kernel a tile of one (the mods use operators only)

__all__ = ["Softcap", "T5Bias", "alibi", "alibi_slopes", "t5_bucket"]


@dataclasses.dataclass(frozen=True)
class Softcap:
  """Logit softcapping, `cap * tanh(score / cap)` (Gemma 2: cap 50 on attention logits).

  Squashes the scores smoothly into (-cap, cap); about the identity for |score| << cap.
  """

  cap: float

  def __call__(self, score: Array, b: Array, h: Array, q_idx: Array, kv_idx: Array) -> Array:
    return self.cap * jnp.tanh(score / self.cap)


def alibi(score: Array, b: Array, h: Array, q_idx: Array, kv_idx: Array, slopes: Any) -> Array:
  """ALiBi: `score - slopes[h] * |q_idx - kv_idx|`, a linear distance penalty per head.

  `slopes` (score_mod_params) is float `[q_heads]`, fixed or learned (gradients flow to
  it); ALiBi's paper uses the geometric sequence 2^(-8 (h + 1) / q_heads). Symmetric in
  the distance, so it serves bidirectional attention as well as causal.
  """
  return score - slopes[h] * jnp.abs(q_idx - kv_idx)


def t5_bucket(
  relative: Array, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> Array:
  """T5's relative-position buckets of `relative = kv_idx - q_idx`.

  Bidirectional (T5's encoder): half of the buckets per direction (keys after the
  query: the upper half). Causal (bidirectional=False, T5's decoder): all buckets for
  the distance q_idx - kv_idx >= 0 (keys after the query share bucket 0). In each range
  the first half of its buckets are exact distances 0, 1, ..., the rest log-spaced up to
  `max_distance`, beyond which all distances share the range's last bucket.

  Args:
    relative: int32 relative positions, any shape.
    num_buckets: buckets in all (even; T5 uses 32).
    max_distance: the distance where the last bucket starts (T5 uses 128).
    bidirectional: see above.

  Returns:
    int32 bucket ids in [0, num_buckets), relative's shape.
  """
  if bidirectional:
    span = num_buckets // 2
    bucket = jnp.where(relative > 0, span, 0)
    n = jnp.abs(relative)
  else:
    span, bucket, n = num_buckets, 0, jnp.maximum(-relative, 0)
  exact = span // 2
  log_ratio = jnp.log(jnp.maximum(n, 1) / exact) / np.log(max_distance / exact)
  large = exact + (log_ratio * (span - exact)).astype(jnp.int32)
  return bucket + jnp.where(n < exact, n, jnp.minimum(large, span - 1))


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's geometric slopes 2^(-8 (h + 1) / num_heads), float32 `[num_heads]`."""
  return (2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class T5Bias:
  """T5's relative position bias: `score + table[t5_bucket(kv_idx - q_idx), h]`.

  `table` (score_mod_params) is float `[num_buckets, q_heads]`, learned; a gather per
  score element, which the kernels read from the parameter in memory.
  """

  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True

  def bucket(self, relative: Array) -> Array:
    """`t5_bucket` of `relative` (kv_idx - q_idx) with this bias's configuration."""
    return t5_bucket(relative, self.num_buckets, self.max_distance, self.bidirectional)

  def __call__(
    self, score: Array, b: Array, h: Array, q_idx: Array, kv_idx: Array, table: Any
  ) -> Array:
    return score + table[self.bucket(kv_idx - q_idx), h]

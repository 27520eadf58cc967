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

__all__ = ["Softcap", "T5Bias", "alibi", "t5_bucket"]


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


def t5_bucket(relative: Array, num_buckets: int, max_distance: int) -> Array:
  """T5's bidirectional relative-position buckets of `relative = kv_idx - q_idx`.

  Half of the buckets per direction (keys after the query: the upper half); in each
  half the first quarter of the buckets are exact distances 0, 1, ..., the rest
  log-spaced up to `max_distance`, beyond which all distances share the last bucket.

  Args:
    relative: int32 relative positions, any shape.
    num_buckets: buckets in all (even; T5 uses 32).
    max_distance: the distance where the last bucket starts (T5 uses 128).

  Returns:
    int32 bucket ids in [0, num_buckets), relative's shape.
  """
  half = num_buckets // 2
  bucket = jnp.where(relative > 0, half, 0)
  n = jnp.abs(relative)
  exact = half // 2
  log_ratio = jnp.log(jnp.maximum(n, 1) / exact) / np.log(max_distance / exact)
  large = exact + (log_ratio * (half - exact)).astype(jnp.int32)
  return bucket + jnp.where(n < exact, n, jnp.minimum(large, half - 1))


@dataclasses.dataclass(frozen=True)
class T5Bias:
  """T5's relative position bias: `score + table[t5_bucket(kv_idx - q_idx), h]`.

  `table` (score_mod_params) is float `[num_buckets, q_heads]`, learned; a gather per
  score element, which the kernels read from the parameter in memory.
  """

  num_buckets: int = 32
  max_distance: int = 128

  def bucket(self, relative: Array) -> Array:
    """`t5_bucket` of `relative` (kv_idx - q_idx) with this bias's configuration."""
    return t5_bucket(relative, self.num_buckets, self.max_distance)

  def __call__(
    self, score: Array, b: Array, h: Array, q_idx: Array, kv_idx: Array, table: Any
  ) -> Array:
    return score + table[self.bucket(kv_idx - q_idx), h]

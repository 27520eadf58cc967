"""ops/score_mods.py: the ready-made score_mods by their definitions. Their use through
every implementation (outputs and gradients against float64) is in test_programmable.py
and test_programmable_kernels.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import score_mods

B, H, LQ, LK = 2, 3, 5, 7


def _grid():
  """(score f32 [B, H, LQ, LK], b, h, q_idx, kv_idx) broadcasting against it."""
  score = jax.random.normal(jax.random.key(0), (B, H, LQ, LK)) * 40.0
  b = jnp.arange(B)[:, None, None, None]
  h = jnp.arange(H)[None, :, None, None]
  return score, b, h, jnp.arange(LQ)[:, None] + 3, jnp.arange(LK)[None, :]


def _t5_bucket_by_the_paper(relative: int, num_buckets: int, max_distance: int) -> int:
  """T5's bidirectional bucket of one relative position (kv - q), scalar Python."""
  half = num_buckets // 2
  out = half if relative > 0 else 0
  n, exact = abs(relative), half // 2
  if n < exact:
    return out + n
  large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
  return out + min(large, half - 1)


def test_softcap_squashes_into_the_cap_and_is_hashable_by_value():
  score, *idx = _grid()
  got = score_mods.Softcap(20.0)(score, *idx)
  np.testing.assert_allclose(got, 20.0 * np.tanh(np.asarray(score) / 20.0), rtol=1e-6)
  assert float(jnp.max(jnp.abs(got))) < 20.0
  assert score_mods.Softcap(20.0) == score_mods.Softcap(20.0)
  assert hash(score_mods.Softcap(20.0)) == hash(score_mods.Softcap(20.0))
  assert score_mods.Softcap(20.0) != score_mods.Softcap(30.0)


def test_alibi_subtracts_each_heads_slope_times_the_distance():
  score, b, h, q_idx, kv_idx = _grid()
  slopes = jnp.array([0.5, 0.25, 0.125])
  got = score_mods.alibi(score, b, h, q_idx, kv_idx, slopes)
  distance = np.abs(np.asarray(q_idx) - np.asarray(kv_idx))  # [LQ, LK]
  expected = np.asarray(score) - np.asarray(slopes)[:, None, None] * distance
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64)])
def test_t5_buckets_are_the_papers(num_buckets, max_distance):
  relative = np.arange(-3 * max_distance, 3 * max_distance + 1)
  got = np.asarray(
    score_mods.t5_bucket(jnp.asarray(relative, jnp.int32), num_buckets, max_distance)
  )
  expected = [_t5_bucket_by_the_paper(int(r), num_buckets, max_distance) for r in relative]
  np.testing.assert_array_equal(got, expected)
  # every bucket used but the upper half's first (distance 0 is never a later key)
  assert set(got.tolist()) == set(range(num_buckets)) - {num_buckets // 2}
  bias = score_mods.T5Bias(num_buckets, max_distance)
  np.testing.assert_array_equal(bias.bucket(jnp.asarray(relative)), got)


def test_t5_bias_reads_the_table_at_bucket_and_head():
  score, b, h, q_idx, kv_idx = _grid()
  bias = score_mods.T5Bias(num_buckets=8, max_distance=16)
  table = jax.random.normal(jax.random.key(1), (8, H))
  got = bias(score, b, h, q_idx, kv_idx, table)
  buckets = np.asarray(score_mods.t5_bucket(kv_idx - q_idx, 8, 16))  # [LQ, LK]
  expected = np.asarray(score) + np.moveaxis(np.asarray(table)[buckets], -1, 0)[None]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert score_mods.T5Bias() == score_mods.T5Bias(32, 128)  # T5's configuration


def test_causal_t5_buckets_are_exact_then_log_spaced():
  d = jnp.arange(200)  # q_idx - kv_idx
  bucket = np.asarray(score_mods.t5_bucket(-d, 32, 128, bidirectional=False))
  np.testing.assert_array_equal(bucket[:16], np.arange(16))
  assert np.all(np.diff(bucket) >= 0) and bucket[127] == 31 and np.all(bucket[128:] == 31)
  assert len(np.unique(bucket)) == 32

"""bench/dynamic_sparsity_quality.py's metrics and masks on toy inputs (no training)."""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from absl import flags
from test_permuted import _dense_mask


@pytest.fixture(scope="module")
def dsq():
  sys.path.insert(0, str(testutil.ROOT / "bench"))
  try:
    module = importlib.import_module("dynamic_sparsity_quality")
  finally:
    sys.path.pop(0)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"], known_only=True)
  return module


def _qkv(s=64, hq=4, hkv=2, d=16):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, s, hq, d))
  k = jax.random.normal(keys[1], (2, s, hkv, d))
  v = jax.random.normal(keys[2], (2, s, hkv, d))
  return q, k, v


def test_measure_against_numpy(dsq):
  q, k, v = _qkv()
  s = q.shape[1]
  base = jnp.tril(jnp.ones((s, s), bool))
  probs = dsq.dense_probs(q, k, base)
  o_dense = dsq.reference_attention(q, k, v, mask=base[None, None])
  d, r, e = dsq.measure(q, k, v, probs, o_dense, base[None, None], base)
  np.testing.assert_allclose(d, 1.0, rtol=1e-6)
  np.testing.assert_allclose(r, 1.0, rtol=1e-5)
  np.testing.assert_allclose(e, 0.0, atol=1e-5)
  i = np.arange(s)
  window = (i[:, None] - i[None] <= 4) & (i[:, None] >= i[None])  # causal band of 5
  d, r, e = dsq.measure(q, k, v, probs, o_dense, jnp.asarray(window)[None, None], base)
  p = np.asarray(probs)
  np.testing.assert_allclose(d, window.sum() / (s * (s + 1) / 2), rtol=1e-6)
  np.testing.assert_allclose(r, (p * window).sum(-1).mean(-1), rtol=1e-5)
  assert np.all((np.asarray(e) > 0) & (np.asarray(e) < 2))


def test_permuted_dense_is_the_cluster_mask(dsq):
  q, k, _ = _qkv(s=96)
  layout = dsq.permuted_layout(
    q, k, num_q_clusters=6, num_kv_clusters=10, top_p=0.7, block_q=16, block_kv=16
  )
  keep = np.asarray(dsq.permuted_dense(layout))
  np.testing.assert_array_equal(keep, _dense_mask(layout))  # tests/test_permuted.py's
  np.testing.assert_allclose(keep.mean((2, 3)), layout.density(), rtol=1e-6)


def test_sweep_and_tables(dsq):
  q, k, v = _qkv(s=64, hq=2, hkv=2)
  results = dsq.sweep(
    [(q, k, v)], causal=False, block=8, windows=(1, 2), topk=(1, 4, 8), clusters=((4, 8),), grid=8
  )
  rows = dsq.summarise(results)
  methods = dsq.methods_of(rows)
  assert methods == ["window", "top-k", "top-p", "oracle", "permuted 4/8"]
  topk = [(d, r) for m, _, d, r, _ in rows if m == "top-k"]
  np.testing.assert_allclose([d for d, _ in topk], [1 / 8, 4 / 8, 1.0], rtol=1e-6)
  assert topk[0][1] < topk[1][1] < topk[2][1] and abs(topk[2][1] - 1) < 1e-5
  r, _ = dsq.at_density(rows, "top-k", 0.3125)  # halfway between k=1 and k=4
  np.testing.assert_allclose(r, (topk[0][1] + topk[1][1]) / 2, rtol=1e-6)
  assert np.isnan(dsq.at_density(rows, "window", 0.99)[0])
  assert "permuted 4/8" in dsq.equal_density_table(rows)
  assert "L0 @ 0.3" in dsq.per_layer_table(results)

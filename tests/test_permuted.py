"""permuted_attention: clustered, permuted block-sparse attention equals dense attention
under the same cluster-pair mask (outputs and gradients); the layout's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import permuted_attention, permuted_layout, reference_attention

KW = dict(num_q_clusters=5, num_kv_clusters=7, top_p=0.6, iterations=4, block_q=16, block_kv=16)


def _inputs(q_len=60, kv_len=72, heads=4, kv_heads=2, dim=8, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  # Tokens from a few directions, shuffled: similar tokens lie far apart.
  centers = rng.standard_normal((6, dim)) * 2
  make = lambda n, h: centers[rng.integers(0, 6, (2, n, h))] + rng.standard_normal((2, n, h, dim))
  q, k, v = (
    make(q_len, heads),
    make(kv_len, kv_heads),
    rng.standard_normal((2, kv_len, kv_heads, dim)),
  )
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _dense_mask(layout):
  """bool [B, Hq, Sq, Sk] in the ORIGINAL token order, in NumPy."""
  q_order, q_cluster = np.asarray(layout.q_order), np.asarray(layout.q_cluster)
  kv_cluster, keep = np.asarray(layout.kv_cluster), np.asarray(layout.keep)
  b, hq, sq = q_order.shape
  group = hq // layout.kv_order.shape[1]
  kv_order = np.repeat(np.asarray(layout.kv_order), group, axis=1)
  qc, kc = np.zeros_like(q_cluster), np.zeros_like(kv_cluster)  # cluster per original token
  np.put_along_axis(qc, q_order, q_cluster, axis=-1)
  np.put_along_axis(kc, kv_order, kv_cluster, axis=-1)
  bi, hi = np.arange(b)[:, None, None, None], np.arange(hq)[None, :, None, None]
  return keep[bi, hi, qc[..., :, None], kc[..., None, :]]


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_equals_dense_attention_under_the_cluster_mask(implementation):
  q, k, v = _inputs()
  interpret = implementation != "xla"
  out, layout = permuted_attention(
    q, k, v, implementation=implementation, interpret=interpret, return_layout=True, **KW
  )
  visible = jnp.asarray(_dense_mask(layout))
  want = reference_attention(q, k, v, mask=visible)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  density = np.asarray(layout.density())
  np.testing.assert_allclose(density, np.asarray(visible).mean(axis=(2, 3)), rtol=1e-6)
  assert 0.05 < density.mean() < 0.95  # sparse, and not empty

  ct = jax.random.normal(jax.random.key(1), out.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * ct)
  ours = loss(lambda q, k, v: permuted_attention(
    q, k, v, implementation=implementation, interpret=interpret, **KW))  # fmt: skip
  dense = loss(lambda q, k, v: reference_attention(q, k, v, mask=visible))
  got, want = jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_layout_sorts_tokens_by_cluster_and_skips_tiles():
  q, k, _ = _inputs(q_len=256, kv_len=256, heads=2, kv_heads=2)
  layout = permuted_layout(q, k, **KW)
  for order in (layout.q_order, layout.kv_order):  # permutations
    np.testing.assert_array_equal(
      np.sort(np.asarray(order), -1), np.broadcast_to(np.arange(256), order.shape)
    )
  assert np.all(np.diff(np.asarray(layout.q_cluster), axis=-1) >= 0)
  assert np.all(np.asarray(layout.keep).any(-1) | (np.asarray(layout.keep).sum(-1) == 0))
  kept_tiles = np.asarray(layout.mask.kv_count).sum() / np.prod(layout.mask.kv_count.shape) / 16
  assert kept_tiles < 0.9  # clusters pair up sparsely: whole tiles are skipped


def test_top_p_one_keeps_every_pair():
  q, k, v = _inputs()
  out, layout = permuted_attention(q, k, v, return_layout=True, **{**KW, "top_p": 1.0})
  np.testing.assert_allclose(np.asarray(layout.density()), 1.0)
  np.testing.assert_allclose(out, reference_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(num_q_clusters=0), "num_q_clusters must be an int >= 1"),
    (dict(num_kv_clusters=100), r"num_kv_clusters must be an int >= 1 and <= 72"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(iterations=-1), "iterations must be an int >= 0"),
  ],
)
def test_bad_arguments_are_named(change, match):
  q, k, v = _inputs()
  with pytest.raises(ValueError, match=match):
    permuted_attention(q, k, v, **{**KW, **change})

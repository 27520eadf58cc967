"""The reference op against independent oracles, its edge cases and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import masks, reference_attention


def numpy_attention(q, k, v, mask, scale):
  """float64 attention with explicit loops over heads; -inf lse for empty rows."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, sq, hq, _ = q.shape
  group = hq // k.shape[2]
  out = np.zeros((b, sq, hq, v.shape[-1]))
  lse = np.full((b, hq, sq), -np.inf)
  for bi in range(b):
    for h in range(hq):
      s = q[bi, :, h] @ k[bi, :, h // group].T * scale
      vis = np.broadcast_to(mask[min(bi, mask.shape[0] - 1), min(h, mask.shape[1] - 1)], s.shape)
      for i in range(sq):
        if vis[i].any():
          row = s[i][vis[i]]
          m = row.max()
          p = np.exp(row - m)
          lse[bi, h, i] = m + np.log(p.sum())
          out[bi, i, h] = (p / p.sum()) @ v[bi, :, h // group][vis[i]]
  return out, lse


@pytest.mark.parametrize("q_heads, kv_heads, v_dim", [(4, 4, 16), (4, 2, 8), (6, 1, 16)])
def test_matches_numpy_with_masks_gqa_and_empty_rows(q_heads, kv_heads, v_dim):
  q, k, v = testutil.qkv(2, 37, 29, q_heads, kv_heads, 16, v_dim)
  rng = np.random.default_rng(0)
  mask = rng.random((2, q_heads, 37, 29)) < 0.3
  mask[:, :, 5] = False  # empty rows
  out, lse = reference_attention(q, k, v, mask=jnp.asarray(mask), scale=0.3, return_lse=True)
  e_out, e_lse = numpy_attention(q, k, v, mask, 0.3)
  np.testing.assert_allclose(np.asarray(out), e_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), e_lse, atol=1e-5, rtol=1e-5)
  assert (np.asarray(out)[:, 5] == 0).all() and np.isneginf(np.asarray(lse)[:, :, 5]).all()


def test_matches_jax_dot_product_attention():
  q, k, v = testutil.qkv(2, 64, 64, 4, 2, 32)
  for is_causal in (False, True):
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
    mask = masks.causal(64, 64, block_q=16, block_kv=16) if is_causal else None
    np.testing.assert_allclose(
      reference_attention(q, k, v, mask=mask), expected, atol=2e-5, rtol=2e-5
    )


def test_block_mask_equals_its_dense_mask():
  q, k, v = testutil.qkv(1, 50, 70, 2, 2, 8)
  m = masks.sliding_window(50, 70, window=(9, 3), block_q=16, block_kv=32)
  a = reference_attention(q, k, v, mask=m)
  b = reference_attention(q, k, v, mask=m.to_dense())
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_empty_rows_have_finite_gradients(dtype):
  q, k, v = testutil.qkv(1, 16, 16, 2, 1, 8, dtype=dtype)
  mask = masks.causal(16, 16, block_q=4, block_kv=4, offset=-4)  # rows 0-3 see nothing

  def loss(q, k, v):
    out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert (np.asarray(out[:, :4], np.float32) == 0).all()
  assert np.isneginf(np.asarray(lse[:, :, :4])).all()
  for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
    assert np.isfinite(np.asarray(g, np.float32)).all()
  assert (np.asarray(jax.grad(loss)(q, k, v)[:, :4], np.float32) == 0).all()


@pytest.mark.parametrize(
  "shapes, dtypes, mask, match",
  [
    (((1, 8, 2, 4), (1, 8, 2), (1, 8, 2, 4)), None, None, "k must have rank 4"),
    (((1, 8, 2, 4), (1, 8, 2, 4), (1, 9, 2, 4)), None, None, "lengths differ"),
    (((1, 8, 3, 4), (1, 8, 2, 4), (1, 8, 2, 4)), None, None, "must divide"),
    (((1, 8, 2, 4), (1, 8, 2, 6), (1, 8, 2, 4)), None, None, "head_dim"),
    (((2, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4)), None, None, "batch"),
    (((1, 8, 2, 4), (1, 8, 1, 4), (1, 8, 2, 4)), None, None, "head counts differ"),
    (((1, 8, 2, 4),) * 3, ("float32", "bfloat16", "float32"), None, "one dtype"),
    (((1, 8, 2, 4),) * 3, ("int32",) * 3, None, "dtype int32"),
    (((1, 8, 2, 4),) * 3, None, np.ones((1, 1, 8, 9), bool), "must end in"),
    (((1, 8, 2, 4),) * 3, None, np.ones((1, 3, 8, 8), bool), "heads"),
    (((1, 8, 2, 4),) * 3, None, np.ones((1, 1, 8, 8), np.int32), "must be bool"),
    (((1, 8, 2, 4),) * 3, None, masks.causal(8, 16, block_q=4, block_kv=4), "kv_len=16"),
  ],
)
def test_bad_inputs_raise(shapes, dtypes, mask, match):
  dtypes = dtypes or ("float32",) * 3
  q, k, v = (jnp.zeros(s, d) for s, d in zip(shapes, dtypes, strict=True))
  with pytest.raises(ValueError, match=match):
    reference_attention(q, k, v, mask=mask)

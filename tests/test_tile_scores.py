"""estimate_tile_scores: the tiles' mean logit (+ log of their keys) from pooled q and k,
checked against the mean over each tile's pairs in NumPy; and what it ranks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import estimate_tile_scores, masks


@pytest.mark.parametrize("q_len, kv_len, block_q, block_kv", [(64, 64, 16, 16), (50, 70, 16, 32)])
def test_equals_the_mean_logit_of_each_tile(q_len, kv_len, block_q, block_kv):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, q_len, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, kv_len, 2, 8)).astype(np.float32)  # GQA: 2 q heads per kv head
  got = estimate_tile_scores(jnp.asarray(q), jnp.asarray(k), block_q=block_q, block_kv=block_kv)
  logits = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, 2, axis=2).astype(np.float64)) / np.sqrt(8)
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  assert got.shape == (2, 4, qb, kb) and got.dtype == jnp.float32
  for r in range(qb):
    for c in range(kb):
      tile = logits[:, :, r * block_q : (r + 1) * block_q, c * block_kv : (c + 1) * block_kv]
      want = tile.mean(axis=(2, 3)) + np.log(tile.shape[3])
      np.testing.assert_allclose(got[:, :, r, c], want, atol=1e-5, rtol=1e-5)


def test_top_p_of_the_estimate_finds_a_coherent_match():
  """Queries of tile 2 match the keys of tile 5 (a shared direction): the estimate's
  top-p mask keeps that tile for them."""
  rng = np.random.default_rng(1)
  q = rng.standard_normal((1, 128, 1, 16)).astype(np.float32) * 0.3
  k = rng.standard_normal((1, 128, 1, 16)).astype(np.float32) * 0.3
  direction = rng.standard_normal(16).astype(np.float32)
  q[0, 32:48, 0] += 2 * direction
  k[0, 80:96, 0] += 2 * direction
  scores = estimate_tile_scores(jnp.asarray(q), jnp.asarray(k), block_q=16, block_kv=16)
  m = masks.topp_blocks(scores, 0.5, block_q=16, block_kv=16, q_len=128, kv_len=128)
  assert int(m.kv_count[0, 0, 2]) == 1 and int(m.kv_index[0, 0, 2, 0]) == 5


def test_bad_arguments_are_named():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match="block_kv must be an int >= 1"):
    estimate_tile_scores(q, q, block_q=8, block_kv=0)
  with pytest.raises(ValueError, match="k/v heads"):
    estimate_tile_scores(q, jnp.zeros((1, 16, 3, 8)), block_q=8, block_kv=8)
  jax.jit(lambda q: estimate_tile_scores(q, q, block_q=8, block_kv=8))(q)  # traced inputs

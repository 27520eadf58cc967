"""decode_attention: new tokens against a KV cache with per-row fill, split KV ranges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import decode_attention, reference_attention
from sparse_attention.ops.decoding import decode_mask, default_num_splits


def _inputs(batch=3, n=4, heads=4, kv_heads=2, dim=16, capacity=300, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, n, heads, dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, capacity, kv_heads, dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, capacity, kv_heads, dim)), dtype)
  return q, k, v


def _visible(lengths, n, capacity, window):
  """bool [B, n, capacity] in NumPy: new token i of row b at lengths[b] + i."""
  pos = np.asarray(lengths)[:, None] + np.arange(n)[None]  # [B, n]
  j = np.arange(capacity)[None, None]
  seen = j <= pos[..., None]
  if window is not None:
    seen &= j >= pos[..., None] - window
  return seen


def _expected(q, k, v, lengths, window):
  mask = _visible(lengths, q.shape[1], k.shape[1], window)[:, None]
  return reference_attention(q, k, v, mask=jnp.asarray(mask), return_lse=True)


@pytest.mark.parametrize(
  "window, n, implementation, all_splits",
  [(None, 1, "xla", (1, 7)), (50, 4, "xla", (2,)), (None, 4, "reference", (3,))],
)
def test_equals_masked_attention_for_every_split(window, n, implementation, all_splits):
  q, k, v = _inputs(n=n)
  capacity = k.shape[1]
  lengths = jnp.array([0, 130, capacity - n])  # empty cache, mid-tile, full cache
  want, want_lse = _expected(q, k, v, lengths, window)
  for splits in all_splits:
    out, lse = decode_attention(
      q, k, v, lengths, window=window, num_splits=splits, block_kv=32,
      implementation=implementation, return_lse=True,
    )  # fmt: skip
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6, err_msg=f"splits {splits}")
    np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=2e-6, err_msg=f"splits {splits}")


def test_bfloat16_and_gradients_through_the_merge():
  q, k, v = _inputs(n=2, dtype=jnp.bfloat16)
  lengths = jnp.array([5, 64, 200])
  want, _ = _expected(q, k, v, lengths, None)
  out = decode_attention(q, k, v, lengths, num_splits=3, block_kv=32, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=2e-2)

  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  mask = jnp.asarray(_visible(lengths, 2, k.shape[1], None))[:, None]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ours = loss(lambda q, k, v: decode_attention(q, k, v, lengths, num_splits=3, block_kv=32))
  theirs = loss(lambda q, k, v: reference_attention(q, k, v, mask=mask))
  for g, h in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, h, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_the_mask_lists_only_the_tiles_up_to_the_fill(window):
  lengths = np.array([0, 31, 32, 100, 290])
  n, capacity, bk, splits = 3, 300, 32, 3
  mask = decode_mask(jnp.asarray(lengths), n, capacity, num_splits=splits, window=window,
                     block_kv=bk)  # fmt: skip
  dense = np.asarray(mask.to_dense())[:, 0]  # [B, splits * n, capacity]
  want = _visible(lengths, n, capacity, window)
  # Each new token's splits together see exactly its keys, each key in one split.
  per_split = dense.reshape(len(lengths), splits, n, capacity)
  np.testing.assert_array_equal(per_split.sum(1), want.astype(int))
  # Work follows the fill: the listed tiles are those holding a visible key.
  visited, _ = mask.block_layout()
  tiles = np.asarray(visited)[:, 0].any(1)  # [B, Kb]
  want_tiles = np.pad(want.any(1), ((0, 0), (0, -capacity % bk))).reshape(len(lengths), -1, bk)
  np.testing.assert_array_equal(tiles, want_tiles.any(-1))
  # Both views agree.
  q_view = np.zeros_like(np.asarray(visited))
  b, _, kb, _ = mask.q_index.shape
  for bi in range(b):
    for j in range(kb):
      for slot in range(int(mask.q_count[bi, 0, j])):
        q_view[bi, 0, mask.q_index[bi, 0, j, slot], j] = True
  np.testing.assert_array_equal(q_view, np.asarray(visited))


def test_new_fill_levels_never_retrace():
  q, k, v = _inputs(n=1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, lengths):
    return decode_attention(q, k, v, lengths, num_splits=2, block_kv=32)

  for lengths in ([0, 1, 2], [100, 7, 299], [64, 64, 64]):
    lengths = jnp.array(lengths)
    want, _ = _expected(q, k, v, lengths, None)
    np.testing.assert_allclose(step(q, k, v, lengths), want, atol=2e-6, rtol=2e-6)


def test_default_splits_fill_a_gpu_and_stay_one_on_xla():
  assert default_num_splits(1, 8, 131072, 128, "xla") == 1
  assert default_num_splits(1, 8, 131072, 128, "pallas_triton") == 33  # 8 * 33 >= 264
  assert default_num_splits(64, 32, 131072, 128, "pallas_triton") == 1
  assert default_num_splits(1, 1, 256, 128, "pallas_triton") == 2  # no more than tiles


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(lengths=jnp.array([0, 1])), r"lengths must be an int array \[batch\] = \[3\]"),
    (dict(lengths=jnp.array([0.0, 1.0, 2.0])), "lengths must be integers"),
    (dict(lengths=jnp.array([0, 1, 297])), r"lengths must lie in \[0, 296\]"),
    (dict(lengths=jnp.array([-1, 1, 2])), r"lengths must lie in"),
    (dict(window=-1), "window must be None or an int >= 0"),
    (dict(num_splits=0), "num_splits must be an int >= 1"),
    (dict(block_kv=0), "block_kv must be an int >= 1"),
  ],
)
def test_bad_arguments_are_named(change, match):
  q, k, v = _inputs()
  args = dict(lengths=jnp.array([0, 1, 2]), window=None, num_splits=1, block_kv=32)
  args.update(change)
  lengths = args.pop("lengths")
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, lengths, **args)

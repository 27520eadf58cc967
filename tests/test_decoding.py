"""decode_attention: new tokens against a KV cache with per-row fill, split KV ranges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import block_sparse_attention, decode_attention, reference_attention
from sparse_attention.ops.decoding import _merge, decode_mask, default_num_splits


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


@pytest.mark.parametrize("window, n", [(None, 1), (50, 4)])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_masked_attention(window, n, implementation):
  q, k, v = _inputs(n=n, capacity=1100)  # the xla path's chunks: 1024 + a clamped one
  capacity = k.shape[1]
  lengths = jnp.array([0, 1030, capacity - n])  # empty cache, second chunk, full cache
  want, want_lse = _expected(q, k, v, lengths, window)
  out, lse = decode_attention(
    q, k, v, lengths, window=window, implementation=implementation, return_lse=True
  )
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("window, splits", [(None, 1), (None, 7), (50, 3)])
def test_split_kv_ranges_merged_by_lse(window, splits):
  """What the kernels run: the queries repeated per split against the split mask
  (here through the xla engine of block_sparse_attention), merged by lse."""
  q, k, v = _inputs(n=4)
  b, n, hq, _ = q.shape
  capacity = k.shape[1]
  lengths = jnp.array([0, 130, capacity - n])
  want, want_lse = _expected(q, k, v, lengths, window)
  mask = decode_mask(lengths, n, capacity, num_splits=splits, window=window, block_kv=32)
  repeated = jnp.tile(q, (1, splits, 1, 1))
  out, lse = block_sparse_attention(repeated, k, v, mask, implementation="xla", return_lse=True)
  out, lse = _merge(out.reshape(b, splits, n, hq, -1), lse.reshape(b, hq, splits, n))
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(lse, want_lse, atol=2e-6, rtol=2e-6)


def test_bfloat16_and_gradients_through_the_merge():
  q, k, v = _inputs(n=2, dtype=jnp.bfloat16)
  lengths = jnp.array([5, 64, 200])
  want, _ = _expected(q, k, v, lengths, None)
  out = decode_attention(q, k, v, lengths, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=2e-2)

  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  mask = jnp.asarray(_visible(lengths, 2, k.shape[1], None))[:, None]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ours = loss(lambda q, k, v: decode_attention(q, k, v, lengths))
  theirs = loss(lambda q, k, v: reference_attention(q, k, v, mask=mask))
  for g, h in zip(
    jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v), strict=True
  ):
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
    return decode_attention(q, k, v, lengths)

  for lengths in ([0, 1, 2], [100, 7, 299], [64, 64, 64]):
    lengths = jnp.array(lengths)
    want, _ = _expected(q, k, v, lengths, None)
    np.testing.assert_allclose(step(q, k, v, lengths), want, atol=2e-6, rtol=2e-6)


def test_default_splits_fill_a_gpu():
  assert default_num_splits(1, 8, 131072, 128) == 33  # 8 * 33 >= 264 programs
  assert default_num_splits(64, 32, 131072, 128) == 1
  assert default_num_splits(1, 1, 256, 128) == 2  # no more than the tiles


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(lengths=jnp.array([0, 1])), r"lengths must be an int array \[batch\] = \[3\]"),
    (dict(lengths=jnp.array([0.0, 1.0, 2.0])), "lengths must be integers"),
    (dict(lengths=jnp.array([0, 1, 297])), r"lengths must lie in \[0, 296\]"),
    (dict(lengths=jnp.array([-1, 1, 2])), r"lengths must lie in"),
    (dict(window=-1), "window must be None or an int >= 0"),
    (dict(num_splits=0), "num_splits must be None or an int >= 1"),
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


@pytest.mark.parametrize(
  "implementation, dtype, n, window, block_kv",
  [
    ("pallas_triton", jnp.float32, 1, None, 32),  # 1 token padded to a 16-row split
    ("pallas_triton", jnp.float32, 4, 50, 32),
    ("pallas_mosaic_gpu", jnp.bfloat16, 3, None, 64),  # padded to 64 rows
    ("pallas_tpu", jnp.float32, 2, None, 128),  # padded to 8 rows
  ],
)
def test_kernels_split_the_cache_and_merge(implementation, dtype, n, window, block_kv):
  """The interpreted kernels (Triton, Mosaic GPU, TPU simulator) run the split mask,
  its mask_mod reading the fill levels; default splits (2 waves) and 3 explicit."""
  q, k, v = _inputs(batch=2, n=n, dim=64 if "mosaic" in implementation else 32, capacity=256,
                    dtype=dtype)  # fmt: skip
  lengths = jnp.array([3, 256 - n])
  want, want_lse = _expected(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, window)
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  for splits in (None, 3):
    out, lse = decode_attention(
      q, k, v, lengths, window=window, num_splits=splits, block_kv=block_kv,
      implementation=implementation, interpret=True, return_lse=True,
    )  # fmt: skip
    np.testing.assert_allclose(out.astype(np.float32), want, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)


def _alibi_softcap(score, b, h, q_idx, kv_idx, slopes):
  del b
  return 20.0 * jnp.tanh((score + slopes[h] * (kv_idx - q_idx)) / 20.0)


def test_score_mod_sees_absolute_positions():
  """ALiBi (learned slopes) + softcapping: q_idx is the new token's position in the
  sequence, as in the full forward; NumPy float64 oracle; slopes get gradients."""
  q, k, v = _inputs(n=3, capacity=200)
  lengths = jnp.array([0, 77, 197])
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)  # GQA 4 / 2
  s = np.einsum("bnhd,bchd->bhnc", q64, k64) / np.sqrt(q.shape[-1])
  pos = np.asarray(lengths)[:, None] + np.arange(3)  # [B, n]
  rel = np.arange(200)[None, None, None] - pos[:, None, :, None]  # [B, 1, n, C]
  s = 20.0 * np.tanh((s + np.asarray(slopes)[None, :, None, None] * rel) / 20.0)
  s = np.where(rel <= 0, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhnc,bchd->bnhd", p / p.sum(-1, keepdims=True), v64)
  outs = {}
  for impl in ("xla", "reference"):
    f = lambda q, slopes, impl=impl: decode_attention(
      q, k, v, lengths, implementation=impl, score_mod=_alibi_softcap, score_mod_params=slopes
    )
    outs[impl] = f(q, slopes)
    np.testing.assert_allclose(outs[impl], want, atol=2e-5, rtol=2e-5, err_msg=impl)
    outs[impl + " grad"] = jax.grad(lambda q, s, f=f: jnp.sum(jnp.sin(f(q, s))), (0, 1))(q, slopes)
  for g, h in zip(outs["xla grad"], outs["reference grad"], strict=True):
    np.testing.assert_allclose(g, h, atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(outs["xla grad"][1]).max()) > 0
  out = decode_attention(
    q, k, v, lengths, implementation="pallas_triton", interpret=True, block_kv=32,
    num_splits=2, score_mod=_alibi_softcap, score_mod_params=slopes,
  )  # fmt: skip
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5, err_msg="triton")

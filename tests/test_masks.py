"""Mask builders against brute-force dense masks, invariants, errors, jit."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import element_masks, masks

SETTINGS = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
lengths = st.integers(1, 200)
blocks = st.sampled_from([1, 7, 16, 32, 48, 64])


def dense_of(mask) -> np.ndarray:
  return np.asarray(mask.to_dense())


def check_full_and_partial_tiles(mask, dense: np.ndarray) -> None:
  """Full tiles are entirely visible; every listed tile of an exact predicate
  mask holds a visible pair (classification is exact for bands and chunks)."""
  visited, full = map(np.asarray, mask.block_layout())
  for pos in np.ndindex(visited.shape):
    b, h, i, j = pos
    tile = dense[
      min(b, dense.shape[0] - 1),
      min(h, dense.shape[1] - 1),
      i * mask.block_q : (i + 1) * mask.block_q,
      j * mask.block_kv : (j + 1) * mask.block_kv,
    ]
    if full[pos]:
      assert tile.all(), f"tile {pos} marked full has hidden pairs"
    if not visited[pos]:
      assert not tile.any(), f"tile {pos} not listed but has visible pairs"


@SETTINGS
@hypothesis.given(q_len=lengths, kv_len=lengths, block_q=blocks, block_kv=blocks)
def test_dense(q_len, kv_len, block_q, block_kv):
  m = masks.dense(q_len, kv_len, block_q=block_q, block_kv=block_kv)
  testutil.check_invariants(m)
  assert dense_of(m).shape == (1, 1, q_len, kv_len) and dense_of(m).all()
  assert m.max_kv_blocks == m.num_kv_blocks


@SETTINGS
@hypothesis.given(
  q_len=lengths, kv_len=lengths, block_q=blocks, block_kv=blocks, offset=st.integers(-50, 50)
)
def test_causal(q_len, kv_len, block_q, block_kv, offset):
  m = masks.causal(q_len, kv_len, block_q=block_q, block_kv=block_kv, offset=offset)
  testutil.check_invariants(m)
  expected = testutil.brute_band(q_len, kv_len, None, offset)
  np.testing.assert_array_equal(dense_of(m)[0, 0], expected)
  check_full_and_partial_tiles(m, expected[None, None])


@SETTINGS
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=blocks,
  block_kv=blocks,
  left=st.integers(0, 80),
  right=st.integers(0, 80),
  causal=st.booleans(),
  as_pair=st.booleans(),
)
def test_sliding_window(q_len, kv_len, block_q, block_kv, left, right, causal, as_pair):
  if as_pair:
    right = 0 if causal else right
    window = (left, right)
  else:
    window, right = left, 0 if causal else left
  m = masks.sliding_window(
    q_len, kv_len, window=window, causal=causal, block_q=block_q, block_kv=block_kv
  )
  testutil.check_invariants(m)
  expected = testutil.brute_band(q_len, kv_len, -left, right)
  np.testing.assert_array_equal(dense_of(m)[0, 0], expected)
  check_full_and_partial_tiles(m, expected[None, None])


@SETTINGS
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=blocks,
  block_kv=blocks,
  chunk=st.integers(1, 90),
  causal=st.booleans(),
)
def test_chunked(q_len, kv_len, block_q, block_kv, chunk, causal):
  m = masks.chunked(q_len, kv_len, chunk=chunk, causal=causal, block_q=block_q, block_kv=block_kv)
  testutil.check_invariants(m)
  expected = testutil.brute_chunk(q_len, kv_len, chunk, causal)
  np.testing.assert_array_equal(dense_of(m)[0, 0], expected)
  visited, full = map(np.asarray, m.block_layout())
  assert not (full & ~visited).any()


@hypothesis.settings(SETTINGS, max_examples=10)
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=blocks,
  block_kv=blocks,
  window=st.integers(0, 60),
  num_anchors=st.integers(0, 4),
  offset=st.integers(-10, 1000),
)
def test_window_with_anchors(q_len, kv_len, block_q, block_kv, window, num_anchors, offset):
  kb = -(-kv_len // block_kv)
  hypothesis.assume(num_anchors <= kb)
  m = masks.window_with_anchors(
    q_len,
    kv_len,
    window=window,
    num_anchors=num_anchors,
    offset=offset,
    block_q=block_q,
    block_kv=block_kv,
  )
  testutil.check_invariants(m)
  anchors = {(offset + a * kb // num_anchors) % kb for a in range(num_anchors)}
  _, j = testutil.positions(q_len, kv_len)
  expected = testutil.brute_band(q_len, kv_len, -window, window) | np.isin(
    j // block_kv, list(anchors)
  )
  np.testing.assert_array_equal(dense_of(m)[0, 0], expected)
  assert m.max_kv_blocks <= kb


def test_anchors_rotate_without_recompiling():
  build = jax.jit(
    chex.assert_max_traces(
      lambda off: masks.window_with_anchors(
        1024, 1024, window=64, num_anchors=2, offset=off, block_q=64, block_kv=64
      ),
      n=1,
    )
  )
  a, b = build(jnp.int32(0)), build(jnp.int32(3))
  chex.assert_trees_all_equal_shapes(a, b)
  visited_a, visited_b = np.asarray(a.block_layout()[0]), np.asarray(b.block_layout()[0])
  # Anchor columns moved by 3 blocks; the window stayed.
  assert visited_a[0, 0, 8, 0] and not visited_b[0, 0, 8, 0] and visited_b[0, 0, 8, 3]


@SETTINGS
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=blocks,
  block_kv=blocks,
  bm=st.sampled_from([1, 2]),
  hm=st.sampled_from([1, 3]),
  density=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**16),
)
def test_from_layout(q_len, kv_len, block_q, block_kv, bm, hm, density, seed):
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  layout = np.random.default_rng(seed).random((bm, hm, qb, kb)) < density
  m = masks.from_layout(layout, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)
  testutil.check_invariants(m)
  assert m.batch_heads == (bm, hm) and m.max_kv_blocks == kb and m.max_q_blocks == qb
  np.testing.assert_array_equal(
    dense_of(m), testutil.brute_layout(layout, q_len, kv_len, block_q, block_kv)
  )
  # The same layout on device, under jit, gives the same mask.
  jitted = jax.jit(
    lambda lay: masks.from_layout(
      lay, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len
    )
  )(layout)
  chex.assert_trees_all_equal(jitted, m)


def brute_topk(scores, k, q_len, kv_len, block_q, block_kv, keep_diagonal, causal):
  scores = np.array(scores, np.float64)
  q_lo = np.arange(scores.shape[-2]) * block_q
  q_hi = np.minimum(q_lo + block_q, q_len) - 1
  k_lo = np.arange(scores.shape[-1]) * block_kv
  k_hi = np.minimum(k_lo + block_kv, kv_len) - 1
  if causal:
    scores[..., k_lo[None, :] > q_hi[:, None]] = -np.inf
  if keep_diagonal:
    diag = (k_lo[None, :] <= q_hi[:, None]) & (q_lo[:, None] <= k_hi[None, :])
    scores[..., diag] = np.inf
  layout = np.zeros(scores.shape, bool)
  for pos in np.ndindex(scores.shape[:-1]):
    row = scores[pos]
    best = np.argsort(-row, kind="stable")[:k]
    layout[pos + (best[row[best] > -np.inf],)] = True
  dense = testutil.brute_layout(layout, q_len, kv_len, block_q, block_kv)
  if causal:
    dense &= testutil.brute_band(q_len, kv_len, None, 0)
  return dense


@hypothesis.settings(SETTINGS, max_examples=6)
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=st.sampled_from([16, 32]),
  block_kv=st.sampled_from([16, 32]),
  k=st.integers(1, 13),
  keep_diagonal=st.booleans(),
  causal=st.booleans(),
  seed=st.integers(0, 99),
)
def test_topk_blocks(q_len, kv_len, block_q, block_kv, k, keep_diagonal, causal, seed):
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  hypothesis.assume(k <= kb)
  if keep_diagonal:
    hypothesis.assume(k >= 3)  # a q block overlaps at most 3 kv blocks here
  scores = np.random.default_rng(seed).standard_normal((2, 1, qb, kb)).astype(np.float32)
  m = masks.topk_blocks(
    jnp.asarray(scores),
    k,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    keep_diagonal=keep_diagonal,
    causal=causal,
  )
  testutil.check_invariants(m)
  assert m.max_kv_blocks <= k
  expected = brute_topk(scores, k, q_len, kv_len, block_q, block_kv, keep_diagonal, causal)
  np.testing.assert_array_equal(dense_of(m), expected)


def brute_topp(scores, p, q_len, kv_len, block_q, block_kv, min_blocks, cap, keep_diagonal, causal):
  """ZipVL's rule row by row in float64: blocks by decreasing softmax mass (diagonal
  first), kept while the mass before them is below p (at least min_blocks, at most cap)."""
  scores = np.array(scores, np.float64)
  q_hi = np.minimum(np.arange(scores.shape[-2]) * block_q + block_q, q_len) - 1
  q_lo = np.arange(scores.shape[-2]) * block_q
  k_lo = np.arange(scores.shape[-1]) * block_kv
  k_hi = np.minimum(k_lo + block_kv, kv_len) - 1
  if causal:
    scores[..., k_lo[None, :] > q_hi[:, None]] = -np.inf
  diag = (k_lo[None, :] <= q_hi[:, None]) & (q_lo[:, None] <= k_hi[None, :])
  layout = np.zeros(scores.shape, bool)
  for pos in np.ndindex(scores.shape[:-1]):
    row = scores[pos]
    finite = row > -np.inf
    mass = np.zeros_like(row)
    if finite.any():
      mass[finite] = np.exp(row[finite] - row[finite].max())
      mass /= mass.sum()
    forced = diag[pos[-1]] if keep_diagonal else np.zeros_like(finite)
    order = sorted(range(len(row)), key=lambda j: (not forced[j], not finite[j], -mass[j], j))
    kept_mass = 0.0
    for rank, j in enumerate(order[:cap]):
      if forced[j] or (finite[j] and (kept_mass < p or p >= 1 or rank < min_blocks)):
        layout[pos + (j,)] = True
        kept_mass += mass[j]
  dense = testutil.brute_layout(layout, q_len, kv_len, block_q, block_kv)
  if causal:
    dense &= testutil.brute_band(q_len, kv_len, None, 0)
  return dense


@hypothesis.settings(SETTINGS, max_examples=6)
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block=st.sampled_from([16, 32]),
  p=st.sampled_from([0.3, 0.6, 0.9, 0.99, 1.0]),
  min_blocks=st.integers(1, 3),
  capped=st.booleans(),
  keep_diagonal=st.booleans(),
  causal=st.booleans(),
  temperature=st.sampled_from([0.3, 1.0, 4.0]),
  seed=st.integers(0, 99),
)
def test_topp_blocks(q_len, kv_len, block, p, min_blocks, capped, keep_diagonal, causal,
                     temperature, seed):  # fmt: skip
  qb, kb = -(-q_len // block), -(-kv_len // block)
  cap = min(kb, 4) if capped else kb
  hypothesis.assume(min_blocks <= cap and (not keep_diagonal or cap >= 2))
  rng = np.random.default_rng(seed)
  scores = (rng.standard_normal((2, 2, qb, kb)) * temperature).astype(np.float32)
  geo = dict(block_q=block, block_kv=block, q_len=q_len, kv_len=kv_len)
  m = masks.topp_blocks(
    jnp.asarray(scores), p, min_blocks=min_blocks, max_blocks=cap if capped else None,
    keep_diagonal=keep_diagonal, causal=causal, **geo,
  )  # fmt: skip
  testutil.check_invariants(m)
  assert m.max_kv_blocks == cap
  args = (q_len, kv_len, block, block, min_blocks, cap, keep_diagonal, causal)
  expected = brute_topp(scores, p, *args)
  np.testing.assert_array_equal(dense_of(m), expected)


def test_topp_adapts_the_tiles_to_how_peaked_a_row_is():
  """A peaked row keeps one tile, a flat one most of them; p is traced (no retrace)."""
  peaked = jnp.array([10.0] + [0.0] * 15)
  flat = jnp.zeros(16)
  scores = jnp.stack([peaked, flat])[None, None]  # [1, 1, 2, 16]
  geo = dict(block_q=8, block_kv=8, q_len=16, kv_len=128)
  build = jax.jit(lambda p: masks.topp_blocks(scores, p, **geo).kv_count)
  np.testing.assert_array_equal(np.asarray(build(0.9))[0, 0], [1, 15])
  np.testing.assert_array_equal(np.asarray(build(0.5))[0, 0], [1, 8])
  assert build._cache_size() == 1


def test_topp_errors_name_the_argument():
  scores = jnp.zeros((1, 1, 2, 4))
  geo = dict(block_q=8, block_kv=8, q_len=16, kv_len=32)
  for kwargs, match in [
    (dict(p=0.0), r"p must be in \(0, 1\]"),
    (dict(p=0.5, max_blocks=5), "max_blocks=5 exceeds"),
    (dict(p=0.5, min_blocks=3, max_blocks=2), "min_blocks=3 exceeds max_blocks=2"),
  ]:
    with pytest.raises(ValueError, match=match):
      masks.topp_blocks(scores, **kwargs, **geo)


def test_topk_drops_minus_inf_and_nan():
  scores = jnp.array([[[[1.0, -jnp.inf, jnp.nan, 2.0]]]])
  m = masks.topk_blocks(scores, 4, block_q=8, block_kv=8, q_len=8, kv_len=32)
  assert int(m.kv_count[0, 0, 0]) == 2
  np.testing.assert_array_equal(np.asarray(m.kv_index[0, 0, 0, :2]), [0, 3])


@hypothesis.settings(SETTINGS, max_examples=6)
@hypothesis.given(
  q_len=lengths,
  kv_len=lengths,
  block_q=blocks,
  block_kv=blocks,
  window=st.integers(0, 50),
  chunk=st.integers(1, 70),
  seed=st.integers(0, 99),
)
def test_union_and_intersection(q_len, kv_len, block_q, block_kv, window, chunk, seed):
  geo = dict(block_q=block_q, block_kv=block_kv)
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  layout = np.random.default_rng(seed).random((1, 2, qb, kb)) < 0.3
  parts = [
    masks.causal(q_len, kv_len, **geo),
    masks.sliding_window(q_len, kv_len, window=window, **geo),
    masks.chunked(q_len, kv_len, chunk=chunk, **geo),
    masks.from_layout(layout, q_len=q_len, kv_len=kv_len, **geo),
  ]
  dense = [dense_of(p) for p in parts]
  for combine, reduce in ((masks.union, np.logical_or), (masks.intersection, np.logical_and)):
    m = combine(*parts)
    testutil.check_invariants(m)
    assert m.batch_heads == (1, 2)
    expected = reduce.reduce(np.broadcast_arrays(*dense))
    np.testing.assert_array_equal(dense_of(m), expected)
    check_full_and_partial_tiles(m, expected)
  # Layout masks combine with any one mask whose mask_fn is partial-only.
  ti = masks.intersection(parts[0], parts[3])
  np.testing.assert_array_equal(dense_of(masks.union(ti, parts[3])), dense[3] | dense_of(ti))


def test_union_refuses_ambiguous_mask_fns():
  geo = dict(block_q=16, block_kv=16)
  layout = np.ones((1, 1, 4, 4), bool)
  partial_only = masks.intersection(
    masks.causal(64, 64, **geo), masks.from_layout(layout, q_len=64, kv_len=64, **geo)
  )
  with pytest.raises(ValueError, match="mask_fn"):
    masks.union(partial_only, masks.sliding_window(64, 64, window=3, **geo))


def test_combine_errors():
  a = masks.causal(64, 64, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match="block_kv"):
    masks.union(a, masks.causal(64, 64, block_q=16, block_kv=32))
  with pytest.raises(ValueError, match="kv_len"):
    masks.intersection(a, masks.causal(64, 80, block_q=16, block_kv=16))
  b2 = masks.from_layout(np.ones((2, 1, 4, 4), bool), block_q=16, block_kv=16, q_len=64, kv_len=64)
  b3 = masks.from_layout(np.ones((3, 1, 4, 4), bool), block_q=16, block_kv=16, q_len=64, kv_len=64)
  with pytest.raises(ValueError, match="batch"):
    masks.union(b2, b3)
  with pytest.raises(ValueError, match="at least one"):
    masks.union()


def test_element_mask_simplification():
  band = element_masks.all_of(element_masks.Band(None, 0), element_masks.Band(-5, 3))
  assert band == element_masks.Band(-5, 0)
  assert element_masks.any_of(band, band) == band
  with pytest.raises(ValueError, match="lower"):
    element_masks.Band(3, 1)


def test_repr_is_readable():
  r = repr(masks.causal(1000, 1000, block_q=100, block_kv=50))
  for part in ("q_len=1000", "blocks=100x50", "grid=10x20", "block_density=0.550", "Band"):
    assert part in r, r
  traced = jax.jit(
    lambda lay: repr(masks.from_layout(lay, block_q=8, block_kv=8, q_len=16, kv_len=16)) and 0
  )
  traced(jnp.ones((1, 1, 2, 2), bool))  # repr of a traced mask must not fail


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: masks.dense(64, 64, block_q=0, block_kv=16), "block_q"),
    (lambda: masks.causal(64, 64, block_q=16, block_kv=-1), "block_kv"),
    (lambda: masks.causal(0, 64), "q_len"),
    (lambda: masks.causal(64, 64, block_q=16.0), "block_q"),
    (lambda: masks.sliding_window(64, 64, window=-1), "window"),
    (lambda: masks.sliding_window(64, 64, window=(3, 2), causal=True), "causal"),
    (lambda: masks.sliding_window(64, 64, window=(3, -2)), r"window\[1\]"),
    (lambda: masks.chunked(64, 64, chunk=0), "chunk"),
    (lambda: masks.window_with_anchors(64, 64, window=4, num_anchors=9, block_kv=8), "num_anchors"),
    (lambda: masks.window_with_anchors(64, 64, window=4, num_anchors=1, offset=1.5), "offset"),
    (
      lambda: masks.from_layout(
        np.ones((4, 4), bool), block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "rank 4",
    ),
    (
      lambda: masks.from_layout(
        np.ones((1, 1, 4, 5), bool), block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "last two dims",
    ),
    (
      lambda: masks.from_layout(
        np.ones((1, 1, 4, 4), np.float32), block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "dtype",
    ),
    (
      lambda: masks.from_layout(
        np.ones((1, 1, 4, 4), bool), block_q=16, block_kv=16, q_len=64, kv_len=64, max_kv_blocks=2
      ),
      "max_kv_blocks",
    ),
    (
      lambda: masks.topk_blocks(
        jnp.zeros((1, 1, 4, 4)), 5, block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "k=5",
    ),
    (
      lambda: masks.topk_blocks(
        jnp.zeros((1, 1, 4, 4)), 0, block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "k must",
    ),
    (
      lambda: masks.topk_blocks(
        jnp.zeros((1, 1, 4, 4)), 1, block_q=16, block_kv=8, q_len=64, kv_len=32, keep_diagonal=True
      ),
      "diagonal",
    ),
    (
      lambda: masks.topk_blocks(
        jnp.zeros((1, 1, 4, 4), jnp.int32), 1, block_q=16, block_kv=16, q_len=64, kv_len=64
      ),
      "floating",
    ),
  ],
)
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_layout_overflow_raises_when_run():
  build = jax.jit(
    lambda lay: (
      masks.from_layout(lay, block_q=16, block_kv=16, q_len=64, kv_len=64, max_kv_blocks=2).kv_count
    )
  )
  build(jnp.eye(4, dtype=bool)[None, None]).block_until_ready()  # 1 block per row: fine
  with pytest.raises(Exception, match="max_kv_blocks"):
    build(jnp.ones((1, 1, 4, 4), bool)).block_until_ready()


def test_builders_cost_tiles_not_elements():
  """At S = 128k an O(S^2) mask would need 16 G elements; builders must not."""
  s, blk = 131072, 128
  geo = dict(block_q=blk, block_kv=blk)
  n = s // blk
  c = masks.causal(s, s, **geo)
  assert c.max_kv_blocks == n and int(c.kv_count[0, 0, -1]) == n
  w = masks.sliding_window(s, s, window=1000, causal=True, **geo)
  assert w.max_kv_blocks == 9
  scores = jax.random.normal(jax.random.PRNGKey(0), (1, 1, n, n))
  t = masks.topk_blocks(scores, 8, q_len=s, kv_len=s, causal=True, keep_diagonal=True, **geo)
  assert t.max_kv_blocks == 8 and int(t.kv_count.max()) == 8
  a = masks.window_with_anchors(s, s, window=512, num_anchors=4, offset=5, **geo)
  assert int(a.q_count.max()) == n


def test_from_element_mask_takes_any_element_mask():
  """A user's own element mask (call + classify) gives the exact dense mask, with full,
  partial and skipped tiles classified; the built-in Band equals sliding_window."""

  class EveryOtherKey:
    """Key j visible iff j is even and j <= i (causal)."""

    def __call__(self, q_pos, kv_pos):
      return (kv_pos % 2 == 0) & (kv_pos <= q_pos)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi):
      first_even = kv_lo + kv_lo % 2  # ranges are inclusive
      any_ = first_even <= np.minimum(kv_hi, q_hi)
      return any_, np.zeros_like(any_)  # never all visible: odd keys are hidden

  m = masks.from_element_mask(EveryOtherKey(), 50, 40, block_q=16, block_kv=8)
  testutil.check_invariants(m)
  i, j = np.arange(50)[:, None], np.arange(40)[None, :]
  np.testing.assert_array_equal(dense_of(m)[0, 0], (j % 2 == 0) & (j <= i))
  band = element_masks.Band(-5, 0)
  np.testing.assert_array_equal(
    dense_of(masks.from_element_mask(band, 50, 40, block_q=16, block_kv=8)),
    dense_of(masks.sliding_window(50, 40, window=5, causal=True, block_q=16, block_kv=8)),
  )

"""NSA attention: the reference against a NumPy float64 oracle written from the
semantics, the xla path against the reference (outputs and gradients of every input),
the selection rule, compress_mean and input validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import checks, nsa

# Small geometry, the paper's l=32, d=16, l'=64 scaled down by 4 (w shortened).
GEO = dict(block_len=8, stride=4, select_len=16, num_select=4, window=24)
# Nothing divides anything: compressed blocks straddle selection blocks unevenly.
ODD_GEO = dict(block_len=6, stride=4, select_len=10, num_select=3, window=7)
GEO_NAMES = ("block_len", "stride", "select_len", "num_select", "window")


def make_inputs(b, lq, lk, hq, hkv, d, dv, geo=GEO, dtype=jnp.float32, seed=0):
  """q [B, Lq, Hq, D] (the last Lq positions), k, v, k_cmp, v_cmp (random, as from a
  learned phi) and gates in [0, 1]."""
  nc = nsa.num_compressed_blocks(lk, geo["block_len"], geo["stride"])
  q, k, v = testutil.qkv(b, lk, lk, hq, hkv, d, dv, seed=seed)
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
  k_cmp = jax.random.normal(keys[0], (b, nc, hkv, d))
  v_cmp = jax.random.normal(keys[1], (b, nc, hkv, dv))
  gates = jax.random.uniform(keys[2], (b, lq, hq, 3))
  arrays = (q[:, lk - lq :], k, v, k_cmp, v_cmp, gates)
  return tuple(x.astype(dtype) for x in arrays)


# ---------------------------------------------------------------------------
# The oracle: NumPy float64, loops over batch / kv head / query, from the definition.
# ---------------------------------------------------------------------------


def _softmax_attend(qv, keys, values, scale):
  if len(keys) == 0:
    return np.zeros(values.shape[-1])
  s = keys @ qv * scale
  p = np.exp(s - s.max())
  return (p / p.sum()) @ values


def run_starts(segment_ids, b_, lk):
  """int [B, Lk]: the first position of each position's run of equal ids (0 without)."""
  starts = np.zeros((b_, lk), int)
  if segment_ids is None:
    return starts
  seg = np.asarray(segment_ids)
  for b in range(b_):
    for p in range(1, lk):
      starts[b, p] = starts[b, p - 1] if seg[b, p] == seg[b, p - 1] else p
  return starts


def numpy_nsa(
  q,
  k,
  v,
  k_cmp,
  v_cmp,
  gates,
  *,
  block_len,
  stride,
  select_len,
  num_select,
  window,
  segment_ids=None,
):
  """Returns (out, (o_cmp, o_slc, o_win), kept) with kept[b, h, i] the sorted block ids.

  Packed sequences (segment_ids): query t sees only keys of its own run [r, t] (r the
  run's start) and both block grids restart at r: compressed block j of the run covers
  [r + j*stride, r + j*stride + block_len) and sits in slot r // stride + j of k_cmp,
  selection block m covers [r + m*select_len, r + (m+1)*select_len) and the ids are
  the m; window keys max(t - w + 1, r) .. t."""
  q, k, v, k_cmp, v_cmp, gates = (np.asarray(x, np.float64) for x in (q, k, v, k_cmp, v_cmp, gates))
  b_, lq, hq, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g_ = hq // hkv
  nc, ns = k_cmp.shape[1], -(-lk // select_len)
  scale = d**-0.5
  branches = np.zeros((3, b_, lq, hq, dv))
  kept = {}
  starts = run_starts(segment_ids, b_, lk)
  for b in range(b_):
    for h in range(hkv):
      for i in range(lq):
        t = lk - lq + i
        r = starts[b, t]
        tr = t - r  # the position in the run: the grids are the run's
        blocks = [j for j in range(nc) if j * stride + block_len - 1 <= tr]
        seen = [r // stride + j for j in blocks]  # their slots in k_cmp
        # Importance of selection block m, summed over the group's query heads.
        score = np.zeros(ns)
        for g in range(g_):
          if not seen:
            continue
          s = k_cmp[b, seen, h] @ q[b, i, h * g_ + g] * scale
          p = np.exp(s - s.max())
          p /= p.sum()
          for j, pc in zip(blocks, p, strict=True):
            for m in range(ns):
              lo = max(j * stride, m * select_len)
              hi = min(j * stride + block_len, (m + 1) * select_len)
              score[m] += pc * max(0, hi - lo) / block_len
        eligible = [m for m in range(ns) if m * select_len <= tr]
        own = tr // select_len
        forced = sorted({0, own} | ({own - 1} if own - 1 in eligible else set()))
        others = sorted((m for m in eligible if m not in forced), key=lambda m: (-score[m], m))
        chosen = sorted(forced + others[: num_select - len(forced)])
        kept[b, h, i] = chosen
        slc = [
          p for m in chosen for p in range(r + m * select_len, r + (m + 1) * select_len) if p <= t
        ]
        win = [p for p in range(lk) if max(t - window, r - 1) < p <= t]
        for g in range(g_):
          hh = h * g_ + g
          qv = q[b, i, hh]
          branches[0, b, i, hh] = _softmax_attend(qv, k_cmp[b, seen, h], v_cmp[b, seen, h], scale)
          branches[1, b, i, hh] = _softmax_attend(qv, k[b, slc, h], v[b, slc, h], scale)
          branches[2, b, i, hh] = _softmax_attend(qv, k[b, win, h], v[b, win, h], scale)
  out = np.einsum("blhx,xblhd->blhd", gates, branches)
  return out, tuple(branches), kept


def selection_of(q, k_cmp, lk, geo):
  sel = {x: geo[x] for x in ("block_len", "stride", "select_len", "num_select")}
  ids, valid = nsa.nsa_selection(q, k_cmp, lk=lk, **sel)
  return np.asarray(ids), np.asarray(valid)


# (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, geometry)
ORACLE_CASES = {
  "gqa2_ragged": (2, 101, 101, 4, 2, 16, 8, GEO),
  "mqa_group4": (1, 97, 97, 4, 1, 8, 8, GEO),
  "mha_dv_wider": (1, 83, 83, 2, 2, 8, 12, GEO),
  "decode_5_of_101": (2, 5, 101, 4, 2, 16, 8, GEO),
  "decode_1_of_64": (1, 1, 64, 4, 4, 8, 8, GEO),
  "odd_geometry": (1, 61, 67, 4, 2, 8, 4, ODD_GEO),
  "no_compressed_block": (1, 6, 7, 2, 1, 8, 8, GEO),  # Lk < l: Nc = 0
}


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_reference_matches_numpy_oracle(name):
  *dims, geo = ORACLE_CASES[name]
  arrays = make_inputs(*dims, geo=geo, seed=len(name))
  lk = dims[2]
  out, branches = nsa.nsa_attention(
    *arrays, implementation="reference", return_branches=True, **geo
  )
  e_out, e_branches, kept = numpy_nsa(*arrays, **geo)
  ids, valid = selection_of(arrays[0], arrays[3], lk, geo)
  for (b, h, i), chosen in kept.items():
    got = ids[b, h, i][valid[b, h, i]].tolist()
    assert got == chosen, (name, b, h, i, got, chosen)
  for what, a, e in zip(("cmp", "slc", "win"), branches, e_branches, strict=True):
    testutil.assert_close(a, e, jnp.float32, "out", f"{name} {what}")
  testutil.assert_close(out, e_out, jnp.float32, "out", f"{name} out")
  assert out.shape == arrays[0].shape[:3] + (dims[-1],)


def test_early_queries_see_no_compressed_block():
  geo = GEO
  arrays = make_inputs(1, 40, 40, 2, 1, 8, 8, geo=geo)
  for impl in ("reference", "xla"):
    _, (o_cmp, o_slc, o_win) = nsa.nsa_attention(
      *arrays, implementation=impl, return_branches=True, **geo
    )
    first_visible = geo["block_len"] - 1  # t = l - 1 sees block 0
    assert (np.asarray(o_cmp)[:, :first_visible] == 0).all()
    assert (np.abs(np.asarray(o_cmp)[:, first_visible:]) > 0).any(axis=-1).all()
    assert np.isfinite(np.asarray(o_slc)).all() and np.isfinite(np.asarray(o_win)).all()


# ---------------------------------------------------------------------------
# xla vs reference: outputs and gradients of all six inputs.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _loss_grads(arrays, ct, implementation, geo_items, interpret, tuning, segment_ids=None):
  """Module-level jit: tests with the same shapes and statics share one compilation.
  `tuning` (the xla path's step sizes) only keys the cache: tests monkeypatch them."""
  del tuning

  def loss(*xs):
    out = nsa.nsa_attention(
      *xs,
      segment_ids=segment_ids,
      implementation=implementation,
      interpret=interpret,
      **dict(geo_items),
    )
    return jnp.sum(out.astype(jnp.float32) * ct), out

  return jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(*arrays)


def outputs_and_grads(arrays, implementation, geo, seed=1, interpret=False, segment_ids=None):
  """Output and the gradients of all six inputs of a random linear loss."""
  b, lq, hq = arrays[0].shape[:3]
  ct = jax.random.normal(jax.random.PRNGKey(seed), (b, lq, hq, arrays[2].shape[-1]))
  tuning = (nsa._CHUNK_ELEMENTS, nsa._XLA_STEP_SCORES, nsa._SLC_BLOCK_Q)
  statics = (implementation, tuple(sorted(geo.items())), interpret, tuning)
  grads, out = _loss_grads(tuple(arrays), ct, *statics, segment_ids)
  return out, grads


def assert_xla_matches_reference(arrays, geo, what, segment_ids=None):
  dtype = arrays[0].dtype
  out, grads = outputs_and_grads(arrays, "xla", geo, segment_ids=segment_ids)
  r_out, r_grads = outputs_and_grads(arrays, "reference", geo, segment_ids=segment_ids)
  assert out.dtype == dtype
  testutil.assert_close(out, r_out, dtype, "out", f"{what} out")
  names = ("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")
  for name, g, r, x in zip(names, grads, r_grads, arrays, strict=True):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    testutil.assert_close(g, r, dtype, "grad", f"{what} {name}")


XLA_CASES = {
  "gqa2": (2, 101, 101, 4, 2, 16, 8, GEO),
  "decode": (2, 9, 101, 4, 2, 16, 8, GEO),
  "odd_geometry": (1, 61, 67, 4, 2, 8, 4, ODD_GEO),
  "no_compressed_block": (1, 6, 7, 2, 1, 8, 8, GEO),
}


@pytest.mark.parametrize("name", list(XLA_CASES))
def test_xla_matches_reference_f32(name):
  *dims, geo = XLA_CASES[name]
  assert_xla_matches_reference(make_inputs(*dims, geo=geo, seed=3), geo, name)


def test_xla_matches_reference_bf16():
  *dims, geo = XLA_CASES["decode"]
  arrays = make_inputs(*dims, geo=geo, dtype=jnp.bfloat16, seed=4)
  assert_xla_matches_reference(arrays, geo, "decode")


def test_xla_small_steps(monkeypatch):
  """Many chunks / row groups / slots per loop, ragged everywhere."""
  monkeypatch.setattr(nsa, "_CHUNK_ELEMENTS", 4096)
  monkeypatch.setattr(nsa, "_XLA_STEP_SCORES", 4096)
  monkeypatch.setattr(nsa, "_SLC_BLOCK_Q", 3)
  geo = dict(GEO, window=13)
  assert_xla_matches_reference(make_inputs(2, 70, 77, 4, 2, 8, 8, geo=geo, seed=5), geo, "small")


def test_branches_and_gates():
  arrays = make_inputs(1, 40, 40, 2, 1, 8, 8)  # as above: compilations are reused
  for impl in ("reference", "xla"):
    out, branches = nsa.nsa_attention(*arrays, implementation=impl, return_branches=True, **GEO)
    g = np.asarray(arrays[-1])
    mixed = sum(g[..., i : i + 1] * np.asarray(o) for i, o in enumerate(branches))
    testutil.assert_close(out, mixed, jnp.float32, "out", impl)


def test_no_gradient_through_selection():
  """With the compression gate at 0, k_cmp only feeds the (discrete) selection."""
  *dims, geo = XLA_CASES["decode"]  # the shapes of a test above: its compilations are reused
  q, k, v, k_cmp, v_cmp, gates = make_inputs(*dims, geo=geo, seed=3)
  arrays = (q, k, v, k_cmp, v_cmp, gates.at[..., 0].set(0.0))
  for impl in ("reference", "xla"):
    d_kcmp = outputs_and_grads(arrays, impl, geo)[1][3]
    assert (np.asarray(d_kcmp) == 0).all(), impl


def test_default_is_xla_and_jits():
  arrays = make_inputs(1, 40, 40, 2, 1, 8, 8)
  a = nsa.nsa_attention(*arrays, **GEO)
  b = nsa.nsa_attention(*arrays, implementation="xla", **GEO)
  c = jax.jit(lambda *xs: nsa.nsa_attention(*xs, **GEO))(*arrays)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  testutil.assert_close(c, a, jnp.float32, "out")


def _xla_temp_bytes(seq_len: int) -> int:
  shapes = [(1, seq_len, 4, 16), (1, seq_len, 2, 16), (1, seq_len, 2, 16)]
  nc = nsa.num_compressed_blocks(seq_len, 32, 16)
  shapes += [(1, nc, 2, 16), (1, nc, 2, 16), (1, seq_len, 4, 3)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  f = jax.jit(lambda *xs: nsa.nsa_attention(*xs, window=128, num_select=4))
  return f.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_xla_memory_is_not_quadratic():
  small, large = _xla_temp_bytes(1024), _xla_temp_bytes(4096)
  assert large < 6 * small, (small, large)  # O(L^2) would be 16x


# ---------------------------------------------------------------------------
# Packed sequences (segment_ids).
# ---------------------------------------------------------------------------

# select_len 8: the 37-key first run spans blocks 0..4, so the top-n has a real choice.
PACKED_GEO = dict(block_len=8, stride=4, select_len=8, num_select=4, window=12)


def packed_ids(lk, *runs):
  """int32 [len(runs), lk]: row b holds runs[b], a list of (id, length) filling lk."""
  rows = [np.concatenate([np.full(n, i) for i, n in row]) for row in runs]
  assert all(len(r) == lk for r in rows)
  return jnp.asarray(np.stack(rows), jnp.int32)


# Row 0: runs starting at 0, 37 (aligned to neither grid: compressed blocks straddle it)
# and 50, the first run's id reused by the third. Row 1: a start at 21.
PACKED_ROWS = ([(5, 37), (2, 13), (5, 30)], [(0, 21), (1, 59)])


@pytest.mark.parametrize("lq", [80, 20])
def test_packed_reference_matches_numpy_oracle(lq):
  geo = PACKED_GEO
  arrays = make_inputs(2, lq, 80, 4, 2, 8, 8, geo=geo, seed=lq)
  seg = packed_ids(80, *PACKED_ROWS)
  out, branches = nsa.nsa_attention(
    *arrays, segment_ids=seg, implementation="reference", return_branches=True, **geo
  )
  e_out, e_branches, kept = numpy_nsa(*arrays, segment_ids=seg, **geo)
  sel = {x: geo[x] for x in ("block_len", "stride", "select_len", "num_select")}
  ids, valid = map(
    np.asarray, nsa.nsa_selection(arrays[0], arrays[3], lk=80, segment_ids=seg, **sel)
  )
  for (b, h, i), chosen in kept.items():
    got = ids[b, h, i][valid[b, h, i]].tolist()
    assert got == chosen, (lq, b, h, i, got, chosen)
  for what, a, e in zip(("cmp", "slc", "win"), branches, e_branches, strict=True):
    testutil.assert_close(a, e, jnp.float32, "out", f"packed {what}")
  testutil.assert_close(out, e_out, jnp.float32, "out", "packed out")


@pytest.mark.parametrize("lq", [80, 23])  # 23: the compressed branch's rows get a pad
def test_packed_xla_matches_reference(lq):
  arrays = make_inputs(2, lq, 80, 4, 2, 8, 8, geo=PACKED_GEO, seed=6)
  seg = packed_ids(80, *PACKED_ROWS)
  assert_xla_matches_reference(arrays, PACKED_GEO, f"packed lq={lq}", segment_ids=seg)


def oracle_slots(segment_ids, lk, block_len, stride):
  """(start, run_start, valid) int/int/bool [B, Nc] from the definition: each run's
  complete blocks [r + j*stride, r + j*stride + block_len) in slots r // stride + j."""
  nc = nsa.num_compressed_blocks(lk, block_len, stride)
  starts = run_starts(segment_ids, len(segment_ids), lk)
  start = np.tile(np.arange(nc) * stride, (len(segment_ids), 1))
  run, valid = start.copy(), np.zeros(start.shape, bool)
  for b in range(len(segment_ids)):
    for r in sorted(set(starts[b])):
      end = r + int(np.sum(starts[b] == r))  # the run is [r, end)
      for j in range((end - r - block_len) // stride + 1 if end - r >= block_len else 0):
        c = r // stride + j
        assert not valid[b, c], "two blocks in one slot"
        start[b, c], run[b, c], valid[b, c] = r + j * stride, r, True
  return start, run, valid


@pytest.mark.parametrize(
  "lk, block_len, stride, runs",
  [
    (80, 8, 4, PACKED_ROWS),
    (61, 7, 3, ([(0, 3), (1, 11), (2, 9), (3, 38)], [(4, 61)], [(1, 2), (2, 1), (1, 58)])),
    (40, 5, 5, ([(0, 4), (1, 36)], [(0, 5), (1, 6), (2, 29)])),
  ],
)
def test_compressed_slots_and_compress_mean(lk, block_len, stride, runs):
  """compressed_slots and compress_mean with segment_ids against their definition."""
  seg = packed_ids(lk, *runs)
  geo = dict(block_len=block_len, stride=stride)
  slots = nsa.compressed_slots(lk, segment_ids=seg, **geo)
  for got, expected in zip(slots, oracle_slots(seg, lk, **geo), strict=True):
    np.testing.assert_array_equal(got, np.where(slots.valid, expected, got))
  np.testing.assert_array_equal(slots.valid, oracle_slots(seg, lk, **geo)[2])
  k = testutil.qkv(len(runs), lk, lk, 1, 2, 4)[1]
  got = nsa.compress_mean(k, segment_ids=seg, **geo)
  kn, start = np.asarray(k, np.float64), np.asarray(slots.start)
  expected = np.zeros(got.shape)
  for b, c in zip(*np.nonzero(np.asarray(slots.valid)), strict=True):
    expected[b, c] = kn[b, start[b, c] : start[b, c] + block_len].mean(axis=0)
  testutil.assert_close(got, expected, jnp.float32, "out")
  plain = nsa.compressed_slots(lk, **geo)  # no segments: the global grid
  np.testing.assert_array_equal(plain.start[0], np.arange(slots.start.shape[1]) * stride)
  assert bool(jnp.all(plain.valid)) and not bool(jnp.any(plain.run_start))


# A 40-token sequence packed at several offsets (of which 3 and 17 are multiples of
# neither the stride 4 nor select_len 8; 40 of both), between other segments: row b
# holds (segment id, length) runs, the sequence being the run of id 9. Row 2 reuses id 1
# on both sides of another run (two segments).
ALONE_LEN, ALONE_ROWS = (
  40,
  (
    [(9, 40), (1, 56)],
    [(1, 3), (9, 40), (2, 20), (3, 33)],
    [(1, 10), (2, 7), (9, 40), (1, 39)],
    [(1, 25), (2, 15), (9, 40), (3, 16)],
  ),
)
ALONE_OFFSETS = (0, 3, 17, 40)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _helper_loss_grads(implementation, geo_items, interpret, q, k, v, gates, ct, segment_ids):
  """Output and gradients of sum(out * ct) in (q, k, v, gates) with k_cmp / v_cmp from
  compress_mean(segment_ids) (so dk, dv include the compressed path) and in additive
  zero deltas on k_cmp, v_cmp (the gradients of the compressed keys / values)."""
  geo = dict(geo_items)
  cmp = functools.partial(
    nsa.compress_mean, block_len=geo["block_len"], stride=geo["stride"], segment_ids=segment_ids
  )

  def loss(q, k, v, gates, dkc, dvc):
    out = nsa.nsa_attention(
      q, k, v, cmp(k) + dkc, cmp(v) + dvc, gates, segment_ids=segment_ids,
      implementation=implementation, interpret=interpret, **geo,
    )  # fmt: skip
    return jnp.sum(out * ct), out

  kc, vc = jax.eval_shape(cmp, k), jax.eval_shape(cmp, v)
  zeros = jnp.zeros(kc.shape, kc.dtype), jnp.zeros(vc.shape, vc.dtype)
  grads, out = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(q, k, v, gates, *zeros)
  return out, grads


@pytest.mark.parametrize(
  "implementation",
  [
    "reference",
    "xla",
    # The TPU kernel's packed path equals the reference in
    # test_pallas_packed_matches_reference; interpreting it here too costs ~20 s.
    pytest.param("pallas_triton", marks=pytest.mark.slow),
  ],
)
def test_packed_segment_equals_alone(implementation):
  """A segment packed at any offset, between other segments, gives the outputs and the
  gradients (q, k, v, gates; k_cmp / v_cmp by compress_mean with segment_ids) of the
  same sequence alone: both block grids restart at the segment start."""
  geo, n, lk = PACKED_GEO, ALONE_LEN, 96  # 5 selection blocks: a real top-n choice
  interpret = implementation.startswith("pallas")
  seg = packed_ids(lk, *ALONE_ROWS)
  b = len(ALONE_ROWS)
  # The sequence (row 0 of `alone`) inside random packed rows.
  q, k, v, _, _, gates = make_inputs(b, lk, lk, 4, 2, 8, 8, geo=geo, seed=11)
  alone = make_inputs(1, n, n, 4, 2, 8, 8, geo=geo, seed=12)
  ct = jax.random.normal(jax.random.PRNGKey(13), (b, lk, 4, 8))
  ct_alone = jax.random.normal(jax.random.PRNGKey(14), (1, n, 4, 8))
  for row, o in enumerate(ALONE_OFFSETS):
    q, k, v, gates, ct = (
      x.at[row, o : o + n].set(x1[0])
      for x, x1 in ((q, alone[0]), (k, alone[1]), (v, alone[2]), (gates, alone[5]), (ct, ct_alone))
    )
  geo_items = tuple(sorted(geo.items()))
  out, grads = _helper_loss_grads(implementation, geo_items, interpret, q, k, v, gates, ct, seg)
  a_in = (alone[0], alone[1], alone[2], alone[5], ct_alone, None)
  a_out, a_grads = _helper_loss_grads(implementation, geo_items, interpret, *a_in)
  names = ("dq", "dk", "dv", "dgates", "dk_cmp", "dv_cmp")
  nc = nsa.num_compressed_blocks(n, geo["block_len"], geo["stride"])
  for row, o in enumerate(ALONE_OFFSETS):
    what = f"{implementation} offset {o}"
    testutil.assert_close(out[row, o : o + n], a_out[0], jnp.float32, "out", what)
    for name, g, a in zip(names, grads, a_grads, strict=True):
      if name in ("dk_cmp", "dv_cmp"):  # the sequence's blocks: slots o // stride + j
        got = g[row, o // geo["stride"] : o // geo["stride"] + nc]
      else:
        got = g[row, o : o + n]
      testutil.assert_close(got, a[0], jnp.float32, "grad", f"{what} {name}")
  if implementation == "reference":  # the selection too (relative block ids)
    sel = {x: geo[x] for x in ("block_len", "stride", "select_len", "num_select")}
    cmp = lambda x, s: nsa.compress_mean(x, block_len=8, stride=4, segment_ids=s)
    ids, valid = nsa.nsa_selection(q, cmp(k, seg), lk=lk, segment_ids=seg, **sel)
    a_ids, a_valid = nsa.nsa_selection(alone[0], cmp(alone[1], None), lk=n, **sel)
    for row, o in enumerate(ALONE_OFFSETS):
      np.testing.assert_array_equal(valid[row, :, o : o + n], a_valid[0])
      np.testing.assert_array_equal(ids[row, :, o : o + n], a_ids[0])


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dense_packed_masks(plan, ids, valid, q_heads, rs):
  """bool (selection [B, Hq, Lq, Lk], window [B, Hq, Lq, Lk], compressed [B, Hq, Lq, Nc])
  as the kernels see them with segments: tiles, element masks and routes (the
  compressed branch's rows moved back to their queries; rows that see nothing: False)."""
  cfg = plan.cfg
  mask, routes = nsa._selection_mask(plan, ids, valid, q_heads, rs)
  selection = mask.to_dense() & checks.routes_to_dense(routes, q_heads)
  window = nsa._window_mask(plan).to_dense() & checks.routes_to_dense(
    nsa._window_routes(cfg, rs), q_heads
  )
  row, sees, cmp_routes = nsa._packed_compressed(cfg, rs)
  cmp_mask = nsa._compressed_mask(plan, nsa._compressed_pad(cfg))
  rows = cmp_mask.to_dense() & checks.routes_to_dense(cmp_routes, q_heads)  # [B, Hq, Lq+pad, Nc]
  at = jnp.minimum(row, rows.shape[2] - 1)[:, None, :, None]
  compressed = jnp.take_along_axis(rows, at, axis=2) & sees[:, None, :, None]
  return selection, window, compressed


@pytest.mark.parametrize("lq", [70, 80])
def test_pallas_packed_masks_are_exact(lq):
  """With segments, the kernels' masks and routes give exactly the packed branches'
  visible pairs (no kernel runs); lq < lk moves the compressed rows into a pad."""
  geo, (b, lk, hq, hkv) = PACKED_GEO, (2, 80, 4, 2)
  q, k, v, k_cmp, v_cmp, gates = make_inputs(b, lq, lk, hq, hkv, 8, 8, geo=geo, seed=8)
  seg = packed_ids(lk, *PACKED_ROWS)
  cfg = nsa._check_inputs(q, k, v, k_cmp, v_cmp, gates, *(geo[x] for x in GEO_NAMES), None)
  sel = {x: geo[x] for x in ("block_len", "stride", "select_len", "num_select")}
  ids, valid = map(np.asarray, nsa.nsa_selection(q, k_cmp, lk=lk, segment_ids=seg, **sel))
  r = run_starts(seg, b, lk)[:, lk - lq :, None]  # [B, Lq, 1]
  t = np.arange(lk - lq, lk)[:, None]  # [Lq, 1] query positions
  key = np.arange(lk)[None, :]
  hot = ids[..., None] == np.arange(-(-lk // geo["select_len"]))  # [B, Hkv, Lq, n, Ns]
  kept = np.any(hot & valid[..., None], axis=-2)  # [B, Hkv, Lq, Ns]
  own_run = (key <= t) & (key >= r)  # [B, Lq, Lk]
  block = np.clip((key - r) // geo["select_len"], 0, kept.shape[-1] - 1)  # [B, Lq, Lk]
  selection = np.take_along_axis(kept, block[:, None], axis=-1) & own_run[:, None]
  window = own_run & (key > t - geo["window"])
  start, _, ok = oracle_slots(seg, lk, geo["block_len"], geo["stride"])  # [B, Nc]
  start, ok = start[:, None], ok[:, None]
  compressed = ok & (start + geo["block_len"] - 1 <= t) & (start >= r)  # [B, Lq, Nc]
  for kernel in ("pallas_triton", "pallas_tpu"):
    plan = nsa._kernel_plan(cfg, kernel, True)
    got = _dense_packed_masks(plan, jnp.asarray(ids), jnp.asarray(valid), hq, nsa._run_starts(seg))
    np.testing.assert_array_equal(got[0], np.repeat(selection, hq // hkv, axis=1))
    for name, g, e in (("window", got[1], window), ("compressed", got[2], compressed)):
      np.testing.assert_array_equal(g, np.broadcast_to(e[:, None], g.shape), name)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_tpu"])
def test_pallas_packed_matches_reference(implementation):
  geo = dict(PACKED_GEO, select_len=16)  # one 16-key kernel tile per selection block
  arrays = make_inputs(2, 80, 80, 4, 2, 16, 16, geo=geo, seed=9)
  seg = packed_ids(80, *PACKED_ROWS)
  r_out, r_grads = outputs_and_grads(arrays, "reference", geo, segment_ids=seg)
  out, grads = outputs_and_grads(arrays, implementation, geo, interpret=True, segment_ids=seg)
  testutil.assert_close(out, r_out, jnp.float32, "out", f"{implementation} packed out")
  names = ("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")
  for grad_name, g, r in zip(names, grads, r_grads, strict=True):
    testutil.assert_close(g, r, jnp.float32, "grad", f"{implementation} packed {grad_name}")


# ---------------------------------------------------------------------------
# Pallas: the routed block-sparse kernels, interpreted on CPU, vs the reference.
# ---------------------------------------------------------------------------

# select_len 16 (one 16-key kernel tile per selection block); n = 4: the 3 forced blocks
# and a real choice for 1 among the Ns = 5..6.
KERNEL_GEO = dict(block_len=8, stride=4, select_len=16, num_select=4, window=20)
# (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, dtype); ragged lengths.
KERNEL_CASES = {
  "gqa2_f32": (2, 77, 77, 4, 2, 16, 16, jnp.float32),
  "mha_bf16": (1, 61, 61, 2, 2, 16, 32, jnp.bfloat16),
  "mqa4_decode_bf16": (1, 9, 90, 4, 1, 32, 16, jnp.bfloat16),
}


def _kernel_case(name):
  *dims, dtype = KERNEL_CASES[name]
  return make_inputs(*dims, geo=KERNEL_GEO, dtype=dtype, seed=len(name))


# Interpreting costs ~7 s (Triton) to ~15 s (TPU) of compilation per case: 3 runs cover
# both kernels, GQA groups 1, 2 and 4, decoding, ragged tiles, float32 and bfloat16.
@pytest.mark.slow
@pytest.mark.parametrize(
  "implementation, name",
  [
    ("pallas_triton", "gqa2_f32"),
    ("pallas_triton", "mha_bf16"),
    ("pallas_tpu", "mqa4_decode_bf16"),
  ],
)
def test_pallas_matches_reference(implementation, name):
  arrays = _kernel_case(name)
  dtype = arrays[0].dtype
  r_out, r_grads = outputs_and_grads(arrays, "reference", KERNEL_GEO)
  out, grads = outputs_and_grads(arrays, implementation, KERNEL_GEO, interpret=True)
  assert out.dtype == dtype and out.shape == r_out.shape
  testutil.assert_close(out, r_out, dtype, "out", f"{implementation} {name} out")
  names = ("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates")
  for grad_name, g, r, x in zip(names, grads, r_grads, arrays, strict=True):
    assert g.dtype == x.dtype and g.shape == x.shape, grad_name
    testutil.assert_close(g, r, dtype, "grad", f"{implementation} {name} {grad_name}")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dense_kernel_masks(plan, ids, valid, q_heads):
  """bool (selection [B, Hq, Lq, Lk], window [Lq, Lk], compressed [Lq, Nc]) as the
  kernels see them: tiles, element masks and routes."""
  mask, routes = nsa._selection_mask(plan, ids, valid, q_heads)
  selection = mask.to_dense() & checks.routes_to_dense(routes, q_heads)
  window = nsa._window_mask(plan).to_dense()[0, 0]
  compressed = nsa._compressed_mask(plan).to_dense()[0, 0]
  return selection, window, compressed, mask.batch_heads


@pytest.mark.parametrize(
  "dims, geo",
  [
    ((2, 70, 77, 4, 2), KERNEL_GEO),  # decode-style offset, ragged
    ((1, 5, 300, 6, 3), dict(GEO, select_len=48)),  # a block spans 2-3 tiles
  ],
)
def test_pallas_masks_are_exact(dims, geo):
  """The kernels' masks and routes give exactly the branches' visible pairs (no kernel
  runs): selection = selected block and causal, window, compressed-block causality."""
  b, lq, lk, hq, hkv = dims
  q, k, v, k_cmp, v_cmp, gates = make_inputs(b, lq, lk, hq, hkv, 8, 8, geo=geo, seed=lk)
  cfg = nsa._check_inputs(q, k, v, k_cmp, v_cmp, gates, *(geo[x] for x in GEO_NAMES), None)
  ids, valid = selection_of(q, k_cmp, lk, geo)
  t = np.arange(lk - lq, lk)[:, None]  # [Lq, 1] query positions
  key = np.arange(lk)[None, :]
  hot = ids[..., None] == np.arange(-(-lk // geo["select_len"]))  # [B, Hkv, Lq, n, Ns]
  kept = np.any(hot & valid[..., None], axis=-2)  # [B, Hkv, Lq, Ns]
  selection = kept[..., key[0] // geo["select_len"]] & (key <= t)  # [B, Hkv, Lq, Lk]
  nc = nsa.num_compressed_blocks(lk, geo["block_len"], geo["stride"])
  ends = np.arange(nc)[None, :] * geo["stride"] + geo["block_len"] - 1
  for kernel in ("pallas_triton", "pallas_tpu"):
    plan = nsa._kernel_plan(cfg, kernel, True)
    got = _dense_kernel_masks(plan, jnp.asarray(ids), jnp.asarray(valid), hq)
    np.testing.assert_array_equal(got[0], np.repeat(selection, hq // hkv, axis=1))
    np.testing.assert_array_equal(got[1], (key <= t) & (key > t - geo["window"]))
    np.testing.assert_array_equal(got[2], ends <= t)
    assert tuple(map(int, got[3])) == (b, hq)


def test_pallas_resolution(monkeypatch):
  """None is "xla" on CPU and the platform's kernel on GPU/TPU (xla when the kernel
  cannot take the shapes); "pallas" on CPU needs interpret=True."""
  arrays = make_inputs(1, 40, 40, 4, 2, 8, 8)
  cfg = nsa._check_inputs(*arrays, *(GEO[x] for x in GEO_NAMES), None)
  q, k, v = arrays[:3]
  resolve = lambda impl, interpret=False, q=q, k=k, v=v: nsa._resolve(impl, interpret, cfg, q, k, v)
  assert resolve(None) == "xla"
  assert resolve("pallas", True) == "pallas_triton"
  for backend, kernel in (("gpu", "pallas_triton"), ("tpu", "pallas_tpu")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert resolve(None) == kernel and resolve("pallas") == kernel
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  wide = jnp.zeros(q.shape[:3] + (512,)), jnp.zeros(k.shape[:3] + (512,))
  assert resolve(None, q=wide[0], k=wide[1], v=wide[1]) == "xla"  # Triton: head_dim <= 256
  with pytest.raises(ValueError, match="pallas_triton.*head_dim <= 256"):
    resolve("pallas_triton", True, q=wide[0], k=wide[1], v=wide[1])


# ---------------------------------------------------------------------------
# The selection rule.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lq, lk, num_select", [(100, 100, 4), (7, 100, 4), (60, 60, 5)])
def test_selection_invariants(lq, lk, num_select):
  geo = dict(GEO, num_select=num_select)
  q, _, _, k_cmp, _, _ = make_inputs(2, lq, lk, 4, 2, 8, 8, geo=geo, seed=7)
  ids, valid = selection_of(q, k_cmp, lk, geo)
  assert ids.dtype == np.int32 and ids.shape == (2, 2, lq, num_select)
  lsel = geo["select_len"]
  for b, h, i in np.ndindex(ids.shape[:3]):
    t = lk - lq + i
    row, ok = ids[b, h, i], valid[b, h, i]
    kept = row[ok]
    eligible = t // lsel + 1
    assert ok.sum() == min(num_select, eligible)
    assert ok[: ok.sum()].all(), "valid slots come first"
    assert (np.diff(kept) > 0).all(), "ascending, no duplicates"
    assert (row[~ok] == kept[-1]).all(), "padding repeats the last valid id"
    assert (kept * lsel <= t).all(), "never a future block"
    own = t // lsel
    assert {0, own, max(own - 1, 0)} <= set(kept.tolist()), "initial + local blocks"


def test_selection_keeps_every_eligible_block_when_n_is_large():
  lk = 100
  ns = -(-lk // GEO["select_len"])
  geo = dict(GEO, num_select=ns + 2)
  q, _, _, k_cmp, _, _ = make_inputs(1, lk, lk, 2, 1, 8, 8, geo=geo)
  ids, valid = selection_of(q, k_cmp, lk, geo)
  for i in range(lk):
    eligible = list(range(i // GEO["select_len"] + 1))
    assert ids[0, 0, i][valid[0, 0, i]].tolist() == eligible


def test_selection_is_shared_by_the_group():
  """One selection per kv head: permuting a group's query heads changes nothing, and a
  query head of another group does not affect it."""
  q, _, _, k_cmp, _, _ = make_inputs(1, 80, 80, 6, 2, 8, 8, seed=9)
  ids, valid = selection_of(q, k_cmp, 80, GEO)
  permuted = q[:, :, jnp.array([2, 0, 1, 3, 4, 5])]
  np.testing.assert_array_equal(selection_of(permuted, k_cmp, 80, GEO)[0], ids)
  other = q.at[:, :, 4].set(jax.random.normal(jax.random.PRNGKey(0), q.shape[:2] + q.shape[3:]))
  ids2, valid2 = selection_of(other, k_cmp, 80, GEO)
  np.testing.assert_array_equal(ids2[:, 0], ids[:, 0])
  assert not np.array_equal(ids2[:, 1], ids[:, 1])  # the changed group does move


def test_selection_ties_go_to_lower_ids():
  """k_cmp = 0: p_cmp is uniform, so interior selection blocks tie; the lowest win."""
  lk = 128
  q, k, v, k_cmp, v_cmp, gates = make_inputs(1, lk, lk, 2, 1, 8, 8)
  k_cmp = jnp.zeros_like(k_cmp)
  ids, valid = selection_of(q, k_cmp, lk, GEO)
  _, _, kept = numpy_nsa(q, k, v, k_cmp, v_cmp, gates, **GEO)
  for i in range(lk):
    assert ids[0, 0, i][valid[0, 0, i]].tolist() == kept[0, 0, i]
  # The last query: 0, 6 and 7 are forced; blocks 1..5 tie (4 of the 31 equal p_cmp
  # each, by overlap); the lowest, 1, takes the free slot.
  assert ids[0, 0, -1].tolist() == [0, 1, 6, 7]


# ---------------------------------------------------------------------------
# compress_mean, num_compressed_blocks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "lk, block_len, stride", [(101, 8, 4), (64, 32, 16), (7, 8, 4), (20, 5, 5)]
)
def test_compress_mean(lk, block_len, stride):
  k = testutil.qkv(2, lk, lk, 1, 3, 4)[1]
  got = nsa.compress_mean(k, block_len=block_len, stride=stride)
  nc = nsa.num_compressed_blocks(lk, block_len, stride)
  assert nc == max(0, (lk - block_len) // stride + 1)
  kn = np.asarray(k, np.float64)  # [2, lk, 3, 4]
  expected = np.zeros((2, nc, 3, 4))  # lk < block_len: no compressed block, [2, 0, 3, 4]
  for c in range(nc):
    expected[:, c] = kn[:, c * stride : c * stride + block_len].mean(axis=1)
  assert got.shape == (2, nc, 3, 4) and got.dtype == k.dtype
  testutil.assert_close(got, expected, jnp.float32, "out")


# ---------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------


def _bad(arrays, **changes):
  names = ("q", "k", "v", "k_cmp", "v_cmp", "gates")
  args = dict(zip(names, arrays, strict=True))
  kwargs = dict(GEO)
  for key, value in changes.items():
    (args if key in names else kwargs)[key] = value
  return args, kwargs


@pytest.mark.parametrize(
  "change, match",
  [
    (lambda a: dict(k_cmp=a[3][:, :-1]), "k_cmp must be"),
    (lambda a: dict(v_cmp=a[4][..., :4]), "v_cmp must be"),
    (lambda a: dict(k_cmp=a[3].astype(jnp.bfloat16)), "k_cmp has dtype"),
    (lambda a: dict(gates=a[5][..., :2]), "gates must be"),
    (lambda a: dict(gates=a[5][0]), "gates must have rank 4"),
    (lambda a: dict(q=jnp.concatenate([a[0], a[0]], axis=1)), "q_len <= kv_len"),
    (lambda a: dict(k=a[1][..., :4]), "head_dim"),
    (lambda a: dict(num_select=2), "num_select must be an int >= 3"),
    (lambda a: dict(stride=9), "stride"),
    (lambda a: dict(block_len=0), "block_len"),
    (lambda a: dict(select_len=0), "select_len"),
    (lambda a: dict(window=0), "window"),
    (lambda a: dict(window=2.5), "window"),
    (lambda a: dict(scale=jnp.float32(0.5)), "scale"),
    (lambda a: dict(implementation="bogus"), r"implementation must be None or one of \("),
    (lambda a: dict(implementation="pallas"), "no Pallas kernel compiles.*interpret=True"),
    (lambda a: dict(interpret=1), "interpret"),
    (lambda a: dict(segment_ids=jnp.zeros((1, 39), jnp.int32)), r"segment_ids must have shape"),
    (lambda a: dict(segment_ids=jnp.zeros((1, 40))), "segment_ids must be an integer array"),
    (lambda a: dict(segment_ids=[0] * 40), "segment_ids must be None or an integer array"),
  ],
)
def test_bad_inputs_raise(change, match):
  arrays = make_inputs(1, 40, 40, 4, 2, 8, 8)
  args, kwargs = _bad(arrays, **change(arrays))
  with pytest.raises(ValueError, match=match):
    nsa.nsa_attention(**args, **kwargs)


def test_bad_selection_and_compression_inputs_raise():
  q, k, _, k_cmp, _, _ = make_inputs(1, 40, 40, 4, 2, 8, 8)
  sel = dict(block_len=8, stride=4, select_len=16, num_select=4)
  # k_cmp holds Nc = 9 blocks for lk = 40 (and 41..43); lk = 44 has Nc = 10. 3 kv heads
  # do not divide the 4 q heads.
  three_heads = jnp.concatenate([k_cmp, k_cmp[:, :, :1]], axis=2)
  for bad_kc, lk in ((k_cmp, 44), (k_cmp[:, :-1], 40), (k_cmp[..., :4], 40), (three_heads, 40)):
    with pytest.raises(ValueError, match=r"k_cmp must be \[batch, Nc, kv_heads, head_dim\]"):
      nsa.nsa_selection(q, bad_kc, lk=lk, **sel)
  with pytest.raises(ValueError, match="q_len <= kv_len"):
    nsa.nsa_selection(q, k_cmp[:, :1], lk=10, **sel)
  with pytest.raises(ValueError, match="num_select"):
    nsa.nsa_selection(q, k_cmp, lk=40, **dict(sel, num_select=1))
  with pytest.raises(ValueError, match="stride"):
    nsa.compress_mean(k, block_len=4, stride=8)
  with pytest.raises(ValueError, match="k must have rank 4"):
    nsa.compress_mean(k[0], block_len=4, stride=2)
  with pytest.raises(ValueError, match="lk"):
    nsa.num_compressed_blocks(-1, 8, 4)

"""moba_attention: the reference vs NumPy, xla and the Pallas kernels (interpreted) vs the
reference, the selection, the tiles the kernels visit, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import moba
from sparse_attention.ops.moba import chunk_ids, moba_attention, moba_selection

# ---------------------------------------------------------------------------
# An independent float64 NumPy MoBA, written from the semantics with loops.
# ---------------------------------------------------------------------------


def numpy_chunks(segment_ids, kv_len, chunk_size):
  """Per row: a list of chunks, each (segment index, first position, end position)."""
  seg = np.zeros(kv_len, np.int64) if segment_ids is None else np.asarray(segment_ids)
  chunks = []
  start = 0
  for p in range(1, kv_len + 1):
    if p == kv_len or seg[p] != seg[start]:  # the segment [start, p) ends
      for c in range(start, p, chunk_size):
        chunks.append((start, c, min(c + chunk_size, p)))
      start = p
  return chunks  # in position order: index = absolute chunk id


def numpy_moba(q, k, v, chunk_size, topk, segment_ids=None, scale=None):
  """(out [B, Lq, Hq, Dv], lse [B, Hq, Lq], kept {(b, h, t): sorted chunk ids})."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  b_, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  scale = d**-0.5 if scale is None else scale
  out = np.zeros((b_, lq, hq, v.shape[-1]))
  lse = np.zeros((b_, hq, lq))
  kept = {}
  for b in range(b_):
    chunks = numpy_chunks(None if segment_ids is None else segment_ids[b], lk, chunk_size)
    for h in range(hq):
      kh = h // (hq // hkv)
      kbar = [k[b, c0:c1, kh].mean(axis=0) for _, c0, c1 in chunks]
      for t in range(lq):
        pos = lk - lq + t
        own = next(i for i, (_, c0, c1) in enumerate(chunks) if c0 <= pos < c1)
        seg_start = chunks[own][0]
        past = [i for i in range(own) if chunks[i][0] == seg_start]
        gate = {i: float(np.dot(q[b, t, h], kbar[i])) for i in past}
        best = sorted(past, key=lambda i: (-gate[i], i))[: topk - 1]  # ties: lower id
        sel = sorted(best + [own])
        kept[b, h, t] = sel
        keys = [s for i in sel for s in range(chunks[i][1], chunks[i][2]) if s <= pos]
        logits = np.array([np.dot(q[b, t, h], k[b, s, kh]) * scale for s in keys])
        m = logits.max()
        p = np.exp(logits - m)
        out[b, t, h] = p @ v[b, keys, kh] / p.sum()
        lse[b, h, t] = m + np.log(p.sum())
  return out, lse, kept


def packed(batch, kv_len, lengths_per_row):
  """int32 [batch, kv_len] segment ids from a list of segment lengths per row."""
  rows = []
  for lengths in lengths_per_row:
    assert sum(lengths) == kv_len
    rows.append(np.repeat(np.arange(len(lengths)) * 3 + 1, lengths))
  return jnp.asarray(np.stack(rows[:batch]), jnp.int32)


# name: (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, chunk, topk, segments)
CASES = {
  "basic": (2, 48, 48, 4, 2, 16, 16, 8, 3, None),
  "topk1": (1, 40, 40, 2, 2, 8, 8, 8, 1, None),
  "topk_ge_nb": (1, 40, 40, 2, 1, 8, 8, 8, 7, None),
  "ragged": (2, 45, 45, 2, 2, 8, 8, 8, 3, None),
  "gqa4_dv": (1, 37, 37, 4, 1, 16, 12, 6, 3, None),
  "mqa16": (1, 30, 30, 16, 1, 8, 8, 7, 2, None),
  "chunk_gt_len": (1, 20, 20, 2, 2, 8, 8, 32, 3, None),
  "segments": (2, 50, 50, 4, 2, 8, 8, 6, 3, [[13, 20, 1, 16], [50]]),
  "segments_tiny": (1, 24, 24, 2, 1, 8, 8, 4, 2, [[1, 1, 5, 1, 9, 7]]),
  "decode_one": (2, 1, 50, 4, 2, 8, 8, 8, 3, None),
  "decode_few_segments": (2, 5, 50, 2, 2, 8, 12, 6, 4, [[30, 20], [9, 41]]),
}


def qkv(
  batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim=None, dtype=jnp.float32, seed=0
):
  """Random q, k, v from NumPy (no per-shape compilation, unlike jax.random)."""
  rng = np.random.default_rng(seed)
  shapes = [
    (batch, q_len, q_heads, head_dim),
    (batch, kv_len, kv_heads, head_dim),
    (batch, kv_len, kv_heads, v_head_dim or head_dim),
  ]
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def make_case(name, dtype=jnp.float32):
  b, lq, lk, hq, hkv, d, dv, c, topk, lengths = CASES[name]
  q, k, v = qkv(b, lq, lk, hq, hkv, d, dv, dtype=dtype, seed=sum(map(ord, name)))
  seg = None if lengths is None else packed(b, lk, lengths)
  return q, k, v, dict(chunk_size=c, topk=topk, segment_ids=seg)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_numpy(name):
  q, k, v, kw = make_case(name)
  out, lse = moba_attention(q, k, v, implementation="reference", return_lse=True, **kw)
  seg = None if kw["segment_ids"] is None else np.asarray(kw["segment_ids"])
  e_out, e_lse, kept = numpy_moba(q, k, v, kw["chunk_size"], kw["topk"], seg)
  testutil.assert_close(out, e_out, jnp.float32, "out", f"{name} out")
  testutil.assert_close(lse, e_lse, jnp.float32, "lse", f"{name} lse")
  # The selection, as chunk ids: the NumPy chunks are numbered the same way.
  ids, valid = map(np.asarray, moba_selection(q, k, **{x: kw[x] for x in kw}))
  for (b, h, t), sel in kept.items():
    n = len(sel)
    assert valid[b, h, t].sum() == n and valid[b, h, t, :n].all(), (b, h, t)
    assert list(ids[b, h, t, :n]) == sel, (b, h, t, ids[b, h, t], sel)
    assert (ids[b, h, t, n:] == sel[-1]).all(), "padding repeats the last valid id"


def test_ties_go_to_lower_block_ids():
  """q = 0 makes every gate 0: the oldest blocks win."""
  q, k, v, kw = make_case("basic")
  q = jnp.zeros_like(q)
  ids, valid = moba_selection(q, k, chunk_size=8, topk=3)
  expected = []
  for t in range(48):
    sel = sorted({0, 1, t // 8} & set(range(t // 8 + 1)))
    expected.append(sel + [sel[-1]] * (3 - len(sel)))
  np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to(expected, ids.shape))
  out = moba_attention(q, k, v, implementation="reference", **kw)
  e_out, _, _ = numpy_moba(q, k, v, 8, 3)
  testutil.assert_close(out, e_out, jnp.float32, "out", "ties")


def test_gate_is_unscaled_and_uses_own_kv_head():
  """Scaling q changes nothing but the softmax; GQA heads gate independently."""
  q, k, _, kw = make_case("basic")
  ids, _ = moba_selection(q, k, chunk_size=8, topk=2)
  ids2, _ = moba_selection(q * 3.0, k, chunk_size=8, topk=2)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids2))
  assert (np.asarray(ids)[:, 0] != np.asarray(ids)[:, 1]).any(), "heads of a group differ"


def test_packed_segments_equal_separate_sequences():
  """Each packed segment computes exactly what it computes alone."""
  lengths = [13, 20, 1, 16]
  q, k, v, kw = make_case("segments")
  out = moba_attention(q, k, v, implementation="reference", **kw)
  start = 0
  for n in lengths:
    sl = slice(start, start + n)
    alone = moba_attention(
      q[:1, sl], k[:1, sl], v[:1, sl], chunk_size=6, topk=3, implementation="reference"
    )
    testutil.assert_close(out[:1, sl], alone, jnp.float32, "out", f"segment at {start}")
    start += n


def test_decoding_equals_last_rows_of_training():
  q, k, v, kw = make_case("segments")
  full, full_lse = moba_attention(q, k, v, implementation="xla", return_lse=True, **kw)
  lq = 7  # (Lq = 1: decode_one against the reference)
  out, lse = moba_attention(q[:, -lq:], k, v, implementation="xla", return_lse=True, **kw)
  testutil.assert_close(out, full[:, -lq:], jnp.float32, "out", f"lq={lq}")
  testutil.assert_close(lse, full_lse[:, :, -lq:], jnp.float32, "lse", f"lq={lq}")


# ---------------------------------------------------------------------------
# The selection's invariants.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2, 4, 20])
def test_selection_invariants(topk):
  lk, lq, c = 90, 70, 5
  q, k, _ = qkv(2, lq, lk, 4, 2, 8, seed=topk)
  seg = packed(2, lk, [[7, 30, 2, 51], [90]])
  ids, valid = map(np.asarray, moba_selection(q, k, chunk_size=c, topk=topk, segment_ids=seg))
  assert ids.shape == valid.shape == (2, 4, lq, topk)
  assert ids.dtype == np.int32 and valid.dtype == np.bool_
  key_ids = np.asarray(chunk_ids(seg, lk, c))  # [2, lk]
  seg_np = np.asarray(seg)
  for b in range(2):
    for t in range(lq):
      pos = lk - lq + t
      own = key_ids[b, pos]
      for h in range(4):
        sel, ok = ids[b, h, t], valid[b, h, t]
        n = ok.sum()
        assert ok[:n].all() and not ok[n:].any(), "valid slots come first"
        assert sel[n - 1] == own, "the own block is always kept (and is the last)"
        assert (np.diff(sel[:n]) > 0).all(), "ascending, no repeats"
        assert (sel[n:] == own).all(), "padding repeats the last valid id"
        for cid in sel[:n]:
          members = np.flatnonzero(key_ids[b] == cid)
          assert members.size and members[0] <= pos, "never a future block"
          assert (seg_np[b, members] == seg_np[b, pos]).all(), "never across segments"
        if topk == 1:
          assert n == 1
  # Without segments every row is one sequence: n = min(topk, own + 1).
  ids, valid = map(np.asarray, moba_selection(q, k, chunk_size=c, topk=topk))
  own = (lk - lq + np.arange(lq)) // c
  np.testing.assert_array_equal(
    valid.sum(-1), np.broadcast_to(np.minimum(topk, own + 1), (2, 4, lq))
  )
  np.testing.assert_array_equal(ids[..., -1], np.broadcast_to(own, (2, 4, lq)))


def test_chunk_ids():
  seg = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [7] * 12], jnp.int32)
  np.testing.assert_array_equal(
    np.asarray(chunk_ids(seg, 12, 2)),
    [[0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]],
  )
  np.testing.assert_array_equal(np.asarray(chunk_ids(None, 7, 3)), [[0, 0, 0, 1, 1, 1, 2]])
  assert moba.num_chunks(7, 3, segmented=False) == 3 and moba.num_chunks(7, 3, True) == 7


# ---------------------------------------------------------------------------
# xla vs the reference: outputs, lse, gradients.
# ---------------------------------------------------------------------------


def outputs_and_grads(q, k, v, implementation, **kw):
  """Output, lse and (dq, dk, dv) of a fixed random linear loss of both outputs,
  in one jit (NumPy cotangents: no per-shape jax.random compilation)."""
  rng = np.random.default_rng(1)
  ct_out = rng.standard_normal(q.shape[:3] + (v.shape[-1],), np.float32)
  ct_lse = rng.standard_normal((q.shape[0], q.shape[2], q.shape[1]), np.float32)

  def loss(q, k, v):
    out, lse = moba_attention(q, k, v, implementation=implementation, return_lse=True, **kw)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * ct_out) + jnp.sum(finite * ct_lse), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


_REFERENCE_RESULTS = {}


def reference_results(key, q, k, v, **kw):
  """`outputs_and_grads` of the reference, cached under `key` (a case shared by tests)."""
  if key is None:
    return outputs_and_grads(q, k, v, "reference", **kw)
  if key not in _REFERENCE_RESULTS:
    _REFERENCE_RESULTS[key] = outputs_and_grads(q, k, v, "reference", **kw)
  return _REFERENCE_RESULTS[key]


def assert_matches_reference(q, k, v, implementation, what="", key=None, impl_kw=None, **kw):
  """`implementation` (with `impl_kw`) vs the reference: out, lse, dq, dk, dv."""
  dtype = q.dtype
  out, lse, grads = outputs_and_grads(q, k, v, implementation, **kw, **(impl_kw or {}))
  r_out, r_lse, r_grads = reference_results(key, q, k, v, **kw)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert out.shape == r_out.shape and lse.shape == r_lse.shape
  testutil.assert_close(out, r_out, dtype, "out", f"{what} out")
  testutil.assert_close(lse, r_lse, dtype, "lse", f"{what} lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert g.dtype == dtype, name
    testutil.assert_close(g, r, dtype, "grad", f"{what} {name}")


def assert_xla_matches_reference(q, k, v, what="", key=None, **kw):
  assert_matches_reference(q, k, v, "xla", what=what, key=key, **kw)


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles of 8 rows, 3 per step: chunks span tiles, tiles span steps."""
  monkeypatch.setattr(moba, "_TILE_ROWS", 8)
  monkeypatch.setattr(moba, "_STEP_SCORES", 3 * 8 * 8)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("name", ["basic", "gqa4_dv", "segments", "decode_few_segments"])
def test_xla_matches_reference_f32(name):
  q, k, v, kw = make_case(name)
  assert_xla_matches_reference(q, k, v, what=name, **kw)


@pytest.mark.parametrize("name", ["mqa16", "decode_one"])
def test_xla_matches_reference_default_tiles(name):
  q, k, v, kw = make_case(name)
  assert_xla_matches_reference(q, k, v, what=name, **kw)


@pytest.mark.parametrize("name", ["segments"])
def test_xla_matches_reference_bf16(name):
  q, k, v, kw = make_case(name, dtype=jnp.bfloat16)
  assert_xla_matches_reference(q, k, v, what=name, **kw)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("name", ["segments", "decode_one"])
def test_xla_chunked_matches_reference(name):
  q, k, v, kw = make_case(name)
  assert_matches_reference(q, k, v, "xla_chunked", what=name, **kw)


def test_xla_under_jit_and_default_implementation():
  q, k, v, kw = make_case("segments")
  f = jax.jit(functools.partial(moba_attention, chunk_size=6, topk=3))
  a = f(q, k, v, segment_ids=kw["segment_ids"])
  b = moba_attention(q, k, v, implementation="xla", **kw)
  testutil.assert_close(a, b, jnp.float32, "out", "jit")  # fusion may move an ulp
  g = jax.jit(jax.grad(lambda q: jnp.sum(moba_attention(q, k, v, **kw))))(q)
  assert np.isfinite(np.asarray(g)).all()


def test_xla_memory_is_not_quadratic():
  """Compiled temporaries at 4x the length grow ~4x (and are far below Lq x Lk)."""

  def temp(seq_len):
    x = jax.ShapeDtypeStruct((1, seq_len, 2, 32), jnp.float32)
    f = jax.jit(lambda q: moba_attention(q, q, q, chunk_size=128, topk=2))
    return f.lower(x).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(1024), temp(4096)
  assert large < 6 * small, (small, large)
  assert large < 2 * 4096 * 4096 * 4 / 8, large  # an eighth of the dense f32 scores


# ---------------------------------------------------------------------------
# Pallas (the routed block-sparse kernels, interpreted) vs the reference.
# ---------------------------------------------------------------------------

# name: (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, chunk, topk,
#        segments, dtype, block_q, block_kv); blocks None: the defaults (64, clipped).
# Tiny on purpose: the interpreters (the TPU one above all) are slow.
PALLAS_CASES = {
  # GQA 2, C = 24 straddling the 32 x 16 tiles, ragged length.
  "g2_c24_ragged": (1, 90, 90, 4, 2, 16, 16, 24, 3, None, jnp.float32, 32, 16),
  # GQA 4, decoding (Lq < Lk), packed segments, bf16, Dv != D, default tiles (> C).
  "g4_decode_bf16": (2, 21, 80, 4, 1, 32, 16, 16, 3, [[30, 50], [80]], jnp.bfloat16, None, None),
  # No GQA, topk = 1, a segment start inside a tile (chunks off the tile grid).
  "g1_topk1_segments": (1, 96, 96, 2, 2, 16, 16, 16, 1, [[37, 59]], jnp.float32, 32, 32),
}


def make_pallas_case(name):
  b, lq, lk, hq, hkv, d, dv, c, topk, lengths, dtype, bq, bk = PALLAS_CASES[name]
  q, k, v = qkv(b, lq, lk, hq, hkv, d, dv, dtype=dtype, seed=sum(map(ord, name)))
  seg = None if lengths is None else packed(b, lk, lengths)
  return q, k, v, dict(chunk_size=c, topk=topk, segment_ids=seg), dict(block_q=bq, block_kv=bk)


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("name", list(PALLAS_CASES))
def test_pallas_matches_reference(name, kernel):
  q, k, v, kw, blocks = make_pallas_case(name)
  impl_kw = dict(interpret=True, **blocks)
  assert_matches_reference(
    q, k, v, kernel, what=f"{kernel} {name}", key=name, impl_kw=impl_kw, **kw
  )


def numpy_visited_tiles(ids, valid, key_chunks, q_len, kv_len, block_q, block_kv):
  """bool [B, Hq, Qb, Kb]: causal tiles holding a key of a chunk a query of the q tile kept."""
  b, hq = ids.shape[:2]
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  layout = np.zeros((b, hq, qb, kb), bool)
  key_chunks = np.broadcast_to(key_chunks, (b, kv_len))
  for bi, h, t, s in zip(*np.nonzero(valid), strict=True):
    for pos in np.flatnonzero(key_chunks[bi] == ids[bi, h, t, s]):
      layout[bi, h, t // block_q, pos // block_kv] = True
  q_last = kv_len - q_len + np.minimum((np.arange(qb) + 1) * block_q, q_len) - 1
  return layout & (np.arange(kb)[None, :] * block_kv <= q_last[:, None])  # causal tiles


def test_pallas_visits_the_union_of_the_selected_chunks():
  q, k, _, kw, _ = make_pallas_case("g4_decode_bf16")
  c, topk, seg = kw["chunk_size"], kw["topk"], kw["segment_ids"]
  geo = moba._pallas_geometry("pallas_triton", q, k, c, topk, 16, 16)
  inputs = jax.jit(
    lambda q, k, seg: moba._pallas_inputs(q, k, chunk_size=c, topk=topk, segment_ids=seg, geo=geo)
  )
  mask, routes = inputs(q, k, seg)
  ids, valid = map(np.asarray, moba_selection(q, k, **kw))
  key_chunks = np.asarray(chunk_ids(seg, k.shape[1], c))
  expected = numpy_visited_tiles(ids, valid, key_chunks, q.shape[1], k.shape[1], 16, 16)
  np.testing.assert_array_equal(np.asarray(mask.block_layout()[0]), expected)
  assert mask.max_kv_blocks >= int(expected.sum(-1).max())
  np.testing.assert_array_equal(np.asarray(routes.query), np.where(valid, ids, -1))
  np.testing.assert_array_equal(np.asarray(routes.key), key_chunks)


def test_pallas_skips_tiles():
  """topk = 1 with chunks = tiles: only the diagonal tiles are visited, Kmax = 1."""
  q, k, _ = qkv(1, 96, 96, 2, 1, 16)
  geo = moba._pallas_geometry("pallas_tpu", q, k, 16, 1, 16, 16)
  assert geo.max_kv_blocks == 3  # the bound: own chunks span <= (16 + 16 - 2) // 16 + 2 tiles
  inputs = jax.jit(
    lambda q, k: moba._pallas_inputs(q, k, chunk_size=16, topk=1, segment_ids=None, geo=geo)
  )
  mask, _ = inputs(q, k)
  visited = np.asarray(mask.block_layout()[0])
  np.testing.assert_array_equal(visited, np.broadcast_to(np.eye(6, dtype=bool), visited.shape))


def test_default_implementation_and_block_sizes(monkeypatch):
  q, k, v = qkv(1, 40, 40, 2, 1, 16)
  args = (q, k, v, 8, 2)
  assert moba._resolve(None, False, *args, None, None) == ("xla", None)  # CPU
  assert moba._resolve("xla", False, *args, 32, None) == ("xla", None)
  impl, geo = moba._resolve("pallas", True, *args, None, None)  # CPU: interpreted Triton
  assert impl == "pallas_triton" and (geo.block_q, geo.block_kv) == (64, 64)
  impl, geo = moba._resolve("pallas_tpu", True, *args, None, 16)
  assert impl == "pallas_tpu" and (geo.block_q, geo.block_kv) == (40, 16)
  for backend, kernel in (("gpu", "pallas_triton"), ("tpu", "pallas_tpu")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert moba._resolve(None, False, *args, None, None)[0] == kernel
    assert moba._resolve("pallas", False, *args, None, None)[0] == kernel
    assert moba._resolve(None, False, *args, 12, None) == ("xla", None)  # unsupported tiles
  assert moba._block_sizes("pallas_triton", 5, 40, None, None) == (16, 64)
  assert moba._block_sizes("pallas_tpu", 5, 40, None, None) == (8, 40)
  assert moba._block_sizes("pallas_tpu", 500, 40, 128, None) == (128, 40)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(implementation="pallas"), "implementation='pallas'.*interpret=True"),
    (
      dict(implementation="cudnn"),
      r"\('reference', 'xla', 'xla_chunked', 'pallas', 'pallas_mosaic_gpu', 'pallas_triton', "
      r"'pallas_tpu'\)",
    ),
    (dict(implementation="Pallas"), "implementation"),
    (dict(implementation=3), "implementation"),
    (dict(implementation="pallas_triton", block_q=24), "power of two"),
    (dict(implementation="pallas_tpu", block_kv=12), "multiple of 8"),
    (dict(block_q=0), "block_q"),
    (dict(block_kv=16.0), "block_kv"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=4.0), "chunk_size"),
    (dict(topk=0), "topk"),
    (dict(topk=True), "topk"),
    (dict(segment_ids=jnp.zeros((2, 31), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.zeros((2, 32), jnp.float32)), "segment_ids"),
    (dict(segment_ids=[[0] * 32] * 2), "segment_ids"),
    (dict(scale=jnp.float32(0.5)), "scale"),
    (dict(q=jnp.zeros((2, 33, 4, 8))), "q_len"),
    (dict(q=jnp.zeros((2, 32, 3, 8))), "divide"),
    (dict(k=jnp.zeros((2, 32, 2, 4))), "head_dim"),
    (dict(v=jnp.zeros((2, 32, 2, 8), jnp.bfloat16)), "dtype"),
    (dict(q=jnp.zeros((2, 32, 4), jnp.float32)), "rank 4"),
    (dict(q=jnp.zeros((2, 32, 4, 8), jnp.int32)), "dtype"),
  ],
)
def test_bad_inputs_raise(change, match):
  q, k, v = qkv(2, 32, 32, 4, 2, 8)
  args = dict(q=q, k=k, v=v, chunk_size=8, topk=2)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    moba_attention(**args)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(topk=-1), "topk"),
    (dict(chunk_size=None), "chunk_size"),
    (dict(segment_ids=jnp.zeros((1, 32), jnp.int32)), "segment_ids"),
    (dict(k=jnp.zeros((2, 16, 2, 8))), "q_len"),
  ],
)
def test_selection_bad_inputs_raise(change, match):
  q, k, _ = qkv(2, 32, 32, 4, 2, 8)
  args = dict(q=q, k=k, chunk_size=8, topk=2)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    moba_selection(**args)

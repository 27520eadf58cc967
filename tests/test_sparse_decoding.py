"""MoBA and NSA decoding against a left-aligned KV cache: equal to the ops on the filled
prefix row by row, cost set by the selection (no O(capacity) gather of the cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import (
  block_topk_decode_attention,
  compress_mean,
  decode_attention,
  moba_attention,
  moba_decode_attention,
  moba_gate_keys,
  nsa_attention,
  nsa_decode_attention,
  num_compressed_blocks,
  reference_attention,
)

CAPACITY = 96
# An empty cache, a chunk boundary, the middle of a chunk, a full cache (n = 3).
LENGTHS = (0, 32, 45, CAPACITY - 3)
NSA = dict(block_len=8, stride=4, select_len=8, num_select=3, window=10)


def _inputs(n=3, batch=4, heads=4, kv_heads=2, dim=16, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda length, h: (batch, length, h, dim)
  q = jnp.asarray(rng.normal(size=shape(n, heads)), dtype)
  k = jnp.asarray(rng.normal(size=shape(CAPACITY, kv_heads)), dtype)
  v = jnp.asarray(rng.normal(size=shape(CAPACITY, kv_heads)), dtype)
  return q, k, v


@pytest.mark.parametrize("topk", [1, 3, 9])
def test_moba_decode_equals_moba_on_the_filled_prefix(topk):
  q, k, v = _inputs()
  n = q.shape[1]
  kw = dict(chunk_size=8, topk=topk)
  lengths = jnp.array(LENGTHS)
  out, lse = moba_decode_attention(
    q, k, v, moba_gate_keys(k, chunk_size=8), lengths, return_lse=True, **kw
  )
  for b, length in enumerate(LENGTHS):
    end = length + n
    want, want_lse = moba_attention(
      q[b : b + 1], k[b : b + 1, :end], v[b : b + 1, :end], implementation="reference",
      return_lse=True, **kw,
    )  # fmt: skip
    np.testing.assert_allclose(out[b : b + 1], want, atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(lse[b : b + 1], want_lse, atol=2e-6, rtol=2e-6)


def test_moba_decode_reads_nothing_past_the_fill_but_the_gate_keys():
  """Keys past lengths + n (and the gate keys of incomplete chunks) never matter."""
  q, k, v = _inputs()
  lengths = jnp.array(LENGTHS)
  gate = moba_gate_keys(k, chunk_size=8)
  want = moba_decode_attention(q, k, v, gate, lengths, chunk_size=8, topk=3)
  pos = np.arange(CAPACITY)[None, :, None, None]
  future = pos >= np.asarray(LENGTHS)[:, None, None, None] + q.shape[1]
  k2, v2 = jnp.where(future, 1e3, k), jnp.where(future, -1e3, v)
  chunk = np.arange(gate.shape[1])[None, :, None, None]
  own = np.asarray(LENGTHS)[:, None, None, None] // 8  # the first token's own chunk
  gate2 = jnp.where(chunk >= own, 1e3, gate)
  got = moba_decode_attention(q, k2, v2, gate2, lengths, chunk_size=8, topk=3)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nsa_decode_equals_nsa_on_the_filled_prefix(dtype):
  q, k, v = _inputs(dtype=dtype)
  b, n, hq, _ = q.shape
  geometry = dict(block_len=NSA["block_len"], stride=NSA["stride"])
  k_cmp, v_cmp = compress_mean(k, **geometry), compress_mean(v, **geometry)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(1), (b, n, hq, 3))).astype(dtype)
  out = nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, jnp.array(LENGTHS), **NSA)
  assert out.dtype == dtype
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  for row, length in enumerate(LENGTHS):
    end = length + n
    nc = num_compressed_blocks(end, **geometry)
    want = nsa_attention(
      q[row : row + 1], k[row : row + 1, :end], v[row : row + 1, :end],
      k_cmp[row : row + 1, :nc], v_cmp[row : row + 1, :nc], gates[row : row + 1],
      implementation="reference", **NSA,
    )  # fmt: skip
    np.testing.assert_allclose(
      out[row : row + 1].astype(jnp.float32), want.astype(jnp.float32), atol=tol, rtol=tol
    )


def test_decoding_gradients_flow_to_q_k_v():
  q, k, v = _inputs()
  lengths = jnp.array(LENGTHS)
  gate = moba_gate_keys(k, chunk_size=8)

  def loss(q, k, v):
    return jnp.sum(moba_decode_attention(q, k, v, gate, lengths, chunk_size=8, topk=3) ** 2)

  def prefix_loss(q, k, v):
    total = 0.0
    for b, length in enumerate(LENGTHS):
      end = length + q.shape[1]
      o = moba_attention(
        q[b : b + 1], k[b : b + 1, :end], v[b : b + 1, :end], chunk_size=8, topk=3,
        implementation="reference",
      )  # fmt: skip
      total += jnp.sum(o**2)
    return total

  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(prefix_loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_fill_levels_are_traced():
  q, k, v = _inputs()
  gate = moba_gate_keys(k, chunk_size=8)
  traces = []

  @jax.jit
  def step(lengths):
    traces.append(1)
    return moba_decode_attention(q, k, v, gate, lengths, chunk_size=8, topk=3)

  step(jnp.array(LENGTHS))
  step(jnp.array(LENGTHS[::-1]))
  assert len(traces) == 1


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(k_gate=jnp.zeros((4, 11, 2, 16))), r"k_gate must be \[batch, blocks"),
    (dict(k_gate=jnp.zeros((4, 12, 2, 16), jnp.bfloat16)), "k_gate has dtype bfloat16"),
    (dict(lengths=jnp.array([0, 1, 2])), r"lengths must be an int array \[batch\]"),
    (dict(lengths=jnp.array([0, 1, 2, CAPACITY - 2])), "lengths"),
    (dict(topk=0), "topk must be a Python int >= 1"),
  ],
)
def test_bad_moba_arguments_are_named(change, match):
  q, k, v = _inputs()
  args = dict(
    k_gate=moba_gate_keys(k, chunk_size=8), lengths=jnp.array(LENGTHS), chunk_size=8, topk=3
  )
  args.update(change)
  with pytest.raises(ValueError, match=match):
    moba_decode_attention(q, k, v, args.pop("k_gate"), args.pop("lengths"), **args)


def test_bad_nsa_arguments_are_named():
  q, k, v = _inputs()
  b, n, hq, _ = q.shape
  cmp = compress_mean(k, block_len=8, stride=4)
  gates = jnp.ones((b, n, hq, 3))
  with pytest.raises(ValueError, match=r"nsa_decode_attention: k_cmp must be"):
    nsa_decode_attention(q, k, v, cmp[:, :-1], cmp, gates, jnp.array(LENGTHS), **NSA)
  with pytest.raises(ValueError, match=r"nsa_decode_attention: gates must be"):
    nsa_decode_attention(q, k, v, cmp, cmp, gates[:, :1], jnp.array(LENGTHS), **NSA)


def test_block_topk_with_every_block_equals_full_cache_decoding():
  q, k, v = _inputs()
  lengths = jnp.array(LENGTHS)
  means = moba_gate_keys(k, chunk_size=16)
  got = block_topk_decode_attention(q, k, v, means, lengths, block_size=16, topk=6)
  want = decode_attention(q, k, v, lengths, implementation="reference")
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_block_topk_keeps_own_first_and_best_blocks():
  """topk=3 of blocks of 8: the own block, block 0 and the best-gated one in between,
  checked against a NumPy selection and masked dense attention."""
  q, k, v = _inputs(n=1)
  lengths = jnp.array(LENGTHS)
  means = moba_gate_keys(k, chunk_size=8)
  got = block_topk_decode_attention(q, k, v, means, lengths, block_size=8, topk=3)
  qn, mn = np.asarray(q, np.float64), np.asarray(means, np.float64)
  visible = np.zeros((len(LENGTHS), 4, 1, CAPACITY), bool)
  for b, t in enumerate(LENGTHS):
    own = t // 8
    for h in range(4):
      gate = mn[b, :own, h // 2] @ qn[b, 0, h]  # the complete blocks before the own
      kept = {own, 0}
      rest = [j for j in np.argsort(-gate, kind="stable") if j not in kept]
      kept |= set(rest[: 3 - len(kept)])
      for j in kept:
        visible[b, h, 0, j * 8 : min(j * 8 + 8, t + 1)] = True
  want = reference_attention(q, k, v, mask=jnp.asarray(visible))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton", "pallas_tpu"])
def test_kernels_take_the_kept_blocks(implementation):
  """The kept blocks through block_sparse_attention (selected_blocks_mask + routes):
  MoBA, block top-k and NSA decoding equal their xla paths (n = 3 new tokens)."""
  q, k, v = _inputs()
  b, n, hq, _ = q.shape
  lengths = jnp.array(LENGTHS)
  kw = dict(implementation=implementation, interpret=implementation != "reference")
  means = moba_gate_keys(k, chunk_size=16)
  for fn, extra in [
    (moba_decode_attention, dict(chunk_size=16, topk=3)),
    (block_topk_decode_attention, dict(block_size=16, topk=3)),
  ]:
    got = fn(q, k, v, means, lengths, **extra, **kw)
    want = fn(q, k, v, means, lengths, **extra, implementation="xla")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  nsa = {**NSA, "select_len": 16}
  cmp = compress_mean(k, block_len=8, stride=4), compress_mean(v, block_len=8, stride=4)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(1), (b, n, hq, 3)))
  got = nsa_decode_attention(q, k, v, *cmp, gates, lengths, **nsa, **kw)
  want = nsa_decode_attention(q, k, v, *cmp, gates, lengths, **nsa, implementation="xla")
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_mosaic_gpu_takes_the_kept_blocks():
  """Mosaic GPU (interpreted; bf16, head_dim 64, 64-key blocks) equals the xla path."""
  q, k, v = _inputs(dtype=jnp.bfloat16, dim=64)
  lengths = jnp.array(LENGTHS)
  means = moba_gate_keys(k, chunk_size=64)
  kw = dict(block_size=64, topk=1)
  got = block_topk_decode_attention(
    q, k, v, means, lengths, implementation="pallas_mosaic_gpu", interpret=True, **kw
  )
  want = block_topk_decode_attention(q, k, v, means, lengths, implementation="xla", **kw)
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2
  )

"""MoBA and NSA decoding against a left-aligned KV cache: equal to the ops on the filled
prefix row by row, cost set by the selection (no O(capacity) gather of the cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention.ops import (
  compress_mean,
  moba_attention,
  moba_decode_attention,
  moba_gate_keys,
  nsa_attention,
  nsa_decode_attention,
  num_compressed_blocks,
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

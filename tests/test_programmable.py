"""Programmable attention (FlexAttention's contract): score_mod and mask_mod.

Five cases, each against a float64 dense computation of the same functions (outputs and
the gradients of q, k, v and the score_mod parameters):

  softcap + causal                      score_mod without parameters, a structured mask
  ALiBi with learned slopes + documents score_mod parameters, a mask_mod with parameters
  T5 relative bias, learned table       a gather from a [buckets, heads] table, no mask
  prefix-LM with per-row prefixes       a mask_mod varying over the batch
  causal 40-key window as a predicate   a mask_mod without parameters
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import block_sparse_attention, masks, score_mods

B, L, HQ, HKV, D = 2, 100, 4, 2, 16
BLOCK_Q, BLOCK_KV = 32, 16
SEGMENTS = np.repeat(np.arange(4), 25)[None].repeat(B, 0)
SEGMENTS[1, 60:] = 9  # row 1: documents of 25, 25, 10 and 40 tokens


softcap = score_mods.Softcap(20.0)
alibi = score_mods.alibi  # slopes [HQ]
t5_bias = score_mods.T5Bias(num_buckets=16, max_distance=64)  # table [16, HQ]


def window40(b, h, q_idx, kv_idx):
  return (kv_idx <= q_idx) & (q_idx - kv_idx < 40)


def _cases():
  keys = jax.random.split(jax.random.key(7), 2)
  geo = dict(block_q=BLOCK_Q, block_kv=BLOCK_KV)
  return {
    "softcap_causal": (masks.causal(L, L, **geo), softcap, None),
    "alibi_documents": (
      masks.document(jnp.asarray(SEGMENTS), causal=True, **geo),
      alibi,
      jnp.array([0.5, 0.25, 0.125, 0.0625]),
    ),
    "t5_bias_no_mask": (
      masks.dense(L, L, **geo),
      t5_bias,
      0.5 * jax.random.normal(keys[0], (16, HQ)),
    ),
    "prefix_lm": (masks.prefix_lm(jnp.array([10, 57]), L, **geo), None, None),
    "window40_predicate": (masks.create_block_mask(window40, 1, 1, L, L, **geo), None, None),
  }


CASES = _cases()


def _loss(attend, q, k, v, params, ct):
  out, lse = attend(q, k, v, params)
  finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.sum(out * ct[0]) + jnp.sum(finite * ct[1]), (out, lse)


def dense_f64(q, k, v, visible, score_mod, params):
  """softmax(score_mod(q k^T / sqrt(D)), visible) v, the definition (run in float64)."""
  b, length, hq, d = q.shape
  g = hq // k.shape[2]
  kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * d**-0.5
  if score_mod is not None:
    idx = functools.partial(jnp.arange, dtype=jnp.int32)
    args = (s, idx(b)[:, None, None, None], idx(hq)[None, :, None, None])
    args = (*args, idx(length)[:, None], idx(length)[None, :])
    s = score_mod(*args, params) if params is not None else score_mod(*args)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1.0)[..., None], vv)
  lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return out, lse


def _outputs_and_grads(attend, q, k, v, params, ct):
  argnums = (0, 1, 2) if params is None else (0, 1, 2, 3)
  grad = jax.grad(lambda *a: _loss(attend, *a, ct), argnums=argnums, has_aux=True)
  grads, (out, lse) = grad(q, k, v, params)
  return out, lse, grads


@functools.cache
def _expected(name):
  mask, score_mod, params = CASES[name]
  q, k, v = testutil.qkv(B, L, L, HQ, HKV, D, seed=3)
  ct = (jax.random.normal(jax.random.key(1), (B, L, HQ, D)), jnp.ones((B, HQ, L)))
  visible = jnp.asarray(mask.to_dense())  # bool [B|1, 1, L, L]
  with jax.enable_x64(True):
    f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x), jnp.float64)
    attend = lambda q, k, v, p: dense_f64(q, k, v, visible, score_mod, p)
    out, lse, grads = _outputs_and_grads(attend, f64(q), f64(k), f64(v), f64(params), ct)
    expected = jax.tree.map(np.asarray, (out, lse, grads))
  return (q, k, v, params, ct), expected


def _check(name, implementation, **kwargs):
  mask, score_mod, params = CASES[name]
  (q, k, v, params, ct), (e_out, e_lse, e_grads) = _expected(name)
  attend = lambda q, k, v, p: block_sparse_attention(
    q, k, v, mask, implementation=implementation, return_lse=True, score_mod=score_mod,
    score_mod_params=p, **kwargs,
  )  # fmt: skip
  out, lse, grads = _outputs_and_grads(attend, q, k, v, params, ct)
  testutil.assert_close(out, e_out, jnp.float32, "out", f"{name} out")
  testutil.assert_close(lse, e_lse, jnp.float32, "lse", f"{name} lse")
  names = ("dq", "dk", "dv", "d_params")[: len(grads)]
  for what, g, e in zip(names, grads, e_grads, strict=True):
    testutil.assert_close(g, e, jnp.float32, "grad", f"{name} {what}")


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_matches_float64_definition(name, implementation):
  _check(name, implementation)


def test_score_mod_params_get_gradients_only_where_floating():
  mask = masks.causal(L, L, block_q=BLOCK_Q, block_kv=BLOCK_KV)
  q, k, v = testutil.qkv(1, L, L, HQ, HKV, D)
  params = {"scale": jnp.float32(0.5), "shift": jnp.int32(3)}

  def mod(score, b, h, q_idx, kv_idx, p):
    return score * p["scale"] + (q_idx - kv_idx == p["shift"])

  def loss(p):
    out = block_sparse_attention(
      q, k, v, mask, implementation="xla", score_mod=mod, score_mod_params=p
    )
    return jnp.sum(out)

  grads = jax.grad(loss, allow_int=True)(params)
  assert grads["scale"].dtype == jnp.float32 and float(grads["scale"]) != 0.0
  assert grads["shift"].dtype == jax.dtypes.float0


def test_mask_mod_equals_brute_force_and_never_retraces():
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  docs = masks.document(jnp.asarray(SEGMENTS), block_q=BLOCK_Q, block_kv=BLOCK_KV)
  np.testing.assert_array_equal(docs.to_dense()[:, 0], SEGMENTS[:, :, None] == SEGMENTS[:, None])
  prefix = CASES["prefix_lm"][0].to_dense()[:, 0]
  np.testing.assert_array_equal(prefix, (j <= i) | (j < np.array([10, 57])[:, None, None]))
  window = CASES["window40_predicate"][0]
  np.testing.assert_array_equal(window.to_dense()[0, 0], (j <= i) & (i - j < 40))
  visited, full = (np.asarray(x)[0, 0] for x in window.block_layout())
  assert visited.sum() < visited.size and full.any() and (visited & ~full).any()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def build(segment_ids):  # new document boundaries: same trace
    return masks.document(segment_ids, causal=True, block_q=BLOCK_Q, block_kv=BLOCK_KV)

  first = build(jnp.asarray(SEGMENTS))
  again = build(jnp.asarray(np.roll(SEGMENTS, 7, axis=1)))
  assert not np.array_equal(first.to_dense(), again.to_dense())


def test_bad_score_mod_arguments_are_refused():
  mask = masks.causal(L, L, block_q=BLOCK_Q, block_kv=BLOCK_KV)
  q, k, v = testutil.qkv(1, L, L, HQ, HKV, D)
  with pytest.raises(ValueError, match="score_mod must be callable"):
    block_sparse_attention(q, k, v, mask, score_mod=3)
  with pytest.raises(ValueError, match="score_mod_params given without a score_mod"):
    block_sparse_attention(q, k, v, mask, score_mod_params=jnp.ones(2))
  with pytest.raises(ValueError, match=r"score_mod_params\['x'\] must be an array"):
    block_sparse_attention(q, k, v, mask, score_mod=alibi, score_mod_params={"x": 2.0})
  ranks = lambda score, b, h, q_idx, kv_idx: jnp.sort(score, axis=-1)  # no kernel lowering
  with pytest.raises(ValueError, match="implementation='pallas_triton'.*score_mod.*sort"):
    block_sparse_attention(q, k, v, mask, score_mod=ranks, implementation="pallas_triton")

"""Token routes (per-query key selection inside the visited tiles): xla path, the
interpreted Triton kernel and the TPU kernel in the simulator against the reference,
outputs, lse and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import TokenRoutes, block_sparse_attention, masks

L, CHUNK = 100, 16  # ragged: 7 chunks, the last one short


def _routes(batch, route_heads, seed, with_padding=True):
  """Each query lists its own chunk and 2 random past chunks (or -1 padding)."""
  rng = np.random.default_rng(seed)
  own = np.arange(L) // CHUNK
  query = np.empty((batch, route_heads, L, 3), np.int32)
  for b in range(batch):
    for h in range(route_heads):
      for t in range(L):
        past = rng.integers(0, max(own[t], 1), size=2)
        query[b, h, t] = [own[t], *past]
        if with_padding and rng.random() < 0.3:
          query[b, h, t, 2] = -1
  key = np.broadcast_to(np.arange(L, dtype=np.int32) // CHUNK, (batch, L)).copy()
  return TokenRoutes(jnp.asarray(query), jnp.asarray(key))


def _union_mask(routes, block_q, block_kv, q_heads):
  """Causal tiles holding some routed pair: the union of the queries' chunks."""
  query = np.asarray(jnp.repeat(routes.query, q_heads // routes.query.shape[1], axis=1))
  qb, kb = -(-L // block_q), -(-L // block_kv)
  layout = np.zeros((query.shape[0], q_heads, qb, kb), bool)
  for b, h, t, r in zip(*np.nonzero(query >= 0), strict=True):
    chunk = query[b, h, t, r]
    first, last = chunk * CHUNK, min((chunk + 1) * CHUNK, L) - 1
    layout[b, h, t // block_q, first // block_kv : last // block_kv + 1] = True
  geo = dict(block_q=block_q, block_kv=block_kv, q_len=L, kv_len=L)
  return masks.intersection(
    masks.causal(L, L, block_q=block_q, block_kv=block_kv), masks.from_layout(layout, **geo)
  )


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("route_heads, kv_heads", [(4, 2), (2, 2), (1, 1)])
def test_routes_match_reference(implementation, route_heads, kv_heads):
  q, k, v = testutil.qkv(2, L, L, 4, kv_heads, 16, 8, seed=route_heads)
  routes = _routes(2, route_heads, seed=kv_heads)
  mask = _union_mask(routes, 32, 16, 4)
  testutil.assert_matches_reference(
    q,
    k,
    v,
    mask,
    implementation,
    what=f"{implementation} Hr={route_heads}",
    routes=routes,
    interpret=True,
  )


def test_routes_really_select():
  """Dropping a query's routes changes its output; routes that allow everything in the
  visited tiles give plain causal attention."""
  q, k, v = testutil.qkv(1, L, L, 2, 2, 16)
  causal = masks.causal(L, L, block_q=32, block_kv=16)
  every = TokenRoutes(jnp.zeros((1, 1, L, 1), jnp.int32), jnp.zeros((1, L), jnp.int32))
  a = block_sparse_attention(q, k, v, causal, routes=every)
  np.testing.assert_allclose(a, block_sparse_attention(q, k, v, causal), atol=1e-6)
  routes = _routes(1, 2, seed=3, with_padding=False)
  b = block_sparse_attention(q, k, v, causal, routes=routes)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-2


@pytest.mark.parametrize("block_kv", [16, 8, 32])
def test_xla_routes_per_step(block_kv):
  """The xla engine matches a step's tiles once per query when each tile's keys share a
  route (kv tiles inside the chunks: 16, 8) and per key otherwise (32: two chunks per
  tile; the ragged last tile's padding): one tile per step takes both within one call."""
  from sparse_attention.ops.block_sparse_xla import block_sparse_attention_xla

  q, k, v = testutil.qkv(2, L, L, 4, 2, 16, 8, seed=block_kv)
  routes = _routes(2, 2, seed=block_kv)
  mask = _union_mask(routes, 32, block_kv, 4)
  attend = lambda q, k, v, mask: block_sparse_attention_xla(
    q, k, v, mask, scale=16**-0.5, routes=routes, chunk=1
  )
  testutil.assert_matches_reference(q, k, v, mask, attend, f"bk={block_kv}", routes=routes)


@pytest.mark.parametrize(
  "query_shape, key_shape, match",
  [
    ((1, 3, L, 2), (1, L), "divide"),
    ((1, 2, L - 1, 2), (1, L), "expected q_len"),
    ((2, 2, L, 2), (1, L), "batch dim"),
    ((1, 2, L, 2), (1, L, 1), "rank 2"),
  ],
)
def test_bad_routes_raise(query_shape, key_shape, match):
  q, k, v = testutil.qkv(1, L, L, 2, 2, 16)
  routes = TokenRoutes(jnp.zeros(query_shape, jnp.int32), jnp.zeros(key_shape, jnp.int32))
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, masks.causal(L, L, block_q=32, block_kv=16), routes=routes)


def test_none_picks_the_tpu_kernel_with_routes(monkeypatch):
  q, k, v = testutil.qkv(1, L, L, 2, 2, 16)
  mask = masks.causal(L, L, block_q=32, block_kv=16)
  routes = _routes(1, 2, seed=1)
  from sparse_attention.ops import block_sparse

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert block_sparse._resolve(None, False, q, k, v, mask, "op", routes) == "pallas_tpu"

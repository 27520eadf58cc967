"""The Mosaic GPU (Hopper) kernels: run in Mosaic GPU's interpreter on CPU against the
reference (outputs, lse, dq, dk, dv), and lowered for CUDA (the Mosaic GPU module,
TMA and wgmma included, is built on CPU, so lowering errors show up here).

Shapes are small and ragged (3 x 2 tiles of 64) and the persistent grid is 2 CTAs
wide, so that CTAs walk several work items, rings wrap, and ragged tails are read
through TMA's out-of-bounds fill: each case takes a few seconds interpreted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import TokenRoutes, masks
from sparse_attention.pallas_kernels.block_sparse import common, mosaic_gpu

Q_LEN, KV_LEN = 130, 120  # 3 q tiles and 2 kv tiles of 64, both ragged
MASKS = testutil.mask_cases(Q_LEN, KV_LEN, block_q=64, block_kv=64, heads=2, unit=24)


@functools.partial(jax.jit, static_argnames=("scale", "num_ctas"))
def mosaic(q, k, v, mask, routes=None, scale=None, num_ctas=2):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return mosaic_gpu.block_sparse_attention_mosaic_gpu(
    q, k, v, mask, scale=scale, routes=routes, interpret=True, num_ctas=num_ctas
  )


@pytest.mark.parametrize("name", list(MASKS))
def test_every_mask_gqa(name):
  """Every builder; GQA (2 query heads per kv head); bf16 and f16 alternate."""
  dtype = jnp.bfloat16 if list(MASKS).index(name) % 2 == 0 else jnp.float16
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 2, 1, 64, dtype=dtype, seed=len(name))
  testutil.assert_matches_reference(q, k, v, MASKS[name], mosaic, what=name)


def test_two_consumer_warpgroups_mqa_empty_rows_and_explicit_scale():
  """128-row tiles (2 consumer warpgroups in every kernel), MQA, D != Dv, a random
  layout whose rows and columns are partly empty, and a scale that is not the default."""
  q_len, kv_len = 200, 150
  layout = testutil.random_layout(1, 2, q_len, kv_len, 128, 128, 0.6, seed=3)
  layout[0, 1, 0] = False  # a q tile that sees nothing
  mask = masks.from_layout(layout, block_q=128, block_kv=128, q_len=q_len, kv_len=kv_len)
  q, k, v = testutil.qkv(1, q_len, kv_len, 2, 1, 128, 64, dtype=jnp.bfloat16)
  attend = functools.partial(mosaic, scale=0.7)
  testutil.assert_matches_reference(q, k, v, mask, attend, what="128x128", scale=0.7)


def test_token_routes():
  """MoBA/NSA-style token routes (one route head per kv head)."""
  q, k, v = testutil.qkv(1, Q_LEN, KV_LEN, 4, 2, 64, dtype=jnp.bfloat16, seed=5)
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  routes = TokenRoutes(
    query=jax.random.randint(keys[0], (1, 2, Q_LEN, 2), -1, 4),
    key=jax.random.randint(keys[1], (1, KV_LEN), 0, 4),
  )
  attend = lambda q, k, v, m: mosaic(q, k, v, m, routes)
  testutil.assert_matches_reference(q, k, v, MASKS["causal"], attend, what="routes", routes=routes)


def test_work_list_longest_items_first_and_full_tiles_first():
  mask = masks.union(
    masks.sliding_window(256, 256, window=40, block_q=64, block_kv=64),
    masks.from_layout(
      testutil.random_layout(1, 1, 256, 256, 64, 64, 0.4, seed=1),
      block_q=64,
      block_kv=64,
      q_len=256,
      kv_len=256,
    ),
  )
  cfg = mosaic_gpu._Config(
    **common.Tiling.fields_of(mask), scale=1.0, head_dim=64, v_head_dim=64, group=1,
    num_routes=0, route_group=1, interpret=True, num_stages=2, num_ctas=2,
  )  # fmt: skip
  view = (mask.kv_count, mask.kv_index, mask.kv_partial)
  meta, tiles = map(np.asarray, mosaic_gpu._work_list(cfg, *view, 2, 3, 1, along_q=False))
  assert meta.shape == (2 * 3 * 4, 1, 5)
  counts = meta[:, 0, 3]
  assert (np.diff(counts) <= 0).all()
  for (b, h, i, count, full), row in zip(meta[:, 0], tiles[:, 0], strict=True):
    ids, partial = row[:count] // 2, row[:count] % 2
    listed = np.asarray(mask.kv_index[0, 0, i, : mask.kv_count[0, 0, i]])
    assert sorted(ids) == sorted(listed) and (b, h) < (2, 3)
    assert not partial[:full].any()  # full tiles first, none of them partial
    assert np.asarray(mask.kv_partial[0, 0, i])[np.searchsorted(listed, ids[full:])].all()


@pytest.mark.parametrize(
  "dtype, block_q, block_kv, head_dim, match",
  [
    (jnp.float32, 64, 64, 64, "bf16/f16"),
    (jnp.bfloat16, 32, 64, 64, "block_q"),
    (jnp.bfloat16, 64, 64, 96, "head dims"),
    (jnp.bfloat16, 128, 128, 256, "SMEM"),
  ],
)
def test_unsupported_raises(dtype, block_q, block_kv, head_dim, match):
  q, k, v = testutil.qkv(1, 256, 256, 2, 2, head_dim, dtype=dtype)
  m = masks.causal(256, 256, block_q=block_q, block_kv=block_kv)
  with pytest.raises(common.Unsupported, match=match):
    mosaic_gpu.block_sparse_attention_mosaic_gpu(q, k, v, m, scale=0.1, interpret=True)


def _lowered(mask, heads, dims, grad: bool, routes=None) -> str:
  q = jax.ShapeDtypeStruct((1, mask.q_len, heads[0], dims[0]), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, mask.kv_len, heads[1], dims[0]), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, mask.kv_len, heads[1], dims[1]), jnp.bfloat16)

  def forward(q, k, v, m, r):
    return mosaic_gpu.block_sparse_attention_mosaic_gpu(q, k, v, m, scale=0.1, routes=r)[0]

  fn = forward
  if grad:
    fn = jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  return jax.jit(fn).trace(q, k, v, mask, routes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "mask, heads, dims",
  [
    (masks.causal(2048, 2048, block_q=128, block_kv=128), (8, 2), (128, 128)),
    (
      masks.chunked(1000, 1000, chunk=100, causal=True, block_q=64, block_kv=64),
      (4, 1),
      (256, 256),
    ),
    (masks.sliding_window(1021, 999, window=100, block_q=128, block_kv=64), (4, 4), (64, 128)),
  ],
)
def test_lowers_to_mosaic_gpu_for_cuda(mask, heads, dims):
  """Forward = 1 Mosaic GPU kernel; gradient = forward + dQ + dK/dV."""
  assert _lowered(mask, heads, dims, grad=False).count("custom_call @mosaic_gpu") == 1
  assert _lowered(mask, heads, dims, grad=True).count("custom_call @mosaic_gpu") == 3


def test_lowers_for_cuda_with_token_routes():
  mask = masks.causal(1024, 1024, block_q=128, block_kv=128)
  routes = TokenRoutes(
    jax.ShapeDtypeStruct((1, 2, 1024, 3), jnp.int32), jax.ShapeDtypeStruct((1, 1024), jnp.int32)
  )
  text = _lowered(mask, (4, 2), (128, 128), grad=True, routes=routes)
  assert text.count("custom_call @mosaic_gpu") == 3

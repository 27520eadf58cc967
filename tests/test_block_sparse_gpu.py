"""The Triton-lowering kernels: interpreted on CPU vs the reference, and lowered
for CUDA (the Triton IR is built on CPU, so lowering errors show up here)."""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import masks
from sparse_attention.pallas_kernels.block_sparse import common, gpu

MASKS = testutil.mask_cases()


def triton(q, k, v, mask, scale=None):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return gpu.block_sparse_attention_triton(q, k, v, mask, scale=scale, interpret=True)


@pytest.mark.parametrize("name", list(MASKS))
def test_every_mask_f32_gqa(name):
  q, k, v = testutil.qkv(2, testutil.Q_LEN, testutil.KV_LEN, 4, 2, 16, 8, seed=len(name))
  testutil.assert_matches_reference(q, k, v, MASKS[name], triton, what=name)


@pytest.mark.parametrize("name", ["causal_empty_rows", "window_with_anchors", "union"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(name, dtype):
  q, k, v = testutil.qkv(2, testutil.Q_LEN, testutil.KV_LEN, 4, 4, 32, dtype=dtype)
  testutil.assert_matches_reference(q, k, v, MASKS[name], triton, what=name)


@pytest.mark.parametrize(
  "q_heads, kv_heads, head_dim, v_head_dim",
  [(4, 1, 96, 96), (6, 3, 64, 24), (2, 2, 20, 48)],
)
def test_mqa_and_head_dims_that_are_not_powers_of_two(q_heads, kv_heads, head_dim, v_head_dim):
  q, k, v = testutil.qkv(1, 70, 130, q_heads, kv_heads, head_dim, v_head_dim)
  layout = testutil.random_layout(1, q_heads, 70, 130, 32, 64, 0.6, seed=q_heads)
  m = masks.from_layout(layout, block_q=32, block_kv=64, q_len=70, kv_len=130)
  testutil.assert_matches_reference(q, k, v, m, triton, what=f"d={head_dim}/{v_head_dim}")


def test_dq_in_64_key_steps():
  """128 x 128 bf16 tiles at head dim 128: dQ walks each kv tile in two 64-key steps
  (whole tiles would not fit a 3-deep ring in SMEM); causal, ragged, GQA."""
  q, k, v = testutil.qkv(1, 200, 250, 2, 1, 128, dtype=jnp.bfloat16)
  m = masks.causal(200, 250, block_q=128, block_kv=128, offset=50)
  testutil.assert_matches_reference(q, k, v, m, triton, what="64-key dq")


def test_explicit_scale():
  q, k, v = testutil.qkv(1, 64, 64, 2, 2, 16)
  m = masks.causal(64, 64, block_q=16, block_kv=16)
  attend = functools.partial(triton, scale=0.7)
  testutil.assert_matches_reference(q, k, v, m, attend, what="scale", scale=0.7)


@pytest.mark.parametrize(
  "block_q, block_kv, head_dim, match",
  [(24, 32, 16, "block_q"), (32, 8, 16, "block_kv"), (32, 32, 320, "head_dim")],
)
def test_unsupported_raises(block_q, block_kv, head_dim, match):
  q, k, v = testutil.qkv(1, 64, 64, 2, 2, head_dim)
  m = masks.causal(64, 64, block_q=block_q, block_kv=block_kv)
  with pytest.raises(common.Unsupported, match=match):
    triton(q, k, v, m)


def test_int32_offsets_guard():
  """B x H x padded S x padded D >= 2**31 elements overflows the int32 offsets: refused
  (shapes only; the mask stand-in carries just the geometry)."""
  big = jax.ShapeDtypeStruct((1, 2**20, 16, 128), jnp.bfloat16)  # 2**31 elements
  geometry = lambda n: types.SimpleNamespace(block_q=128, block_kv=128, q_len=n, kv_len=n)
  with pytest.raises(common.Unsupported, match="int32 offsets"):
    gpu.check_supported(big, big, big, geometry(2**20))
  ok = jax.ShapeDtypeStruct((1, 2**20 - 128, 16, 128), jnp.bfloat16)
  gpu.check_supported(ok, ok, ok, geometry(2**20 - 128))


def test_pipeline_depth_fits_shared_memory():
  """Each kernel gets the deepest pipeline whose SMEM fits (227 KB on sm90, the budget
  when lowering on a host): 3 stages for all three at 128 x 128 bf16 tiles and head dim
  128 (dQ in 64-key steps: whole 128-key steps would need 256 KB), 1 for f32 here."""
  mask = masks.causal(256, 256, block_q=128, block_kv=128)
  tile = 128 * 128 * 2
  q = jnp.zeros((1, 256, 2, 128))
  cfg = gpu._config(q, q, q, mask, scale=1.0, interpret=False)
  assert gpu._stages(cfg, 2 * tile, 4 * tile) == 1  # f32 tiles
  for dtype, stages in ((jnp.bfloat16, [3, 3, 3]), (jnp.float32, [1, 1, 1])):
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), dtype)

    def loss(q, k, v, m):
      return gpu.block_sparse_attention_triton(q, k, v, m, scale=0.1)[0].astype(jnp.float32).sum()

    text = testutil.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, mask)
    assert [int(n) for n in re.findall(r"num_stages = (\d+)", text)] == stages, dtype


def _lowered_kernels(mask, q_heads, kv_heads, head_dim, v_head_dim, grad: bool) -> int:
  seq_q, seq_kv = mask.q_len, mask.kv_len
  q = jax.ShapeDtypeStruct((1, seq_q, q_heads, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, seq_kv, kv_heads, head_dim), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, seq_kv, kv_heads, v_head_dim), jnp.bfloat16)

  def forward(q, k, v, m):
    return gpu.block_sparse_attention_triton(q, k, v, m, scale=0.1)[0]

  fn = forward
  if grad:
    fn = jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  return testutil.lower_for_cuda(fn, q, k, v, mask).count("xla.gpu.triton")


@pytest.mark.parametrize(
  "mask, heads, dims",
  [
    (masks.causal(2048, 2048, block_q=128, block_kv=64), (8, 2), (128, 128)),
    (masks.sliding_window(1021, 1021, window=100, block_q=64, block_kv=32), (4, 1), (192, 192)),
    (
      masks.from_layout(
        np.random.default_rng(0).random((1, 4, 8, 8)) < 0.3,
        block_q=128,
        block_kv=128,
        q_len=1024,
        kv_len=1024,
      ),
      (4, 2),  # GQA under a per-head mask: dK/dV reads its group's mask rows
      (96, 64),
    ),
    (masks.chunked(512, 512, chunk=100, causal=True, block_q=64, block_kv=64), (2, 2), (256, 256)),
  ],
)
def test_lowers_to_triton_for_cuda(mask, heads, dims):
  """Forward = 1 Triton kernel; gradient = forward + dQ + dK/dV."""
  assert _lowered_kernels(mask, *heads, *dims, grad=False) == 1
  assert _lowered_kernels(mask, *heads, *dims, grad=True) == 3


def test_lowers_to_triton_for_cuda_with_token_routes():
  from sparse_attention.ops import TokenRoutes

  seq = 1024
  mask = masks.causal(seq, seq, block_q=128, block_kv=64)
  q = jax.ShapeDtypeStruct((1, seq, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, seq, 2, 128), jnp.bfloat16)
  routes = TokenRoutes(
    jax.ShapeDtypeStruct((1, 4, seq, 3), jnp.int32), jax.ShapeDtypeStruct((1, seq), jnp.int32)
  )

  def loss(q, k, v, m, r):
    out = gpu.block_sparse_attention_triton(q, k, v, m, scale=0.1, routes=r)[0]
    return out.astype(jnp.float32).sum()

  text = testutil.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, mask, routes)
  assert text.count("xla.gpu.triton") == 3


def test_calibration_kernel_lowers_to_triton_for_cuda():
  seq = 2048
  mask = masks.window_with_anchors(seq, seq, window=64, num_anchors=2, block_q=128, block_kv=64)
  visited, full = mask.block_layout()
  codes = visited.astype(jnp.int32) + (visited & ~full).astype(jnp.int32)
  q = jax.ShapeDtypeStruct((1, seq, 4, 128), jnp.bfloat16)

  def calibrate(q, k, v, m, codes):
    return gpu.calibrate_triton(q, k, v, m, codes, scale=0.1)

  text = testutil.lower_for_cuda(calibrate, q, q, q, mask, codes)
  assert text.count("xla.gpu.triton") == 1

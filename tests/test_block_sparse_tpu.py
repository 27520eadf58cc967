"""The Mosaic (TPU) kernels: run in the Pallas TPU simulator on CPU against the
reference, and lowered for TPU (the Mosaic module is built on CPU, so Pallas
lowering errors show up here). Mosaic's own compiler ships in libtpu (the test
extra installs it through jax[tpu]): the last test compiles the kernels for v5e and
v6e topologies on this host, without a TPU."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from jax.experimental.pallas import tpu as pltpu

from sparse_attention.ops import masks
from sparse_attention.pallas_kernels.block_sparse import common, tpu

# Ragged lengths: with block_kv = 128, 3 kv blocks; with block_q = 64 (dK/dV
# transposes its tiles) 4 q blocks, with block_q = 128 (dK/dV kv-major) 2.
Q_LEN, KV_LEN = 200, 300
BQ64 = dict(block_q=64, block_kv=128)
BQ128 = dict(block_q=128, block_kv=128)
QB, KB = 4, 3  # for BQ64
HEADS = 4
RAISE_OOB = pltpu.InterpretParams(out_of_bounds_reads="raise")


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))  # jit: compiles faster
def mosaic(q, k, v, mask, scale=None, interpret=RAISE_OOB):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return tpu.block_sparse_attention_tpu(q, k, v, mask, scale=scale, interpret=interpret)


def _layout(bm, hm, density, seed):
  return testutil.random_layout(bm, hm, Q_LEN, KV_LEN, 64, 128, density, seed)


def _mask_cases() -> dict:
  g64 = dict(q_len=Q_LEN, kv_len=KV_LEN, **BQ64)
  g128 = dict(q_len=Q_LEN, kv_len=KV_LEN, **BQ128)
  return {
    "causal": masks.causal(Q_LEN, KV_LEN, **BQ128),
    "causal_empty_rows": masks.causal(Q_LEN, KV_LEN, offset=-70, **BQ64),  # q block 0 sees nothing
    "sliding_window": masks.sliding_window(Q_LEN, KV_LEN, window=(40, 100), **BQ128),
    "window_with_anchors": masks.window_with_anchors(
      Q_LEN, KV_LEN, window=30, num_anchors=1, offset=2, **BQ64
    ),
    "layout_per_batch_head": masks.from_layout(_layout(2, HEADS, 0.5, seed=0), **g64),
    "topk_causal_diag": masks.topk_blocks(
      jax.random.normal(jax.random.PRNGKey(3), (1, HEADS, 2, KB)),
      2,
      keep_diagonal=True,
      causal=True,
      **g128,
    ),
    "union": masks.union(
      masks.sliding_window(Q_LEN, KV_LEN, window=20, **BQ64),
      masks.from_layout(_layout(1, HEADS, 0.3, seed=1), **g64),
    ),
  }


MASKS = _mask_cases()


# (q heads, kv heads, head_dim, v_head_dim) per mask: GQA, MQA, MHA, Dv != D.
HEAD_CONFIGS = {
  "causal": (4, 2, 64, 64),
  "causal_empty_rows": (4, 2, 64, 64),
  "sliding_window": (4, 1, 64, 32),
  "window_with_anchors": (4, 2, 96, 128),
  "layout_per_batch_head": (4, 2, 64, 64),
  "topk_causal_diag": (4, 4, 128, 64),
  "union": (4, 1, 64, 64),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_every_mask_f32(name):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, *HEAD_CONFIGS[name], seed=len(name))
  testutil.assert_matches_reference(q, k, v, MASKS[name], mosaic, what=name)


@pytest.mark.parametrize(
  "name, dtype",
  [
    ("causal_empty_rows", jnp.bfloat16),
    ("layout_per_batch_head", jnp.bfloat16),
    ("sliding_window", jnp.float16),  # computed in float32
  ],
)
def test_low_precision(name, dtype):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, *HEAD_CONFIGS[name], dtype=dtype)
  testutil.assert_matches_reference(q, k, v, MASKS[name], mosaic, what=name)


def test_race_detection_scale_and_one_block_covering_the_queries():
  """Also: the sublane rule does not bind a block that covers its sequence."""
  q, k, v = testutil.qkv(1, 36, 256, 2, 1, 64)
  m = masks.causal(36, 256, block_q=36, block_kv=128, offset=150)
  params = pltpu.InterpretParams(out_of_bounds_reads="raise", detect_races=True)
  attend = functools.partial(mosaic, scale=0.3, interpret=params)
  testutil.assert_matches_reference(q, k, v, m, attend, what="races", scale=0.3)


def test_mask_split_over_calls_when_smem_is_short(monkeypatch):
  """A view larger than the SMEM budget is walked in several calls, each
  prefetching only its block rows. A row costs 4 heads x (1 + 3) entries of
  the forward view, 4 x (1 + 4) of the transposed one: with 40 entries, the
  forward and dq run 2 + 2 of the 4 q-block rows, dk/dv 2 + 1 of the 3
  kv-block rows."""
  monkeypatch.setattr(tpu, "MAX_PREFETCH_WORDS", 40)
  m = MASKS["union"]
  assert m.batch_heads == (1, HEADS) and (m.max_kv_blocks, m.max_q_blocks) == (KB, QB)
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, *HEAD_CONFIGS["union"], seed=5)
  attend = jax.jit(functools.partial(mosaic.__wrapped__, scale=0.125))  # not traced before
  testutil.assert_matches_reference(q, k, v, m, attend, what="split", scale=0.125)
  assert _lowered(m, *HEAD_CONFIGS["union"], grad=False).count("tpu_custom_call") == 2
  assert _lowered(m, *HEAD_CONFIGS["union"], grad=True).count("tpu_custom_call") == 6


def test_fully_empty_mask_and_traced_mask():
  q, k, v = testutil.qkv(1, 100, 200, 2, 2, 64)
  layout = np.zeros((1, 2, 2, 2), bool)

  @jax.jit
  def run(q, k, v, layout):
    m = masks.from_layout(layout, block_q=64, block_kv=128, q_len=100, kv_len=200)
    return testutil.outputs_and_grads(q, k, v, m, functools.partial(mosaic, interpret=True))

  out, lse, grads = run(q, k, v, layout)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  for g in grads:
    assert (np.asarray(g) == 0).all()
  layout[0, 1, 1, 0] = layout[0, 0, 0, 1] = True
  got = run(q, k, v, layout)
  m = masks.from_layout(layout, block_q=64, block_kv=128, q_len=100, kv_len=200)
  want = testutil.outputs_and_grads(q, k, v, m, "reference")
  for a, e, kind in zip(got[:2], want[:2], ("out", "lse"), strict=True):
    testutil.assert_close(a, e, jnp.float32, kind, kind)
  for a, e in zip(got[2], want[2], strict=True):
    testutil.assert_close(a, e, jnp.float32, "grad", "grad")


@pytest.mark.parametrize(
  "block_q, block_kv, dtype, match",
  [
    (12, 128, jnp.float32, "block_q"),
    (64, 100, jnp.bfloat16, "block_kv"),
    (64, 128, jnp.int32, "dtype|int32"),
  ],
)
def test_unsupported_raises(block_q, block_kv, dtype, match):
  q, k, v = testutil.qkv(1, 256, 256, 2, 2, 64)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  m = masks.causal(256, 256, block_q=block_q, block_kv=block_kv)
  with pytest.raises(common.Unsupported, match=match):
    tpu.check_supported(q, k, v, m)
  with pytest.raises(common.Unsupported, match=match):
    mosaic(q, k, v, m)


@pytest.mark.parametrize(
  "shape, block_q, block_kv, match",
  [((1, 2, 32, 2), 8, 128, "max_q_blocks=32"), ((1, 2, 2, 32), 128, 8, "max_kv_blocks=32")],
)
def test_smem_limit_raises(monkeypatch, shape, block_q, block_kv, match):
  """One block row of a view (2 heads x (1 + 32 slots)) must fit SMEM."""
  monkeypatch.setattr(tpu, "MAX_PREFETCH_WORDS", 50)
  q, k, v = testutil.qkv(1, 256, 256, 2, 2, 64)
  m = masks.from_layout(
    np.ones(shape, bool), block_q=block_q, block_kv=block_kv, q_len=256, kv_len=256
  )
  with pytest.raises(common.Unsupported, match=match):
    tpu.check_supported(q, k, v, m)


def _lowered(mask, q_heads, kv_heads, head_dim, v_head_dim, grad: bool):
  q = jax.ShapeDtypeStruct((1, mask.q_len, q_heads, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, mask.kv_len, kv_heads, head_dim), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, mask.kv_len, kv_heads, v_head_dim), jnp.bfloat16)

  def forward(q, k, v, m):
    return tpu.block_sparse_attention_tpu(q, k, v, m, scale=0.1)

  fn = forward
  if grad:

    def fn(q, k, v, m):
      def loss(q, k, v):
        out, lse = forward(q, k, v, m)
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return jax.jit(fn).trace(q, k, v, mask).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize(
  "mask, heads, dims",
  [
    (masks.causal(2048, 2048, block_q=128, block_kv=128), (8, 2), (128, 128)),
    (
      masks.window_with_anchors(1000, 1000, window=100, num_anchors=2, block_q=128, block_kv=128),
      (4, 1),
      (192, 192),
    ),
    (
      masks.from_layout(
        np.random.default_rng(0).random((1, 4, 8, 4)) < 0.4,
        block_q=64,
        block_kv=256,
        q_len=512,
        kv_len=1000,
      ),
      (4, 4),
      (96, 64),
    ),
  ],
)
def test_lowers_to_mosaic_for_tpu(mask, heads, dims):
  """Forward = 1 Mosaic kernel; gradient = forward + dQ + dK/dV."""
  assert _lowered(mask, *heads, *dims, grad=False).count("tpu_custom_call") == 1
  assert _lowered(mask, *heads, *dims, grad=True).count("tpu_custom_call") == 3


@pytest.mark.parametrize("masked_output", [True, False])
def test_calibration_lowers_to_mosaic_for_tpu(masked_output):
  """One Mosaic kernel, partial tiles (mask_fn) included, with and without O^M."""
  mask = masks.window_with_anchors(1024, 1024, window=64, num_anchors=2, block_q=128, block_kv=128)
  visited, full = mask.block_layout()
  codes = visited.astype(jnp.int32) + (visited & ~full).astype(jnp.int32)
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)

  def calibrate(q, k, v, m, codes):
    return tpu.calibrate_tpu(q, k, v, m, codes, scale=0.1, masked_output=masked_output)

  lowered = jax.jit(calibrate).trace(q, q, q, mask, codes).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 1


_MOSAIC_COMPILE = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from sparse_attention.ops import masks
from sparse_attention.pallas_kernels.block_sparse import tpu

def loss(q, k, v, m):
  out, lse = tpu.block_sparse_attention_tpu(q, k, v, m, scale=0.1)
  return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

for topology in ("v5e:2x2", "v6e:2x2"):
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(device))
  for m, dtype, heads, d in [
    (masks.causal(1024, 1024, block_q=128, block_kv=128), jnp.bfloat16, (8, 2), 128),
    (masks.sliding_window(300, 700, window=96, block_q=64, block_kv=128), jnp.float32, (4, 1), 192),
  ]:
    q = jax.ShapeDtypeStruct((2, m.q_len, heads[0], d), dtype)
    kv = jax.ShapeDtypeStruct((2, m.kv_len, heads[1], d), dtype)
    args = jax.tree.map(on_tpu, (q, kv, kv, m))
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
  print("compiled for", topology)
"""


def test_mosaic_compiles_for_v5e_and_v6e_without_a_tpu():
  """libtpu (jax[tpu], in the test extra) compiles the kernels, forward and backward,
  for TPU topologies on any host: Mosaic's layout and VMEM/SMEM errors show up here."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  run = subprocess.run(
    [sys.executable, "-c", _MOSAIC_COMPILE], env=env, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  for topology in ("v5e:2x2", "v6e:2x2"):
    assert f"compiled for {topology}" in run.stdout, run.stdout

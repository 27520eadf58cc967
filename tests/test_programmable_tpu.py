"""score_mod / mask_mod in the Mosaic TPU kernel, run in the TPU simulator on CPU.

The cases it takes (outputs and gradients of q, k, v and the score_mod parameters
against a float64 dense computation of the same functions), those it refuses (a
parameter gathered per element: T5's bias table, document ids; `None` then runs
"xla"), the global b / h under vmap and shard offsets, and a libtpu compile of a mod
case for v5e and v6e. Shapes are the smallest the TPU tiling takes (blocks of 128).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import block_sparse, block_sparse_attention, dispatch, masks, score_mods
from sparse_attention.pallas_kernels.block_sparse import common, tpu

B, L, HQ, HKV, D = 2, 256, 2, 1, 128
GEO = dict(block_q=128, block_kv=128)
PREFIX = jnp.array([10, 140])  # row 1's prefix ends inside the second block


softcap = score_mods.Softcap(20.0)
alibi = score_mods.alibi


def temperature_and_shift(score, b, h, q_idx, kv_idx, p):
  """0-d leaves read as p[()], an integer leaf (no gradient), a 2-d leaf read at
  [b, h]."""
  return score * p["t"][()] + jnp.where(kv_idx - q_idx == p["shift"][()], p["bias"][b, h], 0.0)


def window40(b, h, q_idx, kv_idx):
  return (kv_idx <= q_idx) & (q_idx - kv_idx < 40)


def t5_bias(score, b, h, q_idx, kv_idx, table):
  bucket = jnp.clip(kv_idx - q_idx, -8, 7) + 8  # a per-element index into the table
  return score + table[bucket, h]


def _cases():
  return {
    "softcap_causal": (masks.causal(L, L, **GEO), softcap, None),
    "alibi_prefix_lm": (masks.prefix_lm(PREFIX, L, **GEO), alibi, jnp.array([0.5, 0.125])),
    "window40_predicate_scalars": (
      masks.create_block_mask(window40, 1, 1, L, L, **GEO),
      temperature_and_shift,
      {"t": jnp.float32(0.8), "shift": jnp.int32(-3), "bias": jnp.array([[1.0, -2.0], [0.5, 3.0]])},
    ),
  }


CASES = _cases()


def _dense_f64(q, k, v, visible, score_mod, params):
  """softmax(score_mod(q k^T / sqrt(D)), visible) v, the definition, in float64."""
  g = q.shape[2] // k.shape[2]
  kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[-1] ** -0.5
  if score_mod is not None:
    idx = functools.partial(jnp.arange, dtype=jnp.int32)
    b, h = idx(q.shape[0])[:, None, None, None], idx(q.shape[2])[None, :, None, None]
    args = (s, b, h, idx(q.shape[1])[:, None], idx(k.shape[1])[None, :])
    s = score_mod(*args, params) if params is not None else score_mod(*args)
  s = jnp.where(visible, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vv)
  return out, lse


def _outputs_and_grads(attend, q, k, v, params, ct):
  def loss(q, k, v, params):
    out, lse = attend(q, k, v, params)
    return jnp.sum(out * ct[0]) + jnp.sum(lse * ct[1]), (out, lse)

  argnums = (0, 1, 2) if params is None else (0, 1, 2, 3)
  grads, (out, lse) = jax.grad(loss, argnums=argnums, has_aux=True, allow_int=True)(q, k, v, params)
  return out, lse, grads


def _inputs():
  q, k, v = testutil.qkv(B, L, L, HQ, HKV, D, seed=3)
  ct = (jax.random.normal(jax.random.key(1), (B, L, HQ, D)), jnp.ones((B, HQ, L)))
  return q, k, v, ct


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_float64_definition(name):
  mask, score_mod, params = CASES[name]
  q, k, v, ct = _inputs()
  visible = jnp.asarray(mask.to_dense())
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    p64 = jax.tree.map(lambda x: f64(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    attend = lambda q, k, v, p: _dense_f64(q, k, v, visible, score_mod, p)
    expected = jax.tree.map(np.asarray, _outputs_and_grads(attend, f64(q), f64(k), f64(v), p64, ct))

  @jax.jit
  def run(q, k, v, params):
    attend = lambda q, k, v, p: block_sparse_attention(
      q, k, v, mask, implementation="pallas_tpu", interpret=True, return_lse=True,
      score_mod=score_mod, score_mod_params=p,
    )  # fmt: skip
    return _outputs_and_grads(attend, q, k, v, params, ct)

  out, lse, grads = run(q, k, v, params)
  e_out, e_lse, e_grads = expected
  testutil.assert_close(out, e_out, jnp.float32, "out", f"{name} out")
  testutil.assert_close(lse, e_lse, jnp.float32, "lse", f"{name} lse")
  names = ("dq", "dk", "dv", "d_params")
  for what, g, e in zip(names, grads, e_grads, strict=False):
    leaves = zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(e), strict=True)
    for (path, gl), el in leaves:
      if gl.dtype == jax.dtypes.float0:  # an integer parameter: no gradient
        continue
      assert np.abs(el).max() > 0, f"{name} {what}: the test needs a nonzero gradient"
      testutil.assert_close(gl, el, jnp.float32, "grad", f"{name} {what}{path}")


def test_global_batch_row_under_vmap_and_shard_offsets():
  """The mods see global b and h: vmap folds the mapped axis into the batch (b is
  still the row of q), and a kernel call on a slice of the batch and heads gets its
  offsets (as under shard_map). Expected values from the xla path."""
  mask, score_mod, params = CASES["alibi_prefix_lm"]
  q, k, v, _ = _inputs()
  attend = functools.partial(
    tpu.block_sparse_attention_tpu,
    scale=D**-0.5,
    interpret=True,
    score_mod=common.ScoreMod(score_mod, has_params=True),
    score_mod_params=params,
  )
  xla = lambda q, k, v: block_sparse_attention(
    q, k, v, mask, implementation="xla", return_lse=True, score_mod=score_mod,
    score_mod_params=params,
  )  # fmt: skip
  stacked = lambda x: jnp.stack([x, x[::-1]])  # example 1 swaps the batch rows
  mapped = jax.vmap(lambda q, k, v: attend(q, k, v, mask))(stacked(q), stacked(k), stacked(v))
  full = xla(q, k, v)
  for i, want in enumerate((full, xla(q[::-1], k[::-1], v[::-1]))):
    for got, exp in zip(mapped, want, strict=True):
      np.testing.assert_allclose(got[i], exp, atol=1e-5, rtol=0)
  # Batch row 1 and query head 1 (with its kv head) alone, as one device of a mesh
  # runs them: prefix[1] and slopes[1] must apply.
  row1 = jax.tree.map(lambda x: x[1:], mask.replace_params(())).replace_params(mask.mask_params)
  out, lse = attend(q[1:, :, 1:], k[1:], v[1:], row1, batch_offset=1, head_offset=1)
  np.testing.assert_allclose(out, full[0][1:, :, 1:], atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, full[1][1:, 1:], atol=1e-5, rtol=0)


def _tpu_platform(monkeypatch):
  """Dispatch as on a TPU host (its kernel table), to see what None resolves to."""
  monkeypatch.setattr(dispatch, "backend_kernels", lambda backend: ("pallas_tpu",))


def _resolve(mask, score_mod, params, implementation=None):
  q, k, v, _ = _inputs()
  mod = None if score_mod is None else common.ScoreMod(score_mod, params is not None)
  return block_sparse._resolve(implementation, False, q, k, v, mask, "op", None, mod, params)


@pytest.mark.parametrize(
  "mask, score_mod, params, match",
  [
    (
      masks.dense(L, L, **GEO),
      t5_bias,
      jnp.zeros((16, HQ)),
      r"score_mod_params of shape \(16, 2\).*array\(128, 128\)",
    ),
    (
      masks.document(jnp.repeat(jnp.arange(4), 64)[None].repeat(B, 0), causal=True, **GEO),
      None,
      None,
      r"mask_params\[0\] of shape \(2, 256\).*array\(128, 128\)",
    ),
    (masks.causal(L, L, **GEO), lambda s, b, h, i, j, p: s * p, jnp.float32(2.0), "TypeError"),
    (
      masks.causal(L, L, **GEO),
      lambda s, b, h, i, j: s + jnp.asarray(np.arange(L, dtype=np.float32))[j],
      None,
      "constant|gather",
    ),
    (masks.causal(L, L, **GEO), alibi, jnp.ones((tpu.MAX_PARAM_WORDS,)), "SMEM"),
    (masks.causal(L, L, **GEO), alibi, jnp.ones((2, 4096), jnp.int32), "scalar per dim|2, 4096"),
  ],
  ids=["t5_table_gather", "document_ids", "unindexed_param", "captured_table", "large", "slice"],
)
def test_refused_mods_fall_back_to_xla(monkeypatch, mask, score_mod, params, match):
  mod = None if score_mod is None else common.ScoreMod(score_mod, params is not None)
  q, k, v, _ = _inputs()
  with pytest.raises(common.Unsupported, match=match):
    tpu.check_supported(q, k, v, mask, score_mod=mod, score_mod_params=params)
  with pytest.raises(ValueError, match="implementation='pallas_tpu'"):
    _resolve(mask, score_mod, params, "pallas_tpu")
  _tpu_platform(monkeypatch)
  assert _resolve(mask, score_mod, params) == "xla"


@pytest.mark.parametrize("name", sorted(CASES))
def test_supported_mods_resolve_to_the_kernel(monkeypatch, name):
  _tpu_platform(monkeypatch)
  assert _resolve(*CASES[name]) == "pallas_tpu"


_MOSAIC_COMPILE = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from sparse_attention.ops import masks
from sparse_attention.pallas_kernels.block_sparse import common, tpu

def alibi_softcap(score, b, h, q_idx, kv_idx, p):
  return 30.0 * jnp.tanh(score / 30.0) - p["slopes"][h] * jnp.abs(q_idx - kv_idx) + p["bias"][b, h]

mod = common.ScoreMod(alibi_softcap, has_params=True)

def loss(q, k, v, p, m):
  out, lse = tpu.block_sparse_attention_tpu(
    q, k, v, m, scale=0.1, score_mod=mod, score_mod_params=p
  )
  return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

# v5e: kv-major dK/dV (block_q 128), a mask_mod with parameters, bf16;
# v6e: q-major dK/dV (block_q 64), a structured mask, f32.
for topology, m, dtype, heads in [
  ("v5e:2x2", masks.prefix_lm(jnp.array([100, 300]), 1024), jnp.bfloat16, (8, 2)),
  ("v6e:2x2", masks.sliding_window(300, 300, window=96, block_q=64), jnp.float32, (4, 1)),
]:
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(device))
  q = jax.ShapeDtypeStruct((2, m.q_len, heads[0], 128), dtype)
  kv = jax.ShapeDtypeStruct((2, m.kv_len, heads[1], 128), dtype)
  p = {
    "slopes": jax.ShapeDtypeStruct((heads[0],), jnp.float32),
    "bias": jax.ShapeDtypeStruct((2, heads[0]), jnp.bfloat16),
  }
  args = jax.tree.map(on_tpu, (q, kv, kv, p, m))
  jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower().compile()
  print("compiled for", topology)
"""


def test_mods_compile_for_v5e_and_v6e_without_a_tpu():
  """libtpu compiles the kernels with a score_mod (parameters in SMEM, their gradients)
  and a mask_mod with parameters, forward and backward."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  run = subprocess.run(
    [sys.executable, "-c", _MOSAIC_COMPILE], env=env, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  for topology in ("v5e:2x2", "v6e:2x2"):
    assert f"compiled for {topology}" in run.stdout, run.stdout

"""score_mod / mask_mod in the GPU kernels, interpreted on CPU, against float64.

The programmable cases of test_programmable.py (softcap + causal; ALiBi with learned
slopes + packed documents; a T5 bias from a learned table, no mask; prefix-LM with
per-row prefixes; a causal 40-key window as a predicate) run through the Triton kernel
(interpreted: fp32, ragged tiles of 32, GQA) and, where it takes them, the Mosaic GPU
kernel (its interpreter: bf16, ragged tiles of 64, a 2-CTA persistent grid); outputs,
lse and the gradients of q, k, v and the score_mod's parameters equal a float64 dense
computation of the same functions. Both kernels also lower for CUDA with mods, and
refuse the mods they cannot lower.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from test_programmable import alibi, dense_f64, softcap, t5_bias, window40

from sparse_attention.ops import block_sparse_attention, masks
from sparse_attention.pallas_kernels.block_sparse import common, gpu, mosaic_gpu

B = 2
# Per kernel: (length, block, heads q / kv, head dim, dtype). Ragged: the last tile is
# partly past the end, so the mods see clamped positions there.
TRITON = (100, 32, 4, 2, 32, jnp.float32)
MOSAIC = (120, 64, 2, 1, 64, jnp.bfloat16)


def _cases(length: int, block: int, heads: int) -> dict:
  geo = dict(block_q=block, block_kv=block)
  segments = np.repeat(np.arange(4), -(-length // 4))[None, :length].repeat(B, 0)
  segments[1, length * 3 // 5 :] = 9  # row 1: a long last document
  slopes = 0.5 ** jnp.arange(1, heads + 1, dtype=jnp.float32)
  table = 0.5 * jax.random.normal(jax.random.key(7), (16, heads))
  window = masks.create_block_mask(window40, 1, 1, length, length, **geo)
  return {
    "softcap_causal": (masks.causal(length, length, **geo), softcap, None),
    "alibi_documents": (masks.document(jnp.asarray(segments), causal=True, **geo), alibi, slopes),
    "alibi_prefix_lm": (masks.prefix_lm(jnp.array([10, 77]), length, **geo), alibi, slopes),
    "t5_bias_no_mask": (masks.dense(length, length, **geo), t5_bias, table),
    "prefix_lm": (masks.prefix_lm(jnp.array([10, 57]), length, **geo), None, None),
    "window40_predicate": (window, None, None),
    "softcap_window40": (window, softcap, None),
  }


def _outputs_and_grads(attend, q, k, v, params, ct):
  def loss(q, k, v, p):
    out, lse = attend(q, k, v, p)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * ct[0]) + jnp.sum(finite * ct[1]), (out, lse)

  argnums = (0, 1, 2) if params is None else (0, 1, 2, 3)
  grads, (out, lse) = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, params)
  return out, lse, grads


def _check(case, geometry, attend):
  """attend(q, k, v, mask, score_mod, params) -> (out, lse) vs float64 on one case."""
  length, block, hq, hkv, d, dtype = geometry
  mask, score_mod, params = _cases(length, block, hq)[case]
  q, k, v = testutil.qkv(B, length, length, hq, hkv, d, dtype=dtype, seed=3)
  ct = (jax.random.normal(jax.random.key(1), (B, length, hq, d)), jnp.ones((B, hq, length)))
  out, lse, grads = _outputs_and_grads(
    lambda q, k, v, p: attend(q, k, v, mask, score_mod, p), q, k, v, params, ct
  )
  with jax.enable_x64(True):
    f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    visible = jnp.asarray(mask.to_dense())
    dense = lambda q, k, v, p: dense_f64(q, k, v, visible, score_mod, p)
    expected = _outputs_and_grads(dense, f64(q), f64(k), f64(v), f64(params), ct)
    e_out, e_lse, e_grads = jax.tree.map(np.asarray, expected)
  testutil.assert_close(out, e_out, dtype, "out", f"{case} out")
  testutil.assert_close(lse, e_lse, dtype, "lse", f"{case} lse")
  for what, g, e in zip(("dq", "dk", "dv", "d_params"), grads, e_grads, strict=False):
    assert g.dtype == (dtype if what != "d_params" else params.dtype)
    testutil.assert_close(g, e, dtype, "grad", f"{case} {what}")


def _triton(q, k, v, mask, score_mod, params):
  return block_sparse_attention(
    q, k, v, mask, implementation="pallas_triton", interpret=True, return_lse=True,
    score_mod=score_mod, score_mod_params=params,
  )  # fmt: skip


def _mosaic(q, k, v, mask, score_mod, params, interpret=True):
  mod = None if score_mod is None else common.ScoreMod(score_mod, params is not None)
  return mosaic_gpu.block_sparse_attention_mosaic_gpu(
    q, k, v, mask, scale=q.shape[-1] ** -0.5, interpret=interpret, num_ctas=2,
    score_mod=mod, score_mod_params=params,
  )  # fmt: skip


TRITON_CASES = ["softcap_causal", "alibi_documents", "t5_bias_no_mask", "prefix_lm"]
TRITON_CASES += ["window40_predicate"]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_interpreted_matches_float64(case):
  _check(case, TRITON, _triton)


# Mosaic GPU refuses ALiBi + documents and the T5 table (gathers, below). Two cases
# cover what it takes: a score_mod without parameters over a predicate mask_mod, and
# ALiBi's learned slopes over prefix-LM's per-row prefix (scalar reads in both).
MOSAIC_CASES = ["softcap_window40", "alibi_prefix_lm"]


@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_mosaic_gpu_interpreted_matches_float64(case):
  _check(case, MOSAIC, _mosaic)


def _shapes(geometry):
  length, _, hq, hkv, d, _ = geometry
  q, k, v = testutil.qkv(B, length, length, hq, hkv, d, dtype=jnp.bfloat16)
  return q, k, v


@pytest.mark.parametrize("case", ["alibi_documents", "t5_bias_no_mask"])
def test_mosaic_gpu_refuses_gathers_that_triton_takes(case):
  mask, score_mod, params = _cases(*MOSAIC[:3])[case]
  q, k, v = _shapes(MOSAIC)
  mod = common.ScoreMod(score_mod, True)
  with pytest.raises(common.Unsupported, match="gathers"):
    mosaic_gpu.check_supported(q, k, v, mask, score_mod=mod, score_mod_params=params)
  with pytest.raises(common.Unsupported, match="gathers"):
    _mosaic(q, k, v, mask, score_mod, params)
  gpu.check_supported(q, k, v, mask, score_mod=mod, score_mod_params=params)  # Triton takes it


def test_kernels_refuse_mods_they_cannot_lower():
  q, k, v = _shapes(MOSAIC)
  mask = _cases(*MOSAIC[:3])["softcap_causal"][0]
  ranks = common.ScoreMod(lambda s, b, h, i, j: jnp.sort(s, axis=-1), False)
  isfinite = common.ScoreMod(lambda s, b, h, i, j: jnp.where(jnp.isfinite(s), s, 0.0), False)
  on_params = common.ScoreMod(lambda s, b, h, i, j, p: s * p, True)
  for kernel in (gpu, mosaic_gpu):
    with pytest.raises(common.Unsupported, match="no lowering for.*sort"):
      kernel.check_supported(q, k, v, mask, score_mod=ranks)
    with pytest.raises(common.Unsupported, match="read by indexing"):
      kernel.check_supported(q, k, v, mask, score_mod=on_params, score_mod_params=jnp.ones(()))
  gpu.check_supported(q, k, v, mask, score_mod=isfinite)
  with pytest.raises(common.Unsupported, match="is_finite"):
    mosaic_gpu.check_supported(q, k, v, mask, score_mod=isfinite)
  with pytest.raises(ValueError, match="pallas_triton.*sort"):
    block_sparse_attention(q, k, v, mask, score_mod=ranks.fn, implementation="pallas_triton")


def _lowered_grad(attend, geometry, case, count: str) -> int:
  mask, score_mod, params = _cases(*geometry[:3])[case]
  q, k, v = _shapes(geometry)

  def loss(q, k, v, p):
    return jnp.sum(attend(q, k, v, mask, score_mod, p)[0].astype(jnp.float32))

  text = testutil.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, params)
  return text.count(count)


def test_triton_lowers_for_cuda_with_gathers_and_atomic_parameter_gradients():
  """T5's table gather (and its gradient's atomic scatter) and ALiBi over documents (a
  mask_mod gathering segment ids): forward, dq and dK/dV kernels."""
  triton = lambda *a: gpu.block_sparse_attention_triton(
    *a[:4], scale=0.1, score_mod=common.ScoreMod(a[4], True), score_mod_params=a[5]
  )
  for case in ("t5_bias_no_mask", "alibi_documents"):
    assert _lowered_grad(triton, TRITON, case, "__gpu$xla.gpu.triton") == 3


def test_mosaic_gpu_lowers_for_cuda_with_scalar_parameter_reads():
  mosaic = functools.partial(_mosaic, interpret=False)
  assert _lowered_grad(mosaic, MOSAIC, "alibi_prefix_lm", "mosaic_gpu_v2") == 3

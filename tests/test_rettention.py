"""Re-ttention's modes: one-pass calibration (dense output, lse over all keys and over
the mask, O^M) and the row-scaled sparse step, against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import block_sparse_attention, masks, reference_attention, rettention
from sparse_attention.ops.rettention import calibrate_attention

Q_LEN, KV_LEN = 100, 90


def _masks():
  geo = dict(block_q=32, block_kv=16)
  return {
    "window": masks.sliding_window(Q_LEN, KV_LEN, window=12, **geo),
    "window_anchors": masks.window_with_anchors(
      Q_LEN, KV_LEN, window=8, num_anchors=1, offset=2, **geo
    ),
    "layout_per_head": masks.from_layout(
      testutil.random_layout(2, 4, Q_LEN, KV_LEN, 32, 16, 0.3, seed=5),
      q_len=Q_LEN,
      kv_len=KV_LEN,
      **geo,
    ),
    "empty_rows": masks.causal(Q_LEN, KV_LEN, offset=-40, **geo),
  }


MASKS = _masks()


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("implementation", ["xla", "pallas_triton", "pallas_tpu"])
def test_calibration_matches_reference(name, implementation):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 4, 2, 16, 8, seed=len(name))
  mask = MASKS[name]
  run = functools.partial(calibrate_attention, q, k, v, mask)
  got = run(implementation=implementation, interpret=True)
  ref = run(implementation="reference")
  for field in ("out", "lse", "lse_masked", "out_masked"):
    kind = "lse" if field.startswith("lse") else "out"
    testutil.assert_close(getattr(got, field), getattr(ref, field), jnp.float32, kind, field)
  testutil.assert_close(got.mass_ratio, ref.mass_ratio, jnp.float32, "out", "mass_ratio")
  # The shares are probabilities, and rows the mask leaves empty have r = 0.
  r = np.asarray(got.mass_ratio)
  assert (r >= 0).all() and (r <= 1 + 1e-6).all()


def test_dense_mask_has_all_the_mass_and_bf16():
  q, k, v = testutil.qkv(1, 64, 64, 2, 2, 16, dtype=jnp.bfloat16)
  cal = calibrate_attention(q, k, v, masks.dense(64, 64, block_q=16, block_kv=16))
  np.testing.assert_allclose(np.asarray(cal.mass_ratio), 1.0, rtol=1e-5)
  testutil.assert_close(cal.out_masked, cal.out, jnp.bfloat16, "out", "O^M = O")
  assert cal.out.dtype == jnp.bfloat16 and cal.lse.dtype == jnp.float32


def test_row_scaled_sparse_step_recovers_the_in_mask_part():
  """block_sparse_attention(row_scale=r) = r * O^M, and O = r O^M + (1 - r) O^(not M)."""
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 4, 2, 16, 8, seed=1)
  mask = MASKS["window_anchors"]
  cal = calibrate_attention(q, k, v, mask, implementation="reference")
  scaled = block_sparse_attention(q, k, v, mask, row_scale=cal.mass_ratio)
  expected = cal.out_masked * jnp.swapaxes(cal.mass_ratio, 1, 2)[..., None]
  testutil.assert_close(scaled, expected, jnp.float32, "out", "r * O^M")
  # The complement of the mask carries the rest of the mass.
  dense = mask.to_dense()

  o_rest = reference_attention(q, k, v, mask=~dense)
  r = jnp.swapaxes(cal.mass_ratio, 1, 2)[..., None]
  testutil.assert_close(r * cal.out_masked + (1 - r) * o_rest, cal.out, jnp.float32, "out", "mix")


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_tpu"])
def test_calibration_xla_is_differentiable_and_kernels_say_they_are_not(kernel):
  q, k, v = testutil.qkv(1, 32, 32, 2, 2, 16)
  mask = masks.sliding_window(32, 32, window=4, block_q=16, block_kv=16)
  grad = jax.grad(lambda q: calibrate_attention(q, k, v, mask, implementation="xla").out.sum())
  assert np.isfinite(np.asarray(grad(q))).all()
  with pytest.raises(NotImplementedError, match="no gradient"):
    jax.grad(
      lambda q: calibrate_attention(q, k, v, mask, implementation=kernel, interpret=True).out.sum()
    )(q)


def test_bad_row_scale_raises():
  q, k, v = testutil.qkv(1, 32, 32, 2, 2, 16)
  mask = masks.causal(32, 32, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match="row_scale"):
    block_sparse_attention(q, k, v, mask, row_scale=jnp.ones((1, 2, 31)))
  with pytest.raises(ValueError, match="implementation"):
    calibrate_attention(q, k, v, mask, implementation="cudnn")


def test_none_and_pallas_pick_the_backend_kernel(monkeypatch):
  q, k, v = testutil.qkv(1, 32, 32, 2, 2, 16)
  mask = masks.causal(32, 32, block_q=16, block_kv=16)
  ref = calibrate_attention(q, k, v, mask, implementation="reference")
  # On a CPU, "pallas" needs interpret=True and then runs the GPU kernel interpreted.
  with pytest.raises(ValueError, match="interpret=True"):
    calibrate_attention(q, k, v, mask, implementation="pallas")
  got = calibrate_attention(q, k, v, mask, implementation="pallas", interpret=True)
  testutil.assert_close(got.out, ref.out, jnp.float32, "out", "pallas on cpu")
  calls = []
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setitem(
    rettention._KERNELS,
    "pallas_tpu",
    (
      rettention.tpu.check_calibration_supported,
      lambda *a, **kw: calls.append(kw) or (ref.out, ref.lse, ref.lse_masked, ref.out_masked),
    ),
  )
  calibrate_attention(q, k, v, mask)
  assert len(calls) == 1


# ---------------------------------------------------------------------------
# Exactness where M's share underflows: scores of q * 100 or q * 1e4 put the in-mask
# logits of many rows 100s (or 10^4s) below the row's max, past float32's exp range.
# ---------------------------------------------------------------------------

SHARPNESS = (100.0, 1e4)


def numpy_calibration(q, k, v, dense_mask, scale):
  """(out, lse, lse_masked, out_masked), float64 NumPy, straight from the definitions;
  dense_mask bool [B|1, Hq|1, Lq, Lk]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  keep = np.broadcast_to(np.asarray(dense_mask), s.shape)

  def attend(s):
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(axis=-1)  # [B, H, Lq]
    l_safe = np.where(l > 0, l, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v) / np.swapaxes(l_safe, 1, 2)[..., None]
    return out, np.where(l > 0, m[..., 0] + np.log(l_safe), -np.inf)

  out, lse = attend(s)
  out_m, lse_m = attend(np.where(keep, s, -np.inf))
  return out, lse, lse_m, out_m


def _sharp_inputs(sharpness):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 4, 2, 16, 8, seed=1)
  return q * sharpness, k, v


@pytest.mark.parametrize("sharpness", (1.0, *SHARPNESS))
@pytest.mark.parametrize("name", ["window", "layout_per_head", "empty_rows"])
def test_reference_calibration_matches_numpy_float64(name, sharpness):
  # Integer q and k (|q.k| <= 144): every score q.k * 0.25 * sharpness is exact in
  # float32, so any difference from float64 is the softmax's, not the rounding of
  # scores of 10^4 (which alone moves outputs by ~1e-4).
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  q = jax.random.randint(keys[0], (2, Q_LEN, 4, 16), -3, 4).astype(jnp.float32) * sharpness
  k = jax.random.randint(keys[1], (2, KV_LEN, 2, 16), -3, 4).astype(jnp.float32)
  v = jax.random.normal(keys[2], (2, KV_LEN, 2, 8))
  mask = MASKS[name]
  got = calibrate_attention(q, k, v, mask, implementation="reference", scale=0.25)
  want = numpy_calibration(q, k, v, mask.to_dense(), 0.25)
  if sharpness > 1:  # the regime that matters: M's share underflows on many rows
    gap = want[1] - want[2]
    assert (np.isfinite(gap) & (gap > 104)).sum() >= 20
  for field, expected in zip(("out", "lse", "lse_masked", "out_masked"), want, strict=True):
    kind = "lse" if field.startswith("lse") else "out"
    testutil.assert_close(getattr(got, field), expected, jnp.float32, kind, field)


@pytest.mark.parametrize("sharpness", SHARPNESS)
@pytest.mark.parametrize("implementation", ["xla", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("name", ["window", "layout_per_head"])
def test_calibration_is_exact_where_the_masked_share_underflows(name, implementation, sharpness):
  q, k, v = _sharp_inputs(sharpness)
  mask = MASKS[name]
  run = functools.partial(calibrate_attention, q, k, v, mask)
  ref = run(implementation="reference")
  # The case is the one that matters: rows whose in-mask mass underflows float32
  # (exp(lse_masked - lse) < 2^-149) yet have keys in M.
  gap = np.asarray(ref.lse - ref.lse_masked)
  assert (np.isfinite(gap) & (gap > 104)).sum() >= 20
  got = run(implementation=implementation, interpret=True)
  for field in ("out", "lse", "lse_masked", "out_masked"):
    kind = "lse" if field.startswith("lse") else "out"
    testutil.assert_close(getattr(got, field), getattr(ref, field), jnp.float32, kind, field)
  without_out = run(implementation=implementation, interpret=True, return_masked_output=False)
  assert without_out.out_masked is None
  np.testing.assert_array_equal(np.asarray(without_out.lse_masked), np.asarray(got.lse_masked))

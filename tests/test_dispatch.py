"""`block_sparse_attention` picks the implementation the platform and the call allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import (
  block_sparse,
  block_sparse_attention,
  calibrate_attention,
  hilo_attention,
  masks,
  moba_attention,
  nsa,
)


def _inputs(block_q=64, block_kv=128):
  q, k, v = testutil.qkv(1, 200, 200, 2, 1, 32)
  return q, k, v, masks.causal(200, 200, block_q=block_q, block_kv=block_kv)


def test_none_is_xla_on_cpu():
  q, k, v, m = _inputs()
  a = block_sparse_attention(q, k, v, m)
  b = block_sparse_attention(q, k, v, m, implementation="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pallas_needs_interpret_on_cpu():
  q, k, v, m = _inputs()
  with pytest.raises(ValueError, match="interpret=True"):
    block_sparse_attention(q, k, v, m, implementation="pallas")


@pytest.mark.parametrize("implementation", ["pallas", "pallas_triton", "pallas_tpu"])
def test_interpreted_kernels_match_reference(implementation):
  q, k, v, m = _inputs()
  testutil.assert_matches_reference(q, k, v, m, implementation, what=implementation, interpret=True)


def test_explicit_kernel_that_cannot_run_raises():
  q, k, v, m = _inputs(block_q=24, block_kv=24)  # not a power of two: Triton refuses
  with pytest.raises(ValueError, match="pallas_triton.*block_q"):
    block_sparse_attention(q, k, v, m, implementation="pallas_triton", interpret=True)


@pytest.mark.parametrize(
  "backend, blocks, expected",
  [
    ("gpu", (64, 128), "pallas_triton"),
    ("gpu", (24, 24), "xla"),  # Triton needs powers of two: fall back
    ("tpu", (64, 128), "pallas_tpu"),
    ("tpu", (12, 12), "xla"),  # Mosaic needs multiples of 8: fall back
    ("cpu", (64, 128), "xla"),
  ],
)
def test_none_picks_the_platform_kernel_when_it_supports_the_call(
  monkeypatch, backend, blocks, expected
):
  q, k, v, m = _inputs(*blocks)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert block_sparse._resolve(None, False, q, k, v, m, "op") == expected


def test_unknown_implementation_raises():
  q, k, v, m = _inputs()
  with pytest.raises(ValueError, match="implementation"):
    block_sparse_attention(q, k, v, m, implementation="cudnn")


def _every_op() -> dict:
  """name -> op(**overrides): each public op on small valid inputs."""
  q, k, v = testutil.qkv(1, 32, 32, 2, 1, 16)
  m = masks.causal(32, 32, block_q=16, block_kv=16)
  nc = nsa.num_compressed_blocks(32, 8, 4)
  k_cmp, v_cmp = jnp.zeros((1, nc, 1, 16)), jnp.zeros((1, nc, 1, 16))
  gates = jnp.full((1, 32, 2, 3), 0.5)
  lo_k, lo_v = jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16))
  nsa_geo = dict(block_len=8, stride=4, select_len=8, num_select=3, window=8)
  return {
    "block_sparse_attention": lambda **kw: block_sparse_attention(q, k, v, m, **kw),
    "calibrate_attention": lambda **kw: calibrate_attention(q, k, v, m, **kw),
    "moba_attention": lambda **kw: moba_attention(q, k, v, chunk_size=8, topk=2, **kw),
    "nsa_attention": lambda **kw: nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, **nsa_geo, **kw),
    "hilo_attention": lambda **kw: hilo_attention(
      None, None, None, q, lo_k, lo_v, grid=(4, 8), window_size=2, **kw
    ),
  }


EVERY_OP = _every_op()


@pytest.mark.parametrize("op", list(EVERY_OP))
@pytest.mark.parametrize("interpret", [1, 0, "yes", None, np.True_])
def test_interpret_must_be_a_bool(op, interpret):
  with pytest.raises(ValueError, match=f"{op}: interpret must be a bool"):
    EVERY_OP[op](interpret=interpret, implementation="xla")


@pytest.mark.parametrize("op", list(EVERY_OP))
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.25, 0.0, 0])
def test_scale_must_be_finite_and_positive(op, scale):
  with pytest.raises(ValueError, match=f"{op}: scale must be finite and > 0"):
    EVERY_OP[op](scale=scale, implementation="xla")


@pytest.mark.parametrize("op", list(EVERY_OP))
def test_every_op_runs_on_the_valid_inputs_of_these_tests(op):
  """The two tests above fail on the argument they name, not on another one."""
  out = EVERY_OP[op](scale=0.3, interpret=False, implementation="xla")
  leaves = jax.tree.leaves(out)
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)

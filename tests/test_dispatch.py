"""`block_sparse_attention` picks the implementation the platform and the call allow."""

import jax
import numpy as np
import pytest
import testutil

from sparse_attention.ops import block_sparse, block_sparse_attention, masks


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

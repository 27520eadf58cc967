"""Context parallelism (ops/context_parallel.py) on fake CPU devices, each device count in
its own process (the count is fixed when jax starts; tests/context_parallel_worker.py):
the ring equals the unsharded ops (outputs, lse, gradients) on 4 and 8 devices, its
per-device memory shrinks with the devices, and the LM trains with the same losses on
a context axis of 4 as on one device. The host-side planning runs in this process."""

import numpy as np
import pytest
import testutil

from sparse_attention.ops import context_parallel as cp
from sparse_attention.ops import element_masks as em
from sparse_attention.ops import masks

WORKER = "context_parallel_worker.py"  # MODE ARGS...
LM_STEPS = 3


# ------------------------------------------------------------------- host-side planning


def test_zigzag_layout_round_trips_and_balances_causal_work():
  layout = cp.SequenceLayout(64, 4)
  assert layout.slices(0) == (0, 7) and layout.slices(3) == (3, 4)
  x = np.arange(2 * 64).reshape(2, 64)
  np.testing.assert_array_equal(layout.from_layout(layout.to_layout(x)), x)
  np.testing.assert_array_equal(layout.to_layout(x)[0, :8], [0, 1, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(layout.to_layout(x)[0, 8:16], [56, 57, 58, 59, 60, 61, 62, 63])
  causal = em.Band(None, 0)
  work = cp.ring_occupancy(causal, layout, block_q=4, block_kv=4).sum(axis=0)  # per device
  assert work.min() == work.max(), work  # zig-zag: every device the same causal work
  contiguous = cp.SequenceLayout(64, 4, "contiguous")
  work = cp.ring_occupancy(causal, contiguous, block_q=4, block_kv=4).sum(axis=0)
  assert work.max() > 5 * work.min(), work  # the imbalance zig-zag removes (~1 : 2n - 1)


def test_sliding_window_skips_most_ring_steps():
  layout = cp.SequenceLayout(4096, 8)
  kept = cp.ring_occupancy(em.Band(-256, 0), layout, block_q=64, block_kv=64)
  assert (kept == 0).mean() > 0.6, kept  # those steps run no attention at all


def test_predicates_are_planned_statically_and_shared():
  layout = cp.SequenceLayout(512, 8)
  fns, table = cp._plan_predicates(em.Band(None, 0), layout)
  assert len(fns) == 1 and table.shape == (8, 8)  # causal: one predicate for every step
  fns, _ = cp._plan_predicates(em.Band(-40, 0), layout)
  assert len(fns) <= 3
  fns, _ = cp._plan_predicates(None, layout)
  assert fns == (None,)
  # A relocated predicate sees natural positions: device 0 holds slices 0 and 15.
  fn = cp.Relocated(em.Band(None, 0), 32, ((((0, 0)), (0, 480)), ((0, 0), (0, 0))))
  assert bool(fn(np.int32(0), np.int32(40))) is False  # local key 40 is position 488


def test_layout_errors_name_the_argument():
  with pytest.raises(ValueError, match="length 100 must be a multiple of 8"):
    cp.SequenceLayout(100, 4)
  layout = cp.SequenceLayout(128, 4)
  with pytest.raises(ValueError, match="block_q=32 must divide the shard slices of 16"):
    layout.check_tiles("op", block_q=32)


# ---------------------------------------------------------------------- on fake devices
# Each test runs its own worker process(es), so that pytest-xdist can spread them.


@pytest.mark.slow
def test_ring_matches_unsharded_ops():
  """On rings of 8 and 4 devices: causal, sliding, dense (batch also split: a ring of 4
  on 8 devices), a random layout with token routes and row_scale, MoBA, NSA, and the
  interpreted Triton kernel as the per-device engine; outputs, lse and the gradients of
  q, k, v (and NSA's gates) against the unsharded op."""
  errors = testutil.run_worker(WORKER, "ops", devices=8)
  rings = {
    8: ("causal", "sliding", "dense_data2", "random_routes_row_scale", "moba", "nsa"),
    4: ("random_routes_row_scale", "moba", "causal_pallas_triton"),
  }
  assert set(errors) == {f"{name}/{n}" for n, names in rings.items() for name in names}, errors
  assert max(errors.values()) < 2e-5, errors


def test_per_device_memory_shrinks_with_devices():
  sizes = {int(n): size for n, size in testutil.run_worker(WORKER, "memory", devices=8).items()}
  assert sorted(sizes) == [1, 2, 4, 8], sizes
  assert sizes[2] < sizes[1] and sizes[8] < sizes[1] / 4, sizes
  for n in (2, 4):  # ~1/n: the ring's buffers are all sequence shards
    assert sizes[2 * n] < 0.6 * sizes[n], sizes


@pytest.mark.slow
def test_lm_trains_context_parallel_with_one_device_losses():
  """configs/lm_text.py with --config.mesh.data=1 --config.mesh.context=4 on 4 devices
  logs the losses of one device, for dense, MoBA and NSA attention."""
  kinds = ("dense", "moba", "nsa")
  four = testutil.run_worker(
    WORKER, "train", *(f"{kind}:1:4:{LM_STEPS}" for kind in kinds), devices=4
  )
  one = testutil.run_worker(
    WORKER, "train", *(f"{kind}:1:1:{LM_STEPS}" for kind in kinds), devices=1
  )
  for kind in kinds:
    expected, got = one[f"{kind}:1:1:{LM_STEPS}"], four[f"{kind}:1:4:{LM_STEPS}"]
    assert len(got) == len(expected) == LM_STEPS, (kind, got, expected)
    np.testing.assert_allclose(got, expected, rtol=1e-3, err_msg=kind)


def test_mask_mods_are_refused_by_name():
  mask = masks.create_block_mask(
    lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 64, 64, block_q=8, block_kv=8
  )
  q = np.zeros((1, 64, 2, 8), np.float32)
  with pytest.raises(ValueError, match="mask holds a mask_mod"):
    cp.block_sparse_attention(q, q, q, mask, layout=cp.SequenceLayout(64, 1))

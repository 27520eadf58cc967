"""Sharding on 8 fake CPU devices (each check in its own process, since the device
count is fixed when jax starts): the same training losses on 1 device and on
data-parallel, FSDP and tensor-parallel meshes; Pallas kernels under shard_map."""

import numpy as np
import pytest
import testutil

WORKER = "multidevice_worker.py"  # MESH STEPS | kernels
STEPS = 5


@pytest.fixture(scope="module")
def single_device_losses():
  return testutil.run_worker(WORKER, "1,1,1", str(STEPS), devices=1)["losses"]


@pytest.mark.parametrize("mesh", ["2,4,1", "4,1,2"])
def test_sharded_training_matches_one_device(single_device_losses, mesh):
  """FSDP (data 2 x fsdp 4), data 4 x model 2: the same losses as one device. Both
  meshes are data parallel too (pure data parallelism across two processes:
  test_multihost)."""
  result = testutil.run_worker(WORKER, mesh, str(STEPS), devices=8)
  assert result["sharded_tensors"] > 0, result
  losses = result["losses"]
  assert len(losses) == len(single_device_losses) == STEPS
  np.testing.assert_allclose(losses, single_device_losses, rtol=2e-4, atol=2e-5)


def test_pallas_kernels_under_shard_map_match_unsharded():
  result = testutil.run_worker(WORKER, "kernels", devices=8)
  assert result["pallas_triton"] < 1e-4, result
  assert result["xla"] < 1e-4, result
  assert "data" in result["pallas_triton_sharded"], result

"""Runs in its own process with 8 fake CPU devices (set before jax is imported);
prints one JSON line of results for tests/test_multidevice.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_worker.py MODE
"""

import json
import os
import pathlib
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sparse_attention.ops import block_sparse_attention, masks  # noqa: E402
from sparse_attention.train import partitioning, trainer  # noqa: E402

CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "litv2_digits.py")


def train_losses(mesh: str, steps: int) -> dict:
  """Per-step train losses of a short LITv2 run on `mesh` ("data,fsdp,model"), and
  how many parameter tensors were sharded."""
  data, fsdp, model = mesh.split(",")
  argv = [
    "prog",
    f"--config={CONFIG}",
    "--config.data.image_size=8",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    f"--config.steps={steps}",
    "--config.log_every=1",
    "--config.checkpoint_every=1000",
    "--config.eval_every=1000",
    f"--config.mesh.data={data}",
    f"--config.mesh.fsdp={fsdp}",
    f"--config.mesh.model={model}",
    # Shard even the small LITv2-tiny tensors, so FSDP really splits parameters.
    "--config.optimizer.warmup_steps=2",
  ]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  partitioning.MIN_FSDP_SIZE = 1
  with tempfile.TemporaryDirectory() as workdir:
    final = trainer.train_and_evaluate(holder.value, workdir)
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  losses = [json.loads(x)["loss"] for x in lines if json.loads(x)["split"] == "train"]
  return {"losses": losses, "sharded_tensors": final["parameters"]["sharded_tensors"]}


def sharded_kernels() -> dict[str, float]:
  """Max |sharded - unsharded| of the interpreted kernels and the xla path, outputs
  and gradients, with batch over "data" and heads over "model"."""
  mesh = partitioning.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (4, 96, 4, 16))
  k = jax.random.normal(keys[1], (4, 96, 2, 16))
  v = jax.random.normal(keys[2], (4, 96, 2, 16))
  layout = np.random.default_rng(0).random((4, 4, 3, 3)) < 0.6
  mask = masks.from_layout(layout, block_q=32, block_kv=32, q_len=96, kv_len=96)
  errors = {}
  for impl in ("pallas_triton", "xla"):

    def loss(q, k, v, impl=impl):
      out = block_sparse_attention(q, k, v, mask, implementation=impl, interpret=True)
      return (out * out).sum(), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, expected), expected_grads = grad(q, k, v)
    with jax.set_mesh(mesh):
      spec = NamedSharding(mesh, P("data", None, "model", None))
      (_, out), grads = grad(*(jax.device_put(x, spec) for x in (q, k, v)))
    errors[impl] = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip((out, *grads), (expected, *expected_grads), strict=True)
    )
    errors[f"{impl}_sharded"] = str(out.sharding.spec) if hasattr(out, "sharding") else ""
  return errors


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "devices":
    result = {"devices": jax.device_count()}
  elif mode == "kernels":
    result = sharded_kernels()
  else:  # a mesh, e.g. "8,1,1"
    result = train_losses(mode, int(sys.argv[2]))
  print("RESULT " + json.dumps(result), flush=True)

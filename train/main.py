r"""Trains a model from a config file: the library's training entry point.

  python -m sparse_attention.train.main --config=configs/litv2_digits.py --workdir=/tmp/run \
      [--config.steps=200 --config.model.name=litv2_s ...]

A job killed at any moment and started again with the same --workdir resumes from
its newest complete checkpoint. Multi-host (one process per host): pass
--coordinator_address, --num_processes and --process_id, or set the JAX_COORDINATOR_ADDRESS
/ JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables (or run where
`jax.distributed.initialize()` detects the cluster by itself, e.g. Cloud TPU, SLURM).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_attention.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A configs/*.py file with get_config(); --config.a.b=v overrides fields.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for multi-host runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with auto-detected settings."
)
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator or _DISTRIBUTED.value:
    num = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    logging.info("Process %d of %d.", jax.process_index(), jax.process_count())


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; --verbosity=0 shows it
  _initialize_distributed()
  final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    for split in ("eval", "test"):
      values = ", ".join(f"{k} {v:.4f}" for k, v in final[split].items())
      print(f"{split}: {values}", flush=True)


if __name__ == "__main__":
  app.run(main)

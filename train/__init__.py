"""Training: absl scripts, optax, orbax checkpoints, sharding over a mesh.

`load(workdir)` gives back a trained model (train/trainer.py). It is imported on first
use, so that the data pipeline's worker processes, which import `train.data`, do not
load the trainer (and its model and kernel modules) too.
"""

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
  if name == "load":
    from sparse_attention.train.trainer import load

    return load
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

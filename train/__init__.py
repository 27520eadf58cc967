"""Training: absl scripts, optax, orbax checkpoints, sharding over a mesh.

`load(workdir)` gives back a trained model (train/trainer.py).
"""

from sparse_attention.train.trainer import load

__all__ = ["load"]

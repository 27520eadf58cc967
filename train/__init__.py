"""Training: absl scripts, optax, orbax checkpoints, sharding over a mesh."""

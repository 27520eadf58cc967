"""The optimizer: AdamW with linear warmup + cosine decay, clipping, accumulation.

`config.optimizer` fields:
  learning_rate    peak learning rate
  warmup_steps     linear warmup from 0 over this many optimizer updates
  min_lr_ratio     the cosine decays to learning_rate * min_lr_ratio at the end
  weight_decay     decoupled weight decay (AdamW), not applied to biases and norms
  b1, b2, eps      Adam moments
  grad_clip        clip the global gradient norm to this (0: no clipping)
  accumulate_steps average gradients over this many steps before one update
                   (optax.MultiSteps); 1: update every step
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.min_lr_ratio = 0.01
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_clip = 1.0
  c.accumulate_steps = 1
  return c


def check_config(c: ml_collections.ConfigDict, total_steps: int) -> None:
  """Raises ValueError naming the first bad `config.optimizer` field."""
  checks = [
    ("learning_rate", c.learning_rate > 0, "must be > 0"),
    ("warmup_steps", 0 <= c.warmup_steps, "must be >= 0"),
    ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "must lie in [0, 1]"),
    ("weight_decay", c.weight_decay >= 0, "must be >= 0"),
    ("b1", 0 <= c.b1 < 1, "must lie in [0, 1)"),
    ("b2", 0 <= c.b2 < 1, "must lie in [0, 1)"),
    ("eps", c.eps > 0, "must be > 0"),
    ("grad_clip", c.grad_clip >= 0, "must be >= 0 (0: no clipping)"),
    (
      "accumulate_steps",
      isinstance(c.accumulate_steps, int) and c.accumulate_steps >= 1,
      "must be an int >= 1",
    ),
  ]
  for field, ok, what in checks:
    if not ok:
      raise ValueError(f"config.optimizer.{field} {what}, got {c[field]!r}.")
  if total_steps % c.accumulate_steps:
    raise ValueError(
      f"config.steps ({total_steps}) must be a multiple of config.optimizer.accumulate_steps "
      f"({c.accumulate_steps})."
    )


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update (warmup, then cosine to min_lr_ratio)."""
  updates = max(1, total_steps // c.accumulate_steps)
  warmup = min(c.warmup_steps, updates - 1)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=c.learning_rate,
    warmup_steps=warmup,
    decay_steps=updates,
    end_value=c.learning_rate * c.min_lr_ratio,
  )


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices and kernels only (ndim >= 2), not biases / norms."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(
  c: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) from `config.optimizer`."""
  check_config(c, total_steps)
  lr = schedule(c, total_steps)
  parts = []
  if c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(c.grad_clip))
  parts.append(
    optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=_decay_mask)
  )
  tx = optax.chain(*parts)
  if c.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=c.accumulate_steps)
  return tx, lr

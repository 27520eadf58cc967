"""Diffusion: the flow-matching training task for the DiT, and its sampler.

Training (rectified flow / flow matching). For a clean image x_0 (the normalised data),
noise e ~ N(0, I) and a time t in [0, 1]:

  x_t = (1 - t) x_0 + t e          the straight path from data (t = 0) to noise (t = 1)
  v   = e - x_0                    its velocity dx_t/dt, which the model learns to predict
  loss = mean over pixels of (model(x_t, t, y)[..., :C] - v)^2

t ~ U(0, 1) ("uniform") or sigmoid(N(logit_mean, logit_std)) ("logit_normal", SD3's
choice, which weighs the middle times). Labels are dropped to the model's null class
with probability `class_dropout_prob` (classifier-free guidance). The noise, t and the
dropout draw from `model.rngs.diffusion()`, an `nnx.Rngs` stream the model holds: the
trainer saves it with the other model state, so training is deterministic and a resumed
run continues the same random sequence. Metric: loss.

Sampling (`sample`): the flow-matching Euler sampler, a deterministic first-order ODE
solver (the flow-matching counterpart of DDIM with eta = 0): Euler steps of dx/dt = v
from t = 1 (noise) to t = 0 (images) on the uniform grid t_i = 1 - i / steps,
x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i), optionally with classifier-free guidance
v = v_null + cfg_scale (v_y - v_null) (the conditional and null-class halves run as one
batch, so a Re-ttention cache covers both). No noise is added after the start, so the
same initial noise and labels give comparable samples across attention modes. The
attention mode is chosen at sampling time:

  "dense"       every step dense
  "sparse"      every step block-sparse over `mask` only
  "rettention"  steps 0 .. dense_steps-1 dense; step i >= dense_steps calibrates when
                (i - dense_steps) % recalibrate_every == 0 (dense output, fresh r and
                Delta per layer), else is a Re-ttention sparse step with the cached r and
                Delta; after every sparse step r += r_increment. The paper's PixArt
                setting, 20 steps with dense_steps=5, recalibrate_every=5: steps 0-4
                dense, calibration at 5, 10, 15.
  "dense_then_sparse"  the control for "rettention": the same steps dense (warm-up and
                calibration steps), plain block-sparse on the others (no r, no Delta)
  "ratio_only"  the control isolating the reshape: Re-ttention's schedule and r (with
                r_increment), no residual: r * O^M on the sparse steps
  "cache_only"  the control isolating plain reuse: Re-ttention's schedule, every sparse
                step reuses the last calibration step's attention output as is

The default mask is `dit.local_window_mask` at density 1/32 (`granularity`: "tiles",
the kernel-friendly tile window, or "tokens", the authors' token band).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparse_attention.models import dit
from sparse_attention.ops.block_mask import BlockMask

TIME_SAMPLINGS = ("uniform", "logit_normal")
ATTENTION_MODES = ("dense", "sparse", "rettention", "dense_then_sparse", "ratio_only", "cache_only")
# attention -> the DiT's `calibration` on its calibration steps (Re-ttention's schedule)
_CALIBRATION = {"rettention": "rettention", "ratio_only": "ratio_only", "cache_only": "cache_only"}


# ---------------------------------------------------------------------------- the task


def default_diffusion_config() -> ml_collections.ConfigDict:
  """`config.diffusion`: how training draws t."""
  c = ml_collections.ConfigDict()
  c.time_sampling = "logit_normal"  # uniform | logit_normal
  c.logit_mean = 0.0
  c.logit_std = 1.0
  return c


def _positive_int_or_zero(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.model.{name} must be an int >= 0 (0: the preset's), got {value!r}.")


def check(config: ml_collections.ConfigDict) -> None:
  m = config.model
  if m.name not in dit.PRESETS:
    raise ValueError(
      f"config.model.name must be one of {sorted(dit.PRESETS)} for the diffusion task, got "
      f"{m.name!r}."
    )
  for name in ("patch_size", "hidden_size", "depth", "num_heads"):
    _positive_int_or_zero(name, m.get(name, 0))
  if not 0.0 <= m.class_dropout_prob < 1.0:
    raise ValueError(
      f"config.model.class_dropout_prob must lie in [0, 1), got {m.class_dropout_prob!r}."
    )
  d = config.get("diffusion", default_diffusion_config())
  if d.time_sampling not in TIME_SAMPLINGS:
    raise ValueError(
      f"config.diffusion.time_sampling must be one of {TIME_SAMPLINGS}, got {d.time_sampling!r}."
    )
  if not d.logit_std > 0:
    raise ValueError(f"config.diffusion.logit_std must be > 0, got {d.logit_std!r}.")
  size = config.data.image_size
  patch = m.get("patch_size", 0) or dit.PRESETS[m.name]().patch_size
  if size % patch:
    raise ValueError(
      f"config.data.image_size ({size}) must be a multiple of config.model.patch_size ({patch})."
    )


def model_config(config: ml_collections.ConfigDict, datasets: Any) -> dit.DiTConfig:
  """The DiTConfig of `config.model` for the loaded data (0 fields keep the preset's)."""
  m = config.model
  height, _, channels = datasets.image_shape
  overrides = {
    name: m.get(name)
    for name in ("patch_size", "hidden_size", "depth", "num_heads")
    if m.get(name, 0)
  }
  return dit.PRESETS[m.name](
    image_size=height,
    in_channels=channels,
    num_classes=datasets.num_classes,
    class_dropout_prob=float(m.class_dropout_prob),
    learn_sigma=bool(m.get("learn_sigma", False)),
    implementation=m.get("implementation", "") or None,
    **overrides,
  )


@dataclasses.dataclass(frozen=True)
class TimeSampling:
  """How training draws t: `config.diffusion` as a hashable value."""

  kind: str = "logit_normal"  # uniform | logit_normal
  logit_mean: float = 0.0
  logit_std: float = 1.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TimeSampling:
    d = config.get("diffusion", default_diffusion_config())
    return cls(d.time_sampling, float(d.logit_mean), float(d.logit_std))

  def __call__(self, key: jax.Array, n: int) -> jax.Array:
    """t f32 [n] in [0, 1]."""
    if self.kind == "uniform":
      return jax.random.uniform(key, (n,))
    return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (n,)))


def flow_matching_loss(
  model: dit.DiT,
  batch: dict[str, jax.Array],
  dtype: Any,
  time_sampling: TimeSampling = TimeSampling(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean loss, metric sums) of a batch; noise, t and label dropout from model.rngs."""
  x0 = batch["image"].astype(jnp.float32)  # [B, H, W, C], normalised
  labels = batch["label"]  # int32 [B]
  b = x0.shape[0]
  k_t, k_noise, k_drop = jax.random.split(model.rngs.diffusion(), 3)
  t = time_sampling(k_t, b)  # [B]
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * noise
  target = noise - x0  # the velocity dx_t/dt
  p = model.config.class_dropout_prob
  if p > 0:
    labels = jnp.where(jax.random.uniform(k_drop, (b,)) < p, model.null_class, labels)
  pred = model(x_t.astype(dtype), t, labels).astype(jnp.float32)[..., : x0.shape[-1]]
  per_example = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))  # [B]
  weight = batch.get("mask", jnp.ones((b,), bool)).astype(jnp.float32)
  count = jnp.sum(weight)
  total = jnp.sum(per_example * weight)
  return total / jnp.maximum(count, 1.0), {"loss_sum": total, "count": count}


def loss(model: dit.DiT, batch: dict[str, jax.Array], dtype: Any):
  """Task.loss. The interface passes no config, so `build` leaves `config.diffusion` on
  the model as `model.time_sampling` (a static attribute: hashable, not a Variable,
  not saved) and the loss reads it there."""
  return flow_matching_loss(model, batch, dtype, getattr(model, "time_sampling", TimeSampling()))


def build(config: ml_collections.ConfigDict, datasets: Any, rngs: nnx.Rngs) -> dit.DiT:
  noise = nnx.Rngs(diffusion=jax.random.fold_in(jax.random.key(config.seed), 2))
  model = dit.DiT(model_config(config, datasets), rngs=rngs, noise_rngs=noise)
  model.time_sampling = TimeSampling.from_config(config)
  return model


def summarize(sums: dict[str, float]) -> dict[str, float]:
  return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}


def examples(batch: dict[str, Any]) -> int:
  return batch["label"].shape[0]


# ---------------------------------------------------------------------------- the sampler


def step_modes(
  steps: int, attention: str, *, dense_steps: int = 5, recalibrate_every: int = 5
) -> list[str]:
  """The DiT mode of each Euler step: "dense", "sparse", "calibrate" or "rettention"."""
  if attention not in ATTENTION_MODES:
    raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}.")
  if steps < 1 or dense_steps < 0 or recalibrate_every < 1:
    raise ValueError(
      f"need steps >= 1, dense_steps >= 0, recalibrate_every >= 1; got {steps}, "
      f"{dense_steps}, {recalibrate_every}."
    )
  if attention in ("dense", "sparse"):
    return [attention] * steps
  cached = attention in _CALIBRATION  # Re-ttention or one of its controls
  modes = []
  for i in range(steps):
    if i < dense_steps:
      modes.append("dense")
    elif (i - dense_steps) % recalibrate_every == 0:
      modes.append("calibrate" if cached else "dense")
    else:
      modes.append("rettention" if cached else "sparse")
  return modes


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "cfg_scale", "calibration"))
def _euler_step(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  x: jax.Array,  # [B, H, W, C] at time t
  t: jax.Array,  # f32 scalar
  t_next: jax.Array,  # f32 scalar
  labels: jax.Array,  # int [B]
  cache: dit.RettentionCache | None,
  mask: BlockMask | None,
  *,
  mode: str,
  cfg_scale: float,
  calibration: str = "rettention",
) -> tuple[jax.Array, dit.RettentionCache | None]:
  model = nnx.merge(graphdef, state)
  b, c = x.shape[0], x.shape[-1]
  if cfg_scale != 1.0:
    x_in = jnp.concatenate([x, x])
    y_in = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)])
  else:
    x_in, y_in = x, labels
  tt = jnp.full((x_in.shape[0],), t, jnp.float32)
  out, cache = model.forward(
    x_in.astype(x.dtype), tt, y_in, mode=mode, mask=mask, cache=cache, calibration=calibration
  )
  v = out[..., :c].astype(jnp.float32)
  if cfg_scale != 1.0:
    v = v[b:] + cfg_scale * (v[:b] - v[b:])
  x_next = x.astype(jnp.float32) + (t_next - t) * v
  return x_next.astype(x.dtype), cache


def sample(
  model: dit.DiT,
  labels: jax.Array,  # int [B]
  *,
  steps: int = 20,
  rng: jax.Array | None = None,
  noise: jax.Array | None = None,  # [B, H, W, C]
  attention: str = "dense",
  mask: BlockMask | None = None,
  dense_steps: int = 5,
  recalibrate_every: int = 5,
  r_increment: float = 0.04,
  cfg_scale: float = 1.0,
  granularity: str = "tiles",
) -> jax.Array:
  """Images [B, H, W, C] (the model's normalised data space) from noise, by Euler steps.

  Args:
    model: a DiT (not modified).
    labels: int [B], each in [0, num_classes).
    steps: Euler steps from t = 1 to t = 0.
    rng: a PRNG key for the initial noise (ignored when `noise` is given).
    noise: the initial x at t = 1; the same noise and labels make samples of the
      different attention modes comparable.
    attention: "dense", "sparse", "rettention", "dense_then_sparse", "ratio_only" or
      "cache_only" (module docstring).
    mask: the BlockMask of the sparse modes; default `dit.local_window_mask` at density
      1/32 with tiles of min(128, max(1, N // 32)) tokens and `granularity`.
    dense_steps, recalibrate_every: the Re-ttention schedule (see `step_modes`), also
      that of "dense_then_sparse" and the controls.
    r_increment: added to every layer's r after every sparse step of "rettention" and
      "ratio_only" (the authors use 0.04; 0 keeps r as calibrated); "cache_only" keeps
      r = 0.
    cfg_scale: classifier-free guidance scale (1: none; the model needs a null class).
    granularity: the default mask's, "tiles" or "tokens" (`dit.local_window_mask`);
      ignored when `mask` is given.

  Returns:
    x at t = 0, float32 [B, H, W, C].
  """
  cfg = model.config
  labels = jnp.asarray(labels, jnp.int32)
  shape = (labels.shape[0], cfg.image_size, cfg.image_size, cfg.in_channels)
  if noise is None:
    if rng is None:
      raise ValueError("sample: pass `noise` or `rng`.")
    noise = jax.random.normal(rng, shape, jnp.float32)
  if tuple(noise.shape) != shape:
    raise ValueError(f"sample: noise must have shape {shape}, got {tuple(noise.shape)}.")
  if cfg_scale != 1.0:
    model.null_class  # noqa: B018 - raises if the model has no null class
  modes = step_modes(steps, attention, dense_steps=dense_steps, recalibrate_every=recalibrate_every)
  if mask is None and attention != "dense":
    n = cfg.num_tokens
    block = min(128, max(1, n // 32))
    mask = dit.local_window_mask(n, density=1 / 32, block=block, granularity=granularity)
  graphdef, state = nnx.split(model)
  x = jnp.asarray(noise, jnp.float32)
  cache = None
  for i, mode in enumerate(modes):
    t, t_next = jnp.float32(1 - i / steps), jnp.float32(1 - (i + 1) / steps)
    x, cache = _euler_step(
      graphdef,
      state,
      x,
      t,
      t_next,
      labels,
      cache,
      None if mode == "dense" else mask,
      mode=mode,
      cfg_scale=float(cfg_scale),
      calibration=_CALIBRATION.get(attention, "rettention"),
    )
    if mode == "rettention" and attention != "cache_only":
      cache = dit.bump_ratio(cache, r_increment)
  return x

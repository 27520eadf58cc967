"""Tasks: which model a config builds and how its loss and metrics are computed.

A task turns `config.model` plus the loaded datasets into a Flax NNX model, and a
batch into (mean loss, metric sums). Metric sums add up over batches and devices;
`summarize` turns them into the reported numbers. Evaluation batches carry a
"mask" (padding of the last batch) that weights every example once.

  classification  images -> LITv2 (HiLo attention); metrics: loss (cross entropy with
                  the true labels), accuracy; trained on the cross entropy with labels
                  smoothed by `config.label_smoothing` (default 0)
  lm              byte text -> decoder-only LM (dense / sliding / MoBA / NSA attention);
                  metrics: loss (mean next-token cross entropy), perplexity
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparse_attention.models import litv2, lm
from sparse_attention.ops import context_parallel
from sparse_attention.train import diffusion

LITV2_PRESETS: dict[str, Callable[..., litv2.LITv2Config]] = {
  "litv2_tiny": litv2.litv2_tiny,
  "litv2_s": litv2.litv2_s,
  "litv2_m": litv2.litv2_m,
  "litv2_b": litv2.litv2_b,
}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  unit: str  # what one example is, for throughput: "images" or "tokens"
  data_kind: str  # Datasets.kind this task trains on
  check: Callable[[ml_collections.ConfigDict], None]
  check_data: Callable[[Any], None]  # raises ValueError for data the task cannot learn from
  build_model: Callable[[ml_collections.ConfigDict, Any, nnx.Rngs], nnx.Module]
  loss: Callable[[nnx.Module, dict[str, jax.Array], Any], tuple[jax.Array, dict]]
  summarize: Callable[[dict[str, float]], dict[str, float]]
  examples: Callable[[dict[str, Any]], int]  # units per batch (images or tokens)


def _check_classification(config: ml_collections.ConfigDict) -> None:
  m = config.model
  if m.name not in LITV2_PRESETS:
    raise ValueError(
      f"config.model.name must be one of {sorted(LITV2_PRESETS)} for the classification "
      f"task, got {m.name!r}."
    )
  if m.attention != "hilo":
    raise ValueError(
      f"config.model.attention must be 'hilo' for LITv2 (its attention is HiLo), got "
      f"{m.attention!r}."
    )
  if not 0.0 <= m.alpha <= 1.0:
    raise ValueError(f"config.model.alpha must lie in [0, 1], got {m.alpha!r}.")
  if not 0.0 <= m.drop_path_rate < 1.0:
    raise ValueError(f"config.model.drop_path_rate must lie in [0, 1), got {m.drop_path_rate!r}.")
  smoothing = config.get("label_smoothing", 0.0)
  if isinstance(smoothing, bool) or not isinstance(smoothing, int | float):
    raise ValueError(f"config.label_smoothing must be a float in [0, 1), got {smoothing!r}.")
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"config.label_smoothing must lie in [0, 1), got {smoothing!r}.")


def _check_classes(datasets: Any) -> None:
  if datasets.num_classes < 2:
    raise ValueError(
      f"config.data: the data has {datasets.num_classes} class; classification needs at least "
      "two (an image folder needs one subfolder per class)."
    )


def _build_litv2(config: ml_collections.ConfigDict, datasets: Any, rngs: nnx.Rngs):
  m = config.model
  height, _, channels = datasets.image_shape
  preset = LITV2_PRESETS[m.name]
  model_config = preset(
    image_size=height,
    num_classes=datasets.num_classes,
    in_chans=channels,
    alpha=m.alpha,
    drop_path_rate=m.drop_path_rate,
    implementation=m.implementation or None,
  )
  model = litv2.LITv2(model_config, rngs=rngs)
  # The loss reads it here (Task.loss gets no config); a static attribute, not saved.
  model.label_smoothing = float(config.get("label_smoothing", 0.0))
  return model


def _classification_loss(model: nnx.Module, batch: dict[str, jax.Array], dtype: Any):
  """(mean training loss, metric sums): the loss uses the model's `label_smoothing`; the
  reported loss (`loss_sum`) is the plain cross entropy."""
  logits = model(batch["image"].astype(dtype)).astype(jnp.float32)  # [B, classes]
  labels = batch["label"]  # [B]
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
  weight = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)  # [B]
  count = jnp.sum(weight)
  metrics = {
    "loss_sum": jnp.sum(per_example * weight),
    "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
    "count": count,
  }
  smoothing = getattr(model, "label_smoothing", 0.0)
  if smoothing:
    classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, classes), smoothing)  # [B, classes]
    per_example = optax.softmax_cross_entropy(logits, targets)
  return jnp.sum(per_example * weight) / jnp.maximum(count, 1.0), metrics


def _summarize_classification(sums: dict[str, float]) -> dict[str, float]:
  n = max(sums["count"], 1.0)
  return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}


# ---------------------------------------------------------------------------------------
# Language modelling.

LM_PRESETS: dict[str, Callable[..., lm.LMConfig]] = {"lm_tiny": lm.lm_tiny, "lm_1b": lm.lm_1b}
# config.model fields passed to the LMConfig under the same names.
LM_FIELDS = (
  "attention",
  "window",
  "moba_chunk",
  "moba_topk",
  "nsa_block_len",
  "nsa_stride",
  "nsa_select_len",
  "nsa_num_select",
  "nsa_window",
  "nsa_compress",
  "softcap",
  "t5_buckets",
  "t5_max_distance",
  "rope",
)


def _lm_config(config: ml_collections.ConfigDict, vocab_size: int | None) -> lm.LMConfig:
  """The LMConfig of `config.model` (preset + fields); errors name config.model fields."""
  m = config.model
  if m.name not in LM_PRESETS:
    raise ValueError(
      f"config.model.name must be one of {sorted(LM_PRESETS)} for the lm task, got {m.name!r}."
    )
  if m.get("attention") not in lm.ATTENTIONS:
    raise ValueError(
      f"config.model.attention must be one of {lm.ATTENTIONS} for the lm task, got "
      f"{m.get('attention')!r}."
    )
  overrides = {name: m[name] for name in LM_FIELDS if name in m}
  overrides["implementation"] = m.get("implementation") or None
  overrides["score_mod"] = m.get("score_mod") or None
  preset = LM_PRESETS[m.name]()
  if vocab_size is not None:
    overrides["vocab_size"] = vocab_size
  seq_len = config.data.get("seq_len")
  if isinstance(seq_len, int) and seq_len > preset.max_len:
    overrides["max_len"] = seq_len  # RoPE has no table: only the limit moves
  try:
    return LM_PRESETS[m.name](**overrides)
  except lm.LMConfigError as e:
    raise ValueError(f"config.model.{e.field} {e.detail}") from None


def _check_lm(config: ml_collections.ConfigDict) -> None:
  if config.data.kind not in ("text", "npz"):
    raise ValueError(
      f"config.data.kind must be 'text' (or 'npz' with a token stream) for the lm task, got "
      f"{config.data.kind!r}."
    )
  model = _lm_config(config, None)
  context = config.mesh.get("context", 1)
  seq_len = config.data.get("seq_len")
  if context != 1 and isinstance(seq_len, int):
    # Zig-zag: every device holds 2 slices of seq_len / (2 * context) tokens.
    if seq_len % (2 * context):
      raise ValueError(
        f"config.data.seq_len ({seq_len}) must be a multiple of 2 x config.mesh.context "
        f"({context}): each device holds two slices of the sequence."
      )
    problem = lm.context_parallel_problem(model, seq_len // (2 * context))
    if problem:
      raise ValueError(f"config.mesh.context={context} with seq_len {seq_len}: {problem}")


def _build_lm(config: ml_collections.ConfigDict, datasets: Any, rngs: nnx.Rngs):
  return lm.LM(_lm_config(config, datasets.vocab_size), rngs=rngs)


def _lm_loss(model: nnx.Module, batch: dict[str, jax.Array], dtype: Any):
  """Mean next-token cross entropy over the target tokens (eval: of the masked-in examples)."""
  del dtype  # the token ids are ints; the trainer has cast the parameters
  # A mesh with a context axis splits the sequence: the model stores it zig-zag (logits
  # in that order), so the targets follow; the mean over tokens does not care.
  layout = context_parallel.active_layout(batch["inputs"].shape[1])
  logits = model(batch["inputs"], layout=layout)  # [B, L, vocab] float32
  targets = batch["targets"] if layout is None else layout.to_layout(batch["targets"])  # [B, L]
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
  weight = batch.get("mask", jnp.ones(targets.shape[:1], bool)).astype(jnp.float32)  # [B]
  weight = jnp.broadcast_to(weight[:, None], targets.shape)
  loss_sum = jnp.sum(per_token * weight)
  count = jnp.sum(weight)
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count}


def _summarize_lm(sums: dict[str, float]) -> dict[str, float]:
  loss = sums["loss_sum"] / max(sums["count"], 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


TASKS = {
  "classification": Task(
    name="classification",
    unit="images",
    data_kind="image",
    check=_check_classification,
    check_data=_check_classes,
    build_model=_build_litv2,
    loss=_classification_loss,
    summarize=_summarize_classification,
    examples=lambda batch: batch["label"].shape[0],
  ),
  "lm": Task(
    name="lm",
    unit="tokens",
    data_kind="text",
    check=_check_lm,
    check_data=lambda datasets: None,
    build_model=_build_lm,
    loss=_lm_loss,
    summarize=_summarize_lm,
    examples=lambda batch: batch["inputs"].size,
  ),
  "diffusion": Task(
    name="diffusion",
    unit="images",
    data_kind="image",
    check=diffusion.check,
    check_data=lambda datasets: None,
    build_model=diffusion.build,
    loss=diffusion.loss,
    summarize=diffusion.summarize,
    examples=diffusion.examples,
  ),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}.")
  return TASKS[name]

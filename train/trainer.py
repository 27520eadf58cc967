"""The training loop: one trainer for every task, from one `ml_collections` config.

`train_and_evaluate(config, workdir)`:
  1. checks the config (a ValueError names the first bad field) and builds the mesh;
  2. loads the data, builds the model (Flax NNX) and the optimizer (optax);
  3. places parameters and optimizer state on the mesh (train/partitioning.py) and
     jits one training step with those shardings (`jax.jit` with in/out shardings:
     the successor of pjit), batches split over ("data", "fsdp");
  4. resumes from the newest readable checkpoint in `<workdir>/checkpoints`, if any:
     parameters, optimizer state, BatchNorm statistics, RNG streams, step and data
     position, so a killed job continues exactly where the last checkpoint left it;
  5. trains, logging every `log_every` steps (stderr, `<workdir>/metrics.jsonl`,
     TensorBoard event files in `<workdir>`), evaluating every `eval_every` steps and
     checkpointing every `checkpoint_every` steps and at the end;
  6. evaluates on the eval and test splits and returns (and logs) the summary.

Mixed precision: with `config.compute_dtype = "bfloat16"` the float32 parameters are
cast to bfloat16 inside the step (gradients and updates stay float32).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparse_attention.train import checkpoint, data, optim, partitioning, summary, tasks

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------
# Config checks.


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field; run before anything is built."""
  positive = (
    "steps",
    "batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
  )
  for field in positive:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{field} must be a positive int, got {value!r}.")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
      f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {config.compute_dtype!r}."
    )
  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"config.seed must be a non-negative int, got {config.seed!r}.")
  profile = config.profile
  if profile.num_steps < 0 or (profile.num_steps and profile.start_step < 0):
    raise ValueError(
      "config.profile: num_steps must be >= 0 and start_step >= 0 when profiling, got "
      f"start_step={profile.start_step}, num_steps={profile.num_steps}."
    )
  task = tasks.get(config.task)
  task.check(config)
  optim.check_config(config.optimizer, config.steps)
  partitioning.compile_rules([tuple(r) for r in config.sharding_rules])


# ---------------------------------------------------------------------------------------
# Logging.


def say(message: str, *args: Any) -> None:
  """A progress message on stderr from process 0, whatever the absl verbosity (the
  checkpointing library logs a lot at INFO; main.py quiets absl to WARNING)."""
  if jax.process_index() == 0:
    text = message % args if args else message
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class MetricsLog:
  """Progress lines on stderr (a live bar on a terminal), metrics.jsonl, TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, unit: str, enabled: bool):
    self.enabled = enabled
    self.total = total_steps
    self.unit = unit
    self.tty = enabled and sys.stderr.isatty()
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self._writer = summary.SummaryWriter(workdir, enabled=enabled)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self._jsonl.flush()
    self._writer.scalars({f"{split}/{k}": v for k, v in values.items()}, step)

  def progress(self, step: int, values: dict[str, float]) -> None:
    """One line per logging interval; on a terminal the line is redrawn in place."""
    if not self.enabled:
      return
    width = 24
    done = int(width * step / self.total)
    bar = "#" * done + "." * (width - done)
    eta = values.get("eta_s", 0.0)
    parts = [f"step {step}/{self.total}"]
    for key in ("loss", "accuracy", "perplexity"):
      if key in values:
        parts.append(f"{key} {values[key]:.4f}")
    parts += [
      f"lr {values['learning_rate']:.2e}",
      f"{values['steps_per_s']:.2f} steps/s",
      f"{values['examples_per_s']:,.0f} {self.unit}/s",
      f"ETA {int(eta // 60)}m{int(eta % 60):02d}s",
    ]
    line = " | ".join(parts)
    if self.tty:
      sys.stderr.write(f"\r[{bar}] {line}\033[K")
      sys.stderr.flush()
      if step == self.total:
        sys.stderr.write("\n")
    else:
      say("%s", line)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    self._writer.close()


# ---------------------------------------------------------------------------------------
# The training state and the jitted steps.


def _cast_floats(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


class Steps:
  """The model split into (graph, parameters, other state) and its jitted steps."""

  def __init__(
    self, model: nnx.Module, task: tasks.Task, tx: optax.GradientTransformation, compute_dtype: Any
  ):
    model.eval()
    self.eval_graph = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    self.train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    self.initial = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest}
    self.task, self.tx, self.dtype = task, tx, compute_dtype

  def _forward(self, graph, params, rest, batch):
    # tree.map makes fresh Variables at this trace level, which NNX lets the model
    # mutate (BatchNorm statistics, RNG counters) inside jax.grad.
    model = nnx.merge(graph, _cast_floats(params, self.dtype), jax.tree.map(lambda x: x, rest))
    loss, metrics = self.task.loss(model, batch, self.dtype)
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    # Keep the other state's dtypes (e.g. float32 BatchNorm statistics).
    new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
    return loss, (metrics, new_rest)

  def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    grad_fn = jax.value_and_grad(
      lambda p: self._forward(self.train_graph, p, state["rest"], batch), has_aux=True
    )
    (loss, (metrics, rest)), grads = grad_fn(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    del loss  # the task's sums give the reported loss
    new_state = {"step": state["step"] + 1, "params": params, "rest": rest, "opt_state": opt_state}
    return new_state, metrics

  def eval_step(self, state: dict, batch: dict) -> dict:
    _, (metrics, _) = self._forward(self.eval_graph, state["params"], state["rest"], batch)
    return metrics


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(steps: Steps, eval_step, state, source, batch_size: int, sharding) -> dict:
  """The task's metrics over every example of `source` exactly once."""
  batches = data.eval_batches(
    source, batch_size, shard_index=jax.process_index(), num_shards=jax.process_count()
  )
  metrics = [eval_step(state, _to_global(batch, sharding)) for batch in batches]
  return steps.task.summarize(_sum_metrics(jax.device_get(metrics)))


# ---------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final metrics."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = partitioning.make_mesh(config.mesh)
  divisor = partitioning.batch_size_divisor(mesh)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % divisor:
      raise ValueError(
        f"config.{field} ({config[field]}) must be a multiple of the data-parallel degree "
        f"{divisor} (mesh data x fsdp)."
      )
  task = tasks.get(config.task)
  datasets = data.make_datasets(config)
  if datasets.kind != task.data_kind:
    raise ValueError(
      f"config.data.kind {config.data.kind!r} gives {datasets.kind} data; the "
      f"{config.task!r} task needs {task.data_kind} data."
    )
  tx, learning_rate = optim.make(config.optimizer, config.steps)
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  rules = [tuple(r) for r in config.sharding_rules]
  primary = jax.process_index() == 0
  batch_sharding = partitioning.batch_sharding(mesh)

  with jax.set_mesh(mesh):
    steps = Steps(_build_model(task, config, datasets), task, tx, dtype)
    state = dict(steps.initial)
    param_specs = partitioning.param_specs(state["params"], mesh, rules)
    param_shardings = partitioning.shardings(param_specs, mesh)
    state["params"] = jax.device_put(state["params"], param_shardings)
    state["rest"] = jax.device_put(state["rest"], partitioning.replicated(mesh))
    state["step"] = jax.device_put(state["step"], partitioning.replicated(mesh))
    state["opt_state"] = jax.jit(tx.init)(state["params"])  # shardings follow the params
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(
      steps.train_step,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=0,
    )
    eval_step = jax.jit(steps.eval_step, in_shardings=(state_shardings, batch_sharding))

    train_iter = data.BatchIterator(
      datasets.train,
      config.batch_size,
      seed=config.seed,
      shard_index=jax.process_index(),
      num_shards=jax.process_count(),
    )
    ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    start = 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
      start, state, meta = restored
      train_iter.restore(meta["data"])
      say("Resumed from the checkpoint at step %d in %s.", start, ckpt.directory)
    specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
    parameters = {
      "total": sum(x.size for x in jax.tree.leaves(state["params"])),
      "tensors": len(specs),
      "sharded_tensors": sum(any(axis is not None for axis in spec) for spec in specs),
    }
    say(
      "Task %s, model %s (%s parameters; %d of %d tensors sharded), %d devices, mesh %s, "
      "%d steps from step %d.",
      task.name,
      config.model.name,
      f"{parameters['total']:,}",
      parameters["sharded_tensors"],
      parameters["tensors"],
      jax.device_count(),
      dict(mesh.shape),
      config.steps,
      start,
    )

    log = MetricsLog(workdir, config.steps, task.unit, enabled=primary)
    profile_dir = os.path.join(workdir, "profile")
    profile_end = config.profile.start_step + config.profile.num_steps
    pending: list[dict[str, jax.Array]] = []  # step metrics not yet fetched
    interval_start, interval_examples = time.perf_counter(), 0
    for step in range(start, config.steps):
      if config.profile.num_steps and step == config.profile.start_step:
        jax.profiler.start_trace(profile_dir)
      batch = next(train_iter)
      state, metrics = train_step(state, _to_global(batch, batch_sharding))
      pending.append(metrics)
      interval_examples += task.examples(batch) * jax.process_count()
      done = step + 1
      if config.profile.num_steps and done == profile_end:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        say(
          "Wrote a profile of steps %d-%d to %s.",
          config.profile.start_step,
          done - 1,
          profile_dir,
        )
      if done % config.log_every == 0 or done == config.steps:
        sums = _sum_metrics(jax.device_get(pending))  # blocks until these steps are done
        elapsed = time.perf_counter() - interval_start
        values = task.summarize(sums)
        values["grad_norm"] = sums["grad_norm"] / len(pending)
        values["learning_rate"] = float(learning_rate(_updates_before(done, config)))
        values["steps_per_s"] = len(pending) / elapsed
        values["examples_per_s"] = interval_examples / elapsed
        values["eta_s"] = (config.steps - done) / values["steps_per_s"]
        log.write(done, "train", values)
        log.progress(done, values)
        pending, interval_start, interval_examples = [], time.perf_counter(), 0
      if done % config.eval_every == 0 and done != config.steps:
        values = evaluate(
          steps, eval_step, state, datasets.eval, config.eval_batch_size, batch_sharding
        )
        log.write(done, "eval", values)
        say("eval at step %d: %s", done, _fmt(values))
      if done % config.checkpoint_every == 0 or done == config.steps:
        ckpt.save(done, state, {"data": train_iter.state(), "step": done})
    ckpt.close()

    final = {"step": config.steps, "parameters": parameters}
    for split, source in (("eval", datasets.eval), ("test", datasets.test)):
      values = evaluate(steps, eval_step, state, source, config.eval_batch_size, batch_sharding)
      log.write(config.steps, split, values)
      final[split] = values
    log.close()
  if primary:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  say("Done: eval %s; test %s.", _fmt(final["eval"]), _fmt(final["test"]))
  return final


def _build_model(task: tasks.Task, config: ml_collections.ConfigDict, datasets: Any):
  """The task's model, initialised from config.seed (params) and config.seed + 1 (dropout)."""
  return task.build_model(config, datasets, nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def _updates_before(done_steps: int, config: ml_collections.ConfigDict) -> int:
  """The optimizer-update count at the last update of `done_steps` steps (gradient
  accumulation makes k steps one update): the learning rate it used."""
  return max(0, done_steps // config.optimizer.accumulate_steps - 1)


def _sum_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
  sums: dict[str, float] = {}
  for m in metrics:
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return sums


def _fmt(values: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def restore_model(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  step: int | None = None,
  datasets: Any = None,
) -> tuple[nnx.Module, int]:
  """The model a training run left in `workdir`, in eval mode, and its step.

  Works for any task of train/tasks.py (e.g. a DiT to sample from, a LITv2 classifier).
  `config` must be the run's config (the workdir does not store it); the model is built
  with the task's `build_model` and its parameters and other state (RNG streams,
  BatchNorm statistics) are read from the checkpoint `step` (default: the newest).

  Args:
    config: the training config of the run.
    workdir: the run's --workdir.
    step: which checkpoint (default: the newest).
    datasets: `data.make_datasets(config)` if already loaded (shapes, class count).

  Returns:
    (model, step).
  """
  task = tasks.get(config.task)
  if datasets is None:
    datasets = data.make_datasets(config)
  tx, _ = optim.make(config.optimizer, config.steps)
  steps = Steps(
    _build_model(task, config, datasets), task, tx, COMPUTE_DTYPES[config.compute_dtype]
  )
  like = dict(steps.initial, opt_state=tx.init(steps.initial["params"]))  # as trained
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1 << 30)
  try:
    saved = ckpt.all_steps()
    if not saved:
      raise FileNotFoundError(f"restore_model: no checkpoint in {ckpt.directory}.")
    step = saved[-1] if step is None else step
    state, _ = ckpt.restore(step, like)
  finally:
    ckpt.close()
  return nnx.merge(steps.eval_graph, state["params"], state["rest"]), int(step)

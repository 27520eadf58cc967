"""The training loop: one trainer for every task, from one `ml_collections` config.

`train_and_evaluate(config, workdir)`:
  1. checks every config field (a `UsageError` names the first bad one), builds the mesh,
     loads the data, builds the model (Flax NNX) and the optimizer (optax): all before
     anything is written;
  2. records the config and the data's facts in the workdir, or, if the workdir holds a
     run, refuses a config that would not continue it (train/workdir.py; `restart=True`
     moves the old run aside instead);
  3. places parameters and optimizer state on the mesh (train/partitioning.py) and
     compiles one training step with those shardings (`jax.jit` with in/out shardings:
     the successor of pjit), batches split over ("data", "fsdp");
  4. resumes from the newest readable checkpoint in `<workdir>/checkpoints`, if any:
     parameters, optimizer state, BatchNorm statistics, RNG streams, step and data
     position (the grain iterator's state), so a killed job continues exactly where
     the last checkpoint left it;
  5. trains, logging every `log_every` steps (stderr, `<workdir>/metrics.jsonl`,
     TensorBoard event files in `<workdir>`, by tensorboardX), evaluating every
     `eval_every` steps and checkpointing every `checkpoint_every` steps, at the end,
     and on SIGINT / SIGTERM (then raising `Interrupted`);
  6. evaluates on the eval and test splits and returns (and logs) the summary.

A step whose loss or gradients are not finite never changes the state: with
`config.nonfinite = "stop"` (the default) the run stops (`Diverged`) at the next log or
checkpoint boundary, saving nothing more; with "skip" it goes on and counts the skipped
steps (`nonfinite_steps` in the train metrics).

Mixed precision: with `config.compute_dtype = "bfloat16"` the float32 parameters are
cast to bfloat16 inside the step (gradients and updates stay float32).

`load(workdir)` gives back the trained model of a workdir, in eval mode, with its config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter

from sparse_attention.train import checkpoint, data, optim, partitioning, tasks
from sparse_attention.train import workdir as workdir_lib

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NONFINITE = ("stop", "skip")


class UsageError(ValueError):
  """A config, data or workdir problem found before (or instead of) training; the
  message names the field, file or step at fault. train/main.py prints it as one line."""


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped training after saving a checkpoint at `step`."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped at step {step}, checkpoint saved; run the same command to resume")
    self.signum, self.step = signum, step


class Diverged(RuntimeError):
  """The loss or gradients became non-finite (config.nonfinite = "stop")."""


# ---------------------------------------------------------------------------------------
# Config checks.


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field; reads nothing, builds nothing."""
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
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"config.seed must be a non-negative int, got {config.seed!r}.")
  if config.get("nonfinite", "stop") not in NONFINITE:
    raise ValueError(f"config.nonfinite must be one of {NONFINITE}, got {config.nonfinite!r}.")
  profile = config.profile
  for field in ("start_step", "num_steps"):
    if isinstance(profile[field], bool) or not isinstance(profile[field], int):
      raise ValueError(f"config.profile.{field} must be an int, got {profile[field]!r}.")
  if profile.num_steps < 0 or (profile.num_steps and profile.start_step < 0):
    raise ValueError(
      "config.profile: num_steps must be >= 0 and start_step >= 0 when profiling, got "
      f"start_step={profile.start_step}, num_steps={profile.num_steps}."
    )
  _check_implementation(config.model.get("implementation") or "")
  context = config.mesh.get("context", 1)
  if context != 1 and config.task != "lm":
    raise ValueError(
      f"config.mesh.context ({context}) splits sequences: only the lm task runs context "
      "parallel; leave it 1."
    )
  task = tasks.get(config.task)
  task.check(config)
  data.check_config(config)
  optim.check_config(config.optimizer, config.steps)
  partitioning.compile_rules([tuple(r) for r in config.sharding_rules])


def _check_implementation(name: str) -> None:
  """A Pallas kernel named in config.model.implementation must compile on this backend
  (the trainer runs no kernel in the interpreter)."""
  if not name.startswith("pallas"):
    return
  backend = jax.default_backend()
  needs = ("gpu", "tpu") if name == "pallas" else ("tpu",) if name == "pallas_tpu" else ("gpu",)
  if backend not in needs:
    hardware = " or ".join(n.upper() for n in needs)
    raise ValueError(
      f"config.model.implementation {name!r} needs a {hardware}; jax runs on {backend!r} "
      "here. Use '' (the best available) or 'xla'."
    )


# ---------------------------------------------------------------------------------------
# Logging.


def say(message: str, *args: Any) -> None:
  """A progress message on stderr from process 0, whatever the absl verbosity (the
  checkpointing library logs a lot at INFO; main.py quiets absl to WARNING)."""
  if jax.process_index() == 0:
    text = message % args if args else message
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class MetricsLog:
  """Progress lines on stderr (a live bar on a terminal), metrics.jsonl, TensorBoard.

  A run resumed at step S first drops the rows metrics.jsonl holds for steps after S
  (written by the attempt that was killed), and, when it only evaluates (S is the last
  step), the evaluation rows of step S it is about to write again: every row once. Its
  TensorBoard event file starts with `purge_step` S + 1, so TensorBoard drops the
  killed attempt's events of the steps after S too.
  """

  def __init__(self, workdir: str, total_steps: int, unit: str, enabled: bool, start: int):
    self.enabled = enabled
    self.total = total_steps
    self.unit = unit
    self.tty = enabled and sys.stderr.isatty()
    self._bar_open = False
    self._jsonl = self._writer = None
    if enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_rows_after(path, start, drop_evaluations=start == total_steps)
      self._jsonl = open(path, "a")
      self._writer = SummaryWriter(workdir, purge_step=start + 1 if start else None, flush_secs=10)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._writer.add_scalar(f"{split}/{key}", value, step)

  def say(self, message: str, *args: Any) -> None:
    """A message on its own line, never glued to the live bar."""
    if self._bar_open:
      sys.stderr.write("\n")
      self._bar_open = False
    say(message, *args)

  def progress(self, step: int, values: dict[str, float]) -> None:
    """One line per logging interval; on a terminal the line is redrawn in place."""
    if not self.enabled:
      return
    width = 24
    done = int(width * step / self.total)
    bar = "#" * done + "." * (width - done)
    parts = [f"step {step}/{self.total}"]
    for key in ("loss", "accuracy", "perplexity"):
      if key in values:
        parts.append(f"{key} {values[key]:.4f}")
    parts += [
      f"lr {values['learning_rate']:.2e}",
      f"{values['steps_per_s']:.2f} steps/s",
      f"{values['examples_per_s']:,.0f} {self.unit}/s",
      f"ETA {_duration(values['eta_s'])}",
    ]
    if values.get("nonfinite_steps"):
      parts.append(f"{values['nonfinite_steps']:.0f} non-finite steps skipped")
    line = " | ".join(parts)
    if self.tty:
      sys.stderr.write(f"\r[{bar}] {line}\033[K")
      sys.stderr.flush()
      self._bar_open = step != self.total
      if step == self.total:
        sys.stderr.write("\n")
    else:
      say("%s", line)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._writer.close()
    if self._bar_open:
      sys.stderr.write("\n")
      self._bar_open = False


def _duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "--"
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _drop_rows_after(path: str, step: int, drop_evaluations: bool) -> None:
  """Rewrites metrics.jsonl without the rows of steps after `step` (and, with
  `drop_evaluations`, the eval / test rows of `step`), atomically."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
      if row["step"] < step or (row["step"] == step and not drop_evaluations):
        kept.append(line)
      elif row["step"] == step and row["split"] == "train":
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a kill
  if len(kept) != len(lines):
    with open(f"{path}.tmp", "w") as f:
      f.write("".join(line + "\n" for line in kept))
    os.replace(f"{path}.tmp", path)


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
    """One update. A step whose loss or gradients are not finite leaves the state as it
    was (step counter aside), zeroes its metric sums and reports `nonfinite` = 1."""
    grad_fn = jax.value_and_grad(
      lambda p: self._forward(self.train_graph, p, state["rest"], batch), has_aux=True
    )
    (loss, (metrics, rest)), grads = grad_fn(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    def unless_nonfinite(new, old):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = {
      "step": state["step"] + 1,
      "params": unless_nonfinite(params, state["params"]),
      "rest": unless_nonfinite(rest, state["rest"]),
      "opt_state": unless_nonfinite(opt_state, state["opt_state"]),
    }
    metrics = dict(metrics, grad_norm=grad_norm)  # the task's sums give the reported loss
    metrics = {k: jnp.where(finite, v, 0.0) for k, v in metrics.items()}
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    metrics["raw_loss"] = loss  # as computed, for the message when the run stops
    return new_state, metrics

  def eval_step(self, state: dict, batch: dict) -> dict:
    _, (metrics, _) = self._forward(self.eval_graph, state["params"], state["rest"], batch)
    return metrics


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _next_batch(batches, where: str) -> dict[str, np.ndarray]:
  """The next batch; a file that cannot be decoded raises UsageError naming it."""
  try:
    return next(batches)
  except ValueError as e:
    raise UsageError(f"{where}: {e}") from e


def check_batch(batch: dict[str, np.ndarray], datasets: Any, where: str) -> None:
  """The host-side check of every batch before it reaches the compiled step (where an
  out-of-range id would silently read garbage): labels in [0, num_classes), token ids
  in [0, vocab_size), finite images.

  Raises:
    UsageError: naming the batch (`where`), the key and the offending value.
  """
  bounds = {"label": datasets.num_classes, "inputs": datasets.vocab_size}
  bounds["targets"] = datasets.vocab_size
  for key, value in batch.items():
    if key == "mask" or value.size == 0:
      continue
    limit = bounds.get(key)
    if limit is not None:
      lo, hi = int(value.min()), int(value.max())
      if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise UsageError(f"{where}: {key} {bad} is outside [0, {limit}) (check config.data).")
    elif np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      count = int(np.size(value) - np.isfinite(value).sum())
      raise UsageError(f"{where}: {key} holds {count} non-finite values (check config.data).")


def evaluate(
  steps: Steps, eval_step, state, split: str, batch_size: int, sharding, datasets
) -> dict:
  """The task's metrics over every example of `datasets.<split>` exactly once."""
  shard_index, num_shards = partitioning.process_batch_shard(sharding.mesh)
  batches = data.eval_batches(
    datasets, split, batch_size, shard_index=shard_index, num_shards=num_shards
  )
  metrics = []
  with contextlib.closing(batches):  # stops its worker processes
    for i in range(data.num_eval_batches(datasets, split, batch_size)):
      batch = _next_batch(batches, f"{split} batch {i}")
      check_batch(batch, datasets, f"{split} batch {i}")
      metrics.append(eval_step(state, _to_global(batch, sharding)))
  return steps.task.summarize(_sum_metrics(jax.device_get(metrics)))


# ---------------------------------------------------------------------------------------
# Signals.


class _StopSignals:
  """While active, SIGINT and SIGTERM only set `received` (the loop then saves and stops at
  the end of the current step); a second signal gets the previous handler back. Active
  only in the main thread (Python delivers signals there)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signum
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()

  def agreed(self, at_boundary: bool) -> int | None:
    """The signal to stop on, agreed by every process (multi-process runs agree at log
    boundaries only: a collective per step would stall the step pipeline)."""
    if jax.process_count() == 1:
      return self.received
    if not at_boundary:
      return None
    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    return int(np.max(flags)) or None


# ---------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the final metrics.

  Args:
    config: the training config (configs/*.py `get_config()` with overrides).
    workdir: where checkpoints, metrics and the recorded config go.
    restart: move a run already in `workdir` to `workdir/previous/<time>/` and start over
      (nothing is deleted); without it a workdir whose run this config cannot continue is
      refused.

  Raises:
    UsageError: a bad config field, unusable data, an incompatible workdir, or
      `config.steps` below the step of the newest checkpoint; before anything is written
      (workdir problems: before any training).
    Interrupted: SIGINT / SIGTERM; a checkpoint of the current step was saved.
    Diverged: a non-finite loss or gradient with config.nonfinite = "stop".
  """
  try:
    check_config(config)
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
    task.check_data(datasets)
    if len(datasets.train) < config.batch_size:
      raise ValueError(
        f"config.batch_size ({config.batch_size}) is larger than the train split "
        f"({len(datasets.train)} examples)."
      )
  except UsageError:
    raise
  except ValueError as e:
    raise UsageError(str(e)) from e
  tx, learning_rate = optim.make(config.optimizer, config.steps)
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  rules = [tuple(r) for r in config.sharding_rules]
  primary = jax.process_index() == 0
  batch_sharding = partitioning.batch_sharding(mesh)

  with jax.set_mesh(mesh):
    steps = Steps(_build_model(task, config, datasets), task, tx, dtype)
    _prepare_workdir(workdir, config, datasets, restart)
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

    shard_index, num_shards = partitioning.process_batch_shard(mesh)
    train_iter = data.train_batches(
      datasets,
      config.batch_size,
      seed=config.seed,
      shard_index=shard_index,
      num_shards=num_shards,
    )
    ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    start = 0
    try:
      restored = ckpt.restore_latest(state, data=train_iter)
    except checkpoint.IncompatibleCheckpoint as e:
      train_iter.close()
      ckpt.close()
      raise UsageError(str(e)) from None
    if restored is not None:
      start, state, _ = restored
      if start > config.steps:
        train_iter.close()
        ckpt.close()
        raise UsageError(
          f"config.steps ({config.steps}) is below the step of the newest checkpoint in "
          f"{ckpt.directory} ({start}): raise --config.steps to train on, or evaluate the "
          "trained model with sparse_attention.train.load(workdir)."
        )
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
    for split in ("eval", "test"):
      if not len(getattr(datasets, split)):
        say("The %s split is empty (config.data.%s_fraction = 0): not evaluated.", split, split)

    log = MetricsLog(workdir, config.steps, task.unit, enabled=primary, start=start)

    def run_eval(split: str, state: dict) -> dict | None:
      if not len(getattr(datasets, split)):
        return None
      return evaluate(
        steps, eval_step, state, split, config.eval_batch_size, batch_sharding, datasets
      )

    try:
      with _StopSignals() as signals:
        state = _train_loop(
          config, workdir, steps, state, train_step, train_iter, ckpt, log, learning_rate,
          batch_sharding, datasets, run_eval, signals, start,
        )  # fmt: skip
    except BaseException:
      log.close()
      raise
    finally:
      train_iter.close()
      ckpt.close()

    final = {"step": config.steps, "parameters": parameters}
    for split in ("eval", "test"):
      values = run_eval(split, state)
      if values is not None:
        log.write(config.steps, split, values)
      final[split] = values
    log.close()
  if primary:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  say("Done: eval %s; test %s.", format_metrics(final["eval"]), format_metrics(final["test"]))
  return final


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict, datasets, restart) -> None:
  """Moves an old run aside (restart), then records or checks the config. Process 0 does
  it; the others learn from it whether to go on."""
  error = None
  if jax.process_index() == 0:
    if restart:
      moved = workdir_lib.move_aside(workdir)
      if moved:
        say("--restart: moved the previous run's files to %s.", moved)
    os.makedirs(workdir, exist_ok=True)
    try:
      workdir_lib.check_or_record(workdir, config, workdir_lib.dataset_facts(datasets))
    except workdir_lib.IncompatibleWorkdir as e:
      error = str(e)
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = f"process 0 refused --workdir {workdir} (its error says why)."
  if error is not None:
    raise UsageError(error)


def _train_loop(
  config, workdir, steps, state, train_step, train_iter, ckpt, log, learning_rate,
  batch_sharding, datasets, run_eval, signals, start,
):  # fmt: skip
  """Steps `start` .. config.steps; returns the final state."""
  task = steps.task
  profile_dir = os.path.join(workdir, "profile")
  profile_end = config.profile.start_step + config.profile.num_steps
  pending: list[dict[str, jax.Array]] = []  # step metrics not yet fetched
  clock = _Clock()
  interval_examples, last_saved = 0, start
  compiled = None
  for step in range(start, config.steps):
    done = step + 1
    if config.profile.num_steps and step == config.profile.start_step:
      jax.profiler.start_trace(profile_dir)
    batch = _next_batch(train_iter, f"the training batch of step {done}")
    check_batch(batch, datasets, f"the training batch of step {done}")
    batch = _to_global(batch, batch_sharding)
    if compiled is None:  # compile before the clock runs: rates and ETA exclude it
      tic = time.perf_counter()
      compiled = train_step.lower(state, batch).compile()
      log.say("Compiled the training step in %.1f s.", time.perf_counter() - tic)
      clock.restart()
    state, metrics = compiled(state, batch)
    pending.append(metrics)
    interval_examples += task.examples(batch)  # the global batch
    if config.profile.num_steps and done == profile_end:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      log.say("Wrote a profile of steps %d-%d to %s.", config.profile.start_step, done - 1,
              profile_dir)  # fmt: skip
    at_log = done % config.log_every == 0 or done == config.steps
    at_checkpoint = done % config.checkpoint_every == 0 or done == config.steps
    stop = signals.agreed(at_boundary=at_log)
    if at_log:
      sums = _sum_metrics(jax.device_get(pending))  # blocks until these steps are done
      _check_finite(sums, pending, done, config, last_saved, learning_rate)
      elapsed = clock.elapsed()
      values = task.summarize(sums)
      finite_steps = len(pending) - sums["nonfinite"]
      values["grad_norm"] = sums["grad_norm"] / max(finite_steps, 1)
      values["nonfinite_steps"] = sums["nonfinite"]
      values["learning_rate"] = float(learning_rate(_updates_before(done, config)))
      values["steps_per_s"] = len(pending) / elapsed
      values["examples_per_s"] = interval_examples / elapsed
      values["eta_s"] = (config.steps - done) / values["steps_per_s"]
      log.write(done, "train", values)
      log.progress(done, values)
      pending, interval_examples = [], 0
      clock.restart()
    elif at_checkpoint or stop:  # never save a state past a step that should stop the run
      _check_finite(
        _sum_metrics(jax.device_get(pending)), pending, done, config, last_saved, learning_rate
      )
    if done % config.eval_every == 0 and done != config.steps:
      with clock.paused():
        values = run_eval("eval", state)
        if values is not None:
          log.write(done, "eval", values)
          log.say("eval at step %d: %s", done, format_metrics(values))
    if at_checkpoint or stop:
      with clock.paused():
        ckpt.save(done, state, {"step": done}, data=train_iter)
        last_saved = done
    if stop:
      ckpt.wait()
      raise Interrupted(stop, done)
  return state


class _Clock:
  """Training time of the current logging interval, without compilation, evaluation and
  checkpoint saves."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self._start, self._paused = time.perf_counter(), 0.0

  def elapsed(self) -> float:
    return max(time.perf_counter() - self._start - self._paused, 1e-9)

  @contextlib.contextmanager
  def paused(self):
    tic = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - tic


def _check_finite(sums, pending, done, config, last_saved, learning_rate) -> None:
  """Raises Diverged at the first non-finite step of `pending` (config.nonfinite = "stop")."""
  if not sums["nonfinite"] or config.get("nonfinite", "stop") != "stop":
    return
  flags = [float(m["nonfinite"]) for m in jax.device_get(pending)]
  first = flags.index(1.0)
  bad_step = done - len(pending) + first + 1
  loss = float(jax.device_get(pending[first]["raw_loss"]))
  lr = float(learning_rate(_updates_before(bad_step, config)))
  saved = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
  raise Diverged(
    f"the loss or gradients became non-finite at step {bad_step} (loss {loss:.4g}, learning "
    f"rate {lr:.3g}); stopped without saving it ({saved}). Try a lower "
    "config.optimizer.learning_rate or config.optimizer.grad_clip, check the data, or set "
    "--config.nonfinite=skip to skip such steps."
  )


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


def format_metrics(values: dict[str, float] | None) -> str:
  if values is None:
    return "skipped (empty split)"
  return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


# ---------------------------------------------------------------------------------------
# Using a trained model.


def load(workdir: str, step: int | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The model a training run left in `workdir`, in eval mode, with the run's config.

  The model is rebuilt from the config and data facts the run recorded (config.json,
  dataset.json: no data is read) and restored from the newest readable checkpoint
  (unreadable ones are skipped, not moved), or from checkpoint `step`. Works for every
  task (a LITv2 classifier, the LM, the DiT). Nothing is written.

  Args:
    workdir: the run's --workdir.
    step: which checkpoint (default: the newest readable one).

  Returns:
    (model, config): the model in eval mode (BatchNorm uses its running statistics,
    dropout is off) and the training config, with two fields added:
    `config.restored_step`, the checkpoint's step, and `config.dataset`, the recorded
    facts of the training data (`num_classes`, `class_names`, `image_shape`, `mean`,
    `std` of the normalisation every input image needs, `vocab_size`, `seq_len`).

  Raises:
    FileNotFoundError: `workdir` does not exist, holds no recorded config, or no
      (readable) checkpoint / no checkpoint `step`.
    ValueError: the checkpoint does not fit the recorded config.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"load: workdir {workdir!r} does not exist.")
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    raise FileNotFoundError(
      f"load: {workdir!r} holds no {workdir_lib.CONFIG_FILE}; is it a training run's --workdir?"
    )
  config = workdir_lib.read_config(workdir)
  facts = workdir_lib.read_dataset_facts(workdir)
  shapes = types.SimpleNamespace(
    **dict(facts, image_shape=tuple(facts["image_shape"] or ()) or None)
  )
  task = tasks.get(config.task)
  tx, _ = optim.make(config.optimizer, config.steps)
  steps = Steps(_build_model(task, config, shapes), task, tx, COMPUTE_DTYPES[config.compute_dtype])
  like = dict(steps.initial, opt_state=tx.init(steps.initial["params"]))  # as trained
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load: no checkpoint in {directory!r}.")
  ckpt = checkpoint.Checkpointer(directory, keep=1 << 30, create=False)
  try:
    if step is None:
      restored = ckpt.restore_latest(like, set_aside=False)
      if restored is None:
        raise FileNotFoundError(f"load: no readable checkpoint in {directory!r}.")
      state = restored[1]
    else:
      if step not in ckpt.all_steps():
        raise FileNotFoundError(
          f"load: no checkpoint at step {step} in {directory!r}; saved: {ckpt.all_steps()}."
        )
      ckpt.check_fits(step, like)
      state, _ = ckpt.restore(step, like)
      restored = (step,)
  finally:
    ckpt.close()
  config.dataset = ml_collections.ConfigDict(facts)
  config.restored_step = int(restored[0])
  return nnx.merge(steps.eval_graph, state["params"], state["rest"]), config

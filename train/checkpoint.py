"""Checkpoints with orbax: save everything a bitwise-exact resume needs.

One checkpoint per saved step, in `<workdir>/checkpoints/<step>/`, with up to three items:

  state  the training state pytree: parameters, the model's other variables
         (BatchNorm statistics, the NNX RNG streams' keys and counters), the
         optimizer state and the step; sharded arrays are saved and restored
         in place on the mesh
  meta   JSON: the step
  data   the training data iterator's state, one JSON file per process
         (`process_<i>-of-<n>.json`), by grain's orbax CheckpointHandler

Saves are asynchronous (training continues while orbax writes) and atomic: orbax
writes into a temporary folder and renames it when complete, so a job killed in the
middle of a save leaves no checkpoint for that step, only a temporary folder that is
never listed. `restore_latest` tries the newest checkpoint first and falls back to
older ones when one cannot be read (a corrupted file, a disk error), logging why. A
checkpoint that reads fine but holds a different tree (another model's parameters, other
shapes or dtypes) is not corrupt: it raises `IncompatibleCheckpoint` and stays in place.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint whose tree does not fit the state it was asked to restore."""


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(tree: Any) -> Any:
  """Typed PRNG keys become their uint32 key data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_storable(tree: Any, like: Any) -> Any:
  """Inverse of `to_storable`, taking the key types from `like`."""

  def back(x, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
    return x

  return jax.tree.map(back, tree, like)


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a storable tree: orbax's restore target."""

  def spec(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree.map(spec, tree)


def _path_key(path: tuple) -> str:
  """A tree path as a plain string, whatever key classes the tree used (NNX states and
  orbax's metadata tree name the same leaf with different key types)."""
  parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return "/".join(str(p) for p in parts)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {_path_key(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in leaves}


class Checkpointer:
  """Saves and restores (state, meta) per step under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True, create: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save
    )
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], data: Any = None) -> None:
    """Starts saving `state` (a pytree, typed keys allowed), `meta` (JSON) and the state
    of `data`, a grain iterator (its position now: it is read before this returns)."""
    items = {"state": ocp.args.StandardSave(to_storable(state)), "meta": ocp.args.JsonSave(meta)}
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, like: Any, data: Any = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of `step`; `like` gives structure, dtypes, shardings, key types. A
    grain iterator `data` is moved to the position saved with the step."""
    items = {
      "state": ocp.args.StandardRestore(abstract(to_storable(like))),
      "meta": ocp.args.JsonRestore(),
    }
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return from_storable(restored.state, like), dict(restored.meta)

  def read(self, step: int) -> tuple[Any, dict[str, Any]]:
    """(state as stored, meta) of `step` without a target: for inspection and tests
    (PRNG keys come back as their key data, arrays on the default device)."""
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    return restored.state, dict(restored.meta)

  def check_fits(self, step: int, like: Any) -> None:
    """Raises IncompatibleCheckpoint if checkpoint `step` holds another tree than `like`
    (leaf paths, shapes, dtypes); lets errors reading its metadata through."""
    stored = self._manager.item_metadata(step)["state"]
    if stored is None:
      raise ValueError(f"checkpoint {step} has no readable state metadata")
    have, want = _leaf_specs(stored), _leaf_specs(abstract(to_storable(like)))
    if have == want:
      return
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    diff = [f"{k}: stored {have.get(k)}, expected {want.get(k)}" for k in keys]
    raise IncompatibleCheckpoint(
      f"the checkpoint at step {step} in {self.directory} holds another model or optimizer "
      f"state than this config builds ({len(diff)} of {len(want)} arrays differ; "
      f"{'; '.join(diff[:3])}). Use a new --workdir, or --restart to move it aside."
    )

  def restore_latest(
    self, like: Any, *, data: Any = None, set_aside: bool = True
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, meta); None if there is none. A
    grain iterator `data` is moved to the position saved with it.

    Unreadable newer checkpoints are skipped (logged) and, with `set_aside`, renamed
    `<step>.unreadable` (kept for inspection, no longer listed), so training can save
    those steps again.

    Raises:
      IncompatibleCheckpoint: a readable checkpoint that does not fit `like`.
    """
    unreadable = []
    for step in reversed(self.all_steps()):
      try:
        self.check_fits(step, like)
        state, meta = self.restore(step, like, data)
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous
        logging.warning(
          "Checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one.",
          step,
          self.directory,
          type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else "",
        )
        unreadable.append(step)
        continue
      if set_aside:
        self._quarantine(unreadable)
      return step, state, meta
    if set_aside:
      self._quarantine(unreadable)
    return None

  def _quarantine(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        target, suffix = f"{path}.unreadable", 0
        while os.path.exists(target):
          suffix += 1
          target = f"{path}.unreadable{suffix}"
        os.rename(path, target)
    multihost_utils.sync_global_devices("sparse_attention.checkpoint.quarantine")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

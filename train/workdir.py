"""What a run records in its --workdir, and what keeps a later run from mixing with it.

The first run in a workdir writes, before its first step:

  config.json    the config as first run: the config file with its command-line overrides
  dataset.json   facts of the data the model was built for: image shape, class count and
                 names, vocabulary, sequence length, the normalisation statistics
                 (a trained model needs them at inference: `trainer.load`)

A later run in the same workdir compares its config with config.json (and its data with
dataset.json) before doing any work. Fields in `SAFE_TO_CHANGE` may differ (a longer run,
other logging intervals, another kernel); any other difference would restore checkpoints
into a different model, optimizer or data order, so the run is refused with the list of
differences. `move_aside` is the explicit way to start over in the same workdir: the old
run's files move to `previous/<time>/`, never deleted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
PREVIOUS = "previous"

# Config fields (a dotted prefix covers its sub-fields) a resumed run may change: they do
# not shape the model, the optimizer state or the data order (the input pipeline's
# batches do not depend on its worker processes). `steps` stretches the learning-rate
# schedule to the new length from the resumed step on.
SAFE_TO_CHANGE = (
  "steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "eval_batch_size",
  "nonfinite",
  "profile",
  "data.worker_count",
  "data.prefetch",
  "mesh",
  "sharding_rules",
  "model.implementation",
  "sampling",
)


class IncompatibleWorkdir(ValueError):
  """The workdir holds a run this config cannot continue."""


def _jsonable(tree: Any) -> Any:
  """Plain JSON values (lists for tuples, floats for NumPy scalars), as json.load gives."""
  return json.loads(json.dumps(tree, default=_json_default))


def _json_default(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def _is_safe(field: str) -> bool:
  return any(field == s or field.startswith(s + ".") for s in SAFE_TO_CHANGE)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def differences(recorded: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, current value) of every field that differs, sorted; a
  missing field shows as "<absent>"."""
  old, new = _flatten(_jsonable(recorded)), _flatten(_jsonable(current))
  absent = "<absent>"
  return [
    (field, old.get(field, absent), new.get(field, absent))
    for field in sorted(set(old) | set(new))
    if not _same(old.get(field, absent), new.get(field, absent))
  ]


def dataset_facts(datasets: Any) -> dict[str, Any]:
  """What a model built for `datasets` (train/data.Datasets) depends on, as JSON values."""
  facts = {
    "kind": datasets.kind,
    "num_classes": datasets.num_classes,
    "class_names": datasets.class_names,
    "image_shape": datasets.image_shape,
    "mean": datasets.mean,
    "std": datasets.std,
    "vocab_size": datasets.vocab_size,
    "seq_len": datasets.seq_len,
    "examples": {split: len(getattr(datasets, split)) for split in ("train", "eval", "test")},
  }
  return _jsonable(facts)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise IncompatibleWorkdir(
      f"{path} cannot be read ({type(e).__name__}: {e}); move the workdir's files aside with "
      "--restart or use a new --workdir."
    ) from None


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)  # never a half-written file


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config recorded in `workdir` (a ConfigDict, unlocked)."""
  return ml_collections.ConfigDict(_read_json(os.path.join(workdir, CONFIG_FILE)))


def read_dataset_facts(workdir: str) -> dict[str, Any]:
  return _read_json(os.path.join(workdir, DATASET_FILE))


def check_or_record(workdir: str, config: ml_collections.ConfigDict, facts: dict) -> None:
  """Records config and data facts in a new run's workdir, or checks a later run against
  them (the record stays the first run's: a resumed run changes only safe fields).

  Raises:
    IncompatibleWorkdir: listing the differing fields and the two ways on.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  facts_path = os.path.join(workdir, DATASET_FILE)
  current = config.to_dict()
  if not os.path.exists(config_path):
    if has_run_files(workdir):
      raise IncompatibleWorkdir(
        f"--workdir {workdir} holds files of a run that recorded no {CONFIG_FILE} (an older "
        "version of this library); continuing it cannot be checked. Use a new --workdir, or "
        f"--restart to move its files to {os.path.join(workdir, PREVIOUS)}/."
      )
    _write_json(config_path, current)
    _write_json(facts_path, facts)
    return
  changed = [d for d in differences(_read_json(config_path), current) if not _is_safe(d[0])]
  changed += [
    (f"<data>.{field}", old, new) for field, old, new in differences(_read_json(facts_path), facts)
  ]
  if changed:
    lines = "\n".join(f"  {field}: {old!r} -> {new!r}" for field, old, new in changed[:20])
    more = f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else ""
    raise IncompatibleWorkdir(
      f"--workdir {workdir} holds a run whose config differs from this one in fields that "
      f"shape the model, the optimizer state or the data (recorded in {CONFIG_FILE} and "
      f"{DATASET_FILE}):\n{lines}{more}\nIts checkpoints cannot continue this config. Use a "
      "new --workdir, or add --restart to start over in this one (its files move to "
      f"{os.path.join(workdir, PREVIOUS)}/<time>/; nothing is deleted). Fields that may "
      f"change on resume: {', '.join(SAFE_TO_CHANGE)}."
    )


def has_run_files(workdir: str) -> bool:
  """Whether `workdir` holds anything but earlier runs moved aside."""
  return os.path.isdir(workdir) and any(n != PREVIOUS for n in os.listdir(workdir))


def move_aside(workdir: str) -> str | None:
  """Moves every file of the run in `workdir` to `workdir/previous/<time>/`; returns that
  folder (None if there was nothing to move). Nothing is deleted."""
  if not has_run_files(workdir):
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target, n = os.path.join(workdir, PREVIOUS, stamp), 0
  while os.path.exists(target):
    n += 1
    target = os.path.join(workdir, PREVIOUS, f"{stamp}.{n}")
  os.makedirs(target)
  for name in sorted(os.listdir(workdir)):
    if name != PREVIOUS:
      os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target

"""Device mesh and shardings: how parameters, optimizer state and batches are split.

The mesh has four named axes (`jax.make_mesh`, Auto axis types):

  data     batches are split over it (pure data parallelism: parameters replicated)
  fsdp     batches are split over it too, and parameters / optimizer state are sharded
           over it (ZeRO-3 / FSDP: each device holds 1/fsdp of every large tensor and
           XLA gathers it for the matmuls)
  context  the sequence is split over it (context parallelism, the lm task): activations
           are sequence-local, attention runs as a ring over it
           (ops/context_parallel.py); parameters are replicated over it
  model    parameters are split over it along their output features (tensor
           parallelism); the Pallas attention kernels split heads over it

`config.mesh` gives the axis sizes; -1 takes all remaining devices, so the same
config runs on 1 CPU, 8 GPUs or a TPU slice. Parameter shardings follow
big_vision's rules: `config.sharding_rules` is a list of (regex over the
parameter path such as "layers/2/blocks/0/attn/l_q/kernel", strategy) pairs,
the first match wins:

  "fsdp"       shard the largest dim divisible by the fsdp axis over it (tensors of
               at least `min_fsdp_size` elements), and, if the model axis is > 1,
               the last dim of >= 2-d tensors over `model` when it divides
  "replicate"  keep a full copy on every device

Batches: the leading dim over ("data", "fsdp"), replicated over "context" (the model
splits the sequence itself). A process loads the batch rows its devices hold
(`process_batch_shard`): with a context or model axis spanning hosts, several processes
load the same rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "context", "model")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("fsdp", "replicate")
DEFAULT_RULES = ((".*", "fsdp"),)
MIN_FSDP_SIZE = 2**12  # smaller tensors (biases, norms) are not worth gathering


def make_mesh(sizes: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "context", "model") mesh from a mapping of axis sizes (-1: the
  rest; a missing axis is 1)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = []
  for axis in AXES:
    size = int(sizes.get(axis, 1) if hasattr(sizes, "get") else getattr(sizes, axis, 1))
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis} must be a positive size or -1, got {size}.")
    shape.append(size)
  if shape.count(-1) > 1:
    raise ValueError("config.mesh: at most one axis may be -1 (all remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
        f"config.mesh: {len(devices)} devices are not divisible by the fixed axes "
        f"{dict(zip(AXES, shape, strict=True))}."
      )
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"config.mesh {dict(zip(AXES, shape, strict=True))} needs {math.prod(shape)} devices; "
      f"{len(devices)} are available."
    )
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_size_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the data-parallel degree)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
  """(shard_index, num_shards) of the global batch rows this process's devices hold:
  what it loads (`data.BatchIterator`, `data.eval_batches`). One process: (0, 1); data
  parallel over processes: (process_index, process_count); processes that share rows
  (a context or model axis spanning them) get the same shard."""
  shards = batch_size_divisor(mesh)
  held = batch_sharding(mesh).addressable_devices_indices_map((shards,))
  starts = sorted({index[0].start or 0 for index in held.values()})
  count = len(starts)
  if starts != list(range(starts[0], starts[0] + count)) or shards % count:
    raise ValueError(
      f"config.mesh: process {jax.process_index()} holds batch shards {starts} of {shards}; "
      "each process must hold a contiguous run of them (order the mesh so that data / fsdp "
      "split across hosts)."
    )
  return starts[0] // count, shards // count


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_string(path: tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  spec: list[Any] = [None] * len(shape)
  model = mesh.shape["model"]
  if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
    spec[-1] = "model"
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and math.prod(shape) >= min_size:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*spec)


def compile_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
  """Checks `config.sharding_rules` and compiles their regexes."""
  compiled = []
  for rule in rules:
    if len(rule) != 2 or rule[1] not in STRATEGIES:
      raise ValueError(
        f"config.sharding_rules: each rule is (regex, one of {STRATEGIES}), got {rule!r}."
      )
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ValueError(f"config.sharding_rules: bad regex {rule[0]!r}: {e}.") from None
  return compiled


def param_specs(
  tree: Any,
  mesh: Mesh,
  rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
  min_fsdp_size: int | None = None,
) -> Any:
  """A PartitionSpec for every array leaf of `tree`, by the first matching rule
  (`min_fsdp_size` defaults to MIN_FSDP_SIZE)."""
  compiled = compile_rules(rules)
  min_fsdp_size = MIN_FSDP_SIZE if min_fsdp_size is None else min_fsdp_size

  def spec(path, leaf):
    name = _path_string(path)
    shape = tuple(np.shape(leaf))
    for pattern, strategy in compiled:
      if pattern.fullmatch(name):
        return P() if strategy == "replicate" else _fsdp_spec(shape, mesh, min_fsdp_size)
    return P()

  return jax.tree_util.tree_map_with_path(spec, tree)


def shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

"""Running Pallas kernels on sharded inputs: `jax.shard_map` over batch and heads.

XLA partitions the reference and xla paths by itself (GSPMD), but a
`pallas_call` is opaque to it. When a mesh is set (`jax.set_mesh(mesh)`, as
the trainer does) the ops therefore run their kernels under `jax.shard_map`:
each device attends over its own batch rows and heads, which needs no
communication because attention never mixes batches or heads.

Convention: the batch dim is split over the mesh axes named in `BATCH_AXES`
(those the mesh has, of size > 1, and whose product divides the batch), the
head dim over `HEAD_AXIS` when it divides the kv heads (so every query head
stays with its kv head under GQA). Everything else is replicated. Mask
metadata follows q: its batch / head dims are split the same way where they
are not broadcast (size 1). Axes that are already manual (inside a caller's
`jax.shard_map`, e.g. the context-parallel ring) are left alone: the arrays
the kernel sees there are already per-device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "model"


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def batch_head_axes(mesh, batch: int, kv_heads: int) -> tuple[tuple[str, ...], str | None]:
  """The mesh axes the batch and the heads are split over (possibly none); manual
  axes (inside a `jax.shard_map`) are not."""
  manual = set(getattr(mesh, "manual_axes", ()))
  shape = {a: s for a, s in zip(mesh.axis_names, mesh.axis_sizes, strict=True) if a not in manual}
  batch_axes = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
  if batch % math.prod(shape[a] for a in batch_axes):
    batch_axes = ()
  head_axis = HEAD_AXIS if shape.get(HEAD_AXIS, 1) > 1 else None
  if head_axis and kv_heads % shape[head_axis]:
    head_axis = None
  return batch_axes, head_axis


def shard_over_batch_and_heads(
  kernel: Callable[..., tuple[jax.Array, jax.Array]],
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: Any,  # a pytree whose leaves are [Bm, Hm, ...] (a BlockMask)
  routes: Any = None,  # TokenRoutes: query [Br, Hr, Lq, R], key [Br, Lk]; or None
  **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
  """`kernel(q, k, v, mask, routes=routes, **kwargs) -> (out, lse)`, under
  `jax.shard_map` when a mesh is set and splits the batch or the heads; a plain
  call otherwise."""
  mesh = _active_mesh()
  if mesh is None:
    return kernel(q, k, v, mask, routes=routes, **kwargs)
  batch_axes, head_axis = batch_head_axes(mesh, q.shape[0], k.shape[2])
  if not batch_axes and head_axis is None:
    return kernel(q, k, v, mask, routes=routes, **kwargs)
  b = batch_axes or None

  def leading(x, heads: bool):  # split leading [batch, heads] dims that are not broadcast
    head = head_axis if heads and x.shape[1] > 1 else None
    return P(b if x.shape[0] > 1 else None, head, *([None] * (x.ndim - 2)))

  qkv_spec = P(b, None, head_axis, None)
  mask_specs = jax.tree.map(lambda x: leading(x, heads=True), mask)
  route_specs = None
  if routes is not None:
    route_specs = type(routes)(
      query=leading(routes.query, heads=True), key=leading(routes.key, heads=False)
    )
  return jax.shard_map(
    lambda q, k, v, m, r: kernel(q, k, v, m, routes=r, **kwargs),
    mesh=mesh,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, mask_specs, route_specs),
    out_specs=(qkv_spec, P(b, head_axis, None)),
    check_vma=False,
  )(q, k, v, mask, routes)

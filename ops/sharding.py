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
are not broadcast (size 1). The parameters of a score_mod or mask_mod are
replicated, and each device's kernel gets the global index of its first batch row
and head (`batch_offset`, `head_offset`), so the functions see global b and h.
Axes that are already manual (inside a caller's `jax.shard_map`, e.g. the
context-parallel ring) are left alone: the arrays the kernel sees there are
already per-device.
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
  score_mod_params: Any = None,  # replicated
  **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
  """`kernel(q, k, v, mask, routes=routes, score_mod_params=..., batch_offset=...,
  head_offset=..., **kwargs) -> (out, lse)`, under `jax.shard_map` when a mesh is set
  and splits the batch or the heads; a plain call otherwise."""
  call = lambda q, k, v, m, r, p, offsets: kernel(
    q, k, v, m, routes=r, score_mod_params=p, batch_offset=offsets[0],
    head_offset=offsets[1], **kwargs,
  )  # fmt: skip
  mesh = _active_mesh()
  batch_axes, head_axis = (), None
  if mesh is not None:
    batch_axes, head_axis = batch_head_axes(mesh, q.shape[0], k.shape[2])
  if not batch_axes and head_axis is None:
    return call(q, k, v, mask, routes, score_mod_params, (0, 0))
  b = batch_axes or None

  def leading(x, heads: bool):  # split leading [batch, heads] dims that are not broadcast
    head = head_axis if heads and x.shape[1] > 1 else None
    return P(b if x.shape[0] > 1 else None, head, *([None] * (x.ndim - 2)))

  qkv_spec = P(b, None, head_axis, None)
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  metadata = jax.tree.map(lambda x: leading(x, heads=True), mask.replace_params(()))
  mask_specs = metadata.replace_params(replicated(mask.mask_params))
  route_specs = None
  if routes is not None:
    route_specs = type(routes)(
      query=leading(routes.query, heads=True), key=leading(routes.key, heads=False)
    )

  def local(q, k, v, m, r, p):
    b0 = jax.lax.axis_index(batch_axes) * q.shape[0] if batch_axes else 0
    h0 = jax.lax.axis_index(head_axis) * q.shape[2] if head_axis else 0
    return call(q, k, v, m, r, p, (b0, h0))

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, mask_specs, route_specs, replicated(score_mod_params)),
    out_specs=(qkv_spec, P(b, head_axis, None)),
    check_vma=False,
  )(q, k, v, mask, routes, score_mod_params)

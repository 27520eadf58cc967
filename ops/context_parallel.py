"""Context parallelism: attention over a sequence split across devices (ring attention).

A long sequence is split along a mesh axis (`AXIS`, "context"): every device keeps its
shard of the queries and the key/value shards travel around the ring of devices
(`lax.ppermute` inside `jax.shard_map`). At ring step t device d attends its queries to
the keys of shard (d - t) mod n with the per-device op (`ops.block_sparse_attention`:
its "xla" path or a Pallas kernel), while the next shard is already in flight; the
partial results merge by their logsumexp. Nothing on a device grows with the whole
sequence except the compact selection inputs of MoBA / NSA (chunk means, compressed
keys), so a sequence too long for one accelerator fits n of them.

    from sparse_attention.ops import context_parallel as cp, element_masks
    layout = cp.SequenceLayout(length=65536, num_shards=mesh.shape["context"])
    q, k, v = (layout.to_layout(x) for x in (q, k, v))     # stored order, split over "context"
    with jax.set_mesh(mesh):
      out = cp.block_sparse_attention(q, k, v, element_masks.Band(None, 0), layout=layout)
    out = layout.from_layout(out)                           # natural order again

Layout (`SequenceLayout`). The sequence is cut into slices of consecutive positions;
shard d holds `layout.slices(d)` in that order, as rows [d * L/n, (d + 1) * L/n) of the
stored global array. "zigzag" (the default) cuts 2n slices and gives shard d slices d
and 2n - 1 - d: under a causal mask every shard then holds one early and one late
slice, so each does the same work (a contiguous split leaves shard 0 with the least
and shard n - 1 with the most work, ~1 : 2n - 1). Windowed masks are balanced either
way. "contiguous" (one slice per shard) is for masks with no causal structure. Models
keep their activations in the stored order end to end (position-wise layers do not
care; RoPE gets `layout.positions()`; the loss permutes its targets the same way), so
nothing is reshuffled between layers.

Sub-masks. Each ring step needs the sub-mask of (local query shard, visiting kv shard):
its tile layout (visited, full) `[Bm, Hm, Qb/n, Kb/n]`, built on device for that step
from the global mask's tile layout (a `BlockMask`: its rows for the local query tiles,
the visiting shard's columns), from the element mask's `classify` on the tiles'
positions (structured masks: causal, windows; nothing global is built), or from token
routes (MoBA / NSA selections), then compacted by `block_mask.from_block_layout`. A step
whose sub-mask keeps no tile runs no attention at all (a `lax.switch` to a branch that
returns zeros and lse -inf): under a sliding window most steps are skipped. Shard
slices must be multiples of the tiles (an error says so).

Element masks on shards. A BlockMask's `mask_fn(q_pos, kv_pos)` sees positions, and a
shard's local positions are not the natural ones. On a partial tile the ring evaluates
the predicate at natural positions (`Relocated`: a static shift per (query slice, key
slice) quadrant). The shift depends on the device and the step, which are traced, but
the predicate must be static, so the shifts are planned on the host (`_plan_predicates`):
only quadrants that can hold a partial tile (the predicate's `classify` of the slice
pair is neither empty nor full) need one, and for translation-invariant predicates
(`Band`: causal, windows) only the key-minus-query shift matters; (step, device) pairs
whose needs agree share one static predicate. Causal and sliding masks need one or two
predicates in all; the step picks its branch from a static table. Assumed (true of
every builder in `ops.masks`): a mask marks a tile partial only where its predicate's
`classify` calls the tile neither empty nor full.

Backward. `_ring_attention` is a `jax.custom_vjp`: its backward runs the ring again,
with dK / dV accumulators (float32) travelling with the key/value shards and arriving
home after n steps. Each step reuses the per-device op's own backward through
`jax.vjp` (so every implementation, kernels included, differentiates as it does
unsharded): with the global output O and lse L, the step's cotangents are
dO_t = w_t dO and dlse_t = w_t (dO . (O_t - O) + dL), w_t = exp(lse_t - L), which is
exactly the global softmax gradient restricted to the step's keys. `jax.vjp` recomputes
the step's forward, so the backward costs one forward more than a fused ring backward.

MoBA (`moba_attention`) and NSA (`nsa_attention`) run their selections on the sharded
sequence. MoBA: each device sums its keys per chunk, one `psum` gives every device all
chunk means (chunks may straddle shards), and the top-k gate selection runs on the
local queries (`_moba_select`, MoBA's rule); the selected chunk ids become token routes
and the visited tiles of each step. NSA: the compressed keys (Lk / stride of them) are
replicated; `nsa_selection` runs per local slice (its queries are the last of a prefix
of the sequence, so the prefix call is exact); the compressed branch attends locally,
the selection branch (routes) and the window branch (a band) run as rings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sparse_attention.ops import block_sparse, checks, element_masks, masks, moba, nsa, sharding
from sparse_attention.ops.block_mask import BlockMask, from_block_layout
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes

AXIS = "context"
LAYOUTS = ("zigzag", "contiguous")
# Tile size the ops pick when the caller gives none: the largest power of two <= this
# that divides the shard slices (an element mask carries no tiles of its own).
_DEFAULT_BLOCK = 64

__all__ = [
  "AXIS",
  "LAYOUTS",
  "Relocated",
  "SequenceLayout",
  "active_layout",
  "block_sparse_attention",
  "compress",
  "context_size",
  "moba_attention",
  "nsa_attention",
  "ring_occupancy",
  "shard_sequence",
]


# --------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """How the `length` positions of a sequence are stored over `num_shards` devices.

  Attributes:
    length: L, the sequence length.
    num_shards: n, the devices the sequence is split over (the context axis size).
    kind: "zigzag" (2n slices, shard d holds slices d and 2n - 1 - d: causal work is
      balanced) or "contiguous" (shard d holds positions [d L/n, (d + 1) L/n)).
  """

  length: int
  num_shards: int
  kind: str = "zigzag"

  def __post_init__(self):
    for name in ("length", "num_shards"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SequenceLayout: {name} must be an int >= 1, got {value!r}.")
    if self.kind not in LAYOUTS:
      raise ValueError(f"SequenceLayout: kind must be one of {LAYOUTS}, got {self.kind!r}.")
    parts = self.num_shards * self.slices_per_shard
    if self.length % parts:
      raise ValueError(
        f"SequenceLayout: length {self.length} must be a multiple of {parts} (num_shards "
        f"{self.num_shards} x {self.slices_per_shard} {self.kind} slices per shard)."
      )

  @property
  def slices_per_shard(self) -> int:
    return 2 if self.kind == "zigzag" else 1

  @property
  def shard_len(self) -> int:
    """Positions per shard, L / n."""
    return self.length // self.num_shards

  @property
  def slice_len(self) -> int:
    """Consecutive positions per slice."""
    return self.shard_len // self.slices_per_shard

  def slices(self, shard: int) -> tuple[int, ...]:
    """The slices shard `shard` holds, in stored order (slice s is positions
    [s * slice_len, (s + 1) * slice_len))."""
    if self.kind == "zigzag":
      return (shard, 2 * self.num_shards - 1 - shard)
    return (shard,)

  def shard_positions(self) -> np.ndarray:
    """int32 [n, L/n]: the natural position of every row of every shard."""
    c = self.slice_len
    rows = [
      np.concatenate([np.arange(s * c, (s + 1) * c) for s in self.slices(d)])
      for d in range(self.num_shards)
    ]
    return np.stack(rows).astype(np.int32)

  def positions(self) -> np.ndarray:
    """int32 [L]: the natural position of every stored row (RoPE positions)."""
    return self.shard_positions().reshape(-1)

  def to_layout(self, x: Any, axis: int = 1) -> Any:
    """x with its `axis` (natural order, length L) put in stored order."""
    take = np.take if isinstance(x, np.ndarray) else jnp.take
    return take(x, self.positions(), axis=axis)

  def from_layout(self, x: Any, axis: int = 1) -> Any:
    """Inverse of `to_layout`: stored order back to natural order."""
    take = np.take if isinstance(x, np.ndarray) else jnp.take
    return take(x, np.argsort(self.positions()), axis=axis)

  def check_tiles(self, op: str, **blocks: int) -> None:
    """Slices must hold whole tiles (a tile never straddles two slices)."""
    for name, block in blocks.items():
      if self.slice_len % block:
        raise ValueError(
          f"{op}: {name}={block} must divide the shard slices of {self.slice_len} positions "
          f"(length {self.length} over {self.num_shards} shards, {self.kind}); pick a "
          f"smaller tile or a length that is a multiple of {self.num_shards} x "
          f"{self.slices_per_shard} x {block}."
        )


def context_size(axis_name: str = AXIS, mesh: Any = None) -> int:
  """The size of the context axis of `mesh` (default: the mesh set by `jax.set_mesh`);
  1 without a mesh or without that axis."""
  mesh = _mesh(mesh)
  if mesh is None or axis_name not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis_name]


def active_layout(
  length: int, kind: str = "zigzag", axis_name: str = AXIS
) -> SequenceLayout | None:
  """The layout a model should store a `length` sequence in under the active mesh:
  None when the mesh has no context axis of size > 1 (no context parallelism)."""
  n = context_size(axis_name)
  return SequenceLayout(length, n, kind) if n > 1 else None


def _mesh(mesh: Any) -> Any:
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def shard_sequence(x: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """x `[batch, seq, ...]` constrained to its sequence dim split over the context axis
  (and its batch over the data axes), so position-wise layers run on local slices."""
  mesh = _mesh(None)
  if mesh is None or context_size(axis_name) == 1:
    return x
  batch_axes, _ = sharding.batch_head_axes(mesh, x.shape[0], 1)
  spec = P(batch_axes or None, axis_name, *([None] * (x.ndim - 2)))
  return jax.lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------ element masks on shards


@dataclasses.dataclass(frozen=True)
class Relocated:
  """An element mask evaluated at natural positions from a shard's local ones.

  A local query position i in slice a of its shard (a = i // slice_len) and a local key
  position j in slice b sit at natural positions i + dq and j + dk, with
  (dq, dk) = shifts[a][b]: `fn(i + dq, j + dk)`. Static and hashable (a BlockMask's
  mask_fn); only evaluated on partial tiles, so it has no `classify`.
  """

  fn: Any
  slice_len: int
  shifts: tuple[tuple[tuple[int, int], ...], ...]  # [slices][slices] (dq, dk)

  def __call__(self, q_idx, kv_idx):
    c, s = self.slice_len, len(self.shifts)

    def pick(values):  # values[a][b] -> per-element, by the slices of q_idx / kv_idx
      out = None
      for a in range(s):
        row = values[a][0]
        for b in range(1, s):
          row = jnp.where(kv_idx >= b * c, values[a][b], row)
        out = row if out is None else jnp.where(q_idx >= a * c, row, out)
      return out

    dq = pick([[sh[0] for sh in r] for r in self.shifts])
    dk = pick([[sh[1] for sh in r] for r in self.shifts])
    return self.fn(q_idx + dq, kv_idx + dk)


def _translation_invariant(fn: Any) -> bool:
  """Whether fn(i, j) depends on j - i only (bands and their combinations)."""
  if isinstance(fn, element_masks.Band):
    return True
  if isinstance(fn, (element_masks.AllOf, element_masks.AnyOf)):
    return all(_translation_invariant(m) for m in fn.members)
  return False


@functools.lru_cache(maxsize=64)
def _plan_predicates(fn: Any, layout: SequenceLayout) -> tuple[tuple[Any, ...], np.ndarray]:
  """The static predicates of the ring steps and which one step t of device d uses.

  Returns (fns, table): table[t, d] indexes fns. fns is (None,) when no step has a
  partial tile (no element mask needed).
  """
  n, c, s = layout.num_shards, layout.slice_len, layout.slices_per_shard
  table = np.zeros((n, n), np.int32)
  if fn is None:
    return (None,), table
  invariant = _translation_invariant(fn)
  groups: list[dict[tuple[int, int], tuple[int, int]]] = []
  for t in range(n):
    for d in range(n):
      need = {}
      for a, x in enumerate(layout.slices(d)):
        for b, y in enumerate(layout.slices((d - t) % n)):
          any_, all_ = fn.classify(x * c, x * c + c - 1, y * c, y * c + c - 1)
          if bool(any_) and not bool(all_):  # may hold a partial tile
            dq, dk = (x - a) * c, (y - b) * c
            need[(a, b)] = (0, dk - dq) if invariant else (dq, dk)
      for i, group in enumerate(groups):
        if all(group.get(key, shift) == shift for key, shift in need.items()):
          group.update(need)
          table[t, d] = i
          break
      else:
        groups.append(need)
        table[t, d] = len(groups) - 1
  if not any(groups):
    return (None,), np.zeros_like(table)
  fns = tuple(
    Relocated(fn, c, tuple(tuple(g.get((a, b), (0, 0)) for b in range(s)) for a in range(s)))
    for g in groups
  )
  return fns, table


# ------------------------------------------------------------------------ step sub-masks


@functools.lru_cache(maxsize=64)
def _tile_bounds(layout: SequenceLayout, block: int) -> tuple[np.ndarray, np.ndarray]:
  """(first, last) natural position of every local tile of every shard, int32 [n, T]."""
  pos = layout.shard_positions().reshape(layout.num_shards, -1, block)
  return pos[..., 0], pos[..., -1]


@dataclasses.dataclass(frozen=True)
class _StructuredTiles:
  """Step tiles from an element mask's `classify` on the tiles' natural positions."""

  fn: Any

  def __call__(self, ring: _Ring, d, e, query_routes, tile_args):
    del query_routes, tile_args
    q_lo, q_hi = (jnp.asarray(x)[d] for x in _tile_bounds(ring.layout, ring.block_q))
    k_lo, k_hi = (jnp.asarray(x)[e] for x in _tile_bounds(ring.layout, ring.block_kv))
    any_, all_ = self.fn.classify(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
    shape = (1, 1, q_lo.shape[0], k_lo.shape[0])
    return jnp.broadcast_to(any_, shape), jnp.broadcast_to(all_, shape)


@dataclasses.dataclass(frozen=True)
class _LayoutTiles:
  """Step tiles from a global mask's tile layout: tile_args = its rows of the local
  query tiles, (visited, full) bool [Bm, Hm, Qb/n, Kb]; the step takes the visiting
  shard's columns."""

  def __call__(self, ring: _Ring, d, e, query_routes, tile_args):
    del d, query_routes
    first, _ = _tile_bounds(ring.layout, ring.block_kv)
    cols = jnp.asarray(first // ring.block_kv)[e]  # [Kb/n]: the shard's kv tile ids
    visited, full = tile_args
    return jnp.take(visited, cols, axis=-1), jnp.take(full, cols, axis=-1)


@dataclasses.dataclass(frozen=True)
class _RouteTiles:
  """Step tiles from token routes whose key route is position // route_len (MoBA's
  chunks, NSA's selection blocks): tile (i, j) is visited if some query of q tile i
  routes to a block with a key in kv tile j, and `fn` (causal) can see it."""

  fn: Any
  route_len: int

  def __call__(self, ring: _Ring, d, e, query_routes, tile_args):
    del tile_args
    b, hr, lq, r = query_routes.shape
    k_lo, k_hi = (jnp.asarray(x)[e] for x in _tile_bounds(ring.layout, ring.block_kv))
    kb = k_lo.shape[0]
    route = query_routes  # [B, Hr, Lq, R], -1: none
    # Keys of route r: [r * len, (r + 1) * len); the shard's tiles ascend in position,
    # so the tiles holding one form a run: first tile ending at or after its start,
    # last tile starting at or before its end.
    first = jnp.searchsorted(k_hi, route * self.route_len, side="left")
    last = jnp.searchsorted(k_lo, (route + 1) * self.route_len - 1, side="right") - 1
    weight = ((route >= 0) & (first <= last)).astype(jnp.int32)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hr)[None, :, None, None]
    qt = (jnp.arange(lq) // ring.block_q)[None, None, :, None]
    diff = jnp.zeros((b, hr, lq // ring.block_q, kb + 1), jnp.int32)
    diff = diff.at[bi, hi, qt, jnp.minimum(first, kb)].add(weight)
    diff = diff.at[bi, hi, qt, jnp.minimum(last + 1, kb)].add(-weight)
    routed = jnp.cumsum(diff[..., :kb], axis=-1) > 0  # [B, Hr, Qb/n, Kb/n]
    routed = jnp.repeat(routed, ring.q_heads // hr, axis=1)
    any_, all_ = _StructuredTiles(self.fn)(ring, d, e, None, None)
    return routed & any_, all_


# --------------------------------------------------------------------------------- ring


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static facts of one ring attention (hashable: the custom_vjp's static argument)."""

  axis: str
  layout: SequenceLayout
  block_q: int
  block_kv: int
  q_heads: int
  tiles: Callable[..., tuple[jax.Array, jax.Array]]
  fns: tuple[Any, ...]
  table: tuple[tuple[int, ...], ...]  # [step][device] -> index into fns
  scale: float
  implementation: str | None
  interpret: bool

  @property
  def steps(self) -> int:
    return self.layout.num_shards


def _step_mask(ring: _Ring, t, d, query_routes, tile_args) -> tuple[BlockMask, jax.Array]:
  """The sub-mask of step t on device d (mask_fn: the first planned predicate) and the
  index of the `lax.switch` branch to run: 0 (nothing kept: skip) or 1 + predicate."""
  e = (d - t) % ring.steps
  visited, full = ring.tiles(ring, d, e, query_routes, tile_args)
  local = ring.layout.shard_len
  mask = from_block_layout(
    visited,
    full,
    block_q=ring.block_q,
    block_kv=ring.block_kv,
    q_len=local,
    kv_len=local,
    mask_fn=ring.fns[0],
    max_kv_blocks=local // ring.block_kv,
    max_q_blocks=local // ring.block_q,
  )
  branch = jnp.where(jnp.any(visited), jnp.asarray(ring.table, jnp.int32)[t, d] + 1, 0)
  return mask, branch


def _branches(ring: _Ring, mask: BlockMask, query_routes, key_routes) -> list[Callable]:
  """The per-device attention of one step under each planned predicate:
  fn(q, k, v) -> (out [B, Lq, Hq, Dv] in q's dtype, lse f32 [B, Hq, Lq])."""
  routes = None if key_routes is None else TokenRoutes(query_routes, key_routes)

  def attend(fn, q, k, v):
    return block_sparse.block_sparse_attention(
      q,
      k,
      v,
      dataclasses.replace(mask, mask_fn=fn),
      routes=routes,
      scale=ring.scale,
      implementation=ring.implementation,
      interpret=ring.interpret,
      return_lse=True,
    )

  return [functools.partial(attend, fn) for fn in ring.fns]


def _merge(o, lse, o_t, lse_t):
  """Two softmax-normalised partial results over disjoint keys -> their union (f32)."""
  new = jnp.logaddexp(lse, lse_t)  # [B, H, Lq]
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  rows = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B, H, Lq] -> [B, Lq, H, 1]
  o = o * rows(jnp.exp(lse - safe)) + o_t.astype(jnp.float32) * rows(jnp.exp(lse_t - safe))
  return o, new


def _perm(n: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % n) for i in range(n)]


def _ring_forward(ring: _Ring, q, k, v, key_routes, local):
  """(out f32 [B, Lq, Hq, Dv], lse f32 [B, Hq, Lq]) over every shard's keys."""
  query_routes, tile_args = local
  n = ring.steps
  d = jax.lax.axis_index(ring.axis)
  b, lq, hq, _ = q.shape

  def step(t, kv, o, lse):
    k_e, v_e, routes_e = kv
    mask, branch = _step_mask(ring, t, d, query_routes, tile_args)
    empty = lambda q, k, v: (
      jnp.zeros((b, lq, hq, v.shape[-1]), q.dtype),
      jnp.full((b, hq, lq), -jnp.inf, jnp.float32),
    )
    fns = [empty, *_branches(ring, mask, query_routes, routes_e)]
    return _merge(o, lse, *jax.lax.switch(branch, fns, q, k_e, v_e))

  def body(carry, t):
    kv, o, lse = carry
    incoming = jax.lax.ppermute(kv, ring.axis, _perm(n))  # in flight during this step
    return (incoming, *step(t, kv, o, lse)), None

  # All n steps in one scan (the last step's transfer is not needed: one kv shard more
  # on the wire per pass, for half the code to compile of a peeled last step).
  kv = (k, v, key_routes)
  o = jnp.zeros((b, lq, hq, v.shape[-1]), jnp.float32)
  lse = jnp.full((b, hq, lq), -jnp.inf, jnp.float32)
  (_, o, lse), _ = jax.lax.scan(body, (kv, o, lse), jnp.arange(n, dtype=jnp.int32))
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, key_routes, local):
  """Ring attention of this device's queries over all shards' keys (inside a
  `shard_map` over ring.axis): (out [B, Lq, Hq, Dv] in q's dtype, lse f32 [B, Hq, Lq]).
  `key_routes` travel with k / v; `local` = (query_routes, tile_args) stays."""
  out, lse = _ring_forward(ring, q, k, v, key_routes, local)
  return out.astype(q.dtype), lse


def _ring_fwd(ring, q, k, v, key_routes, local):
  out, lse = _ring_forward(ring, q, k, v, key_routes, local)
  return (out.astype(q.dtype), lse), (q, k, v, key_routes, local, out, lse)


def _ring_bwd(ring, residuals, cotangents):
  q, k, v, key_routes, local, out, lse = residuals  # out f32: the merged output
  d_out, d_lse = cotangents
  query_routes, tile_args = local
  n = ring.steps
  d = jax.lax.axis_index(ring.axis)
  d_out = d_out.astype(jnp.float32)
  rows = lambda w: jnp.swapaxes(w, 1, 2)[..., None]

  def grads(t, kv):
    """(dq, dk, dv) of step t, float32."""
    k_e, v_e, routes_e = kv
    mask, branch = _step_mask(ring, t, d, query_routes, tile_args)

    def through(attend, q, k, v):
      (o_t, lse_t), pullback = jax.vjp(attend, q, k, v)
      w = jnp.where(jnp.isfinite(lse_t), jnp.exp(lse_t - jnp.where(jnp.isfinite(lse), lse, 0)), 0)
      d_o = (d_out * rows(w)).astype(o_t.dtype)
      d_l = w * (jnp.sum(d_out * (o_t.astype(jnp.float32) - out), axis=-1).swapaxes(1, 2) + d_lse)
      return tuple(g.astype(jnp.float32) for g in pullback((d_o, d_l)))

    zeros = lambda q, k, v: tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    fns = [
      zeros,
      *(functools.partial(through, f) for f in _branches(ring, mask, query_routes, routes_e)),
    ]
    return jax.lax.switch(branch, fns, q, k_e, v_e)

  def body(carry, t):
    kv, dkv, dq = carry
    incoming = jax.lax.ppermute(kv, ring.axis, _perm(n))
    dq_t, dk_t, dv_t = grads(t, kv)
    # The accumulators of shard e travel with it; after n hops they are home again.
    dkv = jax.lax.ppermute((dkv[0] + dk_t, dkv[1] + dv_t), ring.axis, _perm(n))
    return (incoming, dkv, dq + dq_t), None

  kv = (k, v, key_routes)
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq = jnp.zeros(q.shape, jnp.float32)
  (_, (dk, dv), dq), _ = jax.lax.scan(body, (kv, dkv, dq), jnp.arange(n, dtype=jnp.int32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


# ------------------------------------------------------------------------ shard_map glue


def _resolve_layout(layout: Any, length: int, n: int, op: str) -> SequenceLayout:
  """The layout argument (None, a kind, or a SequenceLayout) checked against the call."""
  if layout is None or isinstance(layout, str):
    kind = "zigzag" if layout is None else layout
    if kind not in LAYOUTS:
      raise ValueError(f"{op}: layout must be a SequenceLayout or one of {LAYOUTS}, got {kind!r}.")
    if length % (n * (2 if kind == "zigzag" else 1)):
      raise ValueError(
        f"{op}: the sequence length {length} must be a multiple of {n} context shards x "
        f"{2 if kind == 'zigzag' else 1} {kind} slices."
      )
    return SequenceLayout(length, n, kind)
  if not isinstance(layout, SequenceLayout):
    raise ValueError(f"{op}: layout must be a SequenceLayout, a kind or None, got {layout!r}.")
  if (layout.length, layout.num_shards) != (length, n):
    raise ValueError(
      f"{op}: layout is for length {layout.length} over {layout.num_shards} shards, but the "
      f"sequence has {length} positions and the context axis {n} devices."
    )
  return layout


def _block(layout: SequenceLayout, block: Any, name: str, op: str) -> int:
  if block is None:
    return math.gcd(layout.slice_len, _DEFAULT_BLOCK)
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"{op}: {name} must be None or an int >= 1, got {block!r}.")
  return int(block)


@dataclasses.dataclass(frozen=True)
class _Specs:
  """PartitionSpecs of one context-parallel call: batch over the data axes, heads over
  the model axis (as `ops.sharding`), the sequence over the context axis."""

  batch: tuple[str, ...] | None
  head: str | None
  axis: str

  @classmethod
  def of(cls, mesh, axis: str, batch: int, kv_heads: int) -> _Specs:
    batch_axes, head_axis = sharding.batch_head_axes(mesh, batch, kv_heads)
    return cls(batch_axes or None, head_axis, axis)

  def __call__(self, x: Any, *, heads: int | None = None, seq: int | None = None) -> Any:
    """The spec of x: dim 0 over the batch axes (unless broadcast), dim `heads` over
    the head axis (unless broadcast), dim `seq` over the context axis."""
    if x is None:
      return None
    spec: list[Any] = [None] * x.ndim
    if x.shape[0] > 1:
      spec[0] = self.batch
    if heads is not None and x.shape[heads] > 1:
      spec[heads] = self.head
    if seq is not None:
      spec[seq] = self.axis
    return P(*spec)


def _shard_map(mesh, body, in_specs, out_specs, *args):
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
    *args
  )


def _scale_rows(out: jax.Array, row_scale: jax.Array | None) -> jax.Array:
  """out [B, L, H, Dv] times row_scale [B|1, H|1, L] (Re-ttention's r), in f32."""
  if row_scale is None:
    return out
  rows = jnp.swapaxes(row_scale.astype(jnp.float32), 1, 2)[..., None]
  return (out.astype(jnp.float32) * rows).astype(out.dtype)


def _check_element_mask(mask: Any, op: str) -> Any:
  if not callable(mask) or not hasattr(mask, "classify"):
    raise ValueError(
      f"{op}: mask must be a BlockMask or an element mask with `classify` (e.g. "
      f"ops.element_masks.Band(None, 0) for causal), got {type(mask).__name__}."
    )
  return mask


@dataclasses.dataclass(frozen=True)
class _RingSetup:
  """What every ring op checks and sets up first: the call's sizes (self-attention:
  q and k share the sequence), the mesh, the context axis and the sequence layout."""

  op: str
  shape: checks.AttentionShape
  mesh: Any
  axis: str
  layout: SequenceLayout

  @property
  def n(self) -> int:
    """The context size: devices along the ring (1: no ring, the plain op)."""
    return self.layout.num_shards

  def tiles(self, block_q: Any, block_kv: Any) -> tuple[int, int]:
    """The ring's (block_q, block_kv): the given ones or the defaults, checked to
    divide the layout's slices."""
    block_q = _block(self.layout, block_q, "block_q", self.op)
    block_kv = _block(self.layout, block_kv, "block_kv", self.op)
    self.layout.check_tiles(self.op, block_q=block_q, block_kv=block_kv)
    return block_q, block_kv

  def ring(self, fn: Any, tiles: Callable, block_q: int, block_kv: int, **attend: Any) -> _Ring:
    """A ring under element mask `fn` (its predicates planned on the host), whose steps
    take their tiles from `tiles`; attend: scale, implementation, interpret."""
    fns, table = _plan_predicates(fn, self.layout)
    return _Ring(self.axis, self.layout, block_q, block_kv, self.shape.q_heads, tiles, fns,
                 tuple(map(tuple, table)), **attend)  # fmt: skip

  def specs(self, q: jax.Array) -> tuple[_Specs, P, P]:
    """The call's spec maker, and the specs of q / k / v / out `[B, L, H, D]` and of an
    lse `[B, Hq, L]`."""
    specs = _Specs.of(self.mesh, self.axis, self.shape.batch, self.shape.kv_heads)
    return specs, specs(q, heads=2, seq=1), P(specs.batch, specs.head, self.axis)


def _ring_setup(
  op: str, q: Any, k: Any, v: Any, layout: Any, axis_name: str, mesh: Any
) -> _RingSetup:
  """The prologue of the ring ops: q, k, v checked (one shared sequence), the mesh and
  context size found, and the layout argument resolved against them."""
  shape = checks.check_qkv(q, k, v, op)
  if shape.q_len != shape.kv_len:
    raise ValueError(f"{op}: q ({shape.q_len}) and k ({shape.kv_len}) must share the sequence.")
  mesh = _mesh(mesh)
  n = context_size(axis_name, mesh)
  return _RingSetup(op, shape, mesh, axis_name, _resolve_layout(layout, shape.q_len, n, op))


# ------------------------------------------------------------------------- block-sparse


def block_sparse_attention(
  q: jax.Array,  # [batch, seq, q_heads, head_dim], stored order
  k: jax.Array,  # [batch, seq, kv_heads, head_dim], stored order
  v: jax.Array,  # [batch, seq, kv_heads, v_head_dim], stored order
  mask: Any,  # BlockMask (natural positions) or an element mask
  *,
  layout: SequenceLayout | str | None = None,
  block_q: int | None = None,
  block_kv: int | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  interpret: bool = False,
  routes: TokenRoutes | None = None,
  row_scale: jax.Array | None = None,
  axis_name: str = AXIS,
  mesh: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`ops.block_sparse_attention` over a sequence split along the context axis (a ring).

  Self-attention only (q, k, v share the sequence). Every array with a sequence dim is
  in the layout's stored order (`layout.to_layout`), the mask in natural positions.

  Args:
    q, k, v: as `ops.block_sparse_attention`, seq in stored order.
    mask: a `BlockMask` for (seq, seq) (any builder; its tile layout is split per ring
      step), or an element mask such as `element_masks.Band(None, 0)` (causal) or
      `Band(-w, 0)` (sliding), whose tiles each step classifies on device: nothing of
      size (seq / tile)^2 is built, the way to go at very long sequences.
    layout: a `SequenceLayout` for (seq, context size), or its kind ("zigzag", the
      default, or "contiguous").
    block_q, block_kv: tiles of an element mask (default: the largest power of two
      <= 64 dividing the slices); a BlockMask brings its own. Either must divide the
      layout's slices.
    scale, implementation, return_lse, interpret, routes, row_scale: as
      `ops.block_sparse_attention` (the implementation runs on every device, every
      step); routes and row_scale in stored order.
    axis_name: the mesh axis the sequence is split over.
    mesh: default: the mesh set by `jax.set_mesh`. Without one, or with a context axis
      of size 1, this is `ops.block_sparse_attention` (with the mask built).

  Returns:
    out `[batch, seq, q_heads, v_head_dim]` in stored order (and lse f32
    `[batch, q_heads, seq]`), split over the context axis like q.

  Raises:
    ValueError: bad shapes, a layout or tiles that do not fit, before any work.
  """
  op = "context_parallel.block_sparse_attention"
  setup = _ring_setup(op, q, k, v, layout, axis_name, mesh)
  shape, layout = setup.shape, setup.layout
  if isinstance(mask, BlockMask):
    checks.check_block_mask(mask, shape, op)
    for name, given, own in (
      ("block_q", block_q, mask.block_q),
      ("block_kv", block_kv, mask.block_kv),
    ):
      if given is not None and given != own:
        raise ValueError(f"{op}: {name}={given} differs from the mask's {own}; leave it None.")
    block_q, block_kv, fn = mask.block_q, mask.block_kv, mask.mask_fn
  else:
    fn = _check_element_mask(mask, op)
  if getattr(fn, "per_batch_head", False):
    raise ValueError(
      f"{op}: mask holds a mask_mod (a predicate of b, h and parameters): the ring "
      "relocates position-only element masks; build the mask from element_masks or a "
      "tile layout."
    )
  block_q, block_kv = setup.tiles(block_q, block_kv)  # a BlockMask's own, checked
  scale = checks.check_scale(scale, shape, op)
  checks.check_routes(routes, shape, op)
  checks.check_row_scale(row_scale, shape, op)
  attend = dict(scale=scale, implementation=implementation, interpret=interpret)
  if setup.n == 1:
    if not isinstance(mask, BlockMask):
      mask = masks.from_element_mask(
        fn, shape.q_len, shape.kv_len, block_q=block_q, block_kv=block_kv
      )
    return block_sparse.block_sparse_attention(
      q, k, v, mask, routes=routes, row_scale=row_scale, return_lse=return_lse, **attend
    )
  tiles = _LayoutTiles() if isinstance(mask, BlockMask) else _StructuredTiles(fn)
  ring = setup.ring(fn, tiles, block_q, block_kv, **attend)
  tile_args = None
  if isinstance(mask, BlockMask):  # the rows of the q tiles, in stored order
    order = (_tile_bounds(layout, block_q)[0] // block_q).reshape(-1)
    tile_args = tuple(x[:, :, order] for x in mask.block_layout())
  specs, qkv, lse_spec = setup.specs(q)
  query_routes, key_routes = (None, None) if routes is None else (routes.query, routes.key)

  def body(q, k, v, key_routes, query_routes, tile_args, row_scale):
    out, lse = _ring_attention(ring, q, k, v, key_routes, (query_routes, tile_args))
    return _scale_rows(out, row_scale), lse

  in_specs = (
    qkv,
    qkv,
    qkv,
    specs(key_routes, seq=1),
    specs(query_routes, heads=1, seq=2),
    None if tile_args is None else tuple(specs(x, heads=1, seq=2) for x in tile_args),
    specs(row_scale, heads=1, seq=2),
  )
  out, lse = _shard_map(
    setup.mesh, body, in_specs, (qkv, lse_spec), q, k, v, key_routes, query_routes, tile_args,
    row_scale,
  )  # fmt: skip
  return (out, lse) if return_lse else out


def ring_occupancy(fn: Any, layout: SequenceLayout, *, block_q: int, block_kv: int) -> np.ndarray:
  """Kept tiles of every ring step under an element mask, int64 [step, device] (host,
  O(n^2 Qb/n Kb/n)): a 0 is a step that device skips."""
  q_lo, q_hi = _tile_bounds(layout, block_q)
  k_lo, k_hi = _tile_bounds(layout, block_kv)
  n = layout.num_shards
  out = np.zeros((n, n), np.int64)
  for t in range(n):
    for d in range(n):
      e = (d - t) % n
      any_, _ = fn.classify(q_lo[d][:, None], q_hi[d][:, None], k_lo[e][None, :], k_hi[e][None, :])
      out[t, d] = np.broadcast_to(any_, (q_lo.shape[1], k_lo.shape[1])).sum()
  return out


# --------------------------------------------------------------------------------- MoBA


def _chunk_means(k: jax.Array, ids: jax.Array, num_chunks: int, axis: str) -> jax.Array:
  """MoBA's gate keys over the whole sequence, f32 [B, nc, Hkv, D]: this device's key
  sums per chunk (ids: int32 [L/n]), summed over the ring by one psum, averaged, and
  rounded to k's dtype as MoBA does."""
  b = k.shape[0]
  sums = jnp.zeros((b, num_chunks) + k.shape[2:], jnp.float32).at[:, ids].add(k.astype(jnp.float32))
  counts = jnp.zeros((num_chunks,), jnp.float32).at[ids].add(1.0)
  sums, counts = jax.lax.psum((sums, counts), axis)
  mean = sums / jnp.maximum(counts, 1.0)[None, :, None, None]
  return mean.astype(k.dtype).astype(jnp.float32)


def _moba_select(
  q: jax.Array,  # [B, Lq, Hq, D]: this device's queries
  kbar: jax.Array,  # f32 [B, nc, Hkv, D]: every chunk's mean key
  q_ids: jax.Array,  # int32 [Lq]: the queries' own chunks
  topk: int,
) -> tuple[jax.Array, jax.Array]:
  """MoBA's selection (`ops.moba.moba_selection`'s rule, without segments) for queries
  anywhere in the sequence: the own chunk plus the topk - 1 past chunks of highest gate
  q . kbar (f32, unscaled), ties toward the older chunk; ascending ids, padding repeats
  the own id. Returns (block_ids int32, valid bool), [B, Hq, Lq, topk]."""
  b, lq, hq, d = q.shape
  nc, hkv = kbar.shape[1], kbar.shape[2]
  qf = q.astype(jnp.float32).reshape(b, lq, hkv, hq // hkv, d)
  gate = jnp.einsum("blkgd,bnkd->bkgln", qf, kbar, precision=jax.lax.Precision.HIGHEST)
  gate = gate.reshape(b, hq, lq, nc)
  own = jnp.broadcast_to(q_ids[None, None, :, None], (b, hq, lq, 1))
  past = min(topk - 1, nc - 1)
  if past > 0:
    gate = jnp.where(jnp.arange(nc) < own, gate, -jnp.inf)
    _, idx = jax.lax.top_k(gate, past)  # equal gates: the lower (older) chunk first
    big = jnp.iinfo(jnp.int32).max
    keys = jnp.sort(jnp.concatenate([jnp.where(idx < own, idx, big), own], axis=-1), axis=-1)
    valid = keys != big
    block_ids = jnp.where(valid, keys, own)
  else:
    block_ids, valid = own, jnp.ones_like(own, dtype=bool)
  extra = topk - block_ids.shape[-1]
  if extra > 0:  # fewer chunks than topk
    block_ids = jnp.concatenate([block_ids, jnp.repeat(own, extra, axis=-1)], axis=-1)
    valid = jnp.concatenate([valid, jnp.zeros(own.shape[:3] + (extra,), bool)], axis=-1)
  return block_ids.astype(jnp.int32), valid


def _check_positive(op: str, name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{op}: {name} must be a Python int >= 1, got {value!r}.")
  return int(value)


def moba_attention(
  q: jax.Array,  # [batch, seq, q_heads, head_dim], stored order
  k: jax.Array,  # [batch, seq, kv_heads, head_dim], stored order
  v: jax.Array,  # [batch, seq, kv_heads, v_head_dim], stored order
  *,
  chunk_size: int,
  topk: int,
  layout: SequenceLayout | str | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  interpret: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
  axis_name: str = AXIS,
  mesh: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`ops.moba_attention` (training: q, k, v share the sequence; no segments) over a
  sequence split along the context axis.

  The selection runs on the shards (one psum of per-chunk key sums); the attention is a
  ring of routed block-sparse steps (`ops.block_sparse_attention` with TokenRoutes:
  query routes = the selected chunk ids, key routes = each key's chunk), causal, whose
  steps visit the tiles some local query selected. Arguments as `ops.moba_attention`,
  plus `layout`, `axis_name`, `mesh` as `block_sparse_attention` here; block_q /
  block_kv are the ring's tiles (default: the largest power of two <= 64 dividing the
  slices). Arrays with a sequence dim are in stored order.
  """
  op = "context_parallel.moba_attention"
  setup = _ring_setup(op, q, k, v, layout, axis_name, mesh)
  shape, layout = setup.shape, setup.layout
  chunk_size = _check_positive(op, "chunk_size", chunk_size)
  topk = _check_positive(op, "topk", topk)
  scale = checks.check_scale(scale, shape, op)
  attend = dict(scale=scale, implementation=implementation, interpret=interpret)
  if setup.n == 1:
    return moba.moba_attention(
      q, k, v, chunk_size=chunk_size, topk=topk, return_lse=return_lse, block_q=block_q,
      block_kv=block_kv, **attend,
    )  # fmt: skip
  block_q, block_kv = setup.tiles(block_q, block_kv)
  causal = element_masks.Band(None, 0)
  ring = setup.ring(causal, _RouteTiles(causal, chunk_size), block_q, block_kv, **attend)
  num_chunks = -(-shape.q_len // chunk_size)

  def body(q, k, v):
    d = jax.lax.axis_index(axis_name)
    ids = jnp.asarray(layout.shard_positions())[d] // chunk_size  # [L/n]: each row's chunk
    kbar = _chunk_means(jax.lax.stop_gradient(k), ids, num_chunks, axis_name)
    block_ids, valid = _moba_select(jax.lax.stop_gradient(q), kbar, ids, topk)
    query_routes = jnp.where(valid, block_ids, -1)  # [B, Hq, L/n, topk]
    key_routes = jnp.broadcast_to(ids, (q.shape[0], ids.shape[0]))  # [B, L/n]
    return _ring_attention(ring, q, k, v, key_routes, (query_routes, None))

  _, qkv, lse_spec = setup.specs(q)
  out, lse = _shard_map(setup.mesh, body, (qkv, qkv, qkv), (qkv, lse_spec), q, k, v)
  return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------- NSA


@dataclasses.dataclass(frozen=True)
class _NSAGeometry:
  """Static facts of a context-parallel NSA call."""

  layout: SequenceLayout
  block_len: int
  stride: int
  select_len: int
  num_select: int
  window: int
  scale: float

  @property
  def num_compressed(self) -> int:
    return nsa.num_compressed_blocks(self.layout.length, self.block_len, self.stride)

  @property
  def window_len(self) -> int:
    """W: compressed keys a slice's window holds (as many as the sequence has blocks)."""
    return self.layout.length // self.stride


def _nsa_select(geo: _NSAGeometry, q: jax.Array, k_cmp: jax.Array, d: jax.Array):
  """`nsa_selection` of this device's queries, (ids, valid) [B, Hkv, L/n, n].

  The queries of slice s are the last slice_len positions of the prefix [0, (s + 1) c),
  whose compressed blocks are a prefix of k_cmp: `nsa_selection` on that prefix is
  exact. Prefix lengths differ per slice, so each device's slices are a static branch
  of a `lax.switch` over the devices.
  """
  layout, c = geo.layout, geo.layout.slice_len

  def branch(device: int, q, k_cmp):
    out = []
    for a, s in enumerate(layout.slices(device)):
      lk = (s + 1) * c
      nc = nsa.num_compressed_blocks(lk, geo.block_len, geo.stride)
      out.append(
        nsa.nsa_selection(
          q[:, a * c : (a + 1) * c],
          k_cmp[:, :nc],
          lk=lk,
          block_len=geo.block_len,
          stride=geo.stride,
          select_len=geo.select_len,
          num_select=geo.num_select,
          scale=geo.scale,
        )
      )
    return tuple(jnp.concatenate(x, axis=2) for x in zip(*out, strict=True))

  branches = [functools.partial(branch, i) for i in range(layout.num_shards)]
  return jax.lax.switch(d, branches, jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp))


def _nsa_compressed(geo: _NSAGeometry, ring: _Ring, q, k_cmp, v_cmp, d) -> jax.Array:
  """NSA's compressed branch for this device's queries, [B, L/n, Hq, Dv] in q's dtype.

  Slice s (queries at (s c) + i) reads the window of W = L / stride compressed keys
  ending at block (s + 1) c / stride (zeros before block 0 and past the last one, which
  token routes hide): in window coordinates the visibility is one static element mask
  for every slice, `element_masks.Strided`. The slices run as one batch.
  """
  layout, c = geo.layout, geo.layout.slice_len
  b, _, hq, dd = q.shape
  w, nc = geo.window_len, geo.num_compressed
  pad = lambda x: jnp.pad(x, ((0, 0), (w, w - nc), (0, 0), (0, 0)))  # [B, 2W, Hkv, D]
  kp, vp = pad(k_cmp), pad(v_cmp)
  slices = jnp.asarray([layout.slices(i) for i in range(layout.num_shards)], jnp.int32)[d]
  ends = (slices + 1) * (c // geo.stride)  # [S]: window start in the padded arrays
  window = lambda x, e: jax.lax.dynamic_slice_in_dim(x, e, w, axis=1)
  stack = lambda f: jnp.concatenate([f(a, e) for a, e in enumerate(ends)], axis=0)  # [S*B, ...]
  qs = stack(lambda a, e: q[:, a * c : (a + 1) * c])
  ks = stack(lambda a, e: window(kp, e))
  vs = stack(lambda a, e: window(vp, e))
  block = ends - w + jnp.arange(w, dtype=jnp.int32)[:, None]  # [W, S]: window -> block id
  key = jnp.repeat(((block < 0) | (block >= nc)).astype(jnp.int32).T, b, axis=0)  # 0: real
  routes = TokenRoutes(jnp.zeros((key.shape[0], 1, c, 1), jnp.int32), key)
  fn = element_masks.Strided(geo.stride, c + geo.block_len - 1 - w * geo.stride)
  mask = masks.from_element_mask(fn, c, w, block_q=ring.block_q, block_kv=ring.block_kv)
  out = block_sparse.block_sparse_attention(
    qs, ks, vs, mask, routes=routes, scale=ring.scale, implementation=ring.implementation,
    interpret=ring.interpret,
  )  # fmt: skip
  s = len(ends)
  return out.reshape(s, b, c, hq, -1).transpose(1, 0, 2, 3, 4).reshape(b, s * c, hq, -1)


def nsa_attention(
  q: jax.Array,  # [batch, seq, q_heads, head_dim], stored order
  k: jax.Array,  # [batch, seq, kv_heads, head_dim], stored order
  v: jax.Array,  # [batch, seq, kv_heads, v_head_dim], stored order
  k_cmp: jax.Array,  # [batch, Nc, kv_heads, head_dim], natural order
  v_cmp: jax.Array,  # [batch, Nc, kv_heads, v_head_dim], natural order
  gates: jax.Array,  # [batch, seq, q_heads, 3], stored order
  *,
  layout: SequenceLayout | str | None = None,
  block_len: int = 32,
  stride: int = 16,
  select_len: int = 64,
  num_select: int = 16,
  window: int = 512,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
  axis_name: str = AXIS,
  mesh: Any = None,
) -> jax.Array:
  """`ops.nsa_attention` (training: q, k, v share the sequence; no segments) over a
  sequence split along the context axis.

  The compressed keys / values (natural order, Lk / stride of them) are replicated; the
  selection (`nsa_selection`) and the compressed branch run on each device's queries;
  the selection branch (token routes) and the sliding-window branch (a band) run as
  rings of block-sparse steps, most window steps skipped. Arguments as
  `ops.nsa_attention`, plus `layout`, `axis_name`, `mesh` and the ring's tiles
  (`block_q`, `block_kv`) as `moba_attention` here; the slices must be multiples of
  `stride` and at least `block_len - stride` long. Arrays with a sequence dim are in
  stored order, k_cmp / v_cmp in natural order (`compress` makes them from stored keys).

  Returns:
    `[batch, seq, q_heads, v_head_dim]` in q's dtype, stored order.
  """
  op = "context_parallel.nsa_attention"
  setup = _ring_setup(op, q, k, v, layout, axis_name, mesh)
  shape, layout = setup.shape, setup.layout
  kw = dict(block_len=block_len, stride=stride, select_len=select_len, num_select=num_select,
            window=window, scale=scale, implementation=implementation,
            interpret=interpret)  # fmt: skip
  if setup.n == 1:
    return nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, **kw)
  for name in ("block_len", "stride", "select_len", "window"):
    _check_positive(op, name, kw[name])
  if num_select < 3 or not isinstance(num_select, int):
    raise ValueError(f"{op}: num_select must be an int >= 3, got {num_select!r}.")
  nc = nsa.num_compressed_blocks(shape.kv_len, block_len, stride)
  for name, x, dim in (("k_cmp", k_cmp, shape.head_dim), ("v_cmp", v_cmp, shape.v_head_dim)):
    expected = (shape.batch, nc, shape.kv_heads, dim)
    if getattr(x, "shape", None) != expected or x.dtype != q.dtype:
      raise ValueError(
        f"{op}: {name} must be {q.dtype} {expected} (Nc = num_compressed_blocks), got "
        f"{getattr(x, 'dtype', None)} {getattr(x, 'shape', None)}."
      )
  if getattr(gates, "shape", None) != (shape.batch, shape.q_len, shape.q_heads, 3):
    raise ValueError(
      f"{op}: gates must be [batch, seq, q_heads, 3], got {getattr(gates, 'shape', None)}."
    )
  c = layout.slice_len
  if c % stride or block_len - stride > c:
    raise ValueError(
      f"{op}: the shard slices ({c} positions) must be a multiple of stride ({stride}) and "
      f"at least block_len - stride ({block_len - stride}) long."
    )
  scale = checks.check_scale(scale, shape, op)
  block_q, block_kv = setup.tiles(block_q, block_kv)
  geo = _NSAGeometry(layout, block_len, stride, select_len, num_select, window, scale)
  attend = dict(scale=scale, implementation=implementation, interpret=interpret)
  ring_for = lambda fn, tiles: setup.ring(fn, tiles, block_q, block_kv, **attend)
  causal, band = element_masks.Band(None, 0), element_masks.Band(1 - window, 0)
  slc_ring = ring_for(causal, _RouteTiles(causal, select_len))
  win_ring = ring_for(band, _StructuredTiles(band))

  def body(q, k, v, k_cmp, v_cmp, gates):
    d = jax.lax.axis_index(axis_name)
    ids, valid = _nsa_select(geo, q, k_cmp, d)  # [B, Hkv, L/n, n]
    pos = jnp.asarray(layout.shard_positions())[d]
    key_routes = jnp.broadcast_to(pos // select_len, (q.shape[0], pos.shape[0]))
    query_routes = jnp.where(valid, ids, -1)
    o_slc, _ = _ring_attention(slc_ring, q, k, v, key_routes, (query_routes, None))
    o_win, _ = _ring_attention(win_ring, q, k, v, None, (None, None))
    if nc:
      o_cmp = _nsa_compressed(geo, win_ring, q, k_cmp, v_cmp, d)
    else:
      o_cmp = jnp.zeros_like(o_win)
    g = gates.astype(jnp.float32)[..., None]  # [B, L/n, Hq, 3, 1]
    f32 = lambda x: x.astype(jnp.float32)
    out = g[..., 0, :] * f32(o_cmp) + g[..., 1, :] * f32(o_slc) + g[..., 2, :] * f32(o_win)
    return out.astype(q.dtype)

  specs, qkv, _ = setup.specs(q)
  cmp = specs(k_cmp, heads=2)
  in_specs = (qkv, qkv, qkv, cmp, cmp, specs(gates, heads=2, seq=1))
  return _shard_map(setup.mesh, body, in_specs, qkv, q, k, v, k_cmp, v_cmp, gates)


def compress(
  x: jax.Array,  # [batch, seq, heads, dim], stored order
  phi: Callable[[jax.Array], jax.Array],
  *,
  block_len: int,
  stride: int,
  layout: SequenceLayout,
  axis_name: str = AXIS,
  mesh: Any = None,
) -> jax.Array:
  """NSA's compressed keys (or values) of a sequence split over the context axis:
  `phi(blocks)` of the blocks [c * stride, c * stride + block_len), in natural order,
  [batch, Nc, heads, dim'] (what `nsa_attention` takes as k_cmp / v_cmp).

  Each device cuts the blocks starting in its slices, [B, L/stride/n, block_len, H, D],
  reading the first block_len - stride keys of the next slice from its owner (an
  all-gather of those few rows); phi (e.g. NSA's MLP, or a mean over the block axis)
  runs on the sharded blocks; the Nc blocks inside the sequence come back in natural
  order (replicated: NSA's compressed branch reads all of them).
  """
  op = "context_parallel.compress"
  mesh = _mesh(mesh)
  c, n, s = layout.slice_len, layout.num_shards, layout.slices_per_shard
  halo = block_len - stride
  if c % stride or halo > c or halo < 0:
    raise ValueError(
      f"{op}: the shard slices ({c} positions) must be a multiple of stride ({stride}) and "
      f"at least block_len - stride ({halo}) long."
    )
  owner = {sl: (dev, a) for dev in range(n) for a, sl in enumerate(layout.slices(dev))}
  # For each (device, slice a): where the next slice's first rows live, or (-1, -1).
  nxt = [[owner.get(sl + 1, (-1, -1)) for sl in layout.slices(dev)] for dev in range(n)]
  rows = np.arange(c // stride)[:, None] * stride + np.arange(block_len)  # [c/stride, l]

  def body(x):
    d = jax.lax.axis_index(axis_name)
    parts = x.reshape(x.shape[0], s, c, *x.shape[2:])  # [B, S, c, H, D]
    heads = jax.lax.all_gather(parts[:, :, :halo], axis_name)  # [n, B, S, halo, H, D]
    blocks = []
    for a in range(s):
      dev, sl = (jnp.asarray(np.array(nxt)[:, a, i])[d] for i in range(2))
      tail = jnp.where(dev >= 0, heads[jnp.maximum(dev, 0), :, jnp.maximum(sl, 0)], 0)
      ext = jnp.concatenate([parts[:, a], tail.astype(x.dtype)], axis=1)  # [B, c + halo, H, D]
      blocks.append(ext[:, rows])  # [B, c/stride, l, H, D]
    return jnp.concatenate(blocks, axis=1)

  if n > 1:
    specs = _Specs.of(mesh, axis_name, x.shape[0], x.shape[2])
    spec = specs(x, heads=2, seq=1)
    block_spec = P(spec[0], axis_name, None, spec[2], None)
    blocks = _shard_map(mesh, body, (spec,), block_spec, x)
  else:
    blocks = x[
      :,
      np.minimum(np.arange(0, x.shape[1], stride)[:, None] + np.arange(block_len), x.shape[1] - 1),
    ]
  out = phi(blocks)  # [B, L/stride, H, D']
  first = layout.positions()[::stride] // stride  # natural id of every stored block
  nc = nsa.num_compressed_blocks(layout.length, block_len, stride)
  return jnp.take(out, np.argsort(first)[:nc], axis=1)

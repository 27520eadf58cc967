"""`BlockMask`: the one compact block-sparse mask format of every backend.

Attention is cut into tiles of `block_q` queries x `block_kv` keys. A BlockMask
lists, for every q block, the kv blocks attention must visit (the *forward
view*), and for every kv block the q blocks that visit it (the *transposed
view*, which a dK/dV backward pass walks). Tiles not listed are skipped: no
load, no matmul. Like PyTorch FlexAttention's BlockMask it is a small pytree
of int32/bool arrays, built on device (also under `jit`, from traced inputs),
so a mask that changes every step costs no recompilation: only its *shapes*
are static, and they depend on the builder's static arguments alone.

Metadata (Bm is 1 or the batch, Hm is 1 or the number of *query* heads; a 1
broadcasts; Qb = ceil(q_len / block_q), Kb = ceil(kv_len / block_kv)):

  kv_count   int32[Bm, Hm, Qb]        how many kv blocks q block i visits
  kv_index   int32[Bm, Hm, Qb, Kmax]  their ids, ascending, in the first
                                      kv_count slots; the remaining slots
                                      repeat the last id (0 for an empty row),
                                      so a pipelined kernel that runs over all
                                      Kmax slots issues no new copy for them
  kv_partial bool [Bm, Hm, Qb, Kmax]  the tile needs `mask_fn` (a causal
                                      diagonal, a window edge); False: every
                                      pair in the tile is visible
  q_count    int32[Bm, Hm, Kb]        the same, transposed: q blocks that
  q_index    int32[Bm, Hm, Kb, Qmax]  visit kv block j, ascending
  q_partial  bool [Bm, Hm, Kb, Qmax]

Static fields: block_q, block_kv, q_len, kv_len, mask_fn, mask_fn_exact.
Data field `mask_params`: a tuple of the parameters (pytrees of arrays) of the
mask_mods in `mask_fn` (`masks.create_block_mask`), one entry per mask_mod; () for
position-only masks. Being data, new parameter values (document boundaries, prefix
lengths) never retrace.

Ragged tails. q_len and kv_len need not be multiples of the block sizes; the
last q block and the last kv block then reach past the end. Positions past
q_len / kv_len are never visible, and every consumer masks them by position
on those (statically known) tail blocks, whatever kv_partial says. kv_partial
flags only what `mask_fn` is needed for. Keeping the two apart is what lets a
tile that is full in one mask stay full in a union (a single "partial" bit for
both reasons cannot tell "apply mask_fn" from "only clip the tail").

The element mask. `mask_fn(q_idx, kv_idx) -> bool` (see element_masks.py; a
mask_mod also reads the batch row b, the query head h and `mask_params`) is
evaluated on partial tiles only. The visible pairs of the mask are exactly
    listed(tile) and (not partial(tile) or mask_fn(i, j)) and i < q_len and j < kv_len.
`mask_fn_exact` is True when mask_fn alone already equals the whole mask (the
structured builders: causal, windows, chunks). Masks whose tiles come from
data (layouts, top-k) have no mask_fn, or one that is only valid on their own
partial tiles; `union` / `intersection` use this flag to refuse the one
combination a single static predicate cannot express.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import element_masks
from sparse_attention.pallas_kernels.block_sparse.common import element_visible


def num_blocks(length: int, block: int) -> int:
  """Number of blocks of `block` positions covering `length` positions."""
  return -(-length // block)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=[
    "kv_count",
    "kv_index",
    "kv_partial",
    "q_count",
    "q_index",
    "q_partial",
    "mask_params",
  ],
  meta_fields=["block_q", "block_kv", "q_len", "kv_len", "mask_fn", "mask_fn_exact"],
)
@dataclasses.dataclass(frozen=True, repr=False)
class BlockMask:
  """Compact block-sparse attention mask (see the module docstring)."""

  kv_count: jax.Array  # int32[Bm, Hm, Qb]
  kv_index: jax.Array  # int32[Bm, Hm, Qb, Kmax]
  kv_partial: jax.Array  # bool[Bm, Hm, Qb, Kmax]
  q_count: jax.Array  # int32[Bm, Hm, Kb]
  q_index: jax.Array  # int32[Bm, Hm, Kb, Qmax]
  q_partial: jax.Array  # bool[Bm, Hm, Kb, Qmax]
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  mask_fn: Any = None
  mask_fn_exact: bool = False
  mask_params: tuple = ()  # one pytree per mask_mod of mask_fn (its `slot`)

  @property
  def num_q_blocks(self) -> int:
    return num_blocks(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return num_blocks(self.kv_len, self.block_kv)

  @property
  def max_kv_blocks(self) -> int:
    """Kmax: the static bound on kv blocks per q block."""
    return self.kv_index.shape[-1]

  @property
  def max_q_blocks(self) -> int:
    """Qmax: the static bound on q blocks per kv block."""
    return self.q_index.shape[-1]

  @property
  def batch_heads(self) -> tuple[int, int]:
    """(Bm, Hm): 1 where the mask broadcasts over batch / heads."""
    return tuple(self.kv_count.shape[:2])

  def replace_params(self, mask_params: tuple) -> BlockMask:
    """The same mask with other mask_mod parameters (same structure)."""
    return dataclasses.replace(self, mask_params=mask_params)

  def block_layout(self) -> tuple[jax.Array, jax.Array]:
    """Dense tile layout `(visited, full)`, both bool[Bm, Hm, Qb, Kb]."""
    return _block_layout(self)

  def to_dense(self) -> jax.Array:
    """The element mask, bool[Bm, Hm, q_len, kv_len]. O(S^2): tests/debugging."""
    return _to_dense(self)

  def block_density(self) -> float:
    """Fraction of the Bm*Hm*Qb*Kb tiles that are visited (concrete masks)."""
    total = self.kv_count.size * self.num_kv_blocks
    return float(jnp.sum(self.kv_count)) / total

  def __repr__(self) -> str:
    bm, hm = self.batch_heads
    try:
      density = f"{self.block_density():.3f}"
    except jax.errors.ConcretizationTypeError:
      density = "traced"
    return (
      f"BlockMask(batch_heads=({bm}, {hm}), q_len={self.q_len}, "
      f"kv_len={self.kv_len}, blocks={self.block_q}x{self.block_kv}, "
      f"grid={self.num_q_blocks}x{self.num_kv_blocks}, "
      f"Kmax={self.max_kv_blocks}, Qmax={self.max_q_blocks}, "
      f"block_density={density}, mask_fn={self.mask_fn!r})"
    )


@jax.jit
def _block_layout(mask: BlockMask) -> tuple[jax.Array, jax.Array]:
  listed = jnp.arange(mask.max_kv_blocks) < mask.kv_count[..., None]
  visited = scatter_columns(mask.kv_index, listed, mask.num_kv_blocks)
  partial = scatter_columns(mask.kv_index, listed & mask.kv_partial, mask.num_kv_blocks)
  return visited, visited & ~partial


@jax.jit
def _to_dense(mask: BlockMask) -> jax.Array:
  visited, full = _block_layout(mask)
  up = lambda x: jnp.repeat(jnp.repeat(x, mask.block_q, 2), mask.block_kv, 3)
  visited = up(visited)[:, :, : mask.q_len, : mask.kv_len]
  if mask.mask_fn is None:
    return visited
  full = up(full)[:, :, : mask.q_len, : mask.kv_len]
  bm, hm = mask.batch_heads
  b = jnp.arange(bm, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(hm, dtype=jnp.int32)[None, :, None, None]
  q_idx = jnp.arange(mask.q_len, dtype=jnp.int32)[:, None]
  kv_idx = jnp.arange(mask.kv_len, dtype=jnp.int32)[None, :]
  element = element_visible(mask.mask_fn, b, h, q_idx, kv_idx, mask.mask_params)
  return visited & (full | element)


# --------------------------------------------------------------------------
# Building: one path from a dense tile layout to the compact views.
# --------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _compact(keep, partial, max_len: int, xp):
  """Lists the kept columns of every row of bool[Bm, Hm, R, C], ascending, in
  `max_len` slots: (count [Bm, Hm, R], index and partial [Bm, Hm, R, max_len])."""
  count = keep.sum(-1).astype(np.int32)
  if xp is np:
    order = np.argsort(~keep, axis=-1, kind="stable")
  else:
    order = jnp.argsort(~keep, axis=-1, stable=True)
  index = order[..., :max_len].astype(np.int32)
  last = xp.take_along_axis(index, xp.maximum(count - 1, 0)[..., None], axis=-1)
  slot = xp.arange(max_len, dtype=np.int32)
  index = xp.where(slot < count[..., None], index, xp.where(count[..., None] > 0, last, 0))
  part = xp.take_along_axis(partial, index, axis=-1)
  return count, index, part


def _compact_views(keep, partial, max_kv: int, max_q: int, xp):
  """Both views: (kv_count, kv_index, kv_partial, q_count, q_index, q_partial)."""
  t = lambda x: x.swapaxes(-1, -2)
  return (*_compact(keep, partial, max_kv, xp), *_compact(t(keep), t(partial), max_q, xp))


_compact_views_on_device = jax.jit(functools.partial(_compact_views, xp=jnp), static_argnums=(2, 3))


def _check_row_counts(count: Any, max_len: int, arg_name: str) -> None:
  """Refuses (never truncates) rows longer than the static bound."""

  def check(c):
    worst = int(np.max(c)) if np.size(c) else 0
    if worst > max_len:
      raise ValueError(
        f"{arg_name}={max_len} is too small: a row of the block layout keeps "
        f"{worst} blocks. Raise {arg_name} (at most the number of blocks)."
      )

  if _is_concrete(count):
    check(np.asarray(count))
  else:  # traced layout: the check runs on the host when the mask is built
    jax.debug.callback(check, count)


def scatter_columns(index, valid, num_cols: int):
  """bool[Bm, Hm, R, num_cols]: True at the `index` columns of each row where
  `valid` (both [Bm, Hm, R, n]); the inverse of the compact lists."""
  col = jnp.where(valid, index, num_cols)  # invalid slots write out of range
  bm, hm, rows, _ = index.shape
  b = jnp.arange(bm)[:, None, None, None]
  h = jnp.arange(hm)[None, :, None, None]
  r = jnp.arange(rows)[None, None, :, None]
  out = jnp.zeros((bm, hm, rows, num_cols), bool)
  return out.at[b, h, r, col].set(True, mode="drop")


def from_block_layout(
  keep: Any,  # bool[Bm, Hm, Qb, Kb]
  full: Any,  # bool[Bm, Hm, Qb, Kb]: tiles needing no mask_fn
  *,
  block_q: int,
  block_kv: int,
  q_len: int,
  kv_len: int,
  mask_fn: Any = None,
  mask_fn_exact: bool = False,
  max_kv_blocks: int | None = None,
  max_q_blocks: int | None = None,
  mask_params: tuple = (),
) -> BlockMask:
  """Compacts a dense tile layout into a BlockMask (both views).

  With numpy inputs (static builders) the work runs on the host and the
  bounds default to the exact maxima; with jax inputs it runs on device and
  the bounds default to the full grid, so the shapes never depend on data.
  """
  kb, qb = keep.shape[-1], keep.shape[-2]
  if mask_fn is None:
    full = keep  # nothing to evaluate: every listed tile is full
  full = full & keep
  partial = keep & ~full
  host = isinstance(keep, np.ndarray) and isinstance(partial, np.ndarray)
  if max_kv_blocks is None:
    max_kv_blocks = max(1, int(keep.sum(-1).max())) if host else kb
  if max_q_blocks is None:
    max_q_blocks = max(1, int(keep.sum(-2).max())) if host else qb
  max_kv_blocks, max_q_blocks = min(max_kv_blocks, kb), min(max_q_blocks, qb)
  if kb > max_kv_blocks:
    _check_row_counts(keep.sum(-1), max_kv_blocks, "max_kv_blocks")
  if qb > max_q_blocks:
    _check_row_counts(keep.sum(-2), max_q_blocks, "max_q_blocks")
  if host:
    views = _compact_views(keep, partial, max_kv_blocks, max_q_blocks, np)
  else:
    views = _compact_views_on_device(keep, partial, max_kv_blocks, max_q_blocks)
  return BlockMask(
    *(jnp.asarray(a) for a in views),
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    mask_fn=mask_fn,
    mask_fn_exact=bool(mask_fn_exact and mask_fn is not None),
    mask_params=tuple(mask_params) if mask_fn is not None else (),
  )


def block_bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive first/last position of every block, clipped to `length`."""
  lo = np.arange(num_blocks(length, block), dtype=np.int64) * block
  return lo, np.minimum(lo + block, length) - 1


def classify_tiles(
  fn: Any, q_len: int, kv_len: int, block_q: int, block_kv: int
) -> tuple[np.ndarray, np.ndarray]:
  """(any, all) visibility of every tile under predicate `fn`, bool[Qb, Kb].

  O(Qb * Kb) on the host, from the static arguments only.
  """
  q_lo, q_hi = block_bounds(q_len, block_q)
  k_lo, k_hi = block_bounds(kv_len, block_kv)
  any_, all_ = fn.classify(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
  shape = (len(q_lo), len(k_lo))
  return np.broadcast_to(any_, shape), np.broadcast_to(all_, shape)


# --------------------------------------------------------------------------
# Combining masks.
# --------------------------------------------------------------------------


def _check_compatible(masks: tuple[BlockMask, ...], op: str) -> tuple[int, int]:
  if not masks:
    raise ValueError(f"{op}() needs at least one BlockMask.")
  for m in masks:
    if not isinstance(m, BlockMask):
      raise ValueError(f"{op}(): expected BlockMask arguments, got {type(m).__name__}.")
  ref = masks[0]
  for m in masks[1:]:
    for field in ("block_q", "block_kv", "q_len", "kv_len"):
      if getattr(m, field) != getattr(ref, field):
        raise ValueError(
          f"{op}(): masks disagree on {field}: {getattr(ref, field)} vs {getattr(m, field)}."
        )
  shapes = [m.batch_heads for m in masks]
  out = []
  for axis, name in ((0, "batch"), (1, "heads")):
    sizes = {s[axis] for s in shapes} - {1}
    if len(sizes) > 1:
      raise ValueError(f"{op}(): masks have incompatible {name} sizes {sorted(sizes)}.")
    out.append(sizes.pop() if sizes else 1)
  fns = [m for m in masks if m.mask_fn is not None]
  if len(fns) > 1 and not all(m.mask_fn_exact for m in fns):
    raise ValueError(
      f"{op}(): a mask whose mask_fn covers only its own partial tiles (built "
      "from a layout, top-k or anchors) can be combined with layout masks "
      "only, not with another mask that has a mask_fn. Combine the structured "
      "masks first, then the layouts."
    )
  return out[0], out[1]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _combined_layout(masks: tuple[BlockMask, ...], grid: tuple[int, ...], is_union: bool):
  reduce = jnp.logical_or if is_union else jnp.logical_and
  layouts = [_block_layout(m) for m in masks]
  keep = functools.reduce(reduce, (jnp.broadcast_to(v, grid) for v, _ in layouts))
  full = functools.reduce(reduce, (jnp.broadcast_to(f, grid) for _, f in layouts))
  return keep, full


def _combine(masks, op: str) -> BlockMask:
  bm, hm = _check_compatible(masks, op)
  ref = masks[0]
  is_union = op == "union"
  grid = (bm, hm, ref.num_q_blocks, ref.num_kv_blocks)
  keep, full = _combined_layout(tuple(masks), grid, is_union)
  fns, params = [], ()
  for m in masks:  # parameter tuples concatenate; each mask_mod's slot moves with them
    if m.mask_fn is not None:
      fns.append(element_masks.shift_slots(m.mask_fn, len(params)))
      params += tuple(m.mask_params)
  fn_combine = element_masks.any_of if is_union else element_masks.all_of
  bound = sum if is_union else min
  return from_block_layout(
    keep,
    full,
    block_q=ref.block_q,
    block_kv=ref.block_kv,
    q_len=ref.q_len,
    kv_len=ref.kv_len,
    mask_fn=fn_combine(*fns) if fns else None,
    mask_fn_exact=all(m.mask_fn is not None and m.mask_fn_exact for m in masks),
    max_kv_blocks=bound(m.max_kv_blocks for m in masks),
    max_q_blocks=bound(m.max_q_blocks for m in masks),
    mask_params=params,
  )


def union(*masks: BlockMask) -> BlockMask:
  """Pairs visible in any of the masks. Kmax is the sum of theirs (capped)."""
  return _combine(masks, "union")


def intersection(*masks: BlockMask) -> BlockMask:
  """Pairs visible in all of the masks. Kmax is the least of theirs."""
  return _combine(masks, "intersection")

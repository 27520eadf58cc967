"""Block-mask builders: the public way to make a `BlockMask`.

    from sparse_attention.ops import masks
    m = masks.causal(4096, 4096, block_q=128, block_kv=128)
    m = masks.union(masks.sliding_window(4096, 4096, window=512), masks.from_layout(...))

Every builder costs O(Qb * Kb) at most (never O(S^2)) and can run inside
`jax.jit`. Builders whose tiles follow from static arguments alone (dense,
causal, sliding_window, chunked) lay them out on the host and get the exact
Kmax; builders that take arrays (from_layout, topk_blocks, topp_blocks, the anchor offset
of window_with_anchors) run on device from traced values, with a Kmax fixed by
their static arguments, so a new mask of the same kind never recompiles.

Conventions: positions are absolute (query i is row i of q). A causal mask is
aligned top-left like `jax.nn.dot_product_attention(is_causal=True)`: key j is
visible to query i iff j <= i + offset. A window (left, right) lets query i see
keys i-left .. i+right, like `local_window_size` there.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import element_masks
from sparse_attention.ops.block_mask import (
  BlockMask,
  block_bounds,
  classify_tiles,
  from_block_layout,
  intersection,
  num_blocks,
  scatter_columns,
  union,
)
from sparse_attention.pallas_kernels.block_sparse.common import element_visible

__all__ = [
  "BlockMask",
  "causal",
  "chunked",
  "create_block_mask",
  "dense",
  "document",
  "from_element_mask",
  "from_layout",
  "intersection",
  "prefix_lm",
  "sliding_window",
  "topk_blocks",
  "top_p",
  "topp_blocks",
  "union",
  "window_with_anchors",
]


def _check_int(name: str, value: Any, *, minimum: int | None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int, got {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def _check_geometry(q_len, kv_len, block_q, block_kv) -> tuple[int, int, int, int]:
  return (
    _check_int("q_len", q_len, minimum=1),
    _check_int("kv_len", kv_len, minimum=1),
    _check_int("block_q", block_q, minimum=1),
    _check_int("block_kv", block_kv, minimum=1),
  )


def _window(window: int | tuple[int, int], causal: bool) -> tuple[int, int]:
  if isinstance(window, tuple):
    if len(window) != 2:
      raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}.")
    left = _check_int("window[0]", window[0], minimum=0)
    right = _check_int("window[1]", window[1], minimum=0)
    if causal and right != 0:
      raise ValueError(f"window={window} looks ahead, which causal=True forbids.")
    return left, right
  w = _check_int("window", window, minimum=0)
  return w, 0 if causal else w


def from_element_mask(
  fn: Any, q_len: int, kv_len: int, *, block_q: int = 128, block_kv: int = 128
) -> BlockMask:
  """The BlockMask exactly equal to a static element mask, laid out on the host.

  Args:
    fn: an element mask (see `ops/element_masks.py`: `Band`, `Chunk`, `AllOf`, `AnyOf`,
      or your own hashable object with the same two methods): `fn(q_pos, kv_pos)` gives
      the visibility of (query, key) position pairs as a bool array (traced inside the
      kernels on partial tiles), and `fn.classify(q_lo, q_hi, kv_lo, kv_hi)` gives
      (any, all) visibility of position ranges (NumPy, on the host) so that tiles are
      classified skipped / partial / full in O(Qb * Kb).
    q_len, kv_len, block_q, block_kv: the geometry.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  any_, all_ = classify_tiles(fn, q_len, kv_len, block_q, block_kv)
  return from_block_layout(
    any_[None, None],
    all_[None, None],
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    mask_fn=fn,
    mask_fn_exact=True,
  )


def dense(q_len: int, kv_len: int, *, block_q: int = 128, block_kv: int = 128) -> BlockMask:
  """Every tile kept: plain attention through the block-sparse path."""
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  keep = np.ones((1, 1, num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)), bool)
  return from_block_layout(
    keep, keep, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len
  )


def causal(
  q_len: int, kv_len: int, *, block_q: int = 128, block_kv: int = 128, offset: int = 0
) -> BlockMask:
  """Key j visible to query i iff j <= i + offset (offset = kv_len - q_len aligns
  the last query with the last key, as in decoding with a cache)."""
  offset = _check_int("offset", offset, minimum=None)
  return from_element_mask(
    element_masks.Band(None, offset), q_len, kv_len, block_q=block_q, block_kv=block_kv
  )


_causal = causal  # for builders whose `causal` argument shadows the function


def sliding_window(
  q_len: int,
  kv_len: int,
  *,
  window: int | tuple[int, int],
  causal: bool = False,
  block_q: int = 128,
  block_kv: int = 128,
) -> BlockMask:
  """Local attention: query i sees keys i-left .. i+right.

  Args:
    window: `w` for (w, w), or (w, 0) with causal=True; or an explicit
      (left, right) pair of non-negative ints.
    causal: no look-ahead (right = 0).
  """
  left, right = _window(window, causal)
  return from_element_mask(
    element_masks.Band(-left, right), q_len, kv_len, block_q=block_q, block_kv=block_kv
  )


def chunked(
  q_len: int,
  kv_len: int,
  *,
  chunk: int,
  causal: bool = False,
  block_q: int = 128,
  block_kv: int = 128,
) -> BlockMask:
  """Attention within non-overlapping chunks of `chunk` positions (Llama-4 style
  local attention when causal=True)."""
  fn = element_masks.Chunk(_check_int("chunk", chunk, minimum=1))
  if causal:
    fn = element_masks.all_of(fn, element_masks.Band(None, 0))
  return from_element_mask(fn, q_len, kv_len, block_q=block_q, block_kv=block_kv)


def anchor_blocks(num_kv_blocks: int, num_anchors: int, offset: Any) -> jax.Array:
  """Ids of `num_anchors` kv blocks spread evenly over the grid, rotated by
  `offset` blocks (an int or a traced int32 scalar), int32[num_anchors]."""
  base = (np.arange(num_anchors) * num_kv_blocks) // max(num_anchors, 1)
  return (jnp.asarray(base, jnp.int32) + jnp.asarray(offset, jnp.int32)) % num_kv_blocks


def window_with_anchors(
  q_len: int,
  kv_len: int,
  *,
  window: int | tuple[int, int],
  num_anchors: int,
  offset: Any = 0,
  block_q: int = 128,
  block_kv: int = 128,
) -> BlockMask:
  """A local window plus global anchor kv blocks that every query sees.

  The LVSA pattern for long-video diffusion: the anchors are `num_anchors` kv
  blocks spread evenly over the sequence and rotated by `offset` blocks (e.g.
  the denoising step or layer index), so no fixed grid of positions is always
  global. `offset` may be traced: rotating the anchors never recompiles.
  Bidirectional (a video DiT attends both ways).
  """
  win = sliding_window(
    q_len, kv_len, window=window, causal=False, block_q=block_q, block_kv=block_kv
  )
  kb = win.num_kv_blocks
  num_anchors = _check_int("num_anchors", num_anchors, minimum=0)
  if num_anchors > kb:
    raise ValueError(f"num_anchors={num_anchors} exceeds the {kb} kv blocks.")
  if num_anchors == 0:
    return win
  integer_array = hasattr(offset, "dtype") and jnp.issubdtype(offset.dtype, jnp.integer)
  if isinstance(offset, bool) or not (
    isinstance(offset, (int, np.integer)) or (integer_array and jnp.ndim(offset) == 0)
  ):
    raise ValueError(f"offset must be an int or an integer scalar array, got {offset!r}.")
  cols = jnp.zeros((kb,), bool).at[anchor_blocks(kb, num_anchors, offset)].set(True)
  visited, full = win.block_layout()
  return from_block_layout(
    visited | cols,
    full | cols,
    block_q=win.block_q,
    block_kv=win.block_kv,
    q_len=win.q_len,
    kv_len=win.kv_len,
    mask_fn=win.mask_fn,
    mask_fn_exact=False,
    max_kv_blocks=win.max_kv_blocks + num_anchors,
    max_q_blocks=win.num_q_blocks,
  )


def _check_grid_array(name: str, x: Any, q_len, kv_len, block_q, block_kv) -> tuple[int, int]:
  qb, kb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
  if not hasattr(x, "shape") or len(x.shape) != 4:
    raise ValueError(
      f"{name} must have rank 4, [batch|1, heads|1, {qb}, {kb}] (q blocks, kv "
      f"blocks), got shape {getattr(x, 'shape', None)}."
    )
  if tuple(x.shape[-2:]) != (qb, kb):
    raise ValueError(
      f"{name} has shape {tuple(x.shape)}; its last two dims must be "
      f"({qb}, {kb}) = (ceil(q_len/block_q), ceil(kv_len/block_kv)) for "
      f"q_len={q_len}, kv_len={kv_len}, blocks {block_q}x{block_kv}."
    )
  return qb, kb


def from_layout(
  layout: Any,  # bool[B|1, H|1, Qb, Kb]
  *,
  block_q: int,
  block_kv: int,
  q_len: int,
  kv_len: int,
  max_kv_blocks: int | None = None,
  max_q_blocks: int | None = None,
) -> BlockMask:
  """A mask from any tile layout, e.g. one computed on device.

  Args:
    layout: bool (or integer, nonzero = kept) `[B|1, H|1, Qb, Kb]`.
    max_kv_blocks: static Kmax; default Kb. A smaller bound makes kernels
      cheaper to launch; a row keeping more blocks raises (eagerly for
      concrete layouts, when the jitted computation runs for traced ones),
      it is never truncated.
    max_q_blocks: static Qmax of the transposed view; default Qb.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  qb, kb = _check_grid_array("layout", layout, q_len, kv_len, block_q, block_kv)
  dtype = np.dtype(layout.dtype)
  if dtype != np.bool_ and not np.issubdtype(dtype, np.integer):
    raise ValueError(f"layout must be bool or integer, got dtype {dtype}.")
  if max_kv_blocks is not None:
    max_kv_blocks = _check_int("max_kv_blocks", max_kv_blocks, minimum=1)
  if max_q_blocks is not None:
    max_q_blocks = _check_int("max_q_blocks", max_q_blocks, minimum=1)
  keep = layout != 0
  return from_block_layout(
    keep,
    keep,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    max_kv_blocks=kb if max_kv_blocks is None else max_kv_blocks,
    max_q_blocks=qb if max_q_blocks is None else max_q_blocks,
  )


def diagonal_tiles(q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
  """bool[Qb, Kb]: tiles holding some pair (i, i), i.e. a query's own position."""
  q_lo, q_hi = block_bounds(q_len, block_q)
  k_lo, k_hi = block_bounds(kv_len, block_kv)
  return (k_lo[None, :] <= q_hi[:, None]) & (q_lo[:, None] <= k_hi[None, :])


def topk_blocks(
  scores: Any,  # float[B|1, H|1, Qb, Kb]
  k: int,
  *,
  block_q: int,
  block_kv: int,
  q_len: int,
  kv_len: int,
  keep_diagonal: bool = False,
  causal: bool = False,
) -> BlockMask:
  """Keeps the k best-scoring kv blocks of every q block (a dynamic mask).

  The Kinetics / Re-ttention style: `scores` are e.g. pooled q.k estimates
  computed on device. Kmax = k, whatever the scores.

  Args:
    scores: float `[B|1, H|1, Qb, Kb]`; -inf (and NaN) entries are never kept,
      so a row may keep fewer than k blocks.
    k: blocks per q block, 1 <= k <= Kb.
    keep_diagonal: always keep the tiles holding the queries' own positions
      (they count toward k).
    causal: never keep a block wholly in the future, and apply the causal
      element mask on the diagonal (as `intersection(..., causal(...))`).
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  qb, kb = _check_grid_array("scores", scores, q_len, kv_len, block_q, block_kv)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(f"scores must be floating point, got dtype {scores.dtype}.")
  k = _check_int("k", k, minimum=1)
  if k > kb:
    raise ValueError(f"k={k} exceeds the number of kv blocks Kb={kb}.")
  s = jnp.asarray(scores, jnp.float32)
  if causal:
    q_lo, q_hi = block_bounds(q_len, block_q)
    k_lo, _ = block_bounds(kv_len, block_kv)
    future = k_lo[None, :] > q_hi[:, None]
    s = jnp.where(future, -jnp.inf, s)
  if keep_diagonal:
    diag = diagonal_tiles(q_len, kv_len, block_q, block_kv)
    need = int(diag.sum(-1).max(initial=0))
    if need > k:
      raise ValueError(
        f"k={k} is smaller than the {need} diagonal tiles keep_diagonal=True "
        f"must keep per q block (block_q={block_q}, block_kv={block_kv})."
      )
    s = jnp.where(diag, jnp.inf, s)
  s = jnp.where(jnp.isnan(s), -jnp.inf, s)
  values, index = jax.lax.top_k(s, k)
  keep = scatter_columns(index, values > -jnp.inf, kb)
  mask = from_block_layout(
    keep,
    keep,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    max_kv_blocks=k,
    max_q_blocks=qb,
  )
  if causal:
    mask = intersection(mask, _causal(q_len, kv_len, block_q=block_q, block_kv=block_kv))
  return mask


def top_p(
  logits: Any,  # float[..., N]
  p: Any,
  *,
  min_count: int = 1,
  max_count: int | None = None,
  forced: Any = None,  # bool, broadcasting against logits
) -> tuple[jax.Array, jax.Array]:
  """Top-p (nucleus) selection along the last axis, on device: the fewest entries whose
  softmax mass reaches p.

  Entries are taken in decreasing mass, ties to the lower index, `forced` ones first
  (their mass counts toward p); at least min_count (of those with mass), at most
  max_count. -inf and NaN entries have no mass and are never taken (unless forced).

  Returns:
    (index int32 [..., max_count] in the order taken, keep bool [..., max_count]): the
    kept entries are `index` where `keep`.
  """
  s = jnp.asarray(logits, jnp.float32)
  s = jnp.where(jnp.isnan(s), -jnp.inf, s)
  n = s.shape[-1]
  cap = n if max_count is None else max_count
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  mass = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  order_key = jnp.where(s > -jnp.inf, mass, -1.0)  # entries without mass last
  if forced is not None:
    order_key = jnp.where(forced, 2.0, order_key)  # first, whatever their mass
  # lax.top_k orders equal keys lowest index first: ties go to the lower index.
  key, index = jax.lax.top_k(order_key, cap)  # [..., cap] in the order taken
  taken = jnp.take_along_axis(jnp.broadcast_to(mass, order_key.shape), index, axis=-1)
  before = jnp.cumsum(taken, axis=-1) - taken  # mass kept before this entry
  rank = jnp.arange(cap)
  # p >= 1 keeps every entry with mass (a float32 cumsum may reach 1 before the last).
  keep = (key >= 0) & ((before < p) | (p >= 1.0) | (rank < min_count) | (key > 1.0))
  return index, keep


def topp_blocks(
  scores: Any,  # float[B|1, H|1, Qb, Kb]
  p: float,
  *,
  block_q: int,
  block_kv: int,
  q_len: int,
  kv_len: int,
  min_blocks: int = 1,
  max_blocks: int | None = None,
  causal: bool = False,
  keep_diagonal: bool = False,
) -> BlockMask:
  """Keeps, per q block, the fewest kv blocks whose softmax mass of `scores` reaches p.

  ZipVL's adaptive top-p: with `scores` the tile-level attention logits (e.g.
  `ops.estimate_tile_scores`), row r's mass over kv blocks is softmax(scores[..., r, :]);
  the blocks are taken in decreasing mass (ties: lower block id first) until the kept
  mass reaches p, so a head whose attention is peaked keeps few tiles and a diffuse one
  many. On device under jit: a sort per row, O(B * H * Qb * Kb log Kb); p may be traced.

  Args:
    scores: float `[B|1, H|1, Qb, Kb]` tile logits; -inf (and NaN) blocks have no mass
      and are never kept.
    p: target mass in (0, 1]; 1 keeps every block with mass.
    min_blocks: keep at least this many blocks per row (fewer only where fewer have
      mass), >= 1.
    max_blocks: keep at most this many (None: Kb). It is the mask's static Kmax, so a
      cap bounds the kernels' per-row work and metadata; the mass may then stay below p.
    causal: blocks wholly in the future have no mass, and the causal element mask
      applies on the diagonal (as `intersection(..., causal(...))`).
    keep_diagonal: always keep the tiles holding the queries' own positions; they are
      taken first and their mass counts toward p.

  Returns:
    A BlockMask with max_kv_blocks = max_blocks or Kb.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  qb, kb = _check_grid_array("scores", scores, q_len, kv_len, block_q, block_kv)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(f"scores must be floating point, got dtype {scores.dtype}.")
  if isinstance(p, (int, float)) and not isinstance(p, bool) and not 0 < p <= 1:
    raise ValueError(f"p must be in (0, 1], got {p!r}.")
  min_blocks = _check_int("min_blocks", min_blocks, minimum=1)
  cap = kb if max_blocks is None else _check_int("max_blocks", max_blocks, minimum=1)
  if cap > kb:
    raise ValueError(f"max_blocks={cap} exceeds the number of kv blocks Kb={kb}.")
  if min_blocks > cap:
    raise ValueError(f"min_blocks={min_blocks} exceeds max_blocks={cap}.")
  s = jnp.asarray(scores, jnp.float32)
  if causal:
    q_lo, q_hi = block_bounds(q_len, block_q)
    k_lo, _ = block_bounds(kv_len, block_kv)
    s = jnp.where(k_lo[None, :] > q_hi[:, None], -jnp.inf, s)
  forced = None
  if keep_diagonal:
    diag = diagonal_tiles(q_len, kv_len, block_q, block_kv)
    need = int(diag.sum(-1).max(initial=0))
    if need > cap:
      raise ValueError(
        f"max_blocks={cap} is smaller than the {need} diagonal tiles keep_diagonal=True "
        f"must keep per q block (block_q={block_q}, block_kv={block_kv})."
      )
    forced = jnp.asarray(diag)
  index, keep = top_p(s, p, min_count=min_blocks, max_count=cap, forced=forced)
  layout = scatter_columns(index, keep, kb)
  mask = from_block_layout(
    layout,
    layout,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    max_kv_blocks=cap,
    max_q_blocks=qb,
  )
  if causal:
    mask = intersection(mask, _causal(q_len, kv_len, block_q=block_q, block_kv=block_kv))
  return mask


# --------------------------------------------------------------------------
# Programmable masks: any predicate (FlexAttention's mask_mod).
# --------------------------------------------------------------------------

# Predicate evaluations per classification step of create_block_mask (bool scratch of
# this many elements, a few times over): bounded memory at any length.
_CLASSIFY_ELEMENTS = 1 << 24


def create_block_mask(
  mask_mod: Any,
  batch: int,
  heads: int,
  q_len: int,
  kv_len: int,
  *,
  block_q: int = 128,
  block_kv: int = 128,
  params: Any = None,
  max_kv_blocks: int | None = None,
  max_q_blocks: int | None = None,
) -> BlockMask:
  """The BlockMask of any predicate: `mask_mod(b, h, q_idx, kv_idx) -> bool`, or, with
  `params` given, `mask_mod(b, h, q_idx, kv_idx, params)`.

  As FlexAttention's `create_block_mask`: the predicate is evaluated on device over
  every tile, in steps (memory O(Qb * Kb) plus one step of about 2**24 evaluations,
  never the S x S mask at once), each tile classified empty (skipped), full (no
  element mask) or partial; partial tiles evaluate the predicate again, pair by pair,
  inside every implementation. Under `jit` with traced `params` (document boundaries,
  prefix lengths, a table) a new value never retraces; only the function, the sizes and
  the parameters' shapes are static. Define `mask_mod` once (its identity is part of
  the mask's static structure).

  Args:
    mask_mod: the predicate, written with `jnp` operations that broadcast: b and h are
      int32 arrays (the batch row and the query head), q_idx and kv_idx int32 position
      arrays, all broadcasting together; returns bool. Indexing `params` by them is
      allowed (a gather; the xla path takes anything, kernels refuse what they cannot
      lower and `implementation=None` then falls back).
    batch, heads: the batch / query-head sizes the mask varies over; 1 broadcasts (the
      predicate is then evaluated with b = 0 / h = 0 only).
    q_len, kv_len, block_q, block_kv: the geometry.
    params: a pytree of arrays the predicate reads, or None.
    max_kv_blocks, max_q_blocks: static bounds on the tiles per row / column (Kmax,
      Qmax); default the whole grid. A row keeping more is refused, never truncated.

  Returns:
    A BlockMask with `mask_fn` the predicate and `mask_params = (params,)`.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q, block_kv)
  batch = _check_int("batch", batch, minimum=1)
  heads = _check_int("heads", heads, minimum=1)
  if not callable(mask_mod):
    raise ValueError(f"mask_mod must be callable, got {type(mask_mod).__name__}.")
  fn = element_masks.MaskMod(mask_mod, has_params=params is not None)
  mask_params = () if params is None else (params,)
  any_, all_ = _classify_mask_mod(fn, mask_params, batch, heads, q_len, kv_len, block_q, block_kv)
  return from_block_layout(
    any_,
    all_,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    mask_fn=fn,
    mask_fn_exact=True,
    max_kv_blocks=max_kv_blocks,
    max_q_blocks=max_q_blocks,
    mask_params=mask_params,
  )


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5, 6, 7))
def _classify_mask_mod(fn, params, batch, heads, q_len, kv_len, block_q, block_kv):
  """(any, all) visibility of every tile, bool [batch, heads, Qb, Kb]: the predicate
  evaluated over one q tile by `span` kv tiles per step (positions past the lengths
  excluded)."""
  qb, kb = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
  span = max(1, min(kb, _CLASSIFY_ELEMENTS // (batch * heads * block_q * block_kv)))
  steps = -(-kb // span)
  b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]

  def tiles(i, c):  # q tile i, kv tiles c * span .. c * span + span - 1
    q_idx = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    kv_idx = c * span * block_kv + jnp.arange(span * block_kv, dtype=jnp.int32)
    valid = (q_idx < q_len)[:, None] & (kv_idx < kv_len)[None, :]  # [bq, span * bk]
    vis = element_visible(fn, b, h, q_idx[:, None], kv_idx[None, :], params)
    vis = jnp.broadcast_to(vis, (batch, heads, block_q, span * block_kv))
    vis = vis.reshape(batch, heads, block_q, span, block_kv)
    valid = valid.reshape(block_q, span, block_kv)
    return (vis & valid).any((2, 4)), (vis | ~valid).all((2, 4))  # [batch, heads, span]

  def row(i):
    any_, all_ = jax.lax.map(lambda c: tiles(i, c), jnp.arange(steps))  # [steps, B, H, span]
    flat = lambda x: jnp.moveaxis(x, 0, 2).reshape(batch, heads, steps * span)[..., :kb]
    return flat(any_), flat(all_)

  any_, all_ = jax.lax.map(row, jnp.arange(qb))  # [Qb, B, H, Kb]
  return jnp.moveaxis(any_, 0, 2), jnp.moveaxis(all_, 0, 2)


def _same_document(b, h, q_idx, kv_idx, segment_ids):
  return segment_ids[b, q_idx] == segment_ids[b, kv_idx]


def _same_document_causal(b, h, q_idx, kv_idx, segment_ids):
  return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)


def document(
  segment_ids: Any,  # int[batch, seq]
  *,
  causal: bool = False,
  block_q: int = 128,
  block_kv: int = 128,
) -> BlockMask:
  """Packed sequences: query i of batch row b sees key j iff both belong to the same
  document (`segment_ids[b, i] == segment_ids[b, j]`), and, with causal, j <= i.

  Tiles holding no pair of one document are skipped, so packing costs no attention
  across documents. `segment_ids` may be traced: new boundaries never retrace.
  """
  if not hasattr(segment_ids, "shape") or segment_ids.ndim != 2:
    raise ValueError(
      "segment_ids must be an int array [batch, seq], got "
      f"{getattr(segment_ids, 'shape', segment_ids)!r}."
    )
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}.")
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got {causal!r}.")
  batch, seq = segment_ids.shape
  return create_block_mask(
    _same_document_causal if causal else _same_document,
    batch,
    1,
    seq,
    seq,
    block_q=block_q,
    block_kv=block_kv,
    params=jnp.asarray(segment_ids, jnp.int32),
  )


def _prefix_lm(b, h, q_idx, kv_idx, prefix):
  return (kv_idx <= q_idx) | (kv_idx < prefix[b])


def prefix_lm(
  prefix_len: Any,  # int[batch]
  seq_len: int,
  *,
  block_q: int = 128,
  block_kv: int = 128,
) -> BlockMask:
  """Prefix-LM: a causal mask, except that the first `prefix_len[b]` keys of batch row b
  are visible to every query of that row (bidirectional attention inside the prefix).
  `prefix_len` may be traced."""
  if not hasattr(prefix_len, "shape") or prefix_len.ndim != 1:
    raise ValueError(
      f"prefix_len must be an int array [batch], got {getattr(prefix_len, 'shape', prefix_len)!r}."
    )
  if not jnp.issubdtype(prefix_len.dtype, jnp.integer):
    raise ValueError(f"prefix_len must be integers, got dtype {prefix_len.dtype}.")
  prefix = jnp.asarray(prefix_len, jnp.int32)
  return create_block_mask(
    _prefix_lm, prefix.shape[0], 1, seq_len, seq_len, block_q=block_q, block_kv=block_kv,
    params=prefix,
  )  # fmt: skip

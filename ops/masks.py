"""Block-mask builders: the public way to make a `BlockMask`.

    from sparse_attention.ops import masks
    m = masks.causal(4096, 4096, block_q=128, block_kv=128)
    m = masks.union(masks.sliding_window(4096, 4096, window=512), masks.from_layout(...))

Every builder costs O(Qb * Kb) at most (never O(S^2)) and can run inside
`jax.jit`. Builders whose tiles follow from static arguments alone (dense,
causal, sliding_window, chunked) lay them out on the host and get the exact
Kmax; builders that take arrays (from_layout, topk_blocks, the anchor offset
of window_with_anchors) run on device from traced values, with a Kmax fixed by
their static arguments, so a new mask of the same kind never recompiles.

Conventions: positions are absolute (query i is row i of q). A causal mask is
aligned top-left like `jax.nn.dot_product_attention(is_causal=True)`: key j is
visible to query i iff j <= i + offset. A window (left, right) lets query i see
keys i-left .. i+right, like `local_window_size` there.
"""

from __future__ import annotations

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

__all__ = [
  "BlockMask",
  "causal",
  "chunked",
  "dense",
  "from_element_mask",
  "from_layout",
  "intersection",
  "sliding_window",
  "topk_blocks",
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

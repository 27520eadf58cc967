"""`decode_attention`: a few new tokens against a KV cache, flash-decoding style.

Decoding attends 1-16 new queries per sequence to a cache of fixed capacity whose
fill level differs per batch row and changes every step (traced, so a jitted step
compiles once). Two things make it fast, and both are expressed as a `BlockMask`,
so every implementation of `block_sparse_attention` (xla, Triton, Mosaic GPU,
Mosaic TPU) runs it unchanged:

1. Only the filled tiles are visited: row b's queries sit at positions
   `lengths[b] .. lengths[b] + n - 1` and see keys up to their own position (and,
   with a window, no further back than `window`), so the kv tiles past the fill
   level (or before the window) are never listed. Work follows the fill, not the
   capacity.
2. The kv range is split (flash-decoding): with n queries a kernel's grid has one
   q-block row per (batch, head), far too few programs for a GPU. The queries are
   repeated `num_splits` times along the query axis, q-block row s listing the s-th
   contiguous share of the row's kv tiles, so the grid has `num_splits` times more
   programs; the shares' partial outputs are merged by their logsumexp.

The visibility inside partial tiles (causal, window, the fill level) is one
mask_mod predicate whose parameters are the fill levels, evaluated on partial tiles
only.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, element_masks
from sparse_attention.ops.block_mask import BlockMask, num_blocks
from sparse_attention.ops.block_sparse import block_sparse_attention

# Aim for about this many programs (batch x heads x splits) per kernel launch: two
# waves of an H100/H200 (132 SMs).
_TARGET_PROGRAMS = 264


@functools.lru_cache(maxsize=None)
def _visible(rows: int, window: int | None):
  """The element predicate of a split decode mask (cached: one static identity per
  (rows, window)). Query row q of the repeated queries is new token q % rows."""

  def visible(b, h, q_idx, kv_idx, lengths):
    del h
    position = lengths[b] + q_idx % rows
    seen = kv_idx <= position
    if window is not None:
      seen = seen & (kv_idx >= position - window)
    return seen

  return visible


def decode_mask(
  lengths: jax.Array,  # int32[batch]: tokens in the cache before the new ones
  q_len: int,
  capacity: int,
  *,
  num_splits: int = 1,
  window: int | None = None,
  block_kv: int = 128,
) -> BlockMask:
  """The BlockMask of `decode_attention`: queries repeated `num_splits` times.

  Query row `s * q_len + i` is new token i (position `lengths[b] + i`) in split s;
  split s lists the s-th of `num_splits` contiguous shares of the kv tiles that row
  b's new tokens see. Built arithmetically on device (no sort, no host callback), so
  it costs O(batch * kv tiles) per step.

  Returns:
    A BlockMask for q_len `num_splits * q_len` (block_q = q_len) and kv_len
    `capacity`, batch dim `batch`, head dim 1.
  """
  n, splits, bk = q_len, num_splits, block_kv
  kb = num_blocks(capacity, bk)
  first = lengths.astype(jnp.int32)  # [B] position of new token 0
  last = first + n - 1
  lo = jnp.zeros_like(first) if window is None else jnp.maximum(first - window, 0) // bk
  hi = jnp.minimum(last // bk, kb - 1)
  tiles = hi - lo + 1  # [B] tiles the new tokens see
  share = -(-tiles // splits)  # [B] tiles per split (the last split may get fewer)
  reach = kb if window is None else min(kb, (n + window - 1) // bk + 2)
  kmax = max(1, -(-reach // splits))

  s = jnp.arange(splits, dtype=jnp.int32)
  start = lo[:, None] + s * share[:, None]  # [B, S] first tile of each split
  count = jnp.clip(tiles[:, None] - s * share[:, None], 0, share[:, None])  # [B, S]
  slot = jnp.arange(kmax, dtype=jnp.int32)
  kv_index = start[..., None] + jnp.minimum(slot, jnp.maximum(count[..., None] - 1, 0))
  kv_index = jnp.minimum(kv_index, kb - 1)  # [B, S, Kmax]

  def partial(tile):  # tile int32[...] -> bool: some new token misses some key of it
    a = tile * bk  # first key
    e = jnp.minimum(a + bk, capacity) - 1  # last key
    missing = e > first.reshape(first.shape + (1,) * (tile.ndim - 1))
    if window is not None:
      missing |= a < last.reshape(last.shape + (1,) * (tile.ndim - 1)) - window
    return missing

  j = jnp.arange(kb, dtype=jnp.int32)[None]  # [1, Kb]
  kept = (j >= lo[:, None]) & (j <= hi[:, None])  # [B, Kb]
  owner = jnp.where(kept, (j - lo[:, None]) // jnp.maximum(share[:, None], 1), 0)
  return BlockMask(
    kv_count=count[:, None],
    kv_index=kv_index[:, None],
    kv_partial=partial(kv_index)[:, None],
    q_count=kept.astype(jnp.int32)[:, None],
    q_index=owner[:, None, :, None],
    q_partial=partial(jnp.broadcast_to(j, kept.shape))[:, None, :, None],
    block_q=n,
    block_kv=bk,
    q_len=splits * n,
    kv_len=capacity,
    mask_fn=element_masks.MaskMod(_visible(n, window), has_params=True),
    mask_params=(first,),
  )


def default_num_splits(batch: int, q_heads: int, capacity: int, block_kv: int, impl: str) -> int:
  """Kernel policy of flash-decoding: enough splits that batch x heads x splits fills
  about two waves of a GPU, never more than the cache has tiles; 1 for "xla" and
  "reference" (the xla engine already walks all kept tiles in parallel chunks)."""
  if impl in ("xla", "reference"):
    return 1
  wanted = -(-_TARGET_PROGRAMS // (batch * q_heads))
  return int(max(1, min(wanted, num_blocks(capacity, block_kv))))


def _merge(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Merges split partials by their logsumexp.

  out [B, S, n, H, Dv], lse [B, H, S, n] -> ([B, n, H, Dv] float32, [B, H, n])."""
  lse = jnp.moveaxis(lse, 2, 1)  # [B, S, H, n]
  top = jnp.max(lse, axis=1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top)  # [B, S, H, n]; empty splits weigh 0
  total = jnp.sum(w, axis=1)  # [B, H, n]
  w_out = jnp.swapaxes(w, 2, 3)[..., None]  # [B, S, n, H, 1]
  merged = jnp.sum(out.astype(jnp.float32) * w_out, axis=1)
  denom = jnp.swapaxes(total, 1, 2)[..., None]  # [B, n, H, 1]
  merged = jnp.where(denom > 0, merged / jnp.where(denom > 0, denom, 1.0), 0.0)
  lse_total = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top[:, 0], -jnp.inf)
  return merged, lse_total


def _check_lengths(lengths: Any, batch: int, n: int, capacity: int, op: str) -> jax.Array:
  if not hasattr(lengths, "shape") or tuple(lengths.shape) != (batch,):
    raise ValueError(
      f"{op}: lengths must be an int array [batch] = [{batch}] (tokens in the cache before "
      f"the new ones, per row), got shape {getattr(lengths, 'shape', lengths)!r}."
    )
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{op}: lengths must be integers, got dtype {lengths.dtype}.")
  checks.check_values_in_range(
    lengths, f"{op}: lengths", 0, capacity - n, closed=True, note=" (capacity - new tokens)"
  )
  return jnp.asarray(lengths, jnp.int32)


def decode_attention(
  q: jax.Array,  # [batch, n, q_heads, head_dim]: the n newest tokens' queries
  k_cache: jax.Array,  # [batch, capacity, kv_heads, head_dim], position t at row t
  v_cache: jax.Array,  # [batch, capacity, kv_heads, v_head_dim]
  lengths: jax.Array,  # int[batch]: tokens in the cache before the new ones
  *,
  window: int | None = None,
  scale: float | None = None,
  num_splits: int | None = None,
  block_kv: int = 128,
  implementation: str | None = None,
  interpret: bool = False,
  return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal attention of n new tokens to a left-aligned KV cache with per-row fill.

  The new tokens' keys and values must already be in the cache (rows `lengths[b]
  .. lengths[b] + n - 1`); new token i of row b sees keys `0 .. lengths[b] + i` (or,
  with `window`, keys `lengths[b] + i - window .. lengths[b] + i`). Rows past the fill
  level are never read. Equal to `block_sparse_attention` of the same queries with a
  causal mask offset by the fill level, for every implementation.

  Args:
    q, k_cache, v_cache: as `block_sparse_attention`'s q, k, v (GQA allowed), with
      q_len the number of new tokens and kv_len the cache capacity.
    lengths: int [batch] fill level before this step; may be traced (a new value
      never recompiles). Needs `lengths + n <= capacity`.
    window: sliding-window attention: keys back to position - window.
    scale: softmax scale, default head_dim ** -0.5.
    num_splits: how many shares the kv range is split into (flash-decoding);
      default `default_num_splits` (1 on the xla path).
    block_kv: kv tile size.
    implementation, interpret: as `block_sparse_attention`.
    return_lse: also return the logsumexp, float32 [batch, q_heads, n].

  Returns:
    [batch, n, q_heads, v_head_dim] in q's dtype (and the lse).
  """
  op = "decode_attention"
  shape = checks.check_qkv(q, k_cache, v_cache, op)
  b, n, hq, capacity = shape.batch, shape.q_len, shape.q_heads, shape.kv_len
  if n > capacity:
    raise ValueError(f"{op}: {n} new tokens do not fit a cache of capacity {capacity}.")
  lengths = _check_lengths(lengths, b, n, capacity, op)
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
    raise ValueError(f"{op}: window must be None or an int >= 0, got {window!r}.")
  if isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1:
    raise ValueError(f"{op}: block_kv must be an int >= 1, got {block_kv!r}.")
  if num_splits is None:
    impl = implementation or ("xla" if jax.default_backend() == "cpu" and not interpret else "")
    num_splits = default_num_splits(b, hq, capacity, block_kv, impl)
  if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"{op}: num_splits must be an int >= 1, got {num_splits!r}.")
  mask = decode_mask(
    lengths, n, capacity, num_splits=num_splits, window=window, block_kv=block_kv
  )
  repeated = jnp.tile(q, (1, num_splits, 1, 1))  # [B, S * n, Hq, D], split-major
  out, lse = block_sparse_attention(
    repeated, k_cache, v_cache, mask, scale=scale, implementation=implementation,
    interpret=interpret, return_lse=True,
  )  # fmt: skip
  if num_splits == 1:
    return (out, lse) if return_lse else out
  out = out.reshape(b, num_splits, n, hq, out.shape[-1])
  merged, lse = _merge(out, lse.reshape(b, hq, num_splits, n))
  merged = merged.astype(q.dtype)
  return (merged, lse) if return_lse else merged


__all__ = ["decode_attention", "decode_mask", "default_num_splits"]

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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, element_masks
from sparse_attention.ops.block_mask import BlockMask, num_blocks
from sparse_attention.ops.block_sparse import _resolve, block_sparse_attention
from sparse_attention.ops.reference import reference_attention
from sparse_attention.pallas_kernels.block_sparse.common import ScoreMod, online_softmax_update

# The xla path's keys per loop step (CPU: big enough that the matmuls dominate).
_XLA_CHUNK = 1024
# Aim for about this many programs (batch x heads x splits) per kernel launch: two
# waves of an H100/H200 (132 SMs).
_TARGET_PROGRAMS = 264


@functools.cache
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


@functools.cache
def _at_positions(mod: ScoreMod, rows: int) -> ScoreMod:
  """The user's score_mod seen from the repeated query rows: row q of batch row b is
  new token q % rows at position lengths[b] + q % rows (params: (user's, lengths))."""

  def shifted(score, b, h, q_idx, kv_idx, params):
    user, lengths = params
    return mod(score, b, h, lengths[b] + q_idx % rows, kv_idx, user)

  return ScoreMod(shifted, has_params=True)


def decode_mask(
  lengths: jax.Array,  # int32[batch]: tokens in the cache before the new ones
  q_len: int,
  capacity: int,
  *,
  num_splits: int = 1,
  window: int | None = None,
  block_q: int | None = None,
  block_kv: int = 128,
) -> BlockMask:
  """The BlockMask of `decode_attention`: queries repeated `num_splits` times.

  Query row `s * block_q + i` is new token i (position `lengths[b] + i`) in split s;
  split s lists the s-th of `num_splits` contiguous shares of the kv tiles that row
  b's new tokens see. Rows `q_len .. block_q - 1` of a split pad it to a block size a
  kernel takes (their outputs are discarded). Built arithmetically on device (no sort,
  no host callback): O(batch * kv tiles) per step.

  Returns:
    A BlockMask for q_len `num_splits * block_q` (block_q default q_len) and kv_len
    `capacity`, batch dim `batch`, head dim 1.
  """
  n, splits, bk = q_len, num_splits, block_kv
  rows = block_q or n
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
    block_q=rows,
    block_kv=bk,
    q_len=splits * rows,
    kv_len=capacity,
    mask_fn=element_masks.MaskMod(_visible(rows, window), has_params=True),
    mask_params=(first,),
  )


def default_num_splits(batch: int, q_heads: int, capacity: int, block_kv: int) -> int:
  """Kernel policy of flash-decoding: enough splits that batch x heads x splits fills
  about two waves of a GPU, never more than the cache has tiles."""
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


def _decode_xla(
  q: jax.Array,  # [B, n, Hq, D]
  k: jax.Array,  # [B, C, Hkv, D]
  v: jax.Array,  # [B, C, Hkv, Dv]
  lengths: jax.Array,  # int32[B]
  window: int | None,
  scale: float,
  chunk: int,
  score_mod: ScoreMod | None = None,
  score_mod_params: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """The xla path: the cache in chunks of `chunk` keys, each chunk no row needs
  skipped by `lax.cond` (so work follows the fill), the GQA group's queries stacked
  against one k/v chunk, merged by `common.online_softmax_update` (vmapped over batch
  and kv heads). A static trip count keeps it reverse-differentiable.

  Returns (out [B, n, Hq, Dv] in q's dtype, lse float32 [B, Hq, n])."""
  b, n, hq, d = q.shape
  capacity, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = hq // hkv
  rows = g * n  # query rows of a kv head: (group member, new token)
  qg = q.reshape(b, n, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
  qg = qg.astype(jnp.float32) * scale
  position = lengths[:, None] + jnp.tile(jnp.arange(n, dtype=jnp.int32), g)  # [B, rows]
  group = jnp.arange(rows, dtype=jnp.int32) // n
  head = jnp.arange(hkv, dtype=jnp.int32)[:, None] * g + group  # [Hkv, rows] query head
  first_key = 0 if window is None else jnp.maximum(jnp.min(lengths) - window, 0)
  last_key = jnp.max(lengths) + n - 1
  dot = lambda a, c: jnp.dot(a, c, preferred_element_type=jnp.float32)
  update = jax.vmap(jax.vmap(functools.partial(online_softmax_update, dot=dot)))

  def attend(start, carry):
    at = jnp.minimum(start, capacity - chunk)  # a clamped last slice re-reads older keys
    kc = jax.lax.dynamic_slice_in_dim(k, at, chunk, axis=1)  # [B, chunk, Hkv, D]
    vc = jax.lax.dynamic_slice_in_dim(v, at, chunk, axis=1)
    s = jnp.einsum("bhrd,bkhd->bhrk", qg, kc.astype(jnp.float32))  # [B, Hkv, rows, chunk]
    j = (at + jnp.arange(chunk, dtype=jnp.int32))[None, None, :]  # [1, 1, chunk]
    if score_mod is not None:  # (b, query head, position, key) broadcasting against s
      s = score_mod(
        s, jnp.arange(b)[:, None, None, None], head[None, :, :, None],
        position[:, None, :, None], j[..., None, :], score_mod_params,
      ).astype(jnp.float32)  # fmt: skip
    seen = (j >= start) & (j <= position[..., None])  # [B, rows, chunk]
    if window is not None:
      seen &= j >= position[..., None] - window
    s = jnp.where(seen[:, None], s, -jnp.inf)
    return update(s, *carry, jnp.swapaxes(vc, 1, 2).astype(jnp.float32))

  def step(c, carry):  # chunk c: keys c * chunk .. c * chunk + chunk - 1
    start = c * chunk
    needed = (start <= last_key) & (start + chunk > first_key)
    return jax.lax.cond(needed, functools.partial(attend, start), lambda carry: carry, carry)

  init = (
    jnp.full((b, hkv, rows), -jnp.inf, jnp.float32),
    jnp.zeros((b, hkv, rows), jnp.float32),
    jnp.zeros((b, hkv, rows, dv), jnp.float32),
  )
  m, l, acc = jax.lax.fori_loop(0, -(-capacity // chunk), step, init)
  out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  out = out.reshape(b, hkv, g, n, dv).transpose(0, 3, 1, 2, 4).reshape(b, n, hq, dv)
  return out.astype(q.dtype), lse.reshape(b, hq, n)


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
  score_mod: Callable | None = None,
  score_mod_params: Any = None,
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
    num_splits: kernels: how many shares the kv range is split into (flash-decoding);
      default `default_num_splits`. The xla path walks the cache in chunks of
      max(block_kv, 1024) keys, skipping the chunks no row needs.
    block_kv: kv tile size of the kernels' mask.
    implementation, interpret: as `block_sparse_attention`.
    return_lse: also return the logsumexp, float32 [batch, q_heads, n].
    score_mod, score_mod_params: as `block_sparse_attention`'s, with q_idx the new
      tokens' positions `lengths[b] + i` and kv_idx the cache rows, so a mod gives the
      same scores as in the full forward (ALiBi, relative biases, softcapping).

  Returns:
    [batch, n, q_heads, v_head_dim] in q's dtype (and the lse).
  """
  op = "decode_attention"
  shape = checks.check_qkv(q, k_cache, v_cache, op)
  b, n, hq, capacity = shape.batch, shape.q_len, shape.q_heads, shape.kv_len
  if n > capacity:
    raise ValueError(f"{op}: {n} new tokens do not fit a cache of capacity {capacity}.")
  lengths = _check_lengths(lengths, b, n, capacity, op)
  scale = checks.check_scale(scale, shape, op)
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
    raise ValueError(f"{op}: window must be None or an int >= 0, got {window!r}.")
  if isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1:
    raise ValueError(f"{op}: block_kv must be an int >= 1, got {block_kv!r}.")
  if num_splits is not None and (
    isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
  ):
    raise ValueError(f"{op}: num_splits must be None or an int >= 1, got {num_splits!r}.")
  mod = checks.check_score_mod(score_mod, score_mod_params, op)
  shifted = lambda rows: None if mod is None else _at_positions(mod, rows)
  mod_params = lambda: None if mod is None else (score_mod_params, lengths)
  if implementation == "reference":
    visible = _visible(n, window)
    j = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    i = jnp.arange(n, dtype=jnp.int32)[None, None, :, None]
    dense = visible(jnp.arange(b)[:, None, None, None], 0, i, j, lengths)  # [B, 1, n, C]
    out, lse = reference_attention(
      q, k_cache, v_cache, mask=dense, scale=scale, return_lse=True, score_mod=shifted(n),
      score_mod_params=mod_params(),
    )  # fmt: skip
    return _finish(out, lse, return_lse)
  impl, rows = "xla", n
  if implementation != "xla" and (implementation is not None or interpret or not _on_cpu()):

    def resolve_at(rows: int) -> str:
      mask = decode_mask(  # two splits: the kernels see a sequence of several q blocks
        lengths, n, capacity, num_splits=2, window=window, block_q=rows, block_kv=block_kv
      )
      padded = jnp.zeros((b, 2 * rows) + q.shape[2:], q.dtype)
      return _resolve(
        implementation, interpret, padded, k_cache, v_cache, mask, op, None, shifted(rows),
        mod_params(),
      )  # fmt: skip

    impl, rows = pick_kernel(implementation, interpret, n, resolve_at)
  if impl == "xla":
    chunk = min(capacity, max(block_kv, _XLA_CHUNK))
    out, lse = _decode_xla(
      q, k_cache, v_cache, lengths, window, scale, chunk, mod, score_mod_params
    )
    return _finish(out, lse, return_lse)
  splits = num_splits or default_num_splits(b, hq, capacity, block_kv)
  mask = decode_mask(
    lengths, n, capacity, num_splits=splits, window=window, block_q=rows, block_kv=block_kv
  )
  padded = jnp.pad(q, ((0, 0), (0, rows - n), (0, 0), (0, 0)))
  out, lse = block_sparse_attention(
    jnp.tile(padded, (1, splits, 1, 1)),
    k_cache,
    v_cache,
    mask,
    scale=scale,
    implementation=impl,
    interpret=interpret,
    return_lse=True,
    score_mod=shifted(rows),
    score_mod_params=mod_params(),
  )  # fmt: skip  [B, S * rows, Hq, Dv], [B, Hq, S * rows]
  out = out.reshape(b, splits, rows, hq, -1)[:, :, :n]
  lse = lse.reshape(b, hq, splits, rows)[..., :n]
  return _finish(*_merge(out, lse), return_lse, dtype=q.dtype)


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _finish(out, lse, return_lse: bool, dtype=None):
  out = out if dtype is None else out.astype(dtype)
  return (out, lse) if return_lse else out


def pick_kernel(
  implementation: Any, interpret: bool, n: int, resolve_at: Callable[[int], str]
) -> tuple[str, int]:
  """(implementation, rows): the first query-block height a kernel takes for n new
  tokens (padded to 8, 16, 64 or 128 rows, the kernels' block sizes), else ("xla", n).

  `resolve_at(rows)` resolves the implementation for queries padded to `rows` (raising
  ValueError when an explicitly named kernel refuses that height)."""
  heights = sorted({n, -(-n // 8) * 8, max(16, 1 << (n - 1).bit_length()), max(n, 64), max(n, 128)})
  for i, rows in enumerate(heights):
    try:
      impl = resolve_at(rows)
    except ValueError:  # an explicitly named kernel refused this height
      if i == len(heights) - 1:
        raise
      continue
    if impl != "xla":
      return impl, rows
  return "xla", n


__all__ = ["decode_attention", "decode_mask", "default_num_splits"]

"""`moba_attention`: MoBA (Mixture of Block Attention, Moonshot AI, 2025).

The specification is docs/moba.md (semantics, layout, packed sequences, block ids,
implementations, the routed engine's cost model). In short, with Moonshot's
`moba_attn_varlen_naive` as the reference: the keys are cut into chunks of
`chunk_size`; each query keeps its own chunk plus the `topk - 1` earlier chunks whose
mean key gates highest (q . kbar in float32, unscaled, ties to the older chunk; no
gradient through the gate), and attends, in one softmax, causally to the kept keys.
q `[B, Lq, Hq, D]` are the last Lq positions of k / v `[B, Lk, Hkv, D|Dv]`;
`segment_ids` `[B, Lk]` pack several sequences per row, which neither gating nor
attention crosses.

Every implementation takes the selection from `moba_selection` (`_select`): the
semantics live there. "reference" expands it to a dense mask; "xla" and the Pallas
kernels run it as token routes on the block-sparse engine; "xla_chunked"
(`ops/_moba_chunked.py`) runs MoBA's chunk-major schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparse_attention.ops import checks, dispatch, element_masks
from sparse_attention.ops._moba_chunked import moba_chunked
from sparse_attention.ops.block_mask import BlockMask, classify_tiles, from_block_layout
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.reference import reference_attention
from sparse_attention.pallas_kernels.block_sparse import common, gpu, mosaic_gpu, tpu

_OP = "moba_attention"
_HIGHEST = jax.lax.Precision.HIGHEST
# Queries per tile of the gate computation: a tile's queries span at most
# _GATE_TILE consecutive chunk ids, so each tile multiplies against a window of
# nb - 1 + _GATE_TILE - 1 gate keys (16: about 2x the strictly needed gate work,
# negligible next to the attention).
_GATE_TILE = 16
# xla_chunked: query rows per (kv chunk, rows) tile, and score elements per loop
# step (2**20 f32 scores, 4 MiB: cache-sized temporaries on CPU).
_TILE_ROWS = 128
_STEP_SCORES = 1 << 20


# ---------------------------------------------------------------------------
# Chunks and selection: the semantics, shared by every implementation.
# ---------------------------------------------------------------------------


def num_chunks(kv_len: int, chunk_size: int, segmented: bool) -> int:
  """Static upper bound (exclusive) of the chunk ids of a row of kv_len keys."""
  return kv_len if segmented else -(-kv_len // chunk_size)


def _chunking(
  segment_ids: jax.Array | None, kv_len: int, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
  """(chunk id, id of the segment's first chunk), int32 `[B|1, kv_len]` each."""
  pos = jnp.arange(kv_len, dtype=jnp.int32)
  if segment_ids is None:
    ids = (pos // chunk_size)[None]
    return ids, jnp.zeros_like(ids)
  seg = segment_ids.astype(jnp.int32)  # [batch, kv_len]
  starts = jnp.concatenate(
    [jnp.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1
  )
  seg_start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)  # segment's first position
  new_chunk = (pos - seg_start) % chunk_size == 0
  ids = jnp.cumsum(new_chunk, axis=1, dtype=jnp.int32) - 1
  first = jax.lax.cummax(jnp.where(starts, ids, 0), axis=1)
  return ids, first


def chunk_ids(segment_ids: jax.Array | None, kv_len: int, chunk_size: int) -> jax.Array:
  """The absolute chunk id of every key position, int32 `[B|1, kv_len]`.

  Without segments: `pos // chunk_size` (batch dim 1). With segment_ids
  `[B, kv_len]`: chunks restart at every segment start (a position whose id
  differs from its predecessor's) and are numbered consecutively along the row,
  so ids ascend with position and each chunk is a contiguous run of at most
  chunk_size positions inside one segment. Ids are < `num_chunks(kv_len,
  chunk_size, segmented=segment_ids is not None)`.
  """
  return _chunking(segment_ids, kv_len, chunk_size)[0]


def _gate_keys(k: jax.Array, ids: jax.Array, nc: int) -> jax.Array:
  """The mean key of every chunk, float32 `[B, nc, Hkv, D]` (0 for unused ids)."""
  b, lk = k.shape[:2]
  ids = jnp.broadcast_to(ids, (b, lk))
  rows = jnp.arange(b)[:, None]
  sums = jnp.zeros((b, nc) + k.shape[2:], jnp.float32).at[rows, ids].add(k.astype(jnp.float32))
  counts = jnp.zeros((b, nc), jnp.float32).at[rows, ids].add(1.0)
  mean = sums / jnp.maximum(counts, 1.0)[:, :, None, None]
  # The reference averages in k's dtype (`k.mean()`), then gates in float32.
  return mean.astype(k.dtype).astype(jnp.float32)


def _past_gates(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  kbar: jax.Array,  # [batch, nc, kv_heads, head_dim] f32
  q_ids: jax.Array,  # [batch, q_len] int32
  num_past: int,
) -> jax.Array:
  """gate[b, h, t, r] = q_t . kbar[id(t) - num_past + r], f32 `[B, Hq, Lq, num_past]`.

  Candidates r are the num_past chunks before the query's own chunk (ids below
  0 read zero keys; the caller masks them). Queries are tiled by _GATE_TILE:
  ids ascend by at most one per position, so a tile starting at chunk c0 needs
  only the gate keys c0 - num_past .. c0 + tile - 2, one matmul per tile.
  """
  b, lq, hq, d = q.shape
  hkv = kbar.shape[2]
  g = hq // hkv
  tile = min(_GATE_TILE, lq)
  n_tiles = -(-lq // tile)
  pad = n_tiles * tile - lq
  width = num_past + tile - 1
  qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  qf = qf.reshape(b, n_tiles, tile, hkv, g, d)
  ids = jnp.pad(q_ids, ((0, 0), (0, pad)), mode="edge").reshape(b, n_tiles, tile)
  c0 = ids[:, :, 0]  # [batch, n_tiles]
  # kbar_pad[i] = kbar[i - num_past]: window w of a tile is chunk c0 - num_past + w.
  kbar_pad = jnp.pad(kbar, ((0, 0), (num_past, tile), (0, 0), (0, 0)))
  win = c0[:, :, None] + jnp.arange(width, dtype=jnp.int32)  # [batch, n_tiles, width]
  kwin = kbar_pad[jnp.arange(b)[:, None, None], win]  # [batch, n_tiles, width, Hkv, D]
  gate = jnp.einsum("bntkgd,bnwkd->bkgntw", qf, kwin, precision=_HIGHEST)
  # Query t's candidates r sit at window position (id(t) - c0) + r.
  idx = (ids - c0[:, :, None])[..., None] + jnp.arange(num_past, dtype=jnp.int32)
  gate = jnp.take_along_axis(gate, idx[:, None, None], axis=-1)  # [b, hkv, g, nt, tile, P]
  return gate.reshape(b, hq, n_tiles * tile, num_past)[:, :, :lq]


@functools.partial(jax.jit, static_argnames=("chunk_size", "topk"))
def _select(q, k, chunk_size, topk, segment_ids):
  """(block_ids, valid, key chunk ids [B|1, Lk]); inputs validated."""
  lq, lk = q.shape[1], k.shape[1]
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  ids, first = _chunking(segment_ids, lk, chunk_size)
  nc = num_chunks(lk, chunk_size, segment_ids is not None)
  b, hq = q.shape[0], q.shape[2]
  q_ids = jnp.broadcast_to(ids[:, lk - lq :], (b, lq))  # [batch, q_len]
  q_first = jnp.broadcast_to(first[:, lk - lq :], (b, lq))
  own = jnp.broadcast_to(q_ids[:, None, :, None], (b, hq, lq, 1))
  # Candidates: the nb - 1 chunks before the own one (a segment has at most nb
  # chunks); valid if inside the query's segment.
  num_past = -(-lk // chunk_size) - 1
  kk = min(topk - 1, num_past)
  if kk > 0:
    gate = _past_gates(q, _gate_keys(k, ids, nc), q_ids, num_past)  # [b, hq, lq, P]
    local = (q_ids - q_first)[:, None, :, None]  # own chunk's index in its segment
    r = jnp.arange(num_past, dtype=jnp.int32)
    gate = jnp.where(r >= num_past - local, gate, -jnp.inf)
    # lax.top_k returns equal values lowest index first: ties go to older blocks.
    _, r_sel = jax.lax.top_k(gate, kk)  # [b, hq, lq, kk]
    ok = r_sel >= num_past - local
    past = own - num_past + r_sel
    big = jnp.iinfo(jnp.int32).max
    keys = jnp.sort(jnp.concatenate([jnp.where(ok, past, big), own], axis=-1), axis=-1)
    valid = keys != big
    block_ids = jnp.where(valid, keys, own)  # padding repeats the last valid id (own)
  else:
    block_ids, valid = own, jnp.ones_like(own, dtype=bool)
  if block_ids.shape[-1] < topk:  # topk > nb: pad
    extra = topk - block_ids.shape[-1]
    block_ids = jnp.concatenate([block_ids, jnp.broadcast_to(own, own.shape[:3] + (extra,))], -1)
    valid = jnp.concatenate([valid, jnp.zeros(own.shape[:3] + (extra,), bool)], -1)
  return block_ids.astype(jnp.int32), valid, ids


def moba_selection(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  *,
  chunk_size: int,
  topk: int,
  segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The key blocks each query keeps under MoBA's gate (see the module docstring).

  Args:
    q: `[batch, q_len, q_heads, head_dim]`, the last q_len positions.
    k: `[batch, kv_len, kv_heads, head_dim]`; kv heads divide q heads.
    chunk_size: C, keys per block (>= 1).
    topk: blocks kept per query, the own block included (>= 1).
    segment_ids: optional integer `[batch, kv_len]` (see `chunk_ids`).

  Returns:
    `(block_ids, valid)`, int32 and bool `[batch, q_heads, q_len, topk]`: the
    kept absolute chunk ids (`chunk_ids`) in ascending order, the own block
    last among the valid ones; padding slots (valid False, when fewer than topk
    blocks are visible) repeat the last valid id. No gradient (discrete).

  Raises:
    ValueError: on bad shapes, dtypes or arguments, naming the argument.
  """
  op = "moba_selection"
  shape = checks.check_qkv(q, k, k, op)
  _check_moba_args(shape, chunk_size, topk, segment_ids, op)
  block_ids, valid, _ = _select(q, k, chunk_size, topk, segment_ids)
  return block_ids, valid


def _check_moba_args(shape: checks.AttentionShape, chunk_size, topk, segment_ids, op: str):
  for name, x in (("chunk_size", chunk_size), ("topk", topk)):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
      raise ValueError(f"{op}: {name} must be a Python int >= 1, got {x!r}.")
  if shape.q_len > shape.kv_len:
    raise ValueError(
      f"{op}: q_len ({shape.q_len}) must be <= kv_len ({shape.kv_len}): the queries are "
      "the last q_len positions of the sequence."
    )
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
      raise ValueError(
        f"{op}: segment_ids must be an integer array or None, got {type(segment_ids).__name__}."
      )
    if tuple(segment_ids.shape) != (shape.batch, shape.kv_len):
      raise ValueError(
        f"{op}: segment_ids must have shape [batch, kv_len] = ({shape.batch}, "
        f"{shape.kv_len}), got {tuple(segment_ids.shape)}."
      )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"{op}: segment_ids must be integer (int32), got {segment_ids.dtype}.")


# ---------------------------------------------------------------------------
# "reference": the kept blocks as a dense boolean mask.
# ---------------------------------------------------------------------------


_STATIC = ("chunk_size", "topk", "scale", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _moba_reference(q, k, v, *, chunk_size, topk, segment_ids, scale, interpret):
  del interpret
  lq, lk = q.shape[1], k.shape[1]
  block_ids, valid, ids = _select(q, k, chunk_size, topk, segment_ids)
  key_ids = ids[:, None, None, :]  # [batch|1, 1, 1, kv_len]
  mask = jnp.zeros(block_ids.shape[:3] + (lk,), bool)  # [batch, q_heads, q_len, kv_len]
  for s in range(topk):
    mask |= valid[..., s, None] & (block_ids[..., s, None] == key_ids)
  q_pos = lk - lq + jnp.arange(lq)
  mask &= jnp.arange(lk)[None, :] <= q_pos[:, None]  # causal (inside the own block)
  return reference_attention(q, k, v, mask=mask, scale=scale, return_lse=True)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _moba_xla_chunked(q, k, v, *, chunk_size, topk, segment_ids, scale, interpret):
  """MoBA on its chunk-major XLA schedule (`_moba_chunked`); `(out, lse)`."""
  del interpret
  block_ids, valid, ids = _select(q, k, chunk_size, topk, segment_ids)
  return moba_chunked(
    q, k, v, block_ids, valid, ids,
    chunk_size=chunk_size,
    num_chunks=num_chunks(k.shape[1], chunk_size, segment_ids is not None),
    scale=scale,
    tile_rows=_TILE_ROWS,
    step_scores=_STEP_SCORES,
  )  # fmt: skip


# ---------------------------------------------------------------------------
# "xla" and "pallas": the routed block-sparse engine and kernels.
# ---------------------------------------------------------------------------

# Default tile sizes of the routed paths (clipped to the lengths, see _block_sizes).
_BLOCK_Q = 64
_BLOCK_KV = 64


def _block_sizes(
  kernel: str, q_len: int, kv_len: int, block_q: int | None, block_kv: int | None
) -> tuple[int, int]:
  """(block_q, block_kv): the user's, else 64 clipped to the lengths in the kernel's
  granularity (Triton: powers of two >= 16; TPU: multiples of 8; Mosaic GPU: 64, its
  smallest tile)."""

  def pick(user: int | None, default: int, length: int) -> int:
    if user is not None:
      return user
    if kernel == "xla":  # any size
      return min(default, length)
    if kernel == "pallas_mosaic_gpu":
      return default
    if kernel == "pallas_triton":
      return max(gpu.MIN_BLOCK, min(default, pl.next_power_of_2(length)))
    return min(default, -(-length // tpu.SUBLANES) * tpu.SUBLANES)

  return pick(block_q, _BLOCK_Q, q_len), pick(block_kv, _BLOCK_KV, kv_len)


def _max_kv_blocks(
  q_len: int, kv_len: int, chunk_size: int, topk: int, block_q: int, block_kv: int
) -> int:
  """A static bound on the kv tiles one q tile visits (the BlockMask's Kmax).

  A q tile's bq queries span bq consecutive positions; their own chunks (causal)
  lie in the bq + C - 1 positions ending at the tile's last query: at most
  (bq + C - 2) // bk + 2 tiles. Each of the at most bq * (topk - 1) other
  chunks is <= C consecutive keys: (C - 1) // bk + 2 tiles. Never more than the
  causal row holds.
  """
  any_, _ = classify_tiles(
    element_masks.Band(None, kv_len - q_len), q_len, kv_len, block_q, block_kv
  )
  causal_max = max(1, int(any_.sum(-1).max()))
  own = (block_q + chunk_size - 2) // block_kv + 2
  past = block_q * (topk - 1) * ((chunk_size - 1) // block_kv + 2)
  return min(causal_max, own + past)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """The static facts of the BlockMask a Pallas call will build: what the kernels'
  `check_supported` reads, so an unsupported call is refused before any work."""

  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  batch: int
  heads: int
  max_kv_blocks: int
  mask_fn = None  # the causal band: a position predicate, never a mask_mod

  def _spec(self, *shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.batch, self.heads, *shape), jnp.int32)

  @property
  def kv_count(self) -> jax.ShapeDtypeStruct:
    return self._spec(-(-self.q_len // self.block_q))

  @property
  def kv_index(self) -> jax.ShapeDtypeStruct:
    return self._spec(-(-self.q_len // self.block_q), self.max_kv_blocks)

  @property
  def q_count(self) -> jax.ShapeDtypeStruct:
    return self._spec(-(-self.kv_len // self.block_kv))

  @property
  def q_index(self) -> jax.ShapeDtypeStruct:
    qb = -(-self.q_len // self.block_q)
    return self._spec(-(-self.kv_len // self.block_kv), qb)


def _pallas_geometry(kernel, q, k, chunk_size, topk, block_q, block_kv) -> _Geometry:
  """The tiles of a Pallas call (`_check_kernel` checks them against the kernel)."""
  b, lq, hq, _ = q.shape
  lk = k.shape[1]
  bq, bk = _block_sizes(kernel, lq, lk, block_q, block_kv)
  kmax = _max_kv_blocks(lq, lk, chunk_size, topk, bq, bk)
  return _Geometry(bq, bk, lq, lk, b, hq, kmax)


def _check_kernel(kernel: str, geo: _Geometry, q, k, v) -> None:
  """Raises `common.Unsupported` if `kernel` cannot take the call (dispatch reports it)."""
  checks = {
    "pallas_mosaic_gpu": mosaic_gpu.check_supported,
    "pallas_triton": gpu.check_supported,
    "pallas_tpu": tpu.check_supported,
  }
  checks[kernel](q, k, v, geo)


def _visited_tiles(
  block_ids: jax.Array,  # int32 [B, Hq, Lq, topk]
  valid: jax.Array,  # bool [B, Hq, Lq, topk]
  ids: jax.Array,  # int32 [B|1, Lk]: chunk id of each key
  *,
  chunk_size: int,
  segmented: bool,
  geo: _Geometry,
) -> jax.Array:  # bool [B, Hq, Qb, Kb]
  """Tiles holding a key of a chunk that some query of the q tile selected.

  Every selected chunk is a run of keys [first, last], i.e. the kv tiles
  first // bk .. last // bk; the union over a q tile's queries is a difference
  array (+1 at the first tile, -1 after the last, scatter-added per selection)
  and a cumulative sum over the kv tiles: O(B * Hq * Lq * topk) updates into
  O(B * Hq * Qb * Kb), never anything Lq x Lk.
  """
  b, hq, lq, _ = block_ids.shape
  lk, bk = geo.kv_len, geo.block_kv
  qb, kb = -(-lq // geo.block_q), -(-lk // bk)
  if segmented:  # chunks restart at segment starts: look their ends up
    nc = num_chunks(lk, chunk_size, True)
    rows = jnp.arange(ids.shape[0])[:, None]
    pos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), ids.shape)
    first = jnp.full((ids.shape[0], nc), lk, jnp.int32).at[rows, ids].min(pos)
    last = jnp.zeros((ids.shape[0], nc), jnp.int32).at[rows, ids].max(pos)
    row = jnp.arange(b)[:, None, None, None] % ids.shape[0]
    lo, hi = first[row, block_ids] // bk, last[row, block_ids] // bk
  else:
    lo = block_ids * chunk_size // bk
    hi = (jnp.minimum((block_ids + 1) * chunk_size, lk) - 1) // bk
  weight = valid.astype(jnp.int32)  # padding slots add nothing
  bi = jnp.arange(b)[:, None, None, None]
  hi_ = jnp.arange(hq)[None, :, None, None]
  qt = (jnp.arange(lq, dtype=jnp.int32) // geo.block_q)[None, None, :, None]
  diff = jnp.zeros((b, hq, qb, kb + 1), jnp.int32)
  diff = diff.at[bi, hi_, qt, lo].add(weight).at[bi, hi_, qt, hi + 1].add(-weight)
  return jnp.cumsum(diff[..., :kb], axis=-1) > 0


def _pallas_inputs(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  *,
  chunk_size: int,
  topk: int,
  segment_ids: jax.Array | None,
  geo: _Geometry,
) -> tuple[BlockMask, common.TokenRoutes]:
  """The BlockMask (tiles to visit) and TokenRoutes (pairs inside them) that run
  MoBA on the routed block-sparse kernels. No gradient (discrete)."""
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  block_ids, valid, ids = _select(q, k, chunk_size, topk, segment_ids)
  visited = _visited_tiles(
    block_ids, valid, ids, chunk_size=chunk_size, segmented=segment_ids is not None, geo=geo
  )
  # Intersected with the causal mask (the queries are the last Lq positions:
  # offset Lk - Lq): tiles wholly in the future go, tiles wholly in the past
  # are full, and the causal element mask runs on the diagonal tiles only.
  band = element_masks.Band(None, lk - lq)
  any_, all_ = classify_tiles(band, lq, lk, geo.block_q, geo.block_kv)
  mask = from_block_layout(
    visited & any_,
    all_,
    block_q=geo.block_q,
    block_kv=geo.block_kv,
    q_len=lq,
    kv_len=lk,
    mask_fn=band,
    mask_fn_exact=False,
    max_kv_blocks=geo.max_kv_blocks,
    max_q_blocks=-(-lq // geo.block_q),
  )
  routes = common.TokenRoutes(
    query=jnp.where(valid, block_ids, -1),  # [B, Hq, Lq, topk], -1: padding
    key=jnp.broadcast_to(ids, (b, lk)),  # [B, Lk]: each key's chunk id
  )
  return mask, routes


_ROUTED_STATIC = ("chunk_size", "topk", "scale", "interpret", "kernel", "geo")


@functools.partial(jax.jit, static_argnames=_ROUTED_STATIC)
def _moba_routed(q, k, v, *, chunk_size, topk, segment_ids, scale, interpret, kernel, geo):
  """MoBA through `block_sparse_attention(implementation=kernel)` ("xla", the XLA
  engine, or a kernel) with the selection's tiles and token routes; `(out, lse)`.

  Gradients come from that implementation's custom_vjp; the mask and routes are
  integer metadata without cotangents.
  """
  mask, routes = _pallas_inputs(
    q, k, chunk_size=chunk_size, topk=topk, segment_ids=segment_ids, geo=geo
  )
  return block_sparse_attention(
    q,
    k,
    v,
    mask,
    scale=scale,
    implementation=kernel,
    interpret=interpret,
    routes=routes,
    return_lse=True,
  )


# ---------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------

# implementation name -> fn(q, k, v, *, chunk_size, topk, segment_ids, scale,
# interpret) -> (out, lse); "xla" and the kernels go through `_moba_routed`.
_IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
  "reference": _moba_reference,
  "xla_chunked": _moba_xla_chunked,
}
IMPLEMENTATIONS = ("reference", "xla", "xla_chunked", "pallas", *dispatch.KERNELS)


def _check_block(name: str, value: Any) -> None:
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
  ):
    raise ValueError(f"{_OP}: {name} must be None or a Python int >= 1, got {value!r}.")


def _resolve(implementation: Any, interpret: bool, q, k, v, chunk_size, topk, block_q, block_kv):
  """(implementation to run, its tile geometry or None for "reference"/"xla")."""
  geometry = lambda kernel: _pallas_geometry(kernel, q, k, chunk_size, topk, block_q, block_kv)
  impl = dispatch.resolve(
    implementation,
    interpret=interpret,
    op=_OP,
    implementations=IMPLEMENTATIONS,
    check=lambda kernel: _check_kernel(kernel, geometry(kernel), q, k, v),
  )
  return (impl, geometry(impl)) if impl in dispatch.KERNELS else (impl, None)


def moba_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  *,
  chunk_size: int,
  topk: int,
  segment_ids: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  interpret: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """MoBA attention: each query attends to its own chunk (causal) and the
  topk - 1 past chunks whose mean key scores highest against it.

  Args:
    q: `[batch, q_len, q_heads, head_dim]`: the LAST q_len positions of the
      sequence (q_len == kv_len for training; fewer when decoding with a cache).
    k: `[batch, kv_len, kv_heads, head_dim]`; kv heads divide q heads (GQA:
      q head h reads kv head h // (q_heads // kv_heads)).
    v: `[batch, kv_len, kv_heads, v_head_dim]`; v_head_dim may differ.
      q, k, v share one dtype: float32, bfloat16 or float16.
    chunk_size: C, keys per block (>= 1; need not divide kv_len).
    topk: blocks kept per query, the own block included (>= 1).
    segment_ids: optional integer `[batch, kv_len]` for packed sequences (the
      queries use the last q_len entries); each run of equal ids is its own
      sequence. See the module docstring.
    scale: softmax scale, default `head_dim ** -0.5` (the gate is unscaled).
    implementation: None: on GPU / TPU the backend's Pallas kernel when it
      supports the call, else "xla_chunked" (always on CPU). "reference" (dense
      boolean mask + `reference_attention`, float32, O(Lq * Lk) memory); "xla"
      (the block-sparse XLA engine over the routed tiles, as the kernels);
      "xla_chunked" (exact, memory O(Lq * topk * (C + Dv)) per head, work
      proportional to the kept keys); "pallas" (the backend's kernel; on CPU
      only with interpret=True, which interprets the Triton kernel); "pallas_triton" / "pallas_tpu"
      (that kernel on any backend, with interpret=True off its hardware). The
      Pallas paths visit whole tiles; see the module docstring for their cost.
    return_lse: also return the natural-log logsumexp, float32
      `[batch, q_heads, q_len]`.
    interpret: run a Pallas kernel in the interpreter (tests, CPU); ignored by
      "reference", "xla" and "xla_chunked".
    block_q, block_kv: tile sizes of the routed paths (default 64 each, clipped
      to the lengths: Triton needs powers of two >= 16, the TPU kernel multiples
      of 8 unless one block covers the sequence); ignored by "reference" and
      "xla_chunked".

  Returns:
    `[batch, q_len, q_heads, v_head_dim]` in q's dtype (and the lse).
    Differentiable in q, k, v; the block selection gets no gradient.

  Raises:
    ValueError: on bad shapes, dtypes, arguments or implementation (or tile
      sizes a requested kernel does not support), naming the argument, before
      anything is computed.
  """
  shape = checks.check_qkv(q, k, v, _OP)
  _check_moba_args(shape, chunk_size, topk, segment_ids, _OP)
  scale = checks.check_scale(scale, shape, _OP)
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  chunk_size, topk = int(chunk_size), int(topk)
  block_q = None if block_q is None else int(block_q)
  block_kv = None if block_kv is None else int(block_kv)
  impl, geo = _resolve(implementation, interpret, q, k, v, chunk_size, topk, block_q, block_kv)
  if implementation is None and impl == "xla":
    impl = "xla_chunked"  # the faster XLA schedule (see _moba_chunked)
  kw = dict(
    chunk_size=chunk_size, topk=topk, segment_ids=segment_ids, scale=scale, interpret=interpret
  )
  if impl in _IMPLEMENTATIONS:
    out, lse = _IMPLEMENTATIONS[impl](q, k, v, **kw)
  else:
    geo = geo or _pallas_geometry(impl, q, k, chunk_size, topk, block_q, block_kv)
    out, lse = _moba_routed(q, k, v, kernel=impl, geo=geo, **kw)
  return (out, lse) if return_lse else out


__all__ = [
  "IMPLEMENTATIONS",
  "chunk_ids",
  "moba_attention",
  "moba_selection",
  "num_chunks",
]

"""`nsa_attention`: Native Sparse Attention (NSA, arXiv 2502.11089), given projected inputs.

Each query attends through three causal branches, each with its own softmax, mixed by
per-head gates: compressed blocks (k_cmp, v_cmp: blocks [c*stride, c*stride + block_len)
entirely in the past), the top-n selected blocks of select_len keys (chosen by
`nsa_selection` from the compression probabilities, shared by a GQA group, the initial
and two local blocks forced) and a sliding window of the last `window` keys. Layout
`[batch, seq, heads, head_dim]`; the queries are the last q_len of the kv_len positions.
Packed sequences (`segment_ids`) keep every branch inside the query's segment run and
restart both block grids at each run start (k_cmp / v_cmp laid out by
`compressed_slots`, made by `compressed_blocks` + phi or `compress_mean`), so a packed
segment computes exactly what it computes alone.

Implementations: "reference" (dense masks, the float32 oracle), "xla" (every branch one
call of the block-sparse XLA engine, the CPU default) and the Pallas kernels (every
branch one routed `block_sparse_attention` call). The exact semantics (block geometry,
overlap mapping, forced blocks, ties, packed sequences) and each implementation's masks,
routes and tiles are specified in docs/nsa.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import checks, dispatch, element_masks, masks
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.block_sparse_xla import block_sparse_attention_xla
from sparse_attention.ops.reference import reference_attention
from sparse_attention.pallas_kernels.block_sparse import gpu, mosaic_gpu, tpu
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes, Unsupported

__all__ = [
  "IMPLEMENTATIONS",
  "CompressedSlots",
  "compress_mean",
  "compressed_blocks",
  "compressed_slots",
  "nsa_attention",
  "nsa_selection",
  "num_compressed_blocks",
]

_OP = "nsa_attention"
_HIGHEST = jax.lax.Precision.HIGHEST
# Work per loop step of the selection (`nsa_selection`), in float32 compression scores:
# 2**20 (4 MiB) keep a step's temporaries near the cache on CPU (measured at L=4096,
# 2**18..2**22 were within 2x, 2**20 the fastest).
_CHUNK_ELEMENTS = 1 << 20
# Scores per loop step of the xla path's engine calls (the `chunk` of
# block_sparse_attention_xla, whose own default is 2**20): 2**18, 32 tiles of
# [32 * G, 64] at G = 4. Measured on CPU at L=4096, G=4: against 2**20, fwd+bwd CPU time
# -12% (selection branch), -13% (window), -28% (compression), forward within noise; the
# backward's per-step temporaries (q, dO, s, p, dp, ds tiles) outgrow the cache first.
_XLA_STEP_SCORES = 1 << 18
# Queries per tile of the xla path (a selection tile is [bq * G, l'] scores; a query
# block visits the union of its queries' selections). Measured on CPU at L=4096, G=4
# (the former selection loop): 32 beat 4, 8, 16 and 64 (fwd and fwd+bwd).
_SLC_BLOCK_Q = 32


# ---------------------------------------------------------------------------- helpers


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(op: str, name: str, value: Any, minimum: int) -> int:
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def _check_array(op: str, name: str, x: Any, rank: int, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{op}: {name} must be an array {layout}, got {type(x).__name__}.")
  if x.ndim != rank:
    raise ValueError(f"{op}: {name} must have rank {rank}, {layout}, got shape {tuple(x.shape)}.")
  if not any(x.dtype == d for d in checks.SUPPORTED_DTYPES):
    raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16.")


def _check_compression(op: str, block_len: Any, stride: Any) -> tuple[int, int]:
  block_len = _check_int(op, "block_len", block_len, 1)
  stride = _check_int(op, "stride", stride, 1)
  if stride > block_len:
    raise ValueError(
      f"{op}: stride ({stride}) must be <= block_len ({block_len}): compressed blocks "
      "must leave no key uncovered."
    )
  return block_len, stride


def _check_segment_ids(op: str, segment_ids: Any, batch: int, kv_len: int) -> None:
  if segment_ids is None:
    return
  layout = f"[batch, kv_len] = ({batch}, {kv_len})"
  if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
    raise ValueError(
      f"{op}: segment_ids must be None or an integer array {layout}, got "
      f"{type(segment_ids).__name__}."
    )
  if tuple(segment_ids.shape) != (batch, kv_len):
    raise ValueError(f"{op}: segment_ids must have shape {layout}, got {tuple(segment_ids.shape)}.")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"{op}: segment_ids must be an integer array, got {segment_ids.dtype}.")


def _run_starts(segment_ids: jax.Array | None) -> jax.Array | None:
  """int32 [B, Lk]: the first position of each position's segment run (None: None)."""
  if segment_ids is None:
    return None
  seg = jnp.asarray(segment_ids)
  pos = jnp.arange(seg.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate(
    [jnp.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1
  )
  return jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)


def num_compressed_blocks(lk: int, block_len: int, stride: int) -> int:
  """Nc: the compressed blocks [c*stride, c*stride + block_len) that lie inside lk keys."""
  lk = _check_int("num_compressed_blocks", "lk", lk, 0)
  block_len, stride = _check_compression("num_compressed_blocks", block_len, stride)
  return max(0, (lk - block_len) // stride + 1)


@functools.lru_cache(maxsize=32)
def _overlap(nc: int, ns: int, block_len: int, stride: int, select_len: int) -> np.ndarray:
  """float32[Nc, Ns]: |[c*d, c*d+l) ∩ [j*l', (j+1)*l')| / l, the p_cmp -> p_slc map."""
  start = np.arange(nc)[:, None] * stride
  lo = np.arange(ns)[None, :] * select_len
  inter = np.minimum(start + block_len, lo + select_len) - np.maximum(start, lo)
  return (np.maximum(inter, 0) / block_len).astype(np.float32)


def _chunk_rows(x: jax.Array, axis: int, chunk: int) -> jax.Array:
  """Pads `axis` to a multiple of `chunk` and splits it: [..., n*C, ...] -> [n, ..., C, ...]."""
  n = x.shape[axis]
  nq = -(-n // chunk)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, nq * chunk - n)
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (nq, chunk) + x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


# -------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class _SelectionConfig:
  lk: int
  block_len: int
  stride: int
  select_len: int
  num_select: int
  scale: float
  chunk: int

  @property
  def num_compressed(self) -> int:
    return max(0, (self.lk - self.block_len) // self.stride + 1)

  @property
  def num_selection_blocks(self) -> int:
    return -(-self.lk // self.select_len)


def _select_chunk(
  cfg: _SelectionConfig,
  q_c: jax.Array,  # f32 [B, C, Hkv, G, D]
  t: jax.Array,  # int32 [C], absolute query positions
  k_cmp: jax.Array,  # f32 [B, Nc, Hkv, D]
  r: jax.Array | None,  # int32 [B, C], the queries' run starts (None: no segments)
) -> tuple[jax.Array, jax.Array]:
  """Block ids and validity int32/bool [B, Hkv, C, n] for one chunk of queries.

  Everything is relative to the query's run start r (0 without segments): compressed
  block j (slot r // stride + j, `compressed_slots`) and selection block m of the run.
  """
  b, c, hkv, _, _ = q_c.shape
  nc, ns, n, lsel = cfg.num_compressed, cfg.num_selection_blocks, cfg.num_select, cfg.select_len
  t_rel = t if r is None else t - r  # [C] | [B, C]: positions in the query's run
  if nc > 0:
    s = jnp.einsum("bchgd,bnhd->bhgcn", q_c, k_cmp, precision=_HIGHEST) * cfg.scale
    if r is not None:  # slot order -> the run's block order: [B, Hkv, G, C, Nc]
      slot = jnp.minimum(r[..., None] // cfg.stride + jnp.arange(nc), nc - 1)  # [B, C, Nc]
      s = jnp.take_along_axis(s, slot[:, None, None], axis=-1)
    c_start = jnp.arange(nc) * cfg.stride
    visible = c_start + cfg.block_len - 1 <= t_rel[..., None]  # [C, Nc] | [B, C, Nc]
    if r is not None:  # (past blocks of the run fit in Nc: the gather's clip never shows)
      visible = visible[:, None, None]
    s = jnp.where(visible, s, -jnp.inf)  # [B, Hkv, G, C, Nc]
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    p_cmp = e / jnp.where(total > 0, total, 1.0)  # rows that see nothing: all 0
    overlap = jnp.asarray(_overlap(nc, ns, cfg.block_len, cfg.stride, lsel))
    score = jnp.einsum("bhgcn,nj->bhcj", p_cmp, overlap, precision=_HIGHEST)
  else:
    score = jnp.zeros((b, hkv, c, ns), jnp.float32)
  j = jnp.arange(ns)
  own = (t_rel // lsel)[..., None]
  eligible = j * lsel <= t_rel[..., None]  # [C, Ns] | [B, C, Ns]
  forced = eligible & ((j == 0) | (j == own) | (j == own - 1))
  if r is not None:  # [B, 1, C, Ns]
    eligible, forced = eligible[:, None], forced[:, None]
  prio = jnp.where(forced, jnp.inf, jnp.where(eligible, score, -jnp.inf))
  if ns < n:  # fewer blocks than slots: the extra slots stay invalid
    prio = jnp.pad(prio, [(0, 0)] * 3 + [(0, n - ns)], constant_values=-jnp.inf)
  top, idx = jax.lax.top_k(prio, n)  # ties: lower index first
  chosen = top > -jnp.inf
  ids = jnp.sort(jnp.where(chosen, idx, jnp.iinfo(jnp.int32).max), axis=-1)
  count = jnp.sum(chosen, axis=-1, keepdims=True)  # >= 1: block 0 is always eligible
  valid = jnp.arange(n) < count
  last = jnp.take_along_axis(ids, count - 1, axis=-1)
  return jnp.where(valid, ids, last).astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnums=0)
def _selection(cfg: _SelectionConfig, q: jax.Array, k_cmp: jax.Array, rs: jax.Array | None):
  b, lq, hq, d = q.shape
  hkv = k_cmp.shape[2]
  qg = q.astype(jnp.float32).reshape(b, lq, hkv, hq // hkv, d)
  kc = k_cmp.astype(jnp.float32)
  q_chunks = _chunk_rows(qg, 1, cfg.chunk)  # [nq, B, C, Hkv, G, D]
  offset = cfg.lk - lq
  # The queries' run starts by chunk, [nq, B, C] (None without segments).
  r_chunks = None if rs is None else _chunk_rows(rs[:, offset:], 1, cfg.chunk)

  def one(args):
    i, q_c, r_c = args
    t = offset + i * cfg.chunk + jnp.arange(cfg.chunk, dtype=jnp.int32)
    return _select_chunk(cfg, q_c, jnp.minimum(t, cfg.lk - 1), kc, r_c)

  nq = q_chunks.shape[0]
  ids, valid = jax.lax.map(one, (jnp.arange(nq, dtype=jnp.int32), q_chunks, r_chunks))
  # [nq, B, Hkv, C, n] -> [B, Hkv, Lq, n]
  fix = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, hkv, -1, cfg.num_select)[:, :, :lq]
  return fix(ids), fix(valid)


def nsa_selection(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k_cmp: jax.Array,  # [batch, Nc, kv_heads, head_dim]
  *,
  lk: int,
  block_len: int,
  stride: int,
  select_len: int,
  num_select: int,
  scale: float | None = None,
  segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The selected blocks of NSA's selection branch, shared by each GQA group.

  See docs/nsa.md for the exact rule (compression probabilities, fractional
  overlap mapping, group sum, forced initial + 2 local blocks, top-n, ties toward the
  lower id; packed sequences). The queries are the last `q_len` of `lk` positions. No
  gradient: the result is integer.

  Args:
    q: the queries `[B, Lq, Hq, D]`.
    k_cmp: the compressed keys `[B, Nc, Hkv, D]`, Nc = num_compressed_blocks(lk, ...).
    lk: the number of keys (positions 0 .. lk - 1); lk >= Lq.
    block_len, stride: l and d of the compressed blocks [c*d, c*d + l).
    select_len: l', the length of the selection blocks [j*l', (j+1)*l').
    num_select: n >= 3, the blocks kept per (group, query), forced ones included.
    scale: the compression softmax scale, default `head_dim ** -0.5`.
    segment_ids: optional integer `[B, lk]` for packed sequences (see `nsa_attention`):
      both block grids restart at each segment run's start r, k_cmp is laid out as
      `compressed_slots` says, and block id m is the selection block [r + m*l',
      r + (m+1)*l') of the query's run (clipped to it).

  Returns:
    `(block_ids, valid)`: int32 and bool `[B, Hkv, Lq, n]`. The ids ascend; slots past
    the kept blocks (n > the eligible blocks) are invalid and repeat the last valid id.
  """
  op = "nsa_selection"
  _check_array(op, "q", q, 4, "[batch, q_len, q_heads, head_dim]")
  _check_array(op, "k_cmp", k_cmp, 4, "[batch, Nc, kv_heads, head_dim]")
  cfg = _selection_config(
    op, q.shape, k_cmp.shape, lk, block_len, stride, select_len, num_select, scale
  )
  _check_segment_ids(op, segment_ids, q.shape[0], cfg.lk)
  return _selection(cfg, q, k_cmp, _run_starts(segment_ids))


def _selection_config(
  op, q_shape, kc_shape, lk, block_len, stride, select_len, num_select, scale
) -> _SelectionConfig:
  lk = _check_int(op, "lk", lk, 1)
  block_len, stride = _check_compression(op, block_len, stride)
  select_len = _check_int(op, "select_len", select_len, 1)
  num_select = _check_int(op, "num_select", num_select, 3)  # initial + 2 local blocks
  b, lq, hq, d = q_shape
  nc = max(0, (lk - block_len) // stride + 1)
  if min(b, lq, hq, d) == 0:
    raise ValueError(f"{op}: empty q {tuple(q_shape)}.")
  if lq > lk:
    raise ValueError(
      f"{op}: q has {lq} positions (dim 1) but there are only {lk} keys; the queries are "
      "the last q_len of the kv_len positions, so q_len <= kv_len."
    )
  hkv = kc_shape[2]
  if hkv == 0 or hq % hkv:
    raise ValueError(
      f"{op}: k_cmp must be [batch, Nc, kv_heads, head_dim] with kv_heads dividing the "
      f"{hq} q heads (GQA), got {tuple(kc_shape)}."
    )
  expected = (b, nc, hkv, d)
  if tuple(kc_shape) != expected:
    raise ValueError(
      f"{op}: k_cmp must be [batch, Nc, kv_heads, head_dim] = {expected} with Nc = "
      f"num_compressed_blocks(kv_len={lk}, block_len={block_len}, stride={stride}) = {nc}, "
      f"got {tuple(kc_shape)}."
    )
  shape = checks.AttentionShape(b, lq, lk, hq, hkv, d, d)
  scale = checks.check_scale(scale, shape, op)
  # Queries per chunk: ~_CHUNK_ELEMENTS compression scores.
  chunk = max(1, min(lq, _CHUNK_ELEMENTS // max(1, b * hq * max(nc, 1))))
  return _SelectionConfig(lk, block_len, stride, select_len, num_select, scale, chunk)


class CompressedSlots(NamedTuple):
  """Where each compressed slot's block lies (`compressed_slots`), arrays `[B|1, Nc]`.

  start: int32, the block's first key (keys start .. start + block_len - 1).
  run_start: int32, the first position of the block's segment run.
  valid: bool, whether the slot holds a block (packed rows leave some slots empty;
    an empty slot's start is slot * stride, its run_start that position's).
  """

  start: jax.Array
  run_start: jax.Array
  valid: jax.Array


def _slots(rs: jax.Array | None, lk: int, block_len: int, stride: int) -> CompressedSlots:
  """`compressed_slots` from the run starts rs int32 [B, Lk] (None: one run per row)."""
  nc = max(0, (lk - block_len) // stride + 1)
  grid = jnp.arange(nc, dtype=jnp.int32) * stride  # [Nc]
  if rs is None:
    zero = jnp.zeros((1, nc), jnp.int32)
    return CompressedSlots(grid[None], zero, jnp.ones((1, nc), bool))
  b = rs.shape[0]
  pos = jnp.arange(nc * stride, dtype=jnp.int32)  # Nc * stride <= lk (stride <= block_len)
  end = pos + block_len - 1  # the last key of a block starting at pos
  # pos starts a block iff it lies j * stride after its run start and the block ends
  # inside lk and inside that run: [B, Nc * stride], at most one per slot window.
  head = (pos - rs[:, : nc * stride]) % stride == 0
  whole = (end < lk) & (rs[:, jnp.minimum(end, lk - 1)] == rs[:, : nc * stride])
  window = (head & whole).reshape(b, nc, stride)  # slot c: positions [c*d, (c+1)*d)
  valid = jnp.any(window, axis=-1)  # [B, Nc]
  start = grid + jnp.argmax(window, axis=-1).astype(jnp.int32)  # grid where empty
  return CompressedSlots(start, jnp.take_along_axis(rs, start, axis=1), valid)


def compressed_slots(
  kv_len: int,
  *,
  block_len: int,
  stride: int,
  segment_ids: jax.Array | None = None,  # int [batch, kv_len]
) -> CompressedSlots:
  """The compressed-key layout `nsa_attention` expects: where each slot's block lies.

  There are Nc = num_compressed_blocks(kv_len, block_len, stride) slots. Without
  segments slot c holds the block [c*stride, c*stride + block_len). With segment_ids
  the block grid restarts at each segment run's start s: the run's complete blocks
  [s + j*stride, s + j*stride + block_len) (j = 0, 1, ...; inside the run) sit in slots
  s // stride + j, i.e. slot c holds the block that starts in [c*stride, (c+1)*stride),
  if any (at most one does; the slots of a run are consecutive and all fit in Nc).

  Returns:
    `CompressedSlots(start, run_start, valid)`, each `[1, Nc]` without segments,
    `[B, Nc]` with.
  """
  op = "compressed_slots"
  kv_len = _check_int(op, "kv_len", kv_len, 0)
  block_len, stride = _check_compression(op, block_len, stride)
  if segment_ids is not None:
    _check_segment_ids(op, segment_ids, getattr(segment_ids, "shape", (0,))[0], kv_len)
  return _slots(_run_starts(segment_ids), kv_len, block_len, stride)


def compressed_blocks(
  x: jax.Array,  # [batch, kv_len, heads, dim]
  *,
  block_len: int,
  stride: int,
  segment_ids: jax.Array | None = None,  # int [batch, kv_len]
) -> tuple[jax.Array, jax.Array]:
  """The keys (or values) of every compressed slot's block, the input of a phi.

  Args:
    x: `[B, Lk, H, D]`.
    block_len, stride: the compressed blocks' l and d.
    segment_ids: optional int `[B, Lk]`: blocks per segment run (`compressed_slots`).

  Returns:
    `(blocks [B, Nc, block_len, H, D], valid bool [B|1, Nc])` in x's dtype; the rows
    of empty slots (valid False) are zeros.
  """
  op = "compressed_blocks"
  if not hasattr(x, "ndim") or x.ndim != 4:
    got = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{op}: x must be an array [batch, seq, heads, head_dim], got {got}.")
  b, lk = x.shape[:2]
  block_len, stride = _check_compression(op, block_len, stride)
  _check_segment_ids(op, segment_ids, b, lk)
  if segment_ids is None:
    nc = num_compressed_blocks(lk, block_len, stride)
    rows = np.arange(nc)[:, None] * stride + np.arange(block_len)[None, :]  # [Nc, l]
    return x[:, rows], jnp.ones((1, nc), bool)
  slots = _slots(_run_starts(segment_ids), lk, block_len, stride)
  nc = slots.start.shape[1]
  rows = slots.start[:, :, None] + jnp.arange(block_len, dtype=jnp.int32)  # [B, Nc, l]
  blocks = jnp.take_along_axis(x, rows.reshape(b, nc * block_len, 1, 1), axis=1)
  blocks = blocks.reshape(b, nc, block_len, *x.shape[2:])
  return jnp.where(slots.valid[:, :, None, None, None], blocks, 0), slots.valid


def compress_mean(
  k: jax.Array,
  *,
  block_len: int,
  stride: int,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Mean pooling as NSA's compression phi: `[B, Lk, H, D] -> [B, Nc, H, D]`.

  Compressed row c is the mean of rows [c*stride, c*stride + block_len); Nc =
  num_compressed_blocks(Lk, block_len, stride) (0 when Lk < block_len). With
  segment_ids (int `[B, Lk]`), the mean of each slot's block of its segment run
  (`compressed_slots`: the grid restarts at each run start), zeros in empty slots.
  Accumulated in float32, returned in k's dtype. Works for keys and values alike.
  """
  op = "compress_mean"
  _check_array(op, "k", k, 4, "[batch, seq, heads, head_dim]")
  blocks, _ = compressed_blocks(
    k.astype(jnp.float32), block_len=block_len, stride=stride, segment_ids=segment_ids
  )
  return jnp.mean(blocks, axis=2).astype(k.dtype)  # [B, Nc, H, D]


# -------------------------------------------------------------------------- reference


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static facts of one nsa_attention call."""

  q_len: int
  kv_len: int
  block_len: int
  stride: int
  select_len: int
  num_select: int
  window: int
  scale: float
  step_scores: int  # xla path: scores per engine loop step
  slc_block_q: int  # xla path: queries per selection tile

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def num_compressed(self) -> int:
    return max(0, (self.kv_len - self.block_len) // self.stride + 1)

  @property
  def num_selection_blocks(self) -> int:
    return -(-self.kv_len // self.select_len)


def _positions(cfg: _Config) -> jax.Array:
  """int32 [Lq]: the absolute positions of the queries."""
  return cfg.offset + jnp.arange(cfg.q_len, dtype=jnp.int32)


def _selected_block_mask(cfg: _Config, ids: jax.Array, valid: jax.Array) -> jax.Array:
  """bool [B, Hkv, Lq, Ns]: which selection blocks each (group, query) keeps."""
  hot = ids[..., None] == jnp.arange(cfg.num_selection_blocks)
  return jnp.any(hot & valid[..., None], axis=-2)


@functools.partial(jax.jit, static_argnums=0)
def _nsa_reference(cfg: _Config, q, k, v, k_cmp, v_cmp, gates, ids, valid, rs):
  b, lq, hq, _ = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  f32 = lambda x: x.astype(jnp.float32)
  t = _positions(cfg)[:, None]  # [Lq, 1]
  key = jnp.arange(cfg.kv_len)[None, :]  # [1, Lk]
  # Packed sequences: r [B, 1, Lq, 1], the queries' run starts; keys at or after them.
  r = None if rs is None else rs[:, None, cfg.offset :, None]
  after = (lambda x: True) if rs is None else (lambda x: x >= r)
  attend = functools.partial(reference_attention, f32(q), scale=cfg.scale)
  nc = cfg.num_compressed
  if nc > 0:
    slots = _slots(rs, cfg.kv_len, cfg.block_len, cfg.stride)  # [B|1, Nc] each
    cmp_start, ok = slots.start[:, None, None, :], slots.valid[:, None, None, :]
    visible = ok & (cmp_start + cfg.block_len - 1 <= t) & after(cmp_start)  # [B|1,1,Lq,Nc]
    o_cmp = attend(f32(k_cmp), f32(v_cmp), mask=visible)
  else:
    o_cmp = jnp.zeros((b, lq, hq, dv), jnp.float32)
  blocks = _selected_block_mask(cfg, ids, valid)  # [B, Hkv, Lq, Ns]
  if rs is None:
    slc = blocks[..., key[0] // cfg.select_len]  # [B, Hkv, Lq, Lk]
  else:  # key j lies in block (j - r) // l' of the query's run
    m = jnp.clip((key - r) // cfg.select_len, 0, cfg.num_selection_blocks - 1)  # [B,1,Lq,Lk]
    slc = jnp.take_along_axis(blocks, m, axis=-1)
  slc = slc & (key <= t) & after(key)  # [B, Hkv, Lq, Lk]
  slc = jnp.broadcast_to(slc[:, :, None], (b, hkv, hq // hkv, lq, cfg.kv_len))
  o_slc = attend(f32(k), f32(v), mask=slc.reshape(b, hq, lq, cfg.kv_len))
  win = ((key <= t) & (key > t - cfg.window))[None, None] & after(key)
  o_win = attend(f32(k), f32(v), mask=win)
  return _mix(q.dtype, gates, o_cmp, o_slc, o_win)


def _mix(dtype, gates, o_cmp, o_slc, o_win):
  """(gated sum, branches), all in `dtype`; the sum is taken in float32."""
  g = gates.astype(jnp.float32)[..., None]  # [B, Lq, Hq, 3, 1]
  out = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
  return out.astype(dtype), tuple(o.astype(dtype) for o in (o_cmp, o_slc, o_win))


# ---------------------------------------------------------------------- xla and pallas
#
# Every branch is one block-sparse attention over NSA's own masks (see docs/nsa.md):
# "xla" runs the block-sparse XLA engine, whose rows stack each GQA group's
# query heads (the selection mask has one head per kv head, shared by the group); the
# kernels run their forward and backward Pallas kernels. Kernel tiles are powers of two
# in [16, cap]: the Triton kernel needs that, the TPU kernel needs multiples of 8 (128
# fills its lanes: its cap).

# The kernel each "pallas" backend runs, and its (check_supported, tile cap, tile floor).
_KERNELS = {
  "pallas_mosaic_gpu": (mosaic_gpu.check_supported, 64, 64),
  "pallas_triton": (gpu.check_supported, 64, 16),
  "pallas_tpu": (tpu.check_supported, 128, 16),
}
# Query tile of the selection branch (a tile visits the union of its queries' blocks, so
# it stays small whatever the kernel's cap).
_SLC_KERNEL_BLOCK_Q = 64
# kv tile of the xla path's compression and window branches (its query tile, and the
# selection's, is `_SLC_BLOCK_Q`; the selection's kv tile is select_len).
_XLA_BLOCK_KV = 64


def _pow2_tile(length: int, cap: int, floor: int = 16) -> int:
  """The least power of two >= length, clipped to [floor, cap]."""
  return max(floor, min(cap, 1 << max(0, length - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class _KernelPlan:
  """Static facts of the tiled paths (hashable: a jit static argument)."""

  cfg: _Config
  kernel: str  # "xla" or a kernel name ("pallas_triton", ...)
  interpret: bool
  block_q: int  # compression and window branches
  window_kv: int
  cmp_kv: int
  slc_block_q: int
  slc_kv: int


def _kernel_plan(cfg: _Config, kernel: str, interpret: bool) -> _KernelPlan:
  if kernel == "xla":  # any tile sizes: one selection block per kv tile
    bq, bk = min(cfg.slc_block_q, cfg.q_len), _XLA_BLOCK_KV
    return _KernelPlan(
      cfg,
      kernel,
      interpret,
      block_q=bq,
      window_kv=min(bk, cfg.kv_len),
      cmp_kv=min(bk, max(1, cfg.num_compressed)),
      slc_block_q=bq,
      slc_kv=min(cfg.select_len, cfg.kv_len),
    )
  _, cap, floor = _KERNELS[kernel]
  floor_sel = 1 << (cfg.select_len.bit_length() - 1)  # kv tiles no longer than a block
  return _KernelPlan(
    cfg,
    kernel,
    interpret,
    block_q=_pow2_tile(cfg.q_len, cap, floor),
    window_kv=_pow2_tile(cfg.kv_len, cap, floor),
    cmp_kv=_pow2_tile(max(1, cfg.num_compressed), cap, floor),
    slc_block_q=_pow2_tile(cfg.q_len, min(cap, _SLC_KERNEL_BLOCK_Q), floor),
    slc_kv=_pow2_tile(min(cfg.kv_len, floor_sel), cap),  # a kernel may refuse it
  )


def _compressed_mask(plan: _KernelPlan, pad: int = 0) -> BlockMask:
  """Compressed key c is visible to query row i iff c*stride + block_len - 1 <= t, t =
  offset - pad + i (pad: rows before the first query, `_packed_compressed`)."""
  cfg = plan.cfg
  fn = element_masks.Strided(cfg.stride, cfg.block_len - 1 - cfg.offset + pad)
  return masks.from_element_mask(
    fn, cfg.q_len + pad, cfg.num_compressed, block_q=plan.block_q, block_kv=plan.cmp_kv
  )


def _window_mask(plan: _KernelPlan) -> BlockMask:
  """Keys t - w < j <= t of query row i (t = offset + i): j - i in [offset - w + 1, offset]."""
  cfg = plan.cfg
  fn = element_masks.Band(cfg.offset - cfg.window + 1, cfg.offset)
  return masks.from_element_mask(
    fn, cfg.q_len, cfg.kv_len, block_q=plan.block_q, block_kv=plan.window_kv
  )


def _selection_mask(
  plan: _KernelPlan,
  ids: jax.Array,  # int32 [B, Hkv, Lq, n]
  valid: jax.Array,  # bool [B, Hkv, Lq, n]
  q_heads: int,
  rs: jax.Array | None = None,  # int32 [B, Lk]: run starts (packed sequences)
) -> tuple[BlockMask, TokenRoutes]:
  """The selection branch's tiles (on device) and its token routes.

  Tiles: layout[b, h, i, kt] = some query of q tile i selected (for kv head h) a block
  overlapping kv tile kt, scattered from the selections (O(B * Hkv * Lq * n) updates into
  O(B * Hkv * Qb * Kb), never O(Lq * Lk)), repeated over the group's query heads for the
  kernels (the xla engine reads one head per group) and intersected with causal. Routes:
  query routes = the selected ids (-1 where invalid), Hr = Hkv, so a group shares them;
  key j's route is its block, j // select_len (`[B, Lk]`: the query routes have a batch
  dim, so the key routes must too). With segments (rs, the run starts), the blocks
  start at r + m * select_len (r the query's run start, m the id) and a route is a
  block's first position: key j's is r_j + (j - r_j) // select_len * select_len (r_j =
  run_start(j)), query t's for block m is r + m * select_len: exactly the keys of
  block m of t's run (the causal mask drops the later runs' keys).
  """
  cfg = plan.cfg
  b, hkv, lq, _ = ids.shape
  bq, bk, lsel = plan.slc_block_q, plan.slc_kv, cfg.select_len
  qb, kb = -(-lq // bq), -(-cfg.kv_len // bk)
  start = ids * lsel if rs is None else rs[:, None, cfg.offset :, None] + ids * lsel
  first = start // bk  # [B, Hkv, Lq, n]: the first and last kv tile of each block
  last = (jnp.minimum(start + lsel, cfg.kv_len) - 1) // bk
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(hkv)[None, :, None, None]
  qi = (jnp.arange(lq) // bq)[None, None, :, None]
  layout = jnp.zeros((b, hkv, qb, kb), bool)
  for step in range((lsel - 1) // bk + 2):  # static: the most tiles a block can touch
    tile = first + step
    tile = jnp.where(valid & (tile <= last), tile, kb)  # kb: out of range, dropped
    layout = layout.at[bi, hi, qi, tile].set(True, mode="drop")
  if plan.kernel != "xla":  # the kernels read one mask head per query head
    layout = jnp.repeat(layout, q_heads // hkv, axis=1)  # [B, Hq, Qb, Kb]
  geo = dict(block_q=bq, block_kv=bk, q_len=lq, kv_len=cfg.kv_len)
  mask = masks.intersection(
    masks.causal(lq, cfg.kv_len, block_q=bq, block_kv=bk, offset=cfg.offset),
    masks.from_layout(layout, **geo),
  )
  if rs is None:
    routes = TokenRoutes(
      jnp.where(valid, ids, -1).astype(jnp.int32),  # [B, Hkv, Lq, n]
      jnp.broadcast_to(jnp.arange(cfg.kv_len, dtype=jnp.int32) // lsel, (b, cfg.kv_len)),
    )
  else:
    j = jnp.arange(cfg.kv_len, dtype=jnp.int32)
    routes = TokenRoutes(
      jnp.where(valid, start, -1).astype(jnp.int32),  # [B, Hkv, Lq, n]
      rs + (j - rs) // lsel * lsel,  # [B, Lk]
    )
  return mask, routes


def _window_routes(cfg: _Config, rs: jax.Array | None) -> TokenRoutes | None:
  """The window's token routes of packed sequences (None without): query t's one route
  is run_start(t), key j's run_start(j)."""
  return None if rs is None else TokenRoutes(rs[:, None, cfg.offset :, None], rs)


def _compressed_pad(cfg: _Config) -> int:
  """Rows `_packed_compressed` adds before the first query: a query moves up to
  stride - 1 rows back, never before position 0."""
  return min(cfg.stride - 1, cfg.offset)


def _packed_compressed(cfg: _Config, rs: jax.Array) -> tuple[jax.Array, jax.Array, TokenRoutes]:
  """How the tiled paths run the compression branch of packed sequences.

  Query t of run r sees slot c (`compressed_slots`: block j of the run in slot
  r // stride + j, starting at c*stride + r % stride) iff the slot is its run's and
  c*stride + block_len - 1 <= t - r % stride: the unsegmented Strided mask at position
  t - r % stride. So each query that sees a block (t - r >= block_len - 1) is attended
  from that "virtual" position (row t - r % stride - offset + pad of a q of Lq + pad
  rows, `_compressed_mask(pad)`); the rows are distinct: within a run a shift, the
  queries of earlier runs sit before the run start r (at most at their own positions),
  and the run's queries that see a block at t - r % stride >= r + block_len - stride
  >= r. Routes keep each row in its run.

  Returns:
    `(row [B, Lq], sees [B, Lq], routes)`: each query's row (Lq + pad where it sees
    nothing), whether it sees a block, and the routes: query row -> [r] (-1 on rows no
    query uses), slot c -> its run start if it holds a block, else Lk + c (no match).
  """
  b, pad = rs.shape[0], _compressed_pad(cfg)
  r = rs[:, cfg.offset :]  # [B, Lq]
  sees = _positions(cfg) - r >= cfg.block_len - 1
  i = jnp.arange(cfg.q_len, dtype=jnp.int32)
  row = jnp.where(sees, i + pad - r % cfg.stride, cfg.q_len + pad)
  bi = jnp.arange(b)[:, None]
  query = jnp.full((b, cfg.q_len + pad), -1, jnp.int32).at[bi, row].set(r, mode="drop")
  slots = _slots(rs, cfg.kv_len, cfg.block_len, cfg.stride)
  key = jnp.where(slots.valid, slots.run_start, cfg.kv_len + jnp.arange(cfg.num_compressed))
  return row, sees, TokenRoutes(query[:, None, :, None], key.astype(jnp.int32))


def _compressed_branch(plan: _KernelPlan, q, k_cmp, v_cmp, rs: jax.Array | None) -> jax.Array:
  """The compression branch through the engine or kernel: `[B, Lq, Hq, Dv]`."""
  if rs is None:
    return _attend(plan, q, k_cmp, v_cmp, _compressed_mask(plan), None)
  cfg, pad = plan.cfg, _compressed_pad(plan.cfg)
  b, lq = q.shape[:2]
  row, sees, routes = _packed_compressed(cfg, rs)
  bi = jnp.arange(b)[:, None]
  q_rows = jnp.zeros((b, lq + pad, *q.shape[2:]), q.dtype).at[bi, row].set(q, mode="drop")
  out = _attend(plan, q_rows, k_cmp, v_cmp, _compressed_mask(plan, pad), routes)
  out = jnp.take_along_axis(out, jnp.minimum(row, lq + pad - 1)[:, :, None, None], axis=1)
  return jnp.where(sees[:, :, None, None], out, 0)


@functools.lru_cache(maxsize=64)
def _kernel_problem(
  plan: _KernelPlan, b: int, hq: int, hkv: int, d: int, dv: int, dtype, segmented: bool = False
) -> str:
  """Why the kernel cannot run this call ("" if it can), from the shapes alone."""
  check = _KERNELS[plan.kernel][0]
  cfg, sds = plan.cfg, jax.ShapeDtypeStruct
  q = sds((b, cfg.q_len, hq, d), dtype)
  kv = lambda length: (sds((b, length, hkv, d), dtype), sds((b, length, hkv, dv), dtype))
  sel = (sds((b, hkv, cfg.q_len, cfg.num_select), jnp.int32),) * 2
  rs = sds((b, cfg.kv_len), jnp.int32) if segmented else None
  slc_mask, routes = jax.eval_shape(lambda i, ok, r: _selection_mask(plan, i, ok, hq, r), *sel, rs)
  win_routes = jax.eval_shape(lambda r: _window_routes(cfg, r), rs)
  calls = [
    (q, *kv(cfg.kv_len), slc_mask, routes),
    (q, *kv(cfg.kv_len), _window_mask(plan), win_routes),
  ]
  if cfg.num_compressed > 0:
    pad, cmp_routes = 0, None
    if segmented:
      pad = _compressed_pad(cfg)
      cmp_routes = jax.eval_shape(lambda r: _packed_compressed(cfg, r)[2], rs)
    q_cmp = sds((b, cfg.q_len + pad, hq, d), dtype)
    calls.append((q_cmp, *kv(cfg.num_compressed), _compressed_mask(plan, pad), cmp_routes))
  for q_, k, v, mask, rt in calls:
    try:
      check(q_, k, v, mask, rt)
    except Unsupported as e:
      return str(e)
  return ""


def _attend(plan: _KernelPlan, q, k, v, mask: BlockMask, routes: TokenRoutes | None):
  """One branch over its mask: `[B, Lq, Hq, Dv]` in q's dtype."""
  cfg = plan.cfg
  if plan.kernel == "xla":  # the engine itself: the selection mask has Hkv heads
    group = q.shape[2] // k.shape[2]
    chunk = max(1, cfg.step_scores // (group * mask.block_q * mask.block_kv))
    return block_sparse_attention_xla(q, k, v, mask, scale=cfg.scale, routes=routes, chunk=chunk)[0]
  return block_sparse_attention(
    q, k, v, mask, scale=cfg.scale, implementation=plan.kernel, interpret=plan.interpret,
    routes=routes,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def _nsa_tiled(plan: _KernelPlan, q, k, v, k_cmp, v_cmp, gates, ids, valid, rs):
  """NSA as three block-sparse attentions ("xla" or a kernel): (out, branches)."""
  cfg = plan.cfg
  b, lq, hq, _ = q.shape
  if cfg.num_compressed > 0:
    o_cmp = _compressed_branch(plan, q, k_cmp, v_cmp, rs)
  else:
    o_cmp = jnp.zeros((b, lq, hq, v.shape[3]), q.dtype)
  o_slc = _attend(plan, q, k, v, *_selection_mask(plan, ids, valid, hq, rs))
  o_win = _attend(plan, q, k, v, _window_mask(plan), _window_routes(cfg, rs))
  return _mix(q.dtype, gates, o_cmp, o_slc, o_win)


# ---------------------------------------------------------------------------------- op

IMPLEMENTATIONS = ("reference", "xla", "pallas", *_KERNELS)


def _resolve(
  implementation: Any, interpret: bool, cfg: _Config, q, k, v, segmented: bool = False
) -> str:
  """The concrete implementation: "reference", "xla" or a kernel name."""
  shapes = (q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3], q.dtype, segmented)

  def check(kernel: str) -> None:
    problem = _kernel_problem(_kernel_plan(cfg, kernel, interpret), *shapes)
    if problem:
      raise Unsupported(problem)

  return dispatch.resolve(
    implementation, interpret=interpret, op=_OP, implementations=IMPLEMENTATIONS, check=check
  )


def nsa_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  k_cmp: jax.Array,  # [batch, Nc, kv_heads, head_dim]
  v_cmp: jax.Array,  # [batch, Nc, kv_heads, v_head_dim]
  gates: jax.Array,  # [batch, q_len, q_heads, 3]
  *,
  segment_ids: jax.Array | None = None,  # int [batch, kv_len]
  block_len: int = 32,
  stride: int = 16,
  select_len: int = 64,
  num_select: int = 16,
  window: int = 512,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  return_branches: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """Native Sparse Attention: gated compressed + selected + sliding-window attention.

  The exact semantics (block geometry, overlap mapping, forced blocks, ties, queries
  that see no compressed block) are in docs/nsa.md.

  Args:
    q: `[B, Lq, Hq, D]`, the queries at the last Lq of the Lk positions.
    k, v: `[B, Lk, Hkv, D]`, `[B, Lk, Hkv, Dv]`; Hkv divides Hq (GQA), Lq <= Lk.
    k_cmp, v_cmp: the compressed keys/values `[B, Nc, Hkv, D]`, `[B, Nc, Hkv, Dv]`,
      Nc = num_compressed_blocks(Lk, block_len, stride); compressed block c summarizes
      keys [c*stride, c*stride + block_len) (e.g. `compress_mean`). With segment_ids,
      the blocks of each segment run, anchored at its start s ([s + j*stride, s +
      j*stride + block_len), complete blocks inside the run), in slots s // stride + j
      (`compressed_slots`; `compress_mean(..., segment_ids=)` makes them).
    gates: `[B, Lq, Hq, 3]`, the (compression, selection, window) gates in [0, 1].
    segment_ids: optional integer `[B, Lk]` for packed sequences (the queries use the
      last Lq entries): no branch crosses a segment run, and the compressed and
      selection block grids restart at each run start, so a segment gives what it gives
      alone (docs/nsa.md). None: one sequence per row.
    block_len, stride: l and d of the compressed blocks; 1 <= d <= l.
    select_len: l', the selection block length (any positive int).
    num_select: n >= 3, the selection blocks kept per (group, query), including the
      forced initial block and the 2 local blocks.
    window: w >= 1, the sliding window (keys t - w < j <= t).
    scale: softmax scale of every branch (and of the selection scores), default
      `head_dim ** -0.5`.
    implementation: None: "pallas" on GPU/TPU backends when the kernel takes the call,
      else "xla" (always on CPU). "reference" (dense masks, the float32 oracle), "xla"
      (exact, memory-efficient pure JAX), "pallas" (the platform's kernel; on CPU only
      with interpret=True, which runs the Triton kernel interpreted), "pallas_triton" /
      "pallas_tpu" (that kernel, whatever the platform; interpret=True off its hardware).
    interpret: run the Pallas kernels in the interpreter (tests, CPU); unused by
      "reference" and "xla".
    return_branches: also return the three ungated branch outputs.

  Returns:
    `[B, Lq, Hq, Dv]` in q's dtype; with return_branches, `(out, (o_cmp, o_slc,
    o_win))`, each `[B, Lq, Hq, Dv]` in q's dtype.

  Raises:
    ValueError: on a bad shape, dtype, geometry or implementation, naming the argument,
      before anything is computed.
  """
  cfg = _check_inputs(
    q, k, v, k_cmp, v_cmp, gates, block_len, stride, select_len, num_select, window, scale
  )
  _check_segment_ids(_OP, segment_ids, q.shape[0], cfg.kv_len)
  impl = _resolve(implementation, interpret, cfg, q, k, v, segment_ids is not None)
  ids, valid = nsa_selection(
    q,
    k_cmp,
    lk=cfg.kv_len,
    block_len=block_len,
    stride=stride,
    select_len=select_len,
    num_select=num_select,
    scale=cfg.scale,
    segment_ids=segment_ids,
  )
  ids, valid = jax.lax.stop_gradient(ids), jax.lax.stop_gradient(valid)
  arrays = (q, k, v, k_cmp, v_cmp, gates, ids, valid, _run_starts(segment_ids))
  if impl == "reference":
    out, branches = _nsa_reference(cfg, *arrays)
  else:  # "xla" or a kernel
    out, branches = _nsa_tiled(_kernel_plan(cfg, impl, interpret), *arrays)
  return (out, branches) if return_branches else out


def _check_inputs(
  q,
  k,
  v,
  k_cmp,
  v_cmp,
  gates,
  block_len,
  stride,
  select_len,
  num_select,
  window,
  scale,
  op: str = _OP,
) -> _Config:
  shape = checks.check_qkv(q, k, v, op)
  block_len, stride = _check_compression(op, block_len, stride)
  select_len = _check_int(op, "select_len", select_len, 1)
  num_select = _check_int(op, "num_select", num_select, 3)  # initial + 2 local blocks
  window = _check_int(op, "window", window, 1)
  b, lq, lk, hq, hkv = shape.batch, shape.q_len, shape.kv_len, shape.q_heads, shape.kv_heads
  d, dv = shape.head_dim, shape.v_head_dim
  if lq > lk:
    raise ValueError(
      f"{op}: q has {lq} positions (dim 1) but k only {lk}; the queries are the last "
      "q_len of the kv_len positions, so q_len <= kv_len."
    )
  nc = max(0, (lk - block_len) // stride + 1)
  for name, x, last in (("k_cmp", k_cmp, d), ("v_cmp", v_cmp, dv)):
    layout = f"[batch, Nc, kv_heads, {'head_dim' if name == 'k_cmp' else 'v_head_dim'}]"
    _check_array(op, name, x, 4, layout)
    expected = (b, nc, hkv, last)
    if tuple(x.shape) != expected:
      raise ValueError(
        f"{op}: {name} must be {layout} = {expected} (Nc = num_compressed_blocks("
        f"kv_len={lk}, block_len={block_len}, stride={stride}) = {nc}), got "
        f"{tuple(x.shape)}."
      )
    if x.dtype != q.dtype:
      raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected q's dtype {q.dtype}.")
  _check_array(op, "gates", gates, 4, "[batch, q_len, q_heads, 3]")
  if tuple(gates.shape) != (b, lq, hq, 3):
    raise ValueError(
      f"{op}: gates must be [batch, q_len, q_heads, 3] = {(b, lq, hq, 3)} (cmp, slc, win), "
      f"got {tuple(gates.shape)}."
    )
  scale = checks.check_scale(scale, shape, op)
  return _Config(
    lq, lk, block_len, stride, select_len, num_select, window, scale, _XLA_STEP_SCORES, _SLC_BLOCK_Q
  )

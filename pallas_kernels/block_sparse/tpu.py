"""Block-sparse flash attention for TPUs: Pallas with the Mosaic lowering.

Three `pl.pallas_call`s, tied together by `jax.custom_vjp`:

  forward  grid (B, Hq, Qb, Kmax)     q tile i of query head h; slot t of its
                                      row of the forward view names kv tile
                                      kv_index[b, h, i, t]. Online softmax in
                                      VMEM scratch; out and lse are written at
                                      the last slot.
  dq       grid (B, Hq, Qb, Kmax)     the same walk, accumulating dQ from
                                      p = exp(s - lse).
  dk/dv    grid (B, Hkv, Kb, G, Qmax) kv tile j of kv head h; for each query
                                      head g of its group, slot t of the
                                      transposed view names q tile
                                      q_index[b, h * G + g, j, t]. dK and dV
                                      of the whole group accumulate in VMEM
                                      scratch and are written once, at the
                                      last (g, t): k/v are never repeated and
                                      no per-query-head partials reach HBM.

and one more for Re-ttention's calibration (`calibrate_tpu`, no gradient):

  calibrate grid (B, Hq, Qb, Kb)      q tile i against EVERY kv tile t (only
                                      the ragged bounds masked): the full
                                      online softmax and, on the tiles of
                                      the mask M, M's own (own running max;
                                      tile code 0: outside M, 1: full in M,
                                      2: partial, apply mask_fn). Gives out,
                                      lse, lse over M and O^M.

The trailing axes (the slots; group and slots for dk/dv; kv tiles for the
calibration) carry accumulators and are "arbitrary"; the others are
"parallel" (megacore may split them).

Scalar prefetch. A call prefetches its view of the mask to SMEM as flat
int32 arrays (1-D, so SMEM holds no row padding), which the index maps and
the kernel read:

  count  [Bm * Hm * R]          kv_count (q_count for dk/dv); R block rows
  slots  [Bm * Hm * R * Smax]   tile id << 1 | partial bit; Smax = Kmax (Qmax)
  codes  [Bm * Hm * R * Kb]     the calibration's tile codes (its only prefetch)

Row (b, h, r) is at (b' * Hm + h') * R + r, where b' = 0 if the mask
broadcasts over the batch (Bm = 1) and h' = 0 if over the heads. The index
maps read `slots` so that only listed tiles are DMA'd: padding slots repeat
their row's last id, the block index does not change, and Pallas issues no
copy for them, while `pl.when(t < count)` skips their compute. Partial tiles
run a body that evaluates `mask_fn`; full tiles run one that does not.
SMEM is small (1 MiB per core), so a view larger than `MAX_PREFETCH_WORDS`
is walked in several calls, each over a range of block rows (q blocks for
forward / dq / calibration, kv blocks for dk/dv) and prefetching only its
part.

Token routes (MoBA / NSA block selection, `common.TokenRoutes`): inside a
visited tile, query i of head h sees key j only if key[b, j] is one of
query[b, h // (Hq // Hr), i, :]. The routes are VMEM blocks whose index maps
follow the q and kv tiles of the walk (a padding slot re-uses its blocks, as
for k/v), each the whole of its array's last two dims, so any block size
tiles: query routes as [R8, block_q] rows of int32 [Br, Hr, Qb, R8, block_q]
(R padded to R8, a multiple of 8, and the sequence with -1), key routes as a
[1, block_kv] row of [Br, Kb, 1, block_kv] (padded with -2). A kernel
compares a query column with the key row R times and ORs: the forward, dq
and q-major dk/dv transpose the query rows to [block_q, R8] columns;
kv-major dk/dv (below) transposes the key row to a [block_kv, 1] column
instead (each one (8, n) int32 transpose per tile, on the XLU).

Layout. The wrapper pads the sequences to block multiples and transposes to
heads-major [B, H, S, D], so that a block's last two dims are (seq, head_dim)
as Mosaic's (8, 128) tiling wants (head_dim is a whole dim of the block, so
any head_dim works). The forward writes the lse lane-broadcast, f32
[B, Hq, Sq_pad, 128]: every lane holds the row's value, so a (block_q, 128)
block is one dense store (an [..., Sq_pad, 1] array would take as much
(8, 128)-tiled memory); the wrapper returns lane 0 as [B, Hq, Sq]. The
backward rebuilds lse (+inf on rows that see no key, so p = exp(s - lse) = 0
there and their gradients vanish) and delta = rowsum(dO * O) - dlse in that
layout for dq, whose scores are [block_q, block_kv] with queries on
sublanes. dk/dv, when block_q fills the lanes (a multiple of 128, or one q
block), computes the transposed scores [block_kv, block_q] = k @ q.T and
gets lse / delta sublane-broadcast, f32 [B, Hq, 8, Sq_pad] (16x less to copy
per tile, no transposes: dV += p.T-tile @ dO and dK += ds.T-tile @ q are
plain matmuls); otherwise it reuses dq's layout and contracts the query axis
of [block_q, block_kv] tiles (Mosaic transposes them).

Limits (`check_supported`): block_q and block_kv multiples of 8 (the sublane
tiling of every block), unless one block covers the whole sequence, and one
block row of each mask view must fit in SMEM (for the calibration, one row
of tile codes: `check_calibration_supported`). Token routes add none.
float16 runs in float32 (Mosaic has no float16 vectors). block_kv a
multiple of 128 fills the lanes of the score tiles and is what runs fast;
smaller blocks compile but pad.

vmap. Under `jax.vmap` every kernel runs once over the mapped axis folded into
the batch (`_vmap_into_batch`, a `custom_vmap` rule), a mapped mask or routes
included; Pallas's own rule would add a grid axis these kernels do not expect.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparse_attention.pallas_kernels.block_sparse import common

LANES = 128  # lanes of a vector register
SUBLANES = 8  # a block's second-minor dim is a multiple of this (or the whole dim)
# Prefetched int32 entries per pallas_call. TPU v4 and newer have 1 MiB of
# SMEM per core; a larger view fails to compile. 1/16 is left to the compiler.
MAX_PREFETCH_WORDS = (1 << 20) * 15 // 16 // 4

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _words_per_row(*arrays: jax.Array) -> int:
  """SMEM entries one block row of [Bm, Hm, R, ...] arrays costs (over all
  batches and heads)."""
  return sum(x.size // x.shape[2] for x in arrays)


def check_supported(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: Any,
  routes: Any = None,
  *,
  score_mod: Any = None,
) -> None:
  """Raises `common.Unsupported` if the TPU kernel cannot run this call (before any work).

  Args:
    q, k, v: as for `block_sparse_attention_tpu`; only q's dtype is read.
    mask: a `common.BlockSparseLayout` (an `ops.BlockMask`).
    routes: token routes or None; routes of any shape are supported.
  """
  common.refuse_mods("TPU block-sparse", mask, score_mod)
  del k, v, routes
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise common.Unsupported(
      f"the TPU block-sparse kernel supports float32, bfloat16 and float16, got {q.dtype}."
    )
  for name, block, length in (
    ("block_q", mask.block_q, mask.q_len),
    ("block_kv", mask.block_kv, mask.kv_len),
  ):
    if block % SUBLANES and block < length:
      raise common.Unsupported(
        f"the TPU block-sparse kernel needs {name} to be a multiple of {SUBLANES} "
        f"(Mosaic's sublane tiling) unless one block covers the sequence; the mask "
        f"has {name}={block} for a length of {length}."
      )
  for name, count, index in (
    ("max_kv_blocks", mask.kv_count, mask.kv_index),
    ("max_q_blocks", mask.q_count, mask.q_index),
  ):
    _check_prefetch(f"1 + {name}={index.shape[-1]}", f"lower {name}", count, index)


def check_calibration_supported(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any) -> None:
  """`check_supported` for `calibrate_tpu`, whose prefetch is a row of tile
  codes per (batch, head) of the mask: Bm x Hm x Kb int32 entries."""
  check_supported(q, k, v, mask)
  bm, hm, qb = mask.kv_count.shape
  codes = jax.ShapeDtypeStruct((bm, hm, qb, -(-mask.kv_len // mask.block_kv)), jnp.int32)
  _check_prefetch(f"kv blocks={codes.shape[-1]}", "use larger kv blocks", codes)


def _check_prefetch(what: str, advice: str, *arrays) -> None:
  """One block row of the [Bm, Hm, R, ...] `arrays` must fit in SMEM."""
  words = _words_per_row(*arrays)
  if words > MAX_PREFETCH_WORDS:
    bm, hm = arrays[0].shape[:2]
    raise common.Unsupported(
      f"the TPU block-sparse kernel prefetches the mask to SMEM, at least one block row "
      f"at a time (batch/heads {(bm, hm)} x ({what}) = {words} int32 entries), at most "
      f"{MAX_PREFETCH_WORDS}. Broadcast the mask over batch or heads, or {advice}."
    )


@dataclasses.dataclass(frozen=True)
class _Config(common.Tiling):
  """Static facts of one call (hashable: the custom_vjp's non-diff argument)."""

  scale: float
  group: int  # query heads per kv head
  mask_batch: bool  # the mask has a batch dim (> 1)
  mask_heads: int  # Hm: 1 (broadcast) or the number of query heads
  num_routes: int  # R routes per query (0: no token routes)
  route_group: int  # query heads per route head (Hq // Hr)
  route_batch: bool  # the routes have a batch dim (> 1)
  interpret: Any  # False or a pltpu.InterpretParams

  @property
  def kv_major(self) -> bool:
    """dK/dV computes s.T (kv positions on sublanes, queries on lanes): no
    transposes, and lse / delta reach it as [8, block_q] rows instead of
    [block_q, 128] columns, 16x less to copy per tile. Needs block_q to fill
    lanes: a multiple of 128, or one block covering the queries."""
    return self.block_q % LANES == 0 or self.num_q_blocks == 1

  @property
  def route_rows(self) -> int:
    """R8: the routes of a query, padded to a multiple of 8 (sublanes)."""
    return -(-self.num_routes // SUBLANES) * SUBLANES


def _config(q, k, mask, *, scale, interpret, routes=None) -> _Config:
  if interpret is True:
    interpret = pltpu.InterpretParams()
  bm, hm = mask.kv_count.shape[:2]
  return _Config(
    **common.Tiling.fields_of(mask),
    scale=float(scale),
    group=q.shape[2] // k.shape[2],
    mask_batch=bm > 1,
    mask_heads=hm,
    # R = 0 lists no route: padded to one -1 column, which matches nothing.
    num_routes=0 if routes is None else max(1, routes.query.shape[-1]),
    route_group=1 if routes is None else q.shape[2] // routes.query.shape[1],
    route_batch=routes is not None and routes.query.shape[0] > 1,
    interpret=interpret,
  )


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Block rows [start, start + size) of a mask view: what one call walks."""

  start: int
  size: int

  def flat(self, cfg: _Config, b, h, r):
    """Index into the prefetched `count` of (batch b, query head h, local row r)."""
    b = b if cfg.mask_batch else 0
    h = h if cfg.mask_heads > 1 else 0
    return (b * cfg.mask_heads + h) * self.size + r


def _div(h, group: int):
  """h // group for a program id. jnp's floor division lowers through `sign`,
  whose Mosaic rule asks the local TPU for its generation (so lowering for
  TPU on another host fails); a truncating division does not."""
  return h if group == 1 else jax.lax.div(h, jnp.int32(group))


# ---------------------------------------------------------------------------
# Tile math (inside kernels).
# ---------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, dims=_NN) -> jax.Array:
  """Matmul with f32 accumulation; full f32 precision (not bf16 passes) for f32."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _positions(cfg: _Config, i, j, shape, kv_major: bool = False):
  """Absolute (query, key) positions, int32 `shape`, in tile (i, j):
  [block_q, block_kv], or [block_kv, block_q] if kv_major."""
  q_axis, kv_axis = (1, 0) if kv_major else (0, 1)
  q_pos = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
  kv_pos = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, kv_axis)
  return q_pos, kv_pos


def _scores(
  cfg: _Config, q, k, i, j, masked: bool, kv_major: bool = False, routed=None
) -> jax.Array:
  """Scaled scores f32 [block_q, block_kv] of q tile i and kv tile j, -inf
  where hidden: by `mask_fn` if `masked`, by the routes where `routed` (bool,
  None: no routes) is False, and past the ragged tails. kv_major: the
  transpose, [block_kv, block_q] (k @ q.T)."""
  s = _dot(k, q, _NT) if kv_major else _dot(q, k, _NT)
  s = s * cfg.scale
  q_pos, kv_pos = _positions(cfg, i, j, s.shape, kv_major)
  vis = common.visibility(
    cfg.mask_fn if masked else None,
    True,
    q_pos,
    kv_pos,
    q_len=cfg.q_len,
    kv_len=cfg.kv_len,
    block_q=cfg.block_q,
    block_kv=cfg.block_kv,
    routed=routed,
  )
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _routed(cfg: _Config, q_route_ref, kv_route_ref, kv_major: bool = False):
  """bool [block_q, block_kv] ([block_kv, block_q] if kv_major): the key's
  route is one of the query's; None without routes."""
  if q_route_ref is None:
    return None
  rows, key = q_route_ref[...], kv_route_ref[...]  # [R8, block_q], [1, block_kv]
  if kv_major:  # key column [block_kv, 1] vs query rows [1, block_q]
    key = jnp.broadcast_to(key, (SUBLANES, key.shape[1])).T[:, :1]
    queries = [rows[r : r + 1, :] for r in range(cfg.num_routes)]
  else:  # query columns [block_q, 1] vs the key row
    columns = rows.T
    queries = [columns[:, r : r + 1] for r in range(cfg.num_routes)]
  return functools.reduce(jnp.logical_or, [x == key for x in queries])


def _when_listed(cfg: _Config, t, count, slot, body) -> None:
  """Runs `body(tile, masked)` if slot t < count lists a tile: with
  masked=True on partial tiles, masked=False on full ones."""
  tile, listed = slot >> 1, t < count
  if cfg.mask_fn is None:
    pl.when(listed)(lambda: body(tile, False))
    return
  partial = (slot & 1) == 1
  pl.when(jnp.logical_and(listed, partial))(lambda: body(tile, True))
  pl.when(jnp.logical_and(listed, jnp.logical_not(partial)))(lambda: body(tile, False))


def _column(ref) -> jax.Array:
  """f32 [rows] from a lane-broadcast [rows, 128] ref."""
  return ref[:, 0]


def _lanes(x: jax.Array) -> jax.Array:
  """f32 [rows] -> lane-broadcast [rows, 128]."""
  return jnp.broadcast_to(x[:, None], (x.shape[0], LANES))


# ---------------------------------------------------------------------------
# Kernels. Program ids are local to the call's block rows (`rows`). Route refs
# are None without token routes.
# ---------------------------------------------------------------------------


def _forward_kernel(
  count_ref,  # SMEM int32 [Bm * Hm * rows.size]
  slots_ref,  # SMEM int32 [Bm * Hm * rows.size * Kmax]
  q_route_ref,  # int32 [R8, block_q]  routes of these queries (rows)
  kv_route_ref,  # int32 [1, block_kv]  routes of the keys of tile slots[row, t] >> 1
  q_ref,  # [block_q, D]
  k_ref,  # [block_kv, D]    tile slots[row, t] >> 1
  v_ref,  # [block_kv, Dv]
  o_ref,  # [block_q, Dv]
  lse_ref,  # f32 [block_q, 128]
  m_ref,  # scratch f32 [block_q, 128]   running max, lane-broadcast
  l_ref,  # scratch f32 [block_q, 128]   running sum of exp(s - m), lane-broadcast
  acc_ref,  # scratch f32 [block_q, Dv]
  *,
  cfg: _Config,
  rows: _Rows,
  kmax: int,
):
  b, h, r, t = (pl.program_id(a) for a in range(4))

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(j, masked: bool):
    routed = _routed(cfg, q_route_ref, kv_route_ref)
    s = _scores(cfg, q_ref[...], k_ref[...], rows.start + r, j, masked, routed=routed)
    m, l, acc = common.online_softmax_update(
      s, _column(m_ref), _column(l_ref), acc_ref[...], v_ref[...], _dot
    )
    m_ref[...], l_ref[...], acc_ref[...] = _lanes(m), _lanes(l), acc

  row = rows.flat(cfg, b, h, r)
  _when_listed(cfg, t, count_ref[row], slots_ref[row * kmax + t], body)

  @pl.when(t == kmax - 1)
  def _finish():
    out, lse = common.finalize(_column(m_ref), _column(l_ref), acc_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = _lanes(lse)


def _dq_kernel(
  count_ref,  # SMEM int32 [Bm * Hm * rows.size]
  slots_ref,  # SMEM int32 [Bm * Hm * rows.size * Kmax]
  q_route_ref,  # int32 [R8, block_q]
  kv_route_ref,  # int32 [1, block_kv]
  q_ref,  # [block_q, D]
  k_ref,  # [block_kv, D]
  v_ref,  # [block_kv, Dv]
  do_ref,  # [block_q, Dv]
  lse_ref,  # f32 [block_q, 128]   +inf on rows that see no key
  delta_ref,  # f32 [block_q, 128]   rowsum(dO * O) - dlse
  dq_ref,  # [block_q, D]
  acc_ref,  # scratch f32 [block_q, D]
  *,
  cfg: _Config,
  rows: _Rows,
  kmax: int,
):
  b, h, r, t = (pl.program_id(a) for a in range(4))

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(j, masked: bool):
    k = k_ref[...]
    routed = _routed(cfg, q_route_ref, kv_route_ref)
    s = _scores(cfg, q_ref[...], k, rows.start + r, j, masked, routed=routed)
    p = jnp.exp(s - lse_ref[:, :1])
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - delta_ref[:, :1])
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  row = rows.flat(cfg, b, h, r)
  _when_listed(cfg, t, count_ref[row], slots_ref[row * kmax + t], body)

  @pl.when(t == kmax - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(
  count_ref,  # SMEM int32 [Bm * Hm * rows.size]
  slots_ref,  # SMEM int32 [Bm * Hm * rows.size * Qmax]
  q_route_ref,  # int32 [R8, block_q]   routes of q tile slots[row, t] >> 1
  kv_route_ref,  # int32 [1, block_kv]
  q_ref,  # [block_q, D]     query head h * G + g, tile slots[row, t] >> 1
  k_ref,  # [block_kv, D]
  v_ref,  # [block_kv, Dv]
  do_ref,  # [block_q, Dv]
  lse_ref,  # f32 [8, block_q] sublane-broadcast if cfg.kv_major, else [block_q, 128]
  delta_ref,  # f32, as lse_ref
  dk_ref,  # [block_kv, D]
  dv_ref,  # [block_kv, Dv]
  dk_acc_ref,  # scratch f32 [block_kv, D]    summed over the group's query heads
  dv_acc_ref,  # scratch f32 [block_kv, Dv]
  *,
  cfg: _Config,
  rows: _Rows,
  qmax: int,
):
  b, h, r, g, t = (pl.program_id(a) for a in range(5))

  @pl.when(jnp.logical_and(g == 0, t == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def body(i, masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    routed = _routed(cfg, q_route_ref, kv_route_ref, cfg.kv_major)
    s = _scores(cfg, q, k, i, rows.start + r, masked, cfg.kv_major, routed)
    if cfg.kv_major:  # p, ds: [block_kv, block_q]; every matmul is plain or NT
      p = jnp.exp(s - lse_ref[:1, :])
      dv_acc_ref[...] += _dot(p.astype(do.dtype), do)
      ds = p * (_dot(v, do, _NT) - delta_ref[:1, :])
      dk_acc_ref[...] += _dot(ds.astype(q.dtype), q)
    else:  # p, ds: [block_q, block_kv]; dV and dK contract the q axis (TN)
      p = jnp.exp(s - lse_ref[:, :1])
      dv_acc_ref[...] += _dot(p.astype(do.dtype), do, _TN)
      ds = p * (_dot(do, v, _NT) - delta_ref[:, :1])
      dk_acc_ref[...] += _dot(ds.astype(q.dtype), q, _TN)

  row = rows.flat(cfg, b, h * cfg.group + g, r)
  _when_listed(cfg, t, count_ref[row], slots_ref[row * qmax + t], body)

  @pl.when(jnp.logical_and(g == cfg.group - 1, t == qmax - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _calibrate_kernel(
  codes_ref,  # SMEM int32 [Bm * Hm * rows.size * Kb]: 0 outside M, 1 full in M, 2 partial
  q_ref,  # [block_q, D]
  k_ref,  # [block_kv, D]    tile t
  v_ref,  # [block_kv, Dv]
  o_ref,  # [block_q, Dv]   attention over all keys
  lse_ref,  # f32 [block_q, 128]   lse over all keys, lane-broadcast
  lse_m_ref,  # f32 [block_q, 128]   lse over M's keys
  *refs,  # om_ref [block_q, Dv] (O^M) if masked_output; then scratch: m, l, acc of all
  # keys and m_m, l_m (f32 [block_q, 128], lane-broadcast), acc_m (f32 [block_q, Dv], if
  # O^M) of M's keys
  cfg: _Config,
  rows: _Rows,
  masked_output: bool,
):
  """Dense attention over every kv tile; on M's tiles, M's share runs its own online
  softmax (own running max, so that lse_masked and O^M are exact however far M's
  scores sit below the row's max)."""
  if masked_output:
    om_ref, *scratch = refs
  else:
    om_ref, scratch = None, [*refs, None]
  dense, masked = scratch[:3], scratch[3:]  # (m_ref, l_ref, acc_ref) each
  b, h, r, t = (pl.program_id(a) for a in range(4))
  kb = cfg.num_kv_blocks

  @pl.when(t == 0)
  def _init():
    for m_ref, l_ref, acc_ref in (dense, masked):
      m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      if acc_ref is not None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def update(s, m_ref, l_ref, acc_ref):  # one online-softmax step on the scratch refs
    acc = None if acc_ref is None else acc_ref[...]
    m, l, acc = common.online_softmax_update(
      s, _column(m_ref), _column(l_ref), acc, v_ref[...], _dot
    )
    m_ref[...], l_ref[...] = _lanes(m), _lanes(l)
    if acc_ref is not None:
      acc_ref[...] = acc

  s = _scores(cfg, q_ref[...], k_ref[...], rows.start + r, t, masked=False)
  update(s, *dense)
  code = codes_ref[rows.flat(cfg, b, h, r) * kb + t]
  if cfg.mask_fn is None:  # no partial tiles
    pl.when(code != 0)(lambda: update(s, *masked))
  else:
    pl.when(code == 1)(lambda: update(s, *masked))

    @pl.when(code == 2)
    def _partial():
      q_pos, kv_pos = _positions(cfg, rows.start + r, t, s.shape)
      update(jnp.where(cfg.mask_fn(q_pos, kv_pos), s, -jnp.inf), *masked)

  @pl.when(t == kb - 1)
  def _finish():
    finalize = lambda m_ref, l_ref, acc_ref: common.finalize(
      _column(m_ref), _column(l_ref), None if acc_ref is None else acc_ref[...]
    )
    out, lse = finalize(*dense)
    out_m, lse_m = finalize(*masked)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = _lanes(lse)
    lse_m_ref[...] = _lanes(lse_m)
    if masked_output:
      om_ref[...] = out_m.astype(om_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call plumbing.
# ---------------------------------------------------------------------------


def _heads_major(x: jax.Array, length: int) -> jax.Array:
  """[B, S, H, D] -> [B, H, length, D], zero-padding S to `length`."""
  x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3)


def _seq_major(x: jax.Array, length: int) -> jax.Array:
  """[B, H, S_pad, D] -> [B, length, H, D]."""
  return x[:, :, :length].transpose(0, 2, 1, 3)


def _rows_to_lanes(x: jax.Array, length: int) -> jax.Array:
  """f32 [B, H, S] -> lane-broadcast [B, H, length, 128], zero-padded."""
  x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])))
  return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _rows_to_sublanes(x: jax.Array, length: int) -> jax.Array:
  """f32 [B, H, S] -> sublane-broadcast [B, H, 8, length], zero-padded."""
  x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])))
  return jnp.broadcast_to(x[:, :, None], (*x.shape[:2], SUBLANES, length))


def _slots(view) -> tuple[jax.Array, jax.Array]:
  """(count, slots) of a view (count int32 [Bm, Hm, R], index int32
  [Bm, Hm, R, Smax], partial bool [Bm, Hm, R, Smax]): slot = id << 1 | partial."""
  count, index, partial = view
  return count, (index.astype(jnp.int32) << 1) | partial.astype(jnp.int32)


def _walk_rows(prefetch, call) -> list[jax.Array]:
  """Runs `call(rows, *flat)` over the block rows of the [Bm, Hm, R, ...]
  arrays `prefetch`, in as few pieces as SMEM allows (each array reaches
  `call` flat, its rows `rows` only, as the kernels prefetch it); joins the
  pieces' outputs along axis 2 (the sequence of [B, H, S, D] arrays)."""
  total = prefetch[0].shape[2]
  step = max(1, MAX_PREFETCH_WORDS // _words_per_row(*prefetch))
  flat = lambda x, start, stop: x[:, :, start:stop].astype(jnp.int32).reshape(-1)
  pieces = []
  for start in range(0, total, step):
    stop = min(start + step, total)
    pieces.append(call(_Rows(start, stop - start), *(flat(x, start, stop) for x in prefetch)))
  joined = zip(*pieces, strict=True)
  return [parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2) for parts in joined]


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, scratch, name, prefetch=2):
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=prefetch,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=scratch,
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
    ),
    interpret=cfg.interpret,
    name=name,
  )


def _block(rows: int, width: int, index_map) -> pl.BlockSpec:
  """A [rows, width] block of one (batch, head) of a [B, H, ., .] array."""
  return pl.BlockSpec((None, None, rows, width), index_map)


def _q_walk_specs(cfg: _Config, rows: _Rows, kmax: int):
  """Index maps of the forward-view walk, grid (b, h, r, t):
  (q tile, the call's own output tile, kv tile slots[row, t] >> 1)."""

  def q_tile(b, h, r, t, *prefetch_refs):
    return b, h, rows.start + r, 0

  def out_tile(b, h, r, t, *prefetch_refs):
    return b, h, r, 0

  def kv_tile(b, h, r, t, count_ref, slots_ref):
    j = slots_ref[rows.flat(cfg, b, h, r) * kmax + t] >> 1
    return b, _div(h, cfg.group), j, 0

  return q_tile, out_tile, kv_tile


def _route_arrays(cfg: _Config, routes) -> list:
  """The token routes as `_route_specs` reads them ([None, None] without),
  padded with values that match nothing: query routes int32
  [Br, Hr, Qb, R8, block_q], key routes int32 [Br, Kb, 1, block_kv]."""
  if routes is None:
    return [None, None]
  qb, kb = cfg.num_q_blocks, cfg.num_kv_blocks
  br, hr, _, r = routes.query.shape
  r8 = cfg.route_rows
  query = jnp.pad(
    routes.query.astype(jnp.int32),
    ((0, 0), (0, 0), (0, qb * cfg.block_q - cfg.q_len), (0, r8 - r)),
    constant_values=-1,
  )
  query = query.reshape(br, hr, qb, cfg.block_q, r8).swapaxes(3, 4)
  key = jnp.pad(
    routes.key.astype(jnp.int32), ((0, 0), (0, kb * cfg.block_kv - cfg.kv_len)), constant_values=-2
  )
  return [query, key.reshape(br, kb, 1, cfg.block_kv)]


def _route_specs(cfg: _Config, q_tile, kv_tile) -> list:
  """BlockSpecs of the routes of the q tile and the kv tile that the index
  maps `q_tile` and `kv_tile` name ([None, None] without routes)."""
  if not cfg.num_routes:
    return [None, None]
  batch = lambda b: b if cfg.route_batch else 0

  def query(*ids):
    b, h, i, _ = q_tile(*ids)
    return batch(b), _div(h, cfg.route_group), i, 0, 0

  def key(*ids):
    b, _, j, _ = kv_tile(*ids)
    return batch(b), j, 0, 0

  return [
    pl.BlockSpec((None, None, None, cfg.route_rows, cfg.block_q), query),
    pl.BlockSpec((None, None, 1, cfg.block_kv), key),
  ]


def _forward(cfg: _Config, q, k, v, kv_view, q_view, routes):
  del q_view  # the transposed view serves the backward pass only
  b, _, hq, d = q.shape
  dv = v.shape[-1]
  sq, sk = cfg.num_q_blocks * cfg.block_q, cfg.num_kv_blocks * cfg.block_kv
  kmax = kv_view[1].shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  q, k, v = _heads_major(q, sq), _heads_major(k, sk), _heads_major(v, sk)
  route_args = _route_arrays(cfg, routes)

  def call(rows: _Rows, count, slots):
    q_tile, out_tile, kv_tile = _q_walk_specs(cfg, rows, kmax)
    return _call(
      functools.partial(_forward_kernel, cfg=cfg, rows=rows, kmax=kmax),
      cfg,
      grid=(b, hq, rows.size, kmax),
      in_specs=[
        *_route_specs(cfg, q_tile, kv_tile),
        _block(bq, d, q_tile),
        _block(bk, d, kv_tile),
        _block(bk, dv, kv_tile),
      ],
      out_specs=[_block(bq, dv, out_tile), _block(bq, LANES, out_tile)],
      out_shape=[
        jax.ShapeDtypeStruct((b, hq, rows.size * bq, dv), q.dtype),
        jax.ShapeDtypeStruct((b, hq, rows.size * bq, LANES), jnp.float32),
      ],
      scratch=[
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, dv), jnp.float32),
      ],
      name="block_sparse_forward",
    )(count, slots, *route_args, q, k, v)

  out, lse = _walk_rows(_slots(kv_view), call)
  return _seq_major(out, cfg.q_len), lse[:, :, : cfg.q_len, 0]


def _backward(cfg: _Config, q, k, v, kv_view, q_view, routes, out, lse, d_out, d_lse):
  b, _, hq, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  sq, sk = cfg.num_q_blocks * cfg.block_q, cfg.num_kv_blocks * cfg.block_kv
  kmax, qmax = kv_view[1].shape[-1], q_view[1].shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  # f32 [B, Hq, Sq]; +inf lse on rows that see no key makes p = 0 there.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  stats = (jnp.where(lse == -jnp.inf, jnp.inf, lse), delta - d_lse)
  q, d_out = _heads_major(q, sq), _heads_major(d_out, sq)
  k, v = _heads_major(k, sk), _heads_major(v, sk)
  tensors = (q, k, v, d_out)
  columns = tuple(_rows_to_lanes(x, sq) for x in stats)  # [B, Hq, Sq_pad, 128]
  route_args = _route_arrays(cfg, routes)

  def dq_call(rows: _Rows, count, slots):
    q_tile, out_tile, kv_tile = _q_walk_specs(cfg, rows, kmax)
    return _call(
      functools.partial(_dq_kernel, cfg=cfg, rows=rows, kmax=kmax),
      cfg,
      grid=(b, hq, rows.size, kmax),
      in_specs=[
        *_route_specs(cfg, q_tile, kv_tile),
        _block(bq, d, q_tile),
        _block(bk, d, kv_tile),
        _block(bk, dv, kv_tile),
        _block(bq, dv, q_tile),
        _block(bq, LANES, q_tile),
        _block(bq, LANES, q_tile),
      ],
      out_specs=[_block(bq, d, out_tile)],
      out_shape=[jax.ShapeDtypeStruct((b, hq, rows.size * bq, d), q.dtype)],
      scratch=[pltpu.VMEM((bq, d), jnp.float32)],
      name="block_sparse_dq",
    )(count, slots, *route_args, *tensors, *columns)

  def dkdv_call(rows: _Rows, count, slots):
    # Grid (b, h, r, g, t): kv tile rows.start + r of kv head h; query head
    # h * G + g; its q tile in slot t of the transposed view.
    def q_tile(b, h, r, g, t, count_ref, slots_ref):
      qh = h * cfg.group + g
      return b, qh, slots_ref[rows.flat(cfg, b, qh, r) * qmax + t] >> 1, 0

    def kv_tile(b, h, r, g, t, *prefetch_refs):
      return b, h, rows.start + r, 0

    def out_tile(b, h, r, g, t, *prefetch_refs):
      return b, h, r, 0

    def row_tile(*grid_and_refs):  # lse / delta as [8, block_q] rows
      b, qh, i, _ = q_tile(*grid_and_refs)
      return b, qh, 0, i

    stat = _block(SUBLANES, bq, row_tile) if cfg.kv_major else _block(bq, LANES, q_tile)

    return _call(
      functools.partial(_dkdv_kernel, cfg=cfg, rows=rows, qmax=qmax),
      cfg,
      grid=(b, hkv, rows.size, cfg.group, qmax),
      in_specs=[
        *_route_specs(cfg, q_tile, kv_tile),
        _block(bq, d, q_tile),
        _block(bk, d, kv_tile),
        _block(bk, dv, kv_tile),
        _block(bq, dv, q_tile),
        stat,
        stat,
      ],
      out_specs=[_block(bk, d, out_tile), _block(bk, dv, out_tile)],
      out_shape=[
        jax.ShapeDtypeStruct((b, hkv, rows.size * bk, d), k.dtype),
        jax.ShapeDtypeStruct((b, hkv, rows.size * bk, dv), v.dtype),
      ],
      scratch=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
      name="block_sparse_dkdv",
    )(count, slots, *route_args, *tensors, *rows_or_columns)

  rows_or_columns = tuple(_rows_to_sublanes(x, sq) for x in stats) if cfg.kv_major else columns
  (dq,) = _walk_rows(_slots(kv_view), dq_call)
  dk, dv = _walk_rows(_slots(q_view), dkdv_call)
  return _seq_major(dq, cfg.q_len), _seq_major(dk, cfg.kv_len), _seq_major(dv, cfg.kv_len)


# ---------------------------------------------------------------------------
# vmap: the mapped axis folds into the batch.
# ---------------------------------------------------------------------------


def _vmap_into_batch(fn, mask_args: tuple[int, ...], route_args: tuple[int, ...] = ()):
  """`fn(cfg, *args, **static)`, whose `jax.vmap` runs ONE call over the mapped axis
  folded into the batch (n x B rows), instead of Pallas's batching rule, which adds a
  grid axis that these kernels' dimension semantics and scalar-prefetch index maps do
  not expect (the TPU simulator fails on it).

  Every array of `args` and of the outputs has the batch on axis 0. The arrays at
  positions `mask_args` (the mask's) and `route_args` (the token routes') may have a
  batch of 1 where they broadcast (`cfg.mask_batch` / `cfg.route_batch` False); they
  keep it when vmap leaves them alone, and are folded like the rest (their flag set)
  otherwise. Nested vmaps fold one level at a time.
  """

  def call(cfg, *args, **static):
    run = jax.custom_batching.custom_vmap(lambda *args: fn(cfg, *args, **static))

    @run.def_vmap
    def rule(n, in_batched, *args):
      batch = args[0].shape[1 if in_batched[0] else 0]  # args[0] is q

      def fold(x, batched):  # [n, B|1, ...] or [B|1, ...] -> [n * B, ...]
        x = x if batched else jnp.broadcast_to(x[None], (n, *x.shape))
        x = jnp.broadcast_to(x, (n, batch, *x.shape[2:]))
        return x.reshape(n * batch, *x.shape[2:])

      def batched(positions) -> bool:  # whether these arrays carry a batch dim once folded
        leaves = lambda tree: jax.tree.leaves([tree[i] for i in positions])
        pairs = zip(leaves(args), leaves(in_batched), strict=True)
        return any(mapped or x.shape[0] > 1 for x, mapped in pairs)

      mask_batch, route_batch = batched(mask_args), batched(route_args)
      kept = {i for i in mask_args if not mask_batch} | {i for i in route_args if not route_batch}
      folded = [
        arg if i in kept else jax.tree.map(fold, arg, in_batched[i]) for i, arg in enumerate(args)
      ]
      cfg_n = dataclasses.replace(cfg, mask_batch=mask_batch, route_batch=route_batch)
      out = call(cfg_n, *folded, **static)
      unfold = lambda y: y.reshape(n, batch, *y.shape[1:])
      return jax.tree.map(unfold, out), jax.tree.map(lambda _: True, out)

    return run(*args)

  return call


# args: q, k, v, kv_view, q_view, routes[, out, lse, d_out, d_lse]
_attention = common.attention_with_vjp(
  _vmap_into_batch(_forward, mask_args=(3, 4), route_args=(5,)),
  _vmap_into_batch(_backward, mask_args=(3, 4), route_args=(5,)),
)


def block_sparse_attention_tpu(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: common.BlockSparseLayout,
  *,
  scale: float,
  interpret: Any = False,
  routes: common.TokenRoutes | None = None,
  score_mod: common.ScoreMod | None = None,
  score_mod_params: Any = None,
  batch_offset: Any = 0,
  head_offset: Any = 0,
) -> tuple[jax.Array, jax.Array]:
  """(output [batch, q_len, q_heads, v_head_dim], lse f32 [batch, q_heads, q_len]).

  Differentiable (Pallas backward kernels; the lse cotangent is honoured).
  Inputs are assumed validated by `ops.block_sparse_attention`;
  `check_supported` is run here.

  Args:
    scale: softmax scale (a Python float).
    interpret: False (compile with Mosaic for a TPU), True (the Pallas TPU
      interpreter with `pltpu.InterpretParams()` defaults, on any backend), or
      a `pltpu.InterpretParams` to pass through.
    routes: optional per-token routes (`common.TokenRoutes`, query int
      [B|1, Hr, q_len, R], key int [B|1, kv_len]): inside the visited tiles,
      a query sees only keys whose route it lists.
  """
  check_supported(q, k, v, mask, routes, score_mod=score_mod)
  del score_mod_params, batch_offset, head_offset  # refused above until supported
  if q.dtype == jnp.float16:  # Mosaic has no float16 vectors: compute in float32
    f32 = lambda x: x.astype(jnp.float32)
    out, lse = block_sparse_attention_tpu(
      f32(q), f32(k), f32(v), mask, scale=scale, interpret=interpret, routes=routes
    )
    return out.astype(q.dtype), lse
  cfg = _config(q, k, mask, scale=scale, interpret=interpret, routes=routes)
  kv_view = (mask.kv_count, mask.kv_index, mask.kv_partial)
  q_view = (mask.q_count, mask.q_index, mask.q_partial)
  return _attention(cfg, q, k, v, kv_view, q_view, routes)


# ---------------------------------------------------------------------------
# Re-ttention's calibration.
# ---------------------------------------------------------------------------


def calibrate_tpu(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: common.BlockSparseLayout,
  tile_codes: jax.Array,  # int32 [Bm, Hm, Qb, Kb]: 0 outside the mask, 1 full, 2 partial
  *,
  scale: float,
  masked_output: bool = True,
  interpret: Any = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Re-ttention's calibration in one kernel: (out, lse, lse over the mask M,
  out normalised over M or None), as `gpu.calibrate_triton`.

  Every kv tile is visited once (dense; only the ragged bounds are masked).
  Rows M keeps no key of get lse_masked -inf and O^M 0. No gradient
  (calibration runs at sampling time). `check_calibration_supported` is run
  here; `interpret` as for `block_sparse_attention_tpu`.
  """
  check_calibration_supported(q, k, v, mask)
  if q.dtype == jnp.float16:  # Mosaic has no float16 vectors: compute in float32
    f32 = lambda x: x.astype(jnp.float32)
    out, lse, lse_m, out_m = calibrate_tpu(
      f32(q),
      f32(k),
      f32(v),
      mask,
      tile_codes,
      scale=scale,
      masked_output=masked_output,
      interpret=interpret,
    )
    f16 = lambda x: None if x is None else x.astype(q.dtype)
    return f16(out), lse, lse_m, f16(out_m)
  cfg = _config(q, k, mask, scale=scale, interpret=interpret)
  return _calibrate(cfg, masked_output, q, k, v, tile_codes)


def _calibrate_kernels(cfg: _Config, q, k, v, tile_codes, *, masked_output: bool):
  b, _, hq, d = q.shape
  dv = v.shape[-1]
  kb = cfg.num_kv_blocks
  sq, sk = cfg.num_q_blocks * cfg.block_q, kb * cfg.block_kv
  bq, bk = cfg.block_q, cfg.block_kv
  q, k, v = _heads_major(q, sq), _heads_major(k, sk), _heads_major(v, sk)

  def call(rows: _Rows, codes):
    def q_tile(b, h, r, t, codes_ref):
      return b, h, rows.start + r, 0

    def out_tile(b, h, r, t, codes_ref):
      return b, h, r, 0

    def kv_tile(b, h, r, t, codes_ref):
      return b, _div(h, cfg.group), t, 0

    out = lambda width, dtype: jax.ShapeDtypeStruct((b, hq, rows.size * bq, width), dtype)
    stat = jnp.float32
    outputs = [(dv, q.dtype), (LANES, stat), (LANES, stat)] + [(dv, q.dtype)] * masked_output
    # m, l, acc over all keys; m_m, l_m (and acc_m) over M's
    scratch = [(LANES, stat), (LANES, stat), (dv, stat), (LANES, stat), (LANES, stat)]
    scratch += [(dv, stat)] * masked_output
    return _call(
      functools.partial(_calibrate_kernel, cfg=cfg, rows=rows, masked_output=masked_output),
      cfg,
      grid=(b, hq, rows.size, kb),
      in_specs=[_block(bq, d, q_tile), _block(bk, d, kv_tile), _block(bk, dv, kv_tile)],
      out_specs=[_block(bq, width, out_tile) for width, _ in outputs],
      out_shape=[out(width, dtype) for width, dtype in outputs],
      scratch=[pltpu.VMEM((bq, width), dtype) for width, dtype in scratch],
      name="block_sparse_calibrate",
      prefetch=1,
    )(codes, q, k, v)

  out, lse, lse_m, *out_m = _walk_rows([tile_codes], call)
  out_m = _seq_major(out_m[0], cfg.q_len) if masked_output else None
  lse, lse_m = lse[:, :, : cfg.q_len, 0], lse_m[:, :, : cfg.q_len, 0]
  return _seq_major(out, cfg.q_len), lse, lse_m, out_m


_calibrate_batched = _vmap_into_batch(_calibrate_kernels, mask_args=(3,))
_calibrate = common.forward_only(
  lambda cfg, masked_output, *arrays: _calibrate_batched(cfg, *arrays, masked_output=masked_output),
  "calibrate_attention has no gradient through the TPU kernel (calibration runs at "
  "sampling time); use implementation='xla' to differentiate it.",
)

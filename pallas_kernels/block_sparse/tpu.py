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

The trailing axes (the slots; group and slots for dk/dv) carry accumulators
and are "arbitrary"; the others are "parallel" (megacore may split them).

Scalar prefetch. A call prefetches its view of the mask to SMEM as two flat
int32 arrays (1-D, so SMEM holds no row padding), which the index maps and
the kernel read:

  count  [Bm * Hm * R]          kv_count (q_count for dk/dv); R block rows
  slots  [Bm * Hm * R * Smax]   tile id << 1 | partial bit; Smax = Kmax (Qmax)

Row (b, h, r) is at (b' * Hm + h') * R + r, where b' = 0 if the mask
broadcasts over the batch (Bm = 1) and h' = 0 if over the heads. The index
maps read `slots` so that only listed tiles are DMA'd: padding slots repeat
their row's last id, the block index does not change, and Pallas issues no
copy for them, while `pl.when(t < count)` skips their compute. Partial tiles
run a body that evaluates `mask_fn`; full tiles run one that does not.
SMEM is small (1 MiB per core), so a view larger than `MAX_PREFETCH_WORDS`
is walked in several calls, each over a range of block rows (q blocks for
forward / dq, kv blocks for dk/dv) and prefetching only its part.

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
block row of each mask view must fit in SMEM. float16 runs in float32
(Mosaic has no float16 vectors). block_kv a multiple of 128 fills the lanes
of the score tiles and is what runs fast; smaller blocks compile but pad.
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


def _words_per_row(count: jax.Array, index: jax.Array) -> int:
  """SMEM entries one block row of a view costs (over all batches and heads)."""
  bm, hm = count.shape[:2]
  return bm * hm * (1 + index.shape[-1])


def check_supported(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, routes: Any = None
) -> None:
  """Raises ValueError if the TPU kernel cannot run this call (before any work).

  Args:
    q, k, v: as for `block_sparse_attention_tpu`; only q's dtype is read.
    mask: a `common.BlockSparseLayout` (an `ops.BlockMask`).
  """
  if routes is not None:
    raise ValueError(
      "the TPU block-sparse kernel does not take token routes (MoBA/NSA selection) yet; "
      "use implementation='xla' or the Triton kernel."
    )
  del k, v
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(
      f"the TPU block-sparse kernel supports float32, bfloat16 and float16, got {q.dtype}."
    )
  for name, block, length in (
    ("block_q", mask.block_q, mask.q_len),
    ("block_kv", mask.block_kv, mask.kv_len),
  ):
    if block % SUBLANES and block < length:
      raise ValueError(
        f"the TPU block-sparse kernel needs {name} to be a multiple of {SUBLANES} "
        f"(Mosaic's sublane tiling) unless one block covers the sequence; the mask "
        f"has {name}={block} for a length of {length}."
      )
  for name, count, index in (
    ("max_kv_blocks", mask.kv_count, mask.kv_index),
    ("max_q_blocks", mask.q_count, mask.q_index),
  ):
    words = _words_per_row(count, index)
    if words > MAX_PREFETCH_WORDS:
      raise ValueError(
        f"the TPU block-sparse kernel prefetches the mask to SMEM, at least one "
        f"block row at a time (batch/heads {tuple(count.shape[:2])} x (1 + "
        f"{name}={index.shape[-1]}) = {words} int32 entries), at most "
        f"{MAX_PREFETCH_WORDS}. Broadcast the mask over batch or heads, or "
        f"lower {name}."
      )


@dataclasses.dataclass(frozen=True)
class _Config(common.Tiling):
  """Static facts of one call (hashable: the custom_vjp's non-diff argument)."""

  scale: float
  group: int  # query heads per kv head
  mask_batch: bool  # the mask has a batch dim (> 1)
  mask_heads: int  # Hm: 1 (broadcast) or the number of query heads
  interpret: Any  # False or a pltpu.InterpretParams

  @property
  def kv_major(self) -> bool:
    """dK/dV computes s.T (kv positions on sublanes, queries on lanes): no
    transposes, and lse / delta reach it as [8, block_q] rows instead of
    [block_q, 128] columns, 16x less to copy per tile. Needs block_q to fill
    lanes: a multiple of 128, or one block covering the queries."""
    return self.block_q % LANES == 0 or self.num_q_blocks == 1


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


def _kv_head(h, group: int):
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


def _scores(cfg: _Config, q, k, i, j, masked: bool, kv_major: bool = False) -> jax.Array:
  """Scaled scores f32 [block_q, block_kv] of q tile i and kv tile j, -inf
  where hidden: by `mask_fn` if `masked`, and past the ragged tails.
  kv_major: the transpose, [block_kv, block_q] (k @ q.T)."""
  s = _dot(k, q, _NT) if kv_major else _dot(q, k, _NT)
  s = s * cfg.scale
  q_axis, kv_axis = (1, 0) if kv_major else (0, 1)
  q_pos = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, s.shape, q_axis)
  kv_pos = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, s.shape, kv_axis)
  vis = common.visibility(
    cfg.mask_fn if masked else None,
    True,
    q_pos,
    kv_pos,
    q_len=cfg.q_len,
    kv_len=cfg.kv_len,
    block_q=cfg.block_q,
    block_kv=cfg.block_kv,
  )
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


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
# Kernels. Program ids are local to the call's block rows (`rows`).
# ---------------------------------------------------------------------------


def _forward_kernel(
  count_ref,  # SMEM int32 [Bm * Hm * rows.size]
  slots_ref,  # SMEM int32 [Bm * Hm * rows.size * Kmax]
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
    s = _scores(cfg, q_ref[...], k_ref[...], rows.start + r, j, masked)
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
    s = _scores(cfg, q_ref[...], k, rows.start + r, j, masked)
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
    s = _scores(cfg, q, k, i, rows.start + r, masked, kv_major=cfg.kv_major)
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


def _walk_rows(view, call) -> list[jax.Array]:
  """Runs `call(rows, count, slots)` over the block rows of a mask view, in
  as few pieces as SMEM allows; joins the pieces' outputs along axis 2 (the
  sequence of [B, H, S, D] arrays).

  view: (count int32 [Bm, Hm, R], index int32 [Bm, Hm, R, Smax],
  partial bool [Bm, Hm, R, Smax]). `count` and `slots` reach `call` flat, as
  the kernels prefetch them.
  """
  count, index, partial = view
  slots = (index.astype(jnp.int32) << 1) | partial.astype(jnp.int32)
  total = count.shape[-1]
  step = max(1, MAX_PREFETCH_WORDS // _words_per_row(count, index))
  flat = lambda x, start, stop: x[:, :, start:stop].astype(jnp.int32).reshape(-1)
  pieces = []
  for start in range(0, total, step):
    stop = min(start + step, total)
    rows = _Rows(start, stop - start)
    pieces.append(call(rows, flat(count, start, stop), flat(slots, start, stop)))
  joined = zip(*pieces, strict=True)
  return [parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2) for parts in joined]


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, scratch, name: str):
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
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

  def q_tile(b, h, r, t, count_ref, slots_ref):
    return b, h, rows.start + r, 0

  def out_tile(b, h, r, t, count_ref, slots_ref):
    return b, h, r, 0

  def kv_tile(b, h, r, t, count_ref, slots_ref):
    j = slots_ref[rows.flat(cfg, b, h, r) * kmax + t] >> 1
    return b, _kv_head(h, cfg.group), j, 0

  return q_tile, out_tile, kv_tile


def _forward(cfg: _Config, q, k, v, kv_view, q_view):
  del q_view  # the transposed view serves the backward pass only
  b, _, hq, d = q.shape
  dv = v.shape[-1]
  sq, sk = cfg.num_q_blocks * cfg.block_q, cfg.num_kv_blocks * cfg.block_kv
  kmax = kv_view[1].shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  q, k, v = _heads_major(q, sq), _heads_major(k, sk), _heads_major(v, sk)

  def call(rows: _Rows, count, slots):
    q_tile, out_tile, kv_tile = _q_walk_specs(cfg, rows, kmax)
    return _call(
      functools.partial(_forward_kernel, cfg=cfg, rows=rows, kmax=kmax),
      cfg,
      grid=(b, hq, rows.size, kmax),
      in_specs=[_block(bq, d, q_tile), _block(bk, d, kv_tile), _block(bk, dv, kv_tile)],
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
    )(count, slots, q, k, v)

  out, lse = _walk_rows(kv_view, call)
  return _seq_major(out, cfg.q_len), lse[:, :, : cfg.q_len, 0]


def _backward(cfg: _Config, q, k, v, kv_view, q_view, out, lse, d_out, d_lse):
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

  def dq_call(rows: _Rows, count, slots):
    q_tile, out_tile, kv_tile = _q_walk_specs(cfg, rows, kmax)
    return _call(
      functools.partial(_dq_kernel, cfg=cfg, rows=rows, kmax=kmax),
      cfg,
      grid=(b, hq, rows.size, kmax),
      in_specs=[
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
    )(count, slots, *tensors, *columns)

  def dkdv_call(rows: _Rows, count, slots):
    # Grid (b, h, r, g, t): kv tile rows.start + r of kv head h; query head
    # h * G + g; its q tile in slot t of the transposed view.
    def q_tile(b, h, r, g, t, count_ref, slots_ref):
      qh = h * cfg.group + g
      return b, qh, slots_ref[rows.flat(cfg, b, qh, r) * qmax + t] >> 1, 0

    def kv_tile(b, h, r, g, t, count_ref, slots_ref):
      return b, h, rows.start + r, 0

    def out_tile(b, h, r, g, t, count_ref, slots_ref):
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
    )(count, slots, *tensors, *rows_or_columns)

  rows_or_columns = tuple(_rows_to_sublanes(x, sq) for x in stats) if cfg.kv_major else columns
  (dq,) = _walk_rows(kv_view, dq_call)
  dk, dv = _walk_rows(q_view, dkdv_call)
  return _seq_major(dq, cfg.q_len), _seq_major(dk, cfg.kv_len), _seq_major(dv, cfg.kv_len)


_attention = common.attention_with_vjp(_forward, _backward)


def block_sparse_attention_tpu(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: common.BlockSparseLayout,
  *,
  scale: float,
  interpret: Any = False,
  routes: Any = None,
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
  """
  check_supported(q, k, v, mask, routes)
  if q.dtype == jnp.float16:  # Mosaic has no float16 vectors: compute in float32
    f32 = lambda x: x.astype(jnp.float32)
    out, lse = block_sparse_attention_tpu(
      f32(q), f32(k), f32(v), mask, scale=scale, interpret=interpret
    )
    return out.astype(q.dtype), lse
  if interpret is True:
    interpret = pltpu.InterpretParams()
  bm, hm = mask.kv_count.shape[:2]
  cfg = _Config(
    **common.Tiling.fields_of(mask),
    scale=float(scale),
    group=q.shape[2] // k.shape[2],
    mask_batch=bm > 1,
    mask_heads=hm,
    interpret=interpret,
  )
  kv_view = (mask.kv_count, mask.kv_index, mask.kv_partial)
  q_view = (mask.q_count, mask.q_index, mask.q_partial)
  return _attention(cfg, q, k, v, kv_view, q_view)

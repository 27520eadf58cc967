"""Block-sparse flash attention for Hopper GPUs (sm90+): Pallas on Mosaic GPU.

FlashAttention-3's schedule, driven by a BlockMask. Three `plgpu.kernel`s, tied
together by `jax.custom_vjp`:

  forward  one CTA per 128-row (or 64-row) mask q tile at a time, persistent: the
           (batch, head, q tile) work items are sorted by their kv tile count,
           most first, and dealt round-robin to `num_ctas` CTAs, so rows with few
           tiles fill in behind the long ones instead of idling SMs. Each CTA
           has one producer warpgroup, which reads the tile ids from the mask
           and TMA-copies k/v tiles into a `num_stages`-deep SMEM ring, and
           block_q // 64 consumer warpgroups of 64 query rows each (wgmma QK^T,
           base-2 online softmax, wgmma PV). A row's full tiles run first, in a
           loop without the element mask; its partial and ragged-tail tiles
           follow, masked.
  dq       the same walk, accumulating dQ (p from the saved lse).
  dk/dv    the transposed walk: one CTA per (kv tile, kv head); the producer
           streams the q, dO, lse and delta tiles of every query head of the
           GQA group, one after the other, and the consumers (64 kv rows each)
           accumulate the group's dK and dV in registers, written once in the
           input dtype (no per-query-head copies summed in XLA).

Ragged lengths cost no padding copies: TMA reads past the end of k/v/q fill
zeros and writes past the end are dropped; positions past q_len/kv_len are
masked on the (statically known) tail tiles only.

Limits (`check_supported`, shapes only): bf16/f16 inputs; block_q in {64, 128};
block_kv in {64, 128}; head dims 64, 128 or 256 (others: refused, the Triton
kernel takes them); the SMEM ring must fit (256-wide heads need block_kv 64).
Mosaic GPU's interpreter (jax >= 0.11.2) runs these kernels on CPU
(`interpret=True`); it takes wgmma operands from SMEM only, so the interpreted
build stages P and dS in SMEM where the compiled one feeds them from registers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparse_attention.pallas_kernels.block_sparse import common

HEAD_DIMS = (64, 128, 256)
BLOCK_Q = (64, 128)
BLOCK_KV = (64, 128)
ROWS = 64  # query (kv) rows per consumer warpgroup: one wgmma M tile
SMEM_BYTES = 227 * 1024  # per CTA on sm90
NUM_SMS = 132  # H100/H200: the persistent grid's default width
LOG2E = math.log2(math.e)


def _smem_bytes(
  block_q: int, block_kv: int, d: int, dv: int, itemsize: int, stages: int, interpret: bool
) -> int:
  """SMEM of the forward / dq kernels: q and o tiles, the k/v ring, (interpret: P)."""
  wgs = block_q // ROWS
  tiles = wgs * ROWS * (d + dv) + stages * block_kv * (d + dv)
  staged = wgs * ROWS * block_kv if interpret else 0
  return (tiles + staged) * itemsize + 4 * 4 * block_q


def check_supported(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, routes: Any = None
) -> None:
  """Raises `common.Unsupported` if this kernel cannot run the call (shapes only)."""
  del k, routes  # any GQA grouping and token routes of any shape are supported
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise common.Unsupported(f"the Mosaic GPU kernel takes bf16/f16 inputs, got {q.dtype}.")
  if mask.block_q not in BLOCK_Q or mask.block_kv not in BLOCK_KV:
    raise common.Unsupported(
      f"the Mosaic GPU kernel needs block_q in {BLOCK_Q} and block_kv in {BLOCK_KV}; the "
      f"mask has block_q={mask.block_q}, block_kv={mask.block_kv}."
    )
  d, dv = q.shape[-1], v.shape[-1]
  if d not in HEAD_DIMS or dv not in HEAD_DIMS:
    raise common.Unsupported(
      f"the Mosaic GPU kernel supports head dims {HEAD_DIMS}, got head_dim={d}, v_head_dim={dv}."
    )
  size = _smem_bytes(mask.block_q, mask.block_kv, d, dv, q.dtype.itemsize, 2, False)
  if size > SMEM_BYTES:
    raise common.Unsupported(
      f"the Mosaic GPU kernel's tiles need {size} bytes of SMEM (> {SMEM_BYTES}) at "
      f"block_q={mask.block_q}, block_kv={mask.block_kv}, head dims {d}/{dv}; use block_kv=64."
    )


@dataclasses.dataclass(frozen=True)
class _Config(common.Tiling):
  """Static facts of one call (hashable: jit/custom_vjp static argument)."""

  scale: float
  head_dim: int
  v_head_dim: int
  group: int  # query heads per kv head
  num_routes: int  # R routes per query (0: no token routes)
  route_group: int  # query heads per route head (Hq // Hr)
  interpret: bool
  num_stages: int
  num_ctas: int  # persistent grid width (the SM count on hardware)

  @property
  def wgs(self) -> int:
    """Consumer warpgroups of the forward/dq kernels (64 query rows each)."""
    return self.block_q // ROWS

  @property
  def padded(self) -> tuple[int, int]:
    """Sequence lengths rounded up to whole tiles."""
    return self.num_q_blocks * self.block_q, self.num_kv_blocks * self.block_kv

  def tail_tile(self, ids: jax.Array, along_q: bool) -> jax.Array:
    """bool: which of the tile ids are the ragged last tile of their axis."""
    length, block = (self.q_len, self.block_q) if along_q else (self.kv_len, self.block_kv)
    if length % block == 0:
      return jnp.zeros(ids.shape, bool)
    return ids == length // block


# ---------------------------------------------------------------------------
# Work lists (XLA, O(B * H * Qb * Kmax) integers).
# ---------------------------------------------------------------------------


def _work_list(cfg: _Config, count, index, partial, batch: int, heads: int, along_q: bool):
  """The persistent grid's work items, longest first, and their tiles, full first.

  Args:
    count, index, partial: one view of the mask ([Bm, Hm, N], [Bm, Hm, N, M] x2).
    batch, heads: the sizes the items run over (heads: query heads, or kv heads for
      the transposed view with the GQA loop inside, where `index` lists per query head).
    along_q: the listed tiles are q tiles (the transposed view).

  Returns:
    meta int32 [W, 5]: (batch, head, tile, tile count, full-tile count) per item.
    tiles int32 [W, M]: tile ids * 2 + needs-mask, the full tiles first.
  """
  n, m = index.shape[-2:]
  shape = (batch, heads, n)
  count = jnp.broadcast_to(count, shape).reshape(-1)
  index = jnp.broadcast_to(index, (*shape, m)).reshape(-1, m)
  partial = jnp.broadcast_to(partial, (*shape, m)).reshape(-1, m)
  masked = partial | cfg.tail_tile(index, along_q) | (cfg.num_routes > 0)
  valid = jnp.arange(m) < count[:, None]
  order = jnp.argsort(jnp.where(valid, masked.astype(jnp.int32), 2), axis=-1, stable=True)
  ids = jnp.take_along_axis(index, order, -1)
  flags = jnp.take_along_axis(partial.astype(jnp.int32), order, -1)
  full = jnp.sum(valid & ~masked, axis=-1)
  items = jnp.argsort(-count, stable=True)
  w = jnp.arange(count.shape[0])[items]
  meta = jnp.stack([w // (heads * n), w // n % heads, w % n, count[items], full[items]], -1)
  return meta.astype(jnp.int32), (ids * 2 + flags)[items].astype(jnp.int32)


# ---------------------------------------------------------------------------
# Tile math inside the consumers (layouts: WGMMA and its row/column reductions).
# ---------------------------------------------------------------------------

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a [64, n] wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _zeros(shape, layout=plgpu.Layout.WGMMA, value=0.0) -> jax.Array:
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def _rows(x: jax.Array, shape) -> jax.Array:
  """A per-row vector broadcast over the columns of `shape`."""
  return lax.broadcast_in_dim(x, shape, (0,))


def _cols(x: jax.Array, shape) -> jax.Array:
  return lax.broadcast_in_dim(x, shape, (1,))


def _mma(cfg: _Config, a, b, acc: jax.Array | None = None) -> jax.Array:
  """acc + a @ b with wgmma (f32 accumulation); a: an SMEM ref or a register value,
  b: an SMEM ref. Compiled, wgmma accumulates into acc in place (`run_state`); the
  interpreter does not discharge `run_state`, so it adds a fresh product."""
  shape = (a.shape[0], b.shape[1])
  if acc is not None and not cfg.interpret:

    def run(acc_ref):
      plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(run)(plgpu.ACC.init(acc))

  def scoped(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  product = pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32))
  return product if acc is None else acc + product


def _operand(cfg: _Config, x: jax.Array, scratch, index):
  """A register value as wgmma's left operand: itself when compiled; staged in
  SMEM (`scratch.at[index]`) when interpreted, as the interpreter takes SMEM
  operands only."""
  if not cfg.interpret:
    return x
  scratch = scratch.at[index]
  scratch[...] = x
  plgpu.commit_smem()
  return scratch


def _visible(cfg: _Config, partial, q0, kv0, shape, q_routes=None, kv_routes=None):
  """bool [rows, cols] (or None): the tile's visible pairs; q0/kv0 its first positions."""
  q_pos = q0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  kv_pos = kv0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  routed = None
  if q_routes is not None:
    key = _cols(kv_routes, shape)
    for r in q_routes:
      match = _rows(r, shape) == key
      routed = match if routed is None else routed | match
  return cfg.visible(partial, q_pos, kv_pos, routed)


def _masked(s: jax.Array, vis: jax.Array | None) -> jax.Array:
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _layouts(dtype) -> tuple[Any, ...]:
  """SMEM transforms of the wgmma operand tiles: 128-byte rows, swizzled."""
  cols = 128 // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(128))


def _smem(shape, dtype) -> Any:
  return plgpu.SMEM(shape, dtype, transforms=_layouts(dtype))


def _persistent(cfg: _Config, num_items: int, body, init):
  """Runs body(w, carry) over this CTA's work items (w = cta, cta + num_ctas, ...)."""
  cta = lax.axis_index("cta")
  mine = (num_items - cta + cfg.num_ctas - 1) // cfg.num_ctas
  return lax.fori_loop(0, mine, lambda n, c: body(cta + n * cfg.num_ctas, c), init)


def _produce(cfg: _Config, num_items: int, tiles_of, copies, consumed):
  """The producer warpgroup: fills the `num_stages` ring with `copies(w, t, slot)`
  for every tile t of every work item, each slot once its previous tenant is
  consumed; then waits out the last consumed phases (every phase is observed)."""
  plgpu.set_max_registers(40, action="decrease")
  stages = cfg.num_stages

  def item(w, g):
    def step(t, g):
      slot = lax.rem(g, stages)

      @pl.when(g >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      copies(w, t, slot)
      return g + 1

    return lax.fori_loop(0, tiles_of(w), step, g)

  total = _persistent(cfg, num_items, item, jnp.int32(0))

  def drain(g, _):
    plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])

  lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)


def _forward_kernel(cfg: _Config, num_items: int, *refs):
  nr = 2 if cfg.num_routes else 0
  meta_ref, tiles_ref, q_ref, k_ref, v_ref = refs[:5]  # meta [W, 5], tiles [W, Kmax]
  qr_ref, kr_ref = refs[5 : 5 + nr] if nr else (None, None)  # [B, Hr, R, Sq_p], [B, Sk_p]
  o_ref, lse_ref, scratch, barriers = refs[5 + nr :]  # o [B, Sq, Hq, Dv], lse [B, Hq, Sq_p]
  q_smem, o_smem, k_smem, v_smem, lse_smem, p_smem, qr_smem, kr_smem = scratch
  q_bar, qr_bar, k_bar, v_bar, kr_bar, consumed = barriers
  bk, stages, wg = cfg.block_kv, cfg.num_stages, lax.axis_index("wg")

  @pl.when(wg == cfg.wgs)
  def _producer():
    def copies(w, t, slot):
      b, hk = meta_ref[w, 0], meta_ref[w, 1] // cfg.group
      rows = pl.ds(tiles_ref[w, t] // 2 * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])
      if kr_ref is not None:
        plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], kr_bar.at[slot])

    _produce(cfg, num_items, lambda w: meta_ref[w, 3], copies, consumed)

  @pl.when(wg < cfg.wgs)
  def _consumer():
    plgpu.set_max_registers(232 if cfg.wgs == 2 else 240, action="increase")
    shape = (ROWS, bk)

    def step(w, q0, q_routes, masked, t, carry):
      g, m, l, acc = carry
      slot = lax.rem(g, stages)
      tile = tiles_ref[w, t]
      plgpu.barrier_wait(k_bar.at[slot])
      s = _mma(cfg, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
      s = s * (cfg.scale * LOG2E)
      if masked:
        kv_routes = None
        if kr_ref is not None:
          plgpu.barrier_wait(kr_bar.at[slot])
          kv_routes = plgpu.load(kr_smem.at[slot], layout=_COL)
        vis = _visible(cfg, tile % 2 == 1, q0, tile // 2 * bk, shape, q_routes, kv_routes)
        s = _masked(s, vis)
      plgpu.barrier_wait(v_bar.at[slot])

      def accumulate(acc, p):
        p = _operand(cfg, p.astype(q_ref.dtype), p_smem, wg)
        return _mma(cfg, p, v_smem.at[slot], acc)

      m, l, acc = common.online_softmax_update(
        s, m, l, acc, None, None, base2=True, accumulate=accumulate
      )
      plgpu.barrier_arrive(consumed.at[slot])
      return g + 1, m, l, acc

    def item(w, g):
      b, h, i, count, full = (meta_ref[w, c] for c in range(5))
      q0 = i * cfg.block_q + wg * ROWS
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, ROWS), h], q_smem.at[wg], q_bar.at[wg])
      q_routes = None
      if qr_ref is not None:
        hr = h // cfg.route_group
        plgpu.copy_gmem_to_smem(qr_ref.at[b, hr, :, pl.ds(q0, ROWS)], qr_smem.at[wg], qr_bar.at[wg])
        plgpu.barrier_wait(qr_bar.at[wg])
        q_routes = [plgpu.load(qr_smem.at[wg, r], layout=_ROW) for r in range(cfg.num_routes)]
      plgpu.barrier_wait(q_bar.at[wg])
      carry = (g, _zeros((ROWS,), _ROW, -jnp.inf), _zeros((ROWS,), _ROW))
      carry = (*carry, _zeros((ROWS, cfg.v_head_dim)))
      run = functools.partial(step, w, q0, q_routes)
      carry = lax.fori_loop(0, full, functools.partial(run, False), carry)
      g, m, l, acc = lax.fori_loop(full, count, functools.partial(run, True), carry)
      out, lse = common.finalize(m, l, acc, base2=True)
      o_smem.at[wg][...] = out.astype(o_smem.dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(q0, ROWS), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, ROWS)])
      plgpu.wait_smem_to_gmem(0)  # o_smem/q_smem are reused by the next item
      return g

    _persistent(cfg, num_items, item, jnp.int32(0))


def _scratch(cfg: _Config, dtype, num_slots: int, with_out: bool):
  """SMEM and barriers of the forward (and dq) kernels."""
  wgs, s, bk, r = cfg.wgs, num_slots, cfg.block_kv, cfg.num_routes
  d, dv = cfg.head_dim, cfg.v_head_dim
  buffers = (
    _smem((wgs, ROWS, d), dtype),  # q
    _smem((wgs, ROWS, dv if with_out else d), dtype),  # o (forward) / dq (dq kernel)
    _smem((s, bk, d), dtype),  # k ring
    _smem((s, bk, dv), dtype),  # v ring
    plgpu.SMEM((wgs, ROWS), jnp.float32),  # lse
    _smem((wgs, ROWS, bk), dtype) if cfg.interpret else None,  # staged P (interpret)
    plgpu.SMEM((wgs, r, ROWS), jnp.int32) if r else None,  # query routes
    plgpu.SMEM((s, bk), jnp.int32) if r else None,  # key routes ring
  )
  barriers = (
    plgpu.Barrier(num_barriers=wgs),  # q
    plgpu.Barrier(num_barriers=wgs) if r else None,  # query routes
    plgpu.Barrier(num_barriers=s),  # k
    plgpu.Barrier(num_barriers=s),  # v
    plgpu.Barrier(num_barriers=s) if r else None,  # key routes
    plgpu.Barrier(num_arrivals=wgs, num_barriers=s),  # consumed
  )
  return [buffers, barriers]


def _kernel(cfg: _Config, body, out_type, scratch, num_items: int, name: str):
  params = plgpu.InterpretGPUParams() if cfg.interpret else None
  return plgpu.kernel(
    functools.partial(body, cfg, num_items),
    out_type=out_type,
    scratch_types=scratch,
    grid=(min(cfg.num_ctas, num_items),),
    grid_names=("cta",),
    num_threads=cfg.wgs + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=params,
    kernel_name=name,
  )


def _route_arrays(cfg: _Config, routes, batch: int):
  """Token routes padded to whole tiles and broadcast over the batch: query routes
  [B, Hr, R, Sq_p] (each route slot contiguous over the queries), key routes [B, Sk_p]."""
  if routes is None:
    return []
  sq, sk = cfg.padded
  query = jnp.swapaxes(routes.query.astype(jnp.int32), 2, 3)
  query = jnp.pad(query, ((0, 0), (0, 0), (0, 0), (0, sq - cfg.q_len)), constant_values=-1)
  key = jnp.pad(routes.key.astype(jnp.int32), ((0, 0), (0, sk - cfg.kv_len)), constant_values=-2)
  query = jnp.broadcast_to(query, (batch, *query.shape[1:]))
  return [query, jnp.broadcast_to(key, (batch, sk))]


def _forward(cfg: _Config, q, k, v, kv_view, q_view, routes):
  del q_view  # the transposed view serves the backward pass only
  b, _, hq, _ = q.shape
  meta, tiles = _work_list(cfg, *kv_view, b, hq, along_q=False)
  sq, _ = cfg.padded
  out_type = (
    jax.ShapeDtypeStruct((b, cfg.q_len, hq, cfg.v_head_dim), q.dtype),
    jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
  )
  num_items = meta.shape[0]
  scratch = _scratch(cfg, q.dtype, cfg.num_stages, with_out=True)
  out, lse = _kernel(cfg, _forward_kernel, out_type, scratch, num_items, "block_sparse_fwd")(
    meta, tiles, q, k, v, *_route_arrays(cfg, routes, b)
  )
  return out, lse[..., : cfg.q_len]

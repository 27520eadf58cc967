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
score_mods and mask_mods run in the tile loops (their vjp in dq and dK/dV) when
they trace to primitives Mosaic GPU lowers and read parameters only as scalars at
indices of b, h and constants (`slopes[h]`, `prefix[b]`, from GMEM); gathers (a T5
bias table, document segment ids) are refused: the Triton kernel takes them. dq
writes each floating parameter read's per-query cotangent sums; XLA scatters them into
the parameters' gradients at the reads' indices (no atomics).
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


def _smem_bytes(block_q: int, block_kv: int, d: int, dv: int, stages: int) -> int:
  """SMEM (bf16/f16 tiles) of the larger kernel: forward/dq hold their q-side tiles
  and a k/v ring; dK/dV holds its k/v tiles and a q/dO/lse/delta ring."""
  rows = block_q * (d + dv) + stages * block_kv * (d + dv)
  cols = block_kv * (d + dv) + stages * block_q * (d + dv)
  return max(2 * rows + 8 * block_q, 2 * cols + 8 * stages * block_q)


def check_supported(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: Any,
  routes: Any = None,
  *,
  score_mod: Any = None,
  score_mod_params: Any = None,
) -> None:
  """Raises `common.Unsupported` if this kernel cannot run the call (shapes, and what
  a score_mod / mask_mod traces to: see `_check_mods`)."""
  del k, routes  # any GQA grouping and token routes of any shape are supported
  _check_mods(mask, score_mod, score_mod_params)
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
  size = _smem_bytes(mask.block_q, mask.block_kv, d, dv, 2)
  if size > SMEM_BYTES:
    raise common.Unsupported(
      f"the Mosaic GPU kernel's tiles need {size} bytes of SMEM (> {SMEM_BYTES}) at "
      f"block_q={mask.block_q}, block_kv={mask.block_kv}, head dims {d}/{dv}; use block_kv=64."
    )


def _check_mods(mask: Any, score_mod: Any, score_mod_params: Any) -> common.ModTrace | None:
  """Refuses mods this kernel cannot run: a primitive Mosaic GPU does not lower, or a
  parameter read that is not a scalar at an index of b, h and constants only (`p[h]`,
  `prefix[b]`, `c[...]`): gathers (`table[bucket, h]`, `segment_ids[b, q_idx]`) are
  the Triton kernel's. Returns the mods' trace (None: no mods)."""
  name = "Mosaic GPU block-sparse"
  trace = common.check_mods_lower(name, _lowering_rules(), mask, score_mod, score_mod_params)
  for read in () if trace is None else trace.reads:
    if read.shape or read.on_positions:
      raise common.Unsupported(
        f"the {name} kernel reads mod parameters as scalars at indices of b and h only; the "
        f"{read.fn} gathers (a read of shape {read.shape}"
        f"{', indexed by positions' if read.on_positions else ''}): use the Triton kernel."
      )
  return trace


def _lowering_rules() -> set[str] | None:
  """Names of the primitives Mosaic GPU lowers in these kernels (Lane semantics, per
  warpgroup), None if unknown (then unchecked)."""
  try:
    from jax._src.pallas.mosaic_gpu import core, lowering  # noqa: PLC0415 (private)
    from jax.experimental.mosaic.gpu import LoweringSemantics  # noqa: PLC0415

    key = (LoweringSemantics.Lane, core.PrimitiveSemantics.Warpgroup)
    return {p.name for p in lowering.mosaic_lowering_rules[key]}
  except (ImportError, AttributeError, KeyError):
    return None


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
  score_mod: common.ScoreMod | None = None
  score_tree: Any = None  # treedef of the score_mod's parameters (None: none)
  grad_reads: tuple[bool, ...] = ()  # per parameter read of the score_mod: floating
  mask_tree: Any = None  # treedef of the mask_mod's parameters (None: no mask_mod)

  @property
  def num_mod_inputs(self) -> int:
    """Kernel inputs after the routes: offsets, score_mod and mask parameter leaves."""
    if self.score_mod is None and self.mask_tree is None:
      return 0
    leaves = lambda tree: 0 if tree is None else tree.num_leaves
    return 1 + leaves(self.score_tree) + leaves(self.mask_tree)

  @property
  def num_grad_reads(self) -> int:
    return sum(self.grad_reads)

  @property
  def wgs(self) -> int:
    """Consumer warpgroups of the forward/dq kernels (64 query rows each)."""
    return self.block_q // ROWS

  @property
  def wgs_kv(self) -> int:
    """Consumer warpgroups of the dK/dV kernel (64 kv rows each)."""
    return self.block_kv // ROWS

  @property
  def padded(self) -> tuple[int, int]:
    """Sequence lengths rounded up to whole tiles."""
    return self.num_q_blocks * self.block_q, self.num_kv_blocks * self.block_kv


# ---------------------------------------------------------------------------
# Work lists (XLA, O(B * H * Qb * Kmax) integers).
# ---------------------------------------------------------------------------


def _work_list(
  cfg: _Config, count, index, partial, batch: int, heads: int, group: int, along_q: bool
):
  """The persistent grid's work items, longest first, and their tiles, full first.

  An item is `group` consecutive heads of one (batch, tile): the forward and dq take
  one query head per item; dK/dV takes a kv head's GQA group, whose query heads'
  lists it walks one after the other.

  Args:
    count, index, partial: one view of the mask ([Bm, Hm, N], [Bm, Hm, N, M] x2).
    batch, heads: the (batch, query head) rows the items cover.
    group: heads per item.
    along_q: the listed tiles are q tiles (the transposed view).

  Returns:
    meta int32 [W, group, 5]: (batch, head, tile, tile count, full-tile count).
    tiles int32 [W, group, M]: tile id * 2 + partial, the full tiles first.
  """
  n, m = index.shape[-2:]
  count = jnp.broadcast_to(count, (batch, heads, n))
  index = jnp.broadcast_to(index, (batch, heads, n, m))
  partial = jnp.broadcast_to(partial, (batch, heads, n, m)).astype(bool)
  tiles, full = common.full_tiles_first(cfg, count, index, partial, along_q, cfg.num_routes > 0)
  b, h, i = jnp.meshgrid(jnp.arange(batch), jnp.arange(heads), jnp.arange(n), indexing="ij")
  meta = jnp.stack([b, h, i, count, full], -1)  # [B, H, N, 5]
  # Items: (batch, head group, tile), each holding its group's rows.
  by_item = lambda x: jnp.moveaxis(
    x.reshape(batch, heads // group, group, n, *x.shape[3:]), 2, 3
  ).reshape(-1, group, *x.shape[3:])
  meta, tiles = by_item(meta), by_item(tiles)
  items = jnp.argsort(-jnp.sum(meta[..., 3], -1), stable=True)
  return meta[items].astype(jnp.int32), tiles[items].astype(jnp.int32)


# ---------------------------------------------------------------------------
# Tile math inside the consumers (layouts: WGMMA and its row/column reductions).
# ---------------------------------------------------------------------------

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a [64, n] wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _zeros(shape, layout=plgpu.Layout.WGMMA, value=0.0) -> jax.Array:
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def _cols(x: jax.Array, shape) -> jax.Array:
  """A per-column vector broadcast over the rows of `shape`."""
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


def _positions(start, shape, dim: int) -> jax.Array:
  """int32 [rows, cols]: start + the index along `dim`, in the wgmma layout."""
  return start + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _routed(q_routes, kv_routes, shape, q_dim: int) -> jax.Array | None:
  """bool [rows, cols]: the key's route is one of the query's (queries along q_dim)."""
  if q_routes is None:
    return None
  spread = lambda x, dim: lax.broadcast_in_dim(x, shape, (dim,))
  key = spread(kv_routes, 1 - q_dim)
  match = [spread(r, q_dim) == key for r in q_routes]
  return functools.reduce(jnp.logical_or, match)


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


def _produce(cfg: _Config, num_items: int, group: int, count_of, copies, consumed):
  """The producer warpgroup: fills the `num_stages` ring with `copies(w, h, t, slot)`
  for every tile t of every head h < group of every work item, each slot once its
  previous tenant is consumed; then waits out the last consumed phases, so that
  every barrier phase is observed."""
  plgpu.set_max_registers(40, action="decrease")
  stages = cfg.num_stages

  def head(w, h, g):
    def step(t, g):
      slot = lax.rem(g, stages)

      @pl.when(g >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      copies(w, h, t, slot)
      return g + 1

    return lax.fori_loop(0, count_of(w, h), step, g)

  def item(w, g):
    return lax.fori_loop(0, group, lambda h, g: head(w, h, g), g)

  total = _persistent(cfg, num_items, item, jnp.int32(0))

  def drain(g, _):
    plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])

  lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)


def _tile_loops(full, count, step, carry):
  """step(masked, t, carry) over a list's full tiles, then its masked ones."""
  carry = lax.fori_loop(0, full, functools.partial(step, False), carry)
  return lax.fori_loop(full, count, functools.partial(step, True), carry)


def _kv_producer(
  cfg: _Config, num_items: int, meta_ref, tiles_ref, k_ref, v_ref, kr_ref, smem, bars, consumed
):  # fmt: skip
  """The producer warpgroup of the forward and dq kernels: streams kv tile t of each
  work item w (K, V and, when routed, the kv token routes) into the SMEM ring."""
  k_smem, v_smem, kr_smem = smem
  k_bar, v_bar, kr_bar = bars

  def copies(w, h, t, slot):
    b, hk = meta_ref[w, h, 0], meta_ref[w, h, 1] // cfg.group
    rows = pl.ds(tiles_ref[w, h, t] // 2 * cfg.block_kv, cfg.block_kv)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])
    if kr_ref is not None:
      plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[slot], kr_bar.at[slot])

  _produce(cfg, num_items, 1, lambda w, h: meta_ref[w, h, 3], copies, consumed)


def _load_rows(cfg: _Config, q_ref, qr_ref, q_smem, qr_smem, q_bar, qr_bar, b, h, q0, wg):
  """A consumer's 64 query rows into SMEM, and their token routes into registers."""
  rows = pl.ds(q0, ROWS)
  plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[wg], q_bar.at[wg])
  if qr_ref is None:
    return None
  hr = h // cfg.route_group
  plgpu.copy_gmem_to_smem(qr_ref.at[b, hr, :, rows], qr_smem.at[wg], qr_bar.at[wg])
  plgpu.barrier_wait(qr_bar.at[wg])
  return [plgpu.load(qr_smem.at[wg, r], layout=_ROW) for r in range(cfg.num_routes)]


@dataclasses.dataclass(frozen=True)
class _Mods:
  """A call's score_mod and mask_mod inside the consumers: the global batch row and
  query head of the work item, and the parameters as GMEM refs (scalar reads)."""

  cfg: _Config
  offsets_ref: Any  # int32 [2]: the global index of the first batch row and head
  score_params: Any  # a pytree of refs, like score_mod_params (None: none)
  mask_params: tuple  # the mask's parameters as refs
  b: Any = None  # int32 [] global batch row (set per work item by `at`)
  h: Any = None  # int32 [] global query head

  @staticmethod
  def take(cfg: _Config, refs) -> tuple[_Mods | None, Any]:
    """(the mods, the other refs) from a kernel's refs that start with the mod inputs."""
    n = cfg.num_mod_inputs
    if not n:
      return None, refs
    offsets_ref, *leaves = refs[:n]
    score_leaves = 0 if cfg.score_tree is None else cfg.score_tree.num_leaves
    unflatten = lambda tree, xs, empty: empty if tree is None else tree.unflatten(xs)
    mods = _Mods(
      cfg,
      offsets_ref,
      unflatten(cfg.score_tree, leaves[:score_leaves], None),
      unflatten(cfg.mask_tree, leaves[score_leaves:], ()),
    )
    return mods, refs[n:]

  def at(self, b, h) -> _Mods:
    """The mods of the work item of (local) batch row b and query head h."""
    return dataclasses.replace(self, b=self.offsets_ref[0] + b, h=self.offsets_ref[1] + h)

  def score(self, s, q_idx, kv_idx, vjp: bool):
    """(score_mod(s), pullback or None) on a tile of scaled f32 scores; the pullback
    gives (d_score, [d of each floating parameter read, as a tile]): the read values
    are replayed broadcast over the tile, so that their cotangents come back
    unreduced (row sums then make per-query partial gradients, no atomics)."""
    mod = self.cfg.score_mod
    if not vjp:
      return mod(s, self.b, self.h, q_idx, kv_idx, self.score_params), None
    leaves, tree = jax.tree.flatten(self.score_params)
    reads: list = []
    readers = tree.unflatten([common._Reader(r, i, reads) for i, r in enumerate(leaves)])
    out = mod(s, self.b, self.h, q_idx, kv_idx, readers)
    values = [v for *_, v in reads]
    floating = [jnp.issubdtype(v.dtype, jnp.floating) for v in values]
    tiled = [_zeros(s.shape, value=v) for v, f in zip(values, floating, strict=True) if f]

    def replay(s, tiled):  # a pure function of the score and the floating reads
      tiles = iter(tiled)
      merged = iter([next(tiles) if f else v for v, f in zip(values, floating, strict=True)])
      params = tree.unflatten([common._Replayer(merged)] * len(leaves))
      return mod(s, self.b, self.h, q_idx, kv_idx, params)

    return out, jax.vjp(replay, s, tiled)[1]

  def mask_args(self) -> dict:
    """The keywords `Tiling.visible` needs to evaluate a mask_mod."""
    return dict(b=self.b, h=self.h, params=self.mask_params)


def _scores(
  cfg: _Config, a, b_t, masked, tile, q0, kv0, shape, q_dim, q_routes, kv_routes,
  mods: _Mods | None = None, vjp: bool = False,
):  # fmt: skip
  """Scores of one tile in log2 units (the scale times log2 e folded in), -inf where
  hidden when `masked`; queries along `q_dim` (0: forward/dq, 1: the dK/dV view).
  With `mods`, the score_mod runs on the scaled scores first and a mask_mod decides
  partial tiles; vjp: returns (scores, the score_mod's pullback or None)."""
  score_mod = None if mods is None else cfg.score_mod
  s, pull = _mma(cfg, a, b_t), None
  q_pos = kv_pos = None
  if masked or score_mod is not None:
    q_pos, kv_pos = _positions(q0, shape, q_dim), _positions(kv0, shape, 1 - q_dim)
  if score_mod is None:
    s = s * (cfg.scale * LOG2E)
  else:
    s, pull = mods.score(s * cfg.scale, q_pos, kv_pos, vjp)
    s = s * LOG2E
  if masked:
    routed = _routed(q_routes, kv_routes, shape, q_dim)
    extra = {} if mods is None else mods.mask_args()
    vis = cfg.visible(tile % 2 == 1, q_pos, kv_pos, routed, **extra)
    s = s if vis is None else jnp.where(vis, s, -jnp.inf)
  return (s, pull) if vjp else s


def _forward_kernel(cfg: _Config, num_items: int, *refs):
  nr = 2 if cfg.num_routes else 0
  meta_ref, tiles_ref, q_ref, k_ref, v_ref = refs[:5]  # meta [W, 1, 5], tiles [W, 1, Kmax]
  qr_ref, kr_ref = refs[5 : 5 + nr] if nr else (None, None)  # [B, Hr, R, Sq_p], [B, Sk_p]
  mods, refs = _Mods.take(cfg, refs[5 + nr :])  # then the mods' offsets and parameters
  o_ref, lse_ref, scratch, barriers = refs  # o [B, Sq, Hq, Dv], lse [B, Hq, Sq_p]
  q_smem, o_smem, k_smem, v_smem, lse_smem, p_smem, qr_smem, kr_smem = scratch
  q_bar, qr_bar, k_bar, v_bar, kr_bar, consumed = barriers
  bk, wg = cfg.block_kv, lax.axis_index("wg")

  @pl.when(wg == cfg.wgs)
  def _producer():
    smem, bars = (k_smem, v_smem, kr_smem), (k_bar, v_bar, kr_bar)
    _kv_producer(cfg, num_items, meta_ref, tiles_ref, k_ref, v_ref, kr_ref, smem, bars, consumed)

  @pl.when(wg < cfg.wgs)
  def _consumer():
    plgpu.set_max_registers(232 if cfg.wgs == 2 else 240, action="increase")
    shape = (ROWS, bk)

    def step(w, q0, q_routes, item_mods, masked, t, carry):
      g, m, l, acc = carry
      slot, tile = lax.rem(g, cfg.num_stages), tiles_ref[w, 0, t]
      kv_routes = None
      if kr_ref is not None:
        plgpu.barrier_wait(kr_bar.at[slot])
        kv_routes = plgpu.load(kr_smem.at[slot], layout=_COL)
      plgpu.barrier_wait(k_bar.at[slot])
      k_t = k_smem.at[slot].transpose((1, 0))
      s = _scores(
        cfg, q_smem.at[wg], k_t, masked, tile, q0, tile // 2 * bk, shape, 0, q_routes, kv_routes,
        item_mods,
      )  # fmt: skip
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
      b, h, i, count, full = (meta_ref[w, 0, c] for c in range(5))
      q0 = i * cfg.block_q + wg * ROWS
      q_routes = _load_rows(cfg, q_ref, qr_ref, q_smem, qr_smem, q_bar, qr_bar, b, h, q0, wg)
      plgpu.barrier_wait(q_bar.at[wg])
      carry = (g, _zeros((ROWS,), _ROW, -jnp.inf), _zeros((ROWS,), _ROW))
      carry = (*carry, _zeros((ROWS, cfg.v_head_dim)))
      item_mods = None if mods is None else mods.at(b, h)
      step_ = functools.partial(step, w, q0, q_routes, item_mods)
      g, m, l, acc = _tile_loops(full, count, step_, carry)
      out, lse = common.finalize(m, l, acc, base2=True)
      o_smem.at[wg][...] = out.astype(o_smem.dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(q0, ROWS), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, ROWS)])
      plgpu.wait_smem_to_gmem(0)  # the next item reuses o_smem
      return g

    _persistent(cfg, num_items, item, jnp.int32(0))


def _dq_kernel(cfg: _Config, num_items: int, *refs):
  nr = 2 if cfg.num_routes else 0
  meta_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:8]
  qr_ref, kr_ref = refs[8 : 8 + nr] if nr else (None, None)
  mods, refs = _Mods.take(cfg, refs[8 + nr :])
  dq_ref, *dr_ref, scratch, barriers = refs  # dq [B, Sq, Hq, D], [dreads f32 [B, Hq, R, Sq_p]]
  q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, ds_smem, qr_smem, kr_smem, dr_smem = (
    scratch
  )
  q_bar, do_bar, lse_bar, delta_bar, qr_bar, k_bar, v_bar, kr_bar, consumed = barriers
  bk, wg = cfg.block_kv, lax.axis_index("wg")

  @pl.when(wg == cfg.wgs)
  def _producer():
    smem, bars = (k_smem, v_smem, kr_smem), (k_bar, v_bar, kr_bar)
    _kv_producer(cfg, num_items, meta_ref, tiles_ref, k_ref, v_ref, kr_ref, smem, bars, consumed)

  @pl.when(wg < cfg.wgs)
  def _consumer():
    plgpu.set_max_registers(232 if cfg.wgs == 2 else 240, action="increase")
    shape = (ROWS, bk)

    def step(w, q0, q_routes, lse, delta, item_mods, masked, t, carry):
      g, dq, d_reads = carry
      slot, tile = lax.rem(g, cfg.num_stages), tiles_ref[w, 0, t]
      kv_routes = None
      if kr_ref is not None:
        plgpu.barrier_wait(kr_bar.at[slot])
        kv_routes = plgpu.load(kr_smem.at[slot], layout=_COL)
      plgpu.barrier_wait(k_bar.at[slot])
      k_t = k_smem.at[slot].transpose((1, 0))
      s, pull = _scores(
        cfg, q_smem.at[wg], k_t, masked, tile, q0, tile // 2 * bk, shape, 0, q_routes, kv_routes,
        item_mods, vjp=True,
      )  # fmt: skip
      p = jnp.exp2(s - common.per_row(lse, shape))
      plgpu.barrier_wait(v_bar.at[slot])
      dp = _mma(cfg, do_smem.at[wg], v_smem.at[slot].transpose((1, 0)))
      ds = p * (dp - common.per_row(delta, shape))
      if pull is not None:  # the score_mod's vjp; its parameter reads' per-row shares
        ds, d_tiles = pull(ds)
        d_reads = tuple(acc + jnp.sum(d, axis=1) for acc, d in zip(d_reads, d_tiles, strict=True))
      ds = _operand(cfg, ds.astype(q_ref.dtype), ds_smem, wg)
      dq = _mma(cfg, ds, k_smem.at[slot], dq)
      plgpu.barrier_arrive(consumed.at[slot])
      return g + 1, dq, d_reads

    def item(w, g):
      b, h, i, count, full = (meta_ref[w, 0, c] for c in range(5))
      q0 = i * cfg.block_q + wg * ROWS
      rows = pl.ds(q0, ROWS)
      q_routes = _load_rows(cfg, q_ref, qr_ref, q_smem, qr_smem, q_bar, qr_bar, b, h, q0, wg)
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[wg], do_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], lse_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], delta_bar.at[wg])
      for bar in (q_bar, do_bar, lse_bar, delta_bar):
        plgpu.barrier_wait(bar.at[wg])
      lse = plgpu.load(lse_smem.at[wg], layout=_ROW)
      delta = plgpu.load(delta_smem.at[wg], layout=_ROW)
      item_mods = None if mods is None else mods.at(b, h)
      step_ = functools.partial(step, w, q0, q_routes, lse, delta, item_mods)
      d_reads = tuple(_zeros((ROWS,), _ROW) for _ in range(cfg.num_grad_reads))
      init = (g, _zeros((ROWS, cfg.head_dim)), d_reads)
      g, dq, d_reads = _tile_loops(full, count, step_, init)
      q_smem.at[wg][...] = (dq * cfg.scale).astype(q_smem.dtype)  # q is done: dq's staging
      for r, d in enumerate(d_reads):
        dr_smem.at[wg, r][...] = d
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
      if d_reads:
        plgpu.copy_smem_to_gmem(dr_smem.at[wg], dr_ref[0].at[b, h, :, rows])
      plgpu.wait_smem_to_gmem(0)
      return g

    _persistent(cfg, num_items, item, jnp.int32(0))


def _dkdv_kernel(cfg: _Config, num_items: int, *refs):
  nr = 2 if cfg.num_routes else 0
  meta_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:8]
  qr_ref, kr_ref = refs[8 : 8 + nr] if nr else (None, None)
  mods, refs = _Mods.take(cfg, refs[8 + nr :])
  dk_ref, dv_ref, scratch, barriers = refs  # [B, Sk, Hkv, D], [B, Sk, Hkv, Dv]
  k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, p_smem, qr_smem, kr_smem = scratch
  k_bar, v_bar, kr_bar, q_bar, do_bar, lse_bar, delta_bar, qr_bar, consumed = barriers
  bq, wg = cfg.block_q, lax.axis_index("wg")
  shape = (ROWS, bq)  # kv rows x query columns

  @pl.when(wg == cfg.wgs_kv)
  def _producer():
    def copies(w, h, t, slot):
      b, hq = meta_ref[w, h, 0], meta_ref[w, h, 1]
      rows = pl.ds(tiles_ref[w, h, t] // 2 * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, hq], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, hq], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, hq, rows], lse_smem.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, hq, rows], delta_smem.at[slot], delta_bar.at[slot])
      if qr_ref is not None:
        src = qr_ref.at[b, hq // cfg.route_group, :, rows]
        plgpu.copy_gmem_to_smem(src, qr_smem.at[slot], qr_bar.at[slot])

    _produce(cfg, num_items, cfg.group, lambda w, h: meta_ref[w, h, 3], copies, consumed)

  @pl.when(wg < cfg.wgs_kv)
  def _consumer():
    plgpu.set_max_registers(232 if cfg.wgs_kv == 2 else 240, action="increase")

    def step(w, h, kv0, kv_routes, head_mods, masked, t, carry):
      g, dk, dv = carry
      slot, tile = lax.rem(g, cfg.num_stages), tiles_ref[w, h, t]
      q_routes = None
      if qr_ref is not None:
        plgpu.barrier_wait(qr_bar.at[slot])
        q_routes = [plgpu.load(qr_smem.at[slot, r], layout=_COL) for r in range(cfg.num_routes)]
      plgpu.barrier_wait(q_bar.at[slot])
      q_t = q_smem.at[slot].transpose((1, 0))
      s, pull = _scores(
        cfg, k_smem.at[wg], q_t, masked, tile, tile // 2 * bq, kv0, shape, 1, q_routes, kv_routes,
        head_mods, vjp=True,
      )  # fmt: skip
      plgpu.barrier_wait(lse_bar.at[slot])
      p = jnp.exp2(s - _cols(plgpu.load(lse_smem.at[slot], layout=_COL), shape))
      plgpu.barrier_wait(do_bar.at[slot])
      dv = _mma(cfg, _operand(cfg, p.astype(q_ref.dtype), p_smem, wg), do_smem.at[slot], dv)
      dp = _mma(cfg, v_smem.at[wg], do_smem.at[slot].transpose((1, 0)))
      plgpu.barrier_wait(delta_bar.at[slot])
      ds = p * (dp - _cols(plgpu.load(delta_smem.at[slot], layout=_COL), shape))
      ds = ds if pull is None else pull(ds)[0]
      dk = _mma(cfg, _operand(cfg, ds.astype(q_ref.dtype), p_smem, wg), q_smem.at[slot], dk)
      plgpu.barrier_arrive(consumed.at[slot])
      return g + 1, dk, dv

    def item(w, g):
      b, hk, j = meta_ref[w, 0, 0], meta_ref[w, 0, 1] // cfg.group, meta_ref[w, 0, 2]
      kv0 = j * cfg.block_kv + wg * ROWS
      rows = pl.ds(kv0, ROWS)
      plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[wg], k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[wg], v_bar.at[wg])
      kv_routes = None
      if kr_ref is not None:
        plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem.at[wg], kr_bar.at[wg])
        plgpu.barrier_wait(kr_bar.at[wg])
        kv_routes = plgpu.load(kr_smem.at[wg], layout=_ROW)
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])

      def head(h, carry):  # the GQA group's query heads, one after the other
        head_mods = None if mods is None else mods.at(meta_ref[w, h, 0], meta_ref[w, h, 1])
        step_ = functools.partial(step, w, h, kv0, kv_routes, head_mods)
        return _tile_loops(meta_ref[w, h, 4], meta_ref[w, h, 3], step_, carry)

      init = (g, _zeros((ROWS, cfg.head_dim)), _zeros((ROWS, cfg.v_head_dim)))
      g, dk, dv = lax.fori_loop(0, cfg.group, head, init)
      k_smem.at[wg][...] = (dk * cfg.scale).astype(k_smem.dtype)  # k/v are done: staging
      v_smem.at[wg][...] = dv.astype(v_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, rows, hk])
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, rows, hk])
      plgpu.wait_smem_to_gmem(0)
      return g

    _persistent(cfg, num_items, item, jnp.int32(0))


# ---------------------------------------------------------------------------
# Kernel calls.
# ---------------------------------------------------------------------------


def _kernel(cfg: _Config, body, out_type, scratch, num_items: int, wgs: int, name: str):
  params = plgpu.InterpretGPUParams() if cfg.interpret else None
  return plgpu.kernel(
    functools.partial(body, cfg, num_items),
    out_type=out_type,
    scratch_types=scratch,
    grid=(min(cfg.num_ctas, num_items),),
    grid_names=("cta",),
    num_threads=wgs + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=params,
    kernel_name=name,
  )


def _barriers(*counts: int | None, consumers: int, stages: int) -> tuple:
  """One barrier array per entry (None: absent), then the ring's consumed barriers."""
  bars = tuple(None if n is None else plgpu.Barrier(num_barriers=n) for n in counts)
  return (*bars, plgpu.Barrier(num_arrivals=consumers, num_barriers=stages))


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


def _pad8(x: jax.Array) -> jax.Array:
  """[B, S, H, D] padded along S to a multiple of 8 rows (TMA's tiling of the
  sequence dim; whole tiles past the end are then read as zeros by TMA itself)."""
  return jnp.pad(x, ((0, 0), (0, -x.shape[1] % 8), (0, 0), (0, 0)))


def _mod_inputs(cfg: _Config, score_params, mod_args) -> list[jax.Array]:
  """The kernels' inputs after the routes: offsets int32 [2], the score_mod's and the
  mask_mod's parameter leaves (GMEM; read as scalars)."""
  if not cfg.num_mod_inputs:
    return []
  offsets, mask_params = mod_args
  return [offsets, *jax.tree.leaves(score_params), *jax.tree.leaves(mask_params)]


def _param_grads(cfg: _Config, params, offsets, d_reads: jax.Array):
  """The score_mod parameters' gradients from the dq kernel's per-read sums d_reads f32
  [B, Hq, R]: the reads' indices (functions of b, h and constants, as `_check_mods`
  requires) are evaluated for every (b, h) at once, and the sums scattered there."""
  batch, heads = d_reads.shape[:2]
  b = offsets[0] + jnp.arange(batch, dtype=jnp.int32)[:, None]
  h = offsets[1] + jnp.arange(heads, dtype=jnp.int32)[None, :]
  leaves, tree = jax.tree.flatten(params)
  reads: list = []
  readers = tree.unflatten([common._Reader(x, n, reads) for n, x in enumerate(leaves)])
  zero = jnp.zeros((), jnp.int32)
  cfg.score_mod(jnp.zeros((batch, heads), jnp.float32), b, h, zero, zero, readers)
  reads = [
    (leaf, index) for leaf, index, value in reads if jnp.issubdtype(value.dtype, jnp.floating)
  ]
  grads = [jnp.zeros(x.shape, jnp.float32) for x in leaves]
  for r, (leaf, index) in enumerate(reads):
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(x, jax.Array) and x.ndim for x in parts):
      spread = lambda x: jnp.broadcast_to(x, (batch, heads)) if isinstance(x, jax.Array) else x
      grads[leaf] = grads[leaf].at[tuple(spread(x) for x in parts)].add(d_reads[..., r])
    else:
      grads[leaf] = grads[leaf].at[index].add(jnp.sum(d_reads[..., r]))
  return common.float_cotangents(params, tree.unflatten(grads))


def _forward(cfg: _Config, q, k, v, score_params, kv_view, q_view, routes, mod_args):
  del q_view  # the transposed view serves the backward pass only
  q, k, v = _pad8(q), _pad8(k), _pad8(v)
  b, _, hq, _ = q.shape
  meta, tiles = _work_list(cfg, *kv_view, b, hq, 1, along_q=False)
  wgs, s, bk, r, dt = cfg.wgs, cfg.num_stages, cfg.block_kv, cfg.num_routes, q.dtype
  d, dv = cfg.head_dim, cfg.v_head_dim
  smem = (
    _smem((wgs, ROWS, d), dt),  # q
    _smem((wgs, ROWS, dv), dt),  # o
    _smem((s, bk, d), dt),  # k ring
    _smem((s, bk, dv), dt),  # v ring
    plgpu.SMEM((wgs, ROWS), jnp.float32),  # lse
    _smem((wgs, ROWS, bk), dt) if cfg.interpret else None,  # P, staged (interpret)
    plgpu.SMEM((wgs, r, ROWS), jnp.int32) if r else None,  # query routes
    plgpu.SMEM((s, bk), jnp.int32) if r else None,  # key routes ring
  )
  rw, rs = (wgs, s) if r else (None, None)
  bars = _barriers(wgs, rw, s, s, rs, consumers=wgs, stages=s)
  out_type = (
    jax.ShapeDtypeStruct((*q.shape[:3], dv), dt),
    jax.ShapeDtypeStruct((b, hq, cfg.padded[0]), jnp.float32),
  )
  call = _kernel(cfg, _forward_kernel, out_type, [smem, bars], meta.shape[0], wgs, "bs_fwd")
  mods = _mod_inputs(cfg, score_params, mod_args)
  out, lse = call(meta, tiles, q, k, v, *_route_arrays(cfg, routes, b), *mods)
  return out[:, : cfg.q_len], lse[..., : cfg.q_len]


def _backward(
  cfg: _Config, q, k, v, score_params, kv_view, q_view, routes, mod_args, out, lse, d_out, d_lse
):
  b, _, hq, _ = q.shape
  wgs, wgs_kv, s, r, dt = cfg.wgs, cfg.wgs_kv, cfg.num_stages, cfg.num_routes, q.dtype
  bq, bk, d, dv = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.v_head_dim
  sq = cfg.padded[0]
  pad = lambda x, value: jnp.pad(x, ((0, 0), (0, 0), (0, sq - cfg.q_len)), constant_values=value)
  # log2-unit lse; +inf on rows that see nothing (and the padding) makes p = 0 there.
  lse2 = pad(jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E), jnp.inf)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = pad(delta - d_lse, 0.0)
  route_args = _route_arrays(cfg, routes, b)
  q, k, v, d_out = _pad8(q), _pad8(k), _pad8(v), _pad8(d_out)
  inputs = (q, k, v, d_out, lse2, delta, *route_args, *_mod_inputs(cfg, score_params, mod_args))
  reads = cfg.num_grad_reads

  meta, tiles = _work_list(cfg, *kv_view, b, hq, 1, along_q=False)
  smem = (
    _smem((wgs, ROWS, d), dt),  # q, then dq
    _smem((wgs, ROWS, dv), dt),  # dO
    _smem((s, bk, d), dt),  # k ring
    _smem((s, bk, dv), dt),  # v ring
    plgpu.SMEM((wgs, ROWS), jnp.float32),  # lse
    plgpu.SMEM((wgs, ROWS), jnp.float32),  # delta
    _smem((wgs, ROWS, bk), dt) if cfg.interpret else None,  # dS, staged (interpret)
    plgpu.SMEM((wgs, r, ROWS), jnp.int32) if r else None,
    plgpu.SMEM((s, bk), jnp.int32) if r else None,
    plgpu.SMEM((wgs, reads, ROWS), jnp.float32) if reads else None,  # score_mod reads' d
  )
  rw, rs = (wgs, s) if r else (None, None)
  bars = _barriers(wgs, wgs, wgs, wgs, rw, s, s, rs, consumers=wgs, stages=s)
  out_type = [jax.ShapeDtypeStruct(q.shape, dt)]
  if reads:  # per-query sums of each parameter read's cotangent
    out_type.append(jax.ShapeDtypeStruct((b, hq, reads, sq), jnp.float32))
  dq, *d_reads = _kernel(cfg, _dq_kernel, out_type, [smem, bars], meta.shape[0], wgs, "bs_dq")(
    meta, tiles, *inputs
  )
  d_params = None
  if cfg.score_tree is not None:
    d_reads = jnp.zeros((b, hq, 0)) if not reads else jnp.sum(d_reads[0][..., : cfg.q_len], -1)
    d_params = _param_grads(cfg, score_params, mod_args[0], d_reads)

  meta, tiles = _work_list(cfg, *q_view, b, hq, cfg.group, along_q=True)
  smem = (
    _smem((wgs_kv, ROWS, d), dt),  # k, then dk
    _smem((wgs_kv, ROWS, dv), dt),  # v, then dv
    _smem((s, bq, d), dt),  # q ring
    _smem((s, bq, dv), dt),  # dO ring
    plgpu.SMEM((s, bq), jnp.float32),  # lse ring
    plgpu.SMEM((s, bq), jnp.float32),  # delta ring
    _smem((wgs_kv, ROWS, bq), dt) if cfg.interpret else None,  # P, dS staged (interpret)
    plgpu.SMEM((s, r, bq), jnp.int32) if r else None,  # query routes ring
    plgpu.SMEM((wgs_kv, ROWS), jnp.int32) if r else None,  # key routes
  )
  rw, rs = (wgs_kv, s) if r else (None, None)
  bars = _barriers(wgs_kv, wgs_kv, rw, s, s, s, s, rs, consumers=wgs_kv, stages=s)
  out_type = (
    jax.ShapeDtypeStruct((*k.shape[:3], d), dt),
    jax.ShapeDtypeStruct((*k.shape[:3], dv), dt),
  )
  dk, dv_ = _kernel(cfg, _dkdv_kernel, out_type, [smem, bars], meta.shape[0], wgs_kv, "bs_dkdv")(
    meta, tiles, *inputs
  )
  return dq[:, : cfg.q_len], dk[:, : cfg.kv_len], dv_[:, : cfg.kv_len], d_params


_attention = common.attention_with_vjp(_forward, _backward)


def block_sparse_attention_mosaic_gpu(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: common.BlockSparseLayout,
  *,
  scale: float,
  interpret: bool = False,
  routes: common.TokenRoutes | None = None,
  score_mod: common.ScoreMod | None = None,
  score_mod_params: Any = None,
  batch_offset: Any = 0,
  head_offset: Any = 0,
  num_stages: int | None = None,
  num_ctas: int = NUM_SMS,
) -> tuple[jax.Array, jax.Array]:
  """(output [batch, q_len, q_heads, v_head_dim], lse f32 [batch, q_heads, q_len]).

  Differentiable (Mosaic GPU backward kernels). Inputs are assumed validated by
  `ops.block_sparse_attention`; `check_supported` is run here.

  Args:
    interpret: run the kernels in Mosaic GPU's interpreter (on CPU) instead of
      compiling them for the GPU.
    routes: optional per-token routes (`common.TokenRoutes`).
    score_mod: optional `common.ScoreMod` on the scaled f32 scores of every tile (b,
      h global), its derivative in the backward kernels. Its parameters are GMEM
      refs read as scalars at indices of b, h and constants (`slopes[h]`); the dq
      kernel writes each floating read's per-query cotangent sums, which XLA
      scatters into the parameters' gradients (no atomics).
    score_mod_params: the score_mod's parameters (a pytree of arrays).
    batch_offset, head_offset: the global index of q's first batch row and head.
    num_stages: depth of the SMEM ring (default: 3 where it fits, else 2).
    num_ctas: width of the persistent grid (default: the H100/H200 SM count).

  Mods take elementwise math Mosaic GPU lowers and scalar parameter reads; mask_mods
  likewise (`prefix[b]`); gathers (T5 bias tables, document segment ids) are refused.

  Raises:
    common.Unsupported: a call this kernel does not take (see `check_supported`).
  """
  check_supported(q, k, v, mask, routes, score_mod=score_mod, score_mod_params=score_mod_params)
  trace = _check_mods(mask, score_mod, score_mod_params)
  d, dv = q.shape[-1], v.shape[-1]
  if num_stages is None:
    fits = _smem_bytes(mask.block_q, mask.block_kv, d, dv, 3) <= SMEM_BYTES
    num_stages = 3 if fits else 2
  cfg = _Config(
    **common.Tiling.fields_of(mask),
    scale=scale,
    head_dim=d,
    v_head_dim=dv,
    group=q.shape[2] // k.shape[2],
    num_routes=0 if routes is None else routes.query.shape[-1],
    route_group=1 if routes is None else q.shape[2] // routes.query.shape[1],
    interpret=bool(interpret),
    num_stages=num_stages,
    num_ctas=num_ctas,
    **_mod_fields(mask, score_mod, score_mod_params, trace),
  )
  as_int = lambda x: x.astype(jnp.int32)
  kv_view = (mask.kv_count, mask.kv_index, as_int(mask.kv_partial))
  q_view = (mask.q_count, mask.q_index, as_int(mask.q_partial))
  offsets = jnp.stack([jnp.asarray(batch_offset), jnp.asarray(head_offset)]).astype(jnp.int32)
  mod_args = (offsets, tuple(mask.mask_params) if cfg.mask_tree is not None else ())
  score_params = score_mod_params if cfg.score_tree is not None else None
  return _attention(cfg, q, k, v, score_params, kv_view, q_view, routes, mod_args)


def _mod_fields(mask, score_mod, score_mod_params, trace) -> dict[str, Any]:
  """The `_Config` fields of a call's score_mod and mask_mod."""
  has_params = score_mod is not None and score_mod.has_params
  leaves = jax.tree.leaves(score_mod_params) if has_params else []
  floating = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]
  reads = () if trace is None else trace.reads
  return dict(
    score_mod=score_mod,
    score_tree=jax.tree.structure(score_mod_params) if has_params else None,
    grad_reads=tuple(bool(floating[r.leaf]) for r in reads if r.fn == "score_mod"),
    mask_tree=(
      jax.tree.structure(tuple(mask.mask_params))
      if getattr(mask.mask_fn, "per_batch_head", False)
      else None
    ),
  )

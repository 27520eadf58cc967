"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering.

Three `pl.pallas_call`s, tied together by `jax.custom_vjp`:

  forward  grid (Qb, B, Hq)  one program per q tile; it loops over the kv tiles
                             its row of the forward view lists (kv_count[b, h, i]
                             entries of kv_index), loads each k/v tile straight
                             from HBM by its id, and runs the online softmax.
                             Writes the output and the natural-log lse.
  dq       grid (Qb, B, Hq)  the same walk, accumulating dQ from p = exp(s - lse),
                             in steps of 64 keys where a deep ring of whole k/v
                             tiles would not fit SMEM (see DQ_KV_ROWS).
  dk/dv    grid (Kb * subs, B, Hkv)  one program per 64-row sub-tile of a kv tile
                             and kv head: it walks the transposed view
                             (q_count/q_index) for each query head of the GQA
                             group in turn, and writes dK, dV once, in the input
                             dtype (no per-query-head shares summed afterwards).

The kernels run a row's full tiles in one loop and its masked ones (partial,
ragged tail, token routes) in a second; the next tile id is read one step ahead,
so Triton pipelines the k/v (q/dO) loads `num_stages` deep, as deep as SMEM allows.
Softmax runs in base 2 (exp2, log2 e folded into the scale).

Tiles not listed cost nothing: no load, no matmul, no program step. The
element mask runs only on tiles the mask flags partial, and the position
bounds only on the ragged last tiles (see `common.visibility`).

Mask metadata reaches each program as its own row: BlockSpecs select
kv_count[b, h, i] (a scalar), kv_index[b, h, i, :] and kv_partial[b, h, i, :]
(read one scalar per step), with b / h pinned to 0 where the mask broadcasts.
k and v are passed as whole-sequence blocks of one kv head (h // group), i.e.
as pointers, and sliced per tile with `pl.ds`.

Limits (Triton): block sizes are powers of two >= 16; head dims up to 256
(non-powers of two are padded in the block and masked on load).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_attention.pallas_kernels.block_sparse import common

MAX_HEAD_DIM = 256
MIN_BLOCK = 16
# dK/dV computes kv tiles in sub-tiles of at most 64 rows: at 128 x 128 tiles the two
# f32 accumulators plus s, p and dS of one 128-row program need 255 registers and
# spill (~150 spill instructions per tile, ptxas for sm_90a); 64 rows do not.
DKDV_ROWS = 64
# dQ walks a kv tile in steps of 64 keys where a `num_stages`-deep ring of whole k/v
# tiles does not fit SMEM beside the resident q and dO: at 128 x 128 bf16 tiles and
# head dim 128 that ring needs 256 KB (> 227 KB: 2 stages, whose loads Triton does not
# overlap), of 64-key halves 160 KB. Each k/v tile is still read once; the halves cost
# ~40% more instructions per tile (narrower wgmma), the overlap hides the loads.
DQ_KV_ROWS = 64
# Offsets are int32: the largest operand, padded, must stay below 2**31 elements.
MAX_ELEMENTS = 2**31 - 1
# Shared memory one program may use (bytes): sm90/sm100's opt-in maximum, also the
# budget when lowering on a host without a GPU; A100-class 163 KB, other GPUs 99 KB.
SMEM_BYTES = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024}
SMEM_BYTES_OTHER = 99 * 1024


def check_supported(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: Any,
  routes: Any = None,
  *,
  score_mod: Any = None,
) -> None:
  """Raises `common.Unsupported` if this kernel cannot run the call (before any work)."""
  common.refuse_mods("Triton block-sparse", mask, score_mod)
  del routes  # token routes of any shape are supported
  for name, block in (("block_q", mask.block_q), ("block_kv", mask.block_kv)):
    if block < MIN_BLOCK or block & (block - 1):
      raise common.Unsupported(
        f"the Triton block-sparse kernel needs {name} to be a power of two >= "
        f"{MIN_BLOCK}; the mask has {name}={block}."
      )
  for name, dim in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
    if dim > MAX_HEAD_DIM:
      raise common.Unsupported(
        f"the Triton block-sparse kernel supports {name} <= {MAX_HEAD_DIM}, got {dim}."
      )
  tiles = lambda length, block: -(-length // block) * block
  sq, sk = tiles(mask.q_len, mask.block_q), tiles(mask.kv_len, mask.block_kv)
  sizes = (
    q.shape[0] * q.shape[2] * max(sq, sk) * pl.next_power_of_2(max(q.shape[-1], v.shape[-1])),
  )
  if max(sizes) > MAX_ELEMENTS:
    raise common.Unsupported(
      f"the Triton block-sparse kernel addresses its operands with int32 offsets; "
      f"batch x heads x padded length x padded head dim = {max(sizes)} elements "
      f"exceeds 2**31 - 1. Split the batch or heads (or use the Mosaic GPU kernel)."
    )


@dataclasses.dataclass(frozen=True)
class _Config(common.Tiling):
  """Static facts of one call (hashable: jit/custom_vjp static argument)."""

  scale: float
  head_dim: int
  v_head_dim: int
  group: int  # query heads per kv head
  mask_batch: bool  # the mask has a batch dim (> 1)
  mask_heads: bool  # the mask has a head dim (> 1)
  num_routes: int  # R routes per query (0: no token routes)
  route_group: int  # query heads per route head (Hq // Hr)
  route_batch: bool  # the routes have a batch dim (> 1)
  interpret: bool
  num_warps: int | None
  num_stages: int

  @property
  def padded_dims(self) -> tuple[int, int]:
    return pl.next_power_of_2(self.head_dim), pl.next_power_of_2(self.v_head_dim)

  def warps(self) -> int:
    if self.num_warps is not None:
      return self.num_warps
    return 4 if max(self.head_dim, self.v_head_dim) <= 64 else 8

  def mask_row(self, b, h):
    """(batch, head) index into the mask arrays, 0 where they broadcast."""
    return (b if self.mask_batch else 0, h if self.mask_heads else 0)

  def route_row(self, b, h):
    """(batch, route head) index into the query routes."""
    return (b if self.route_batch else 0, h // self.route_group)


# ---------------------------------------------------------------------------
# Tile helpers (inside kernels).
# ---------------------------------------------------------------------------


def _load(ref, dim: int) -> jax.Array:
  """Loads a [rows, dim_padded] tile, zero past the true head dim."""
  padded = ref.shape[-1]
  if padded == dim:
    return ref[...]
  return plgpu.load(ref, mask=(jnp.arange(padded) < dim)[None, :], other=0.0)


def _store(ref, value: jax.Array, dim: int) -> None:
  padded = ref.shape[-1]
  if padded == dim:
    ref[...] = value.astype(ref.dtype)
  else:
    plgpu.store(ref, value.astype(ref.dtype), mask=(jnp.arange(padded) < dim)[None, :])


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation; exact float32 for float32 inputs."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _positions(start, size: int) -> jax.Array:
  return start + jnp.arange(size, dtype=jnp.int32)


def _route_columns(cfg: _Config, q_route_ref, *index) -> list[jax.Array]:
  """The query routes of a tile, one int32 [block_q] vector per route slot; `index`
  selects the rows (default: all of the block). One indexer per read: jax 0.11's
  Triton lowering takes no `ref.at[...][...]` chains."""
  if q_route_ref is None:
    return []
  index = index or (slice(None),)
  return [q_route_ref[(*index, r)] for r in range(cfg.num_routes)]


def _routed(columns: list[jax.Array], kv_route_ref, kv_rows) -> jax.Array | None:
  """bool [block_q, block_kv]: the key's route is one of the query's (None: no routes)."""
  if not columns:
    return None
  key = kv_route_ref[kv_rows]
  match = columns[0][:, None] == key[None, :]
  for col in columns[1:]:
    match = match | (col[:, None] == key[None, :])
  return match


def _scores(
  cfg: _Config, q, k, q_pos, kv_pos, partial, routed=None, *, log2=False, masked=True
) -> jax.Array:
  """Scaled scores of one tile (in log2 units if log2: the scale times log2 e), -inf
  where the pair is hidden; `masked=False` (a full tile) skips the visibility test."""
  s = _dot(q, k.T) * (cfg.scale * common.LOG2E if log2 else cfg.scale)
  if not masked:
    return s
  vis = cfg.visible(partial, q_pos[:, None], kv_pos[None, :], routed)
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _walk(count, full, tiles_ref, step, init, head=None, subs: int = 1):
  """step(masked, tile id, partial, carry) over a row's full tiles, then its masked
  ones (the row `tiles_ref[head]` if head is given). The next id is read one step
  ahead and carried, so the software pipeliner sees the k/v (or q/dO) loads of a
  step depend on the carry, not on a load. `subs` > 1: each tile is walked in `subs`
  steps, and `tile id` is that of the sub-tile (tile id * subs + the step within)."""
  last = tiles_ref.shape[-1] - 1
  tile_at = (lambda t: tiles_ref[t]) if head is None else (lambda t: tiles_ref[head, t])

  def loop(masked):
    def body(t, carry):
      tile, inner = carry
      if subs == 1:
        upcoming, part = tile_at(jnp.minimum(t + 1, last)), tile // 2
      else:  # t >= 0: truncating division is floor division
        upcoming = tile_at(jnp.minimum(jax.lax.div(t + 1, subs), last))
        part = tile // 2 * subs + jax.lax.rem(t, subs)
      return upcoming, step(masked, part, tile % 2 == 1, inner)

    return body

  carry = jax.lax.fori_loop(0, full * subs, loop(False), (tile_at(0), init))
  return jax.lax.fori_loop(full * subs, count * subs, loop(True), carry)[1]


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _forward_kernel(
  count_ref,  # int32 []           kv tiles of this q tile
  full_ref,  # int32 []            how many of them are full (listed first)
  tiles_ref,  # int32 [Kmax]       their ids * 2 + partial
  q_route_ref,  # int32 [block_q, R] or None: token routes of these queries
  kv_route_ref,  # int32 [Sk_pad] or None: the keys' routes
  q_ref,  # [block_q, Dp]
  k_ref,  # [Sk_pad, Dp]           the whole kv head
  v_ref,  # [Sk_pad, Dvp]
  o_ref,  # [block_q, Dvp]
  lse_ref,  # f32 [block_q]
  *,
  cfg: _Config,
):
  bq, bk = cfg.block_q, cfg.block_kv
  q_pos = _positions(pl.program_id(0) * bq, bq)
  q = _load(q_ref, cfg.head_dim)
  routes = _route_columns(cfg, q_route_ref)

  def step(masked, j, partial, carry):
    keys = pl.ds(j * bk, bk)
    k = _load(k_ref.at[keys, :], cfg.head_dim)
    v = _load(v_ref.at[keys, :], cfg.v_head_dim)
    routed = _routed(routes, kv_route_ref, keys) if masked else None
    kv_pos = _positions(j * bk, bk)
    s = _scores(cfg, q, k, q_pos, kv_pos, partial, routed, log2=True, masked=masked)
    return common.online_softmax_update(s, *carry, v, _dot, base2=True)

  init = (
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
    jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
  )
  m, l, acc = _walk(count_ref[...], full_ref[...], tiles_ref, step, init)
  out, lse = common.finalize(m, l, acc, base2=True)
  _store(o_ref, out, cfg.v_head_dim)
  lse_ref[...] = lse


def _dq_kernel(
  count_ref,  # int32 []
  full_ref,  # int32 []
  tiles_ref,  # int32 [Kmax]
  q_route_ref,  # int32 [block_q, R] or None
  kv_route_ref,  # int32 [Sk_pad] or None
  q_ref,  # [block_q, Dp]
  k_ref,  # [Sk_pad, Dp]
  v_ref,  # [Sk_pad, Dvp]
  do_ref,  # [block_q, Dvp]
  lse_ref,  # f32 [block_q]  log2 units (+inf on empty rows: p = 0 there)
  delta_ref,  # f32 [block_q]  rowsum(dO * O) - dlse
  dq_ref,  # [block_q, Dp]
  *,
  cfg: _Config,
  keys: int,  # keys per step: the kv tile, or a part of it (see DQ_KV_ROWS)
):
  bq, bk = cfg.block_q, keys
  q_pos = _positions(pl.program_id(0) * bq, bq)
  q = _load(q_ref, cfg.head_dim)
  do = _load(do_ref, cfg.v_head_dim)
  lse, delta = lse_ref[...], delta_ref[...]
  routes = _route_columns(cfg, q_route_ref)

  def step(masked, j, partial, dq):  # j: the step's part of the kv tile
    keys = pl.ds(j * bk, bk)
    k = _load(k_ref.at[keys, :], cfg.head_dim)
    v = _load(v_ref.at[keys, :], cfg.v_head_dim)
    routed = _routed(routes, kv_route_ref, keys) if masked else None
    kv_pos = _positions(j * bk, bk)
    s = _scores(cfg, q, k, q_pos, kv_pos, partial, routed, log2=True, masked=masked)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (_dot(do, v.T) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  init = jnp.zeros(q.shape, jnp.float32)
  subs = cfg.block_kv // bk
  dq = _walk(count_ref[...], full_ref[...], tiles_ref, step, init, subs=subs)
  _store(dq_ref, dq * cfg.scale, cfg.head_dim)


def _dkdv_kernel(
  count_ref,  # int32 [G] or []   per query head of the group (one row if the mask
  full_ref,  # int32 [G] or []    broadcasts over heads): q tiles that visit this kv tile
  tiles_ref,  # int32 [G, Qmax] or [Qmax]
  q_route_ref,  # int32 [Hr, Sq_pad, R] or None: routes of every query head
  kv_route_ref,  # int32 [sub] or None: routes of this sub-tile's keys
  q_ref,  # [Sq_pad, G, Dp]      the group's query heads
  k_ref,  # [sub, Dp]            a sub-tile of <= 64 rows of the kv tile
  v_ref,  # [sub, Dvp]
  do_ref,  # [Sq_pad, G, Dvp]
  lse_ref,  # f32 [G, Sq_pad]
  delta_ref,  # f32 [G, Sq_pad]
  dk_ref,  # [sub, Dp]           the group's sum, in the input dtype
  dv_ref,  # [sub, Dvp]
  *,
  cfg: _Config,
):
  bq, sub = cfg.block_q, k_ref.shape[0]
  kv_pos = _positions(pl.program_id(0) * sub, sub)
  k = _load(k_ref, cfg.head_dim)
  v = _load(v_ref, cfg.v_head_dim)
  per_head = cfg.mask_heads and cfg.group > 1  # as _row_specs selects the rows
  # Read outside the loops: the Pallas interpreter substitutes program ids only there.
  first_head = pl.program_id(2) * cfg.group

  def head(h, carry):  # the group's query heads, one after the other
    def step(masked, i, partial, carry):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q = _load(q_ref.at[rows, h, :], cfg.head_dim)
      do = _load(do_ref.at[rows, h, :], cfg.v_head_dim)
      routed = None
      if masked and q_route_ref is not None:
        route_head = (first_head + h) // cfg.route_group
        columns = _route_columns(cfg, q_route_ref, route_head, rows)
        routed = _routed(columns, kv_route_ref, slice(None))
      q_pos = _positions(i * bq, bq)
      s = _scores(cfg, q, k, q_pos, kv_pos, partial, routed, log2=True, masked=masked)
      p = jnp.exp2(s - lse_ref[h, rows][:, None])
      dv = dv + _dot(p.astype(do.dtype).T, do)
      ds = p * (_dot(do, v.T) - delta_ref[h, rows][:, None])
      return dk + _dot(ds.astype(q.dtype).T, q), dv

    if not per_head:
      return _walk(count_ref[...], full_ref[...], tiles_ref, step, carry)
    return _walk(count_ref[h], full_ref[h], tiles_ref, step, carry, head=h)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, cfg.group, head, init)
  _store(dk_ref, dk * cfg.scale, cfg.head_dim)
  _store(dv_ref, dv, cfg.v_head_dim)


def _calibrate_kernel(
  codes_ref,  # int32 [Kb]   each kv tile in the mask M: 0 no, 1 full, 2 partial
  q_ref,  # [block_q, Dp]
  k_ref,  # [Sk_pad, Dp]
  v_ref,  # [Sk_pad, Dvp]
  o_ref,  # [block_q, Dvp]   attention over all keys
  lse_ref,  # f32 [block_q]  logsumexp over all keys
  lse_m_ref,  # f32 [block_q]  logsumexp over M's keys
  om_ref,  # [block_q, Dvp] or None: attention normalised over M's keys
  *,
  cfg: _Config,
):
  """Dense attention over every kv tile; on M's tiles, M's share runs its own online
  softmax (own running max, so that lse_masked and O^M are exact however far M's
  scores sit below the row's max)."""
  bq, bk = cfg.block_q, cfg.block_kv
  q_pos = _positions(pl.program_id(0) * bq, bq)
  q = _load(q_ref, cfg.head_dim)

  def step(j, carry):
    dense, masked = carry  # (m, l, acc) each; masked acc None without O^M
    keys = pl.ds(j * bk, bk)
    k = _load(k_ref.at[keys, :], cfg.head_dim)
    v = _load(v_ref.at[keys, :], cfg.v_head_dim)
    kv_pos = _positions(j * bk, bk)
    s = _scores(dataclasses.replace(cfg, mask_fn=None), q, k, q_pos, kv_pos, True)
    dense = common.online_softmax_update(s, *dense, v, _dot)
    code = codes_ref[j]

    def in_mask(masked):
      s_m = s
      if cfg.mask_fn is not None:
        keep = (code == 1) | cfg.mask_fn(q_pos[:, None], kv_pos[None, :])
        s_m = jnp.where(keep, s, -jnp.inf)
      return common.online_softmax_update(s_m, *masked, v, _dot)

    return dense, jax.lax.cond(code != 0, in_mask, lambda masked: masked, masked)

  stats = lambda: (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc0 = jnp.zeros((bq, v_ref.shape[-1]), jnp.float32)
  init = ((*stats(), acc0), (*stats(), None if om_ref is None else acc0))
  dense, masked = jax.lax.fori_loop(0, cfg.num_kv_blocks, step, init)
  out, lse = common.finalize(*dense)
  out_m, lse_m = common.finalize(*masked)
  _store(o_ref, out, cfg.v_head_dim)
  lse_ref[...] = lse
  lse_m_ref[...] = lse_m
  if om_ref is not None:
    _store(om_ref, out_m, cfg.v_head_dim)


# ---------------------------------------------------------------------------
# pallas_call plumbing.
# ---------------------------------------------------------------------------


def _row_specs(cfg: _Config, slots: int, heads: int = 1, subs: int = 1):
  """BlockSpecs selecting one row (count, full count, tiles) of a mask view for the
  program at grid point (t, b, h). `heads` > 1: h is a kv head and the block holds the
  rows of its group's query heads (where the mask has heads); `subs`: programs per
  mask tile along t (sub-tiles)."""
  block = heads if heads > 1 and cfg.mask_heads else None

  def row(t, b, h):
    return (*cfg.mask_row(b, h), t // subs)

  return [
    pl.BlockSpec((None, block, None), row),
    pl.BlockSpec((None, block, None), row),
    pl.BlockSpec((None, block, None, slots), lambda t, b, h: (*row(t, b, h), 0)),
  ]


def _tile_spec(block: int, width: int, head_of):
  """[block, width] tile of one head of a [B, S, H, D] array at grid (t, b, h)."""
  return pl.BlockSpec((None, block, None, width), lambda t, b, h: (b, t, head_of(h), 0))


def _whole_spec(length: int, width: int, head_of):
  """The whole sequence of one head of a [B, S, H, D] array (a pointer)."""
  return pl.BlockSpec((None, length, None, width), lambda t, b, h: (b, 0, head_of(h), 0))


def _vector_spec(block: int | None, length: int):
  """Rows of a [B, H, S] f32 array: one tile, or the whole sequence if block None."""
  if block is None:
    return pl.BlockSpec((None, None, length), lambda t, b, h: (b, h, 0))
  return pl.BlockSpec((None, None, block), lambda t, b, h: (b, h, t))


def smem_budget() -> int:
  """Shared memory a Triton program may use on the default device, bytes."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not capability:
    return SMEM_BYTES[9, 0]
  major, minor = (int(x) for x in str(capability).split(".")[:2])
  return SMEM_BYTES.get((major, minor), SMEM_BYTES_OTHER)


def _stages(cfg: _Config, fixed: int, per_stage: int) -> int:
  """The deepest software pipeline, at most cfg.num_stages, whose SMEM fits: `fixed`
  bytes of tiles held for the whole program plus `per_stage` bytes per ring slot (the
  k/v or q/dO tiles a step loads). At 128 x 128 bf16 tiles and head dim 128 the
  forward takes 3 stages (224 KB), dQ 3 (160 KB, of 64-key steps), f32 inputs fewer."""
  budget = smem_budget()
  fits = [s for s in range(2, cfg.num_stages + 1) if fixed + s * per_stage <= budget]
  return max(fits, default=1)


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name: str, smem):
  """`smem`: (fixed, per-stage) SMEM bytes of the kernel's tiles (see `_stages`)."""
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=cfg.warps(), num_stages=_stages(cfg, *smem)),
    interpret=cfg.interpret,
    name=name,
  )


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _route_inputs(cfg: _Config, routes, sq: int, sk: int, query_tiles: bool, sub: int = 0):
  """(arrays, BlockSpecs) of the token routes, padded so padding matches nothing;
  query routes as tiles (forward, dq) or every route head whole (dk/dv), key routes
  the other way (dk/dv: `sub`-row sub-tiles)."""
  if routes is None:
    return [None, None], [None, None]
  query = jnp.pad(
    routes.query.astype(jnp.int32),
    ((0, 0), (0, 0), (0, sq - cfg.q_len), (0, 0)),
    constant_values=-1,
  )
  key = jnp.pad(routes.key.astype(jnp.int32), ((0, 0), (0, sk - cfg.kv_len)), constant_values=-2)
  batch = lambda b: b if cfg.route_batch else 0
  r = cfg.num_routes
  if query_tiles:
    specs = [
      pl.BlockSpec((None, None, cfg.block_q, r), lambda t, b, h: (*cfg.route_row(b, h), t, 0)),
      pl.BlockSpec((None, sk), lambda t, b, h: (batch(b), 0)),
    ]
  else:
    hr = query.shape[1]
    specs = [
      pl.BlockSpec((None, hr, sq, r), lambda t, b, h: (batch(b), 0, 0, 0)),
      pl.BlockSpec((None, sub), lambda t, b, h: (batch(b), t)),
    ]
  return [query, key], specs


def _forward(cfg: _Config, q, k, v, kv_view, q_view, routes):
  del q_view  # the transposed view serves the backward pass only
  b, _, hq, _ = q.shape
  qb, kb = cfg.num_q_blocks, cfg.num_kv_blocks
  sq, sk = qb * cfg.block_q, kb * cfg.block_kv
  dp, dvp = cfg.padded_dims
  kv_head = lambda h: h // cfg.group
  same = lambda h: h
  size = q.dtype.itemsize
  route_args, route_specs = _route_inputs(cfg, routes, sq, sk, query_tiles=True)
  tiles, full = common.full_tiles_first(cfg, *kv_view, False, routes is not None)
  out, lse = _call(
    _forward_kernel,
    cfg,
    grid=(qb, b, hq),
    in_specs=[
      *_row_specs(cfg, kv_view[1].shape[-1]),
      *route_specs,
      _tile_spec(cfg.block_q, dp, same),
      _whole_spec(sk, dp, kv_head),
      _whole_spec(sk, dvp, kv_head),
    ],
    out_specs=[_tile_spec(cfg.block_q, dvp, same), _vector_spec(cfg.block_q, sq)],
    out_shape=[
      jax.ShapeDtypeStruct((b, sq, hq, cfg.v_head_dim), q.dtype),
      jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
    ],
    name="block_sparse_forward",
    smem=(cfg.block_q * dp * size, cfg.block_kv * (dp + dvp) * size),
  )(kv_view[0], full, tiles, *route_args, _pad_seq(q, sq), _pad_seq(k, sk), _pad_seq(v, sk))
  return out[:, : cfg.q_len], lse[:, :, : cfg.q_len]


def _backward(cfg: _Config, q, k, v, kv_view, q_view, routes, out, lse, d_out, d_lse):
  b, _, hq, _ = q.shape
  hkv = k.shape[2]
  qb, kb = kv_view[0].shape[2], q_view[0].shape[2]
  sq, sk = qb * cfg.block_q, kb * cfg.block_kv
  dp, dvp = cfg.padded_dims
  kv_head = lambda h: h // cfg.group
  same = lambda h: h
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - d_lse
  pad_rows = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, sq - cfg.q_len)))
  # log2-unit lse; +inf on rows that see nothing makes p = exp2(s - lse) = 0 there.
  lse = pad_rows(jnp.where(lse == -jnp.inf, jnp.inf, lse * common.LOG2E))
  delta = pad_rows(delta)
  q, d_out = _pad_seq(q, sq), _pad_seq(d_out, sq)
  k, v = _pad_seq(k, sk), _pad_seq(v, sk)
  routed, size = routes is not None, q.dtype.itemsize
  tile_route_args, tile_route_specs = _route_inputs(cfg, routes, sq, sk, query_tiles=True)
  tiles, full = common.full_tiles_first(cfg, *kv_view, False, routed)

  # Whole kv tiles per step where `num_stages` of them fit SMEM, else 64-key parts.
  fixed, per_key = cfg.block_q * (dp + dvp) * size, (dp + dvp) * size
  keys = cfg.block_kv
  if _stages(cfg, fixed, keys * per_key) < cfg.num_stages:
    keys = min(keys, DQ_KV_ROWS)
  dq = _call(
    functools.partial(_dq_kernel, keys=keys),
    cfg,
    grid=(qb, b, hq),
    in_specs=[
      *_row_specs(cfg, kv_view[1].shape[-1]),
      *tile_route_specs,
      _tile_spec(cfg.block_q, dp, same),
      _whole_spec(sk, dp, kv_head),
      _whole_spec(sk, dvp, kv_head),
      _tile_spec(cfg.block_q, dvp, same),
      _vector_spec(cfg.block_q, sq),
      _vector_spec(cfg.block_q, sq),
    ],
    out_specs=_tile_spec(cfg.block_q, dp, same),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    name="block_sparse_dq",
    smem=(fixed, keys * per_key),
  )(kv_view[0], full, tiles, *tile_route_args, q, k, v, d_out, lse, delta)

  # dK/dV: one program per (sub-tile of <= 64 kv rows, batch, kv head); the GQA
  # group's query heads are walked inside it, so dK/dV are written once, in k's dtype.
  sub = min(cfg.block_kv, DKDV_ROWS)
  subs, g = cfg.block_kv // sub, cfg.group
  head_route_args, head_route_specs = _route_inputs(cfg, routes, sq, sk, False, sub)
  tiles, full = common.full_tiles_first(cfg, *q_view, True, routed)
  group_spec = lambda width: pl.BlockSpec((None, sq, g, width), lambda t, b, h: (b, 0, h, 0))
  dk, dv = _call(
    _dkdv_kernel,
    cfg,
    grid=(kb * subs, b, hkv),
    in_specs=[
      *_row_specs(cfg, q_view[1].shape[-1], heads=g, subs=subs),
      *head_route_specs,
      group_spec(dp),
      _tile_spec(sub, dp, same),
      _tile_spec(sub, dvp, same),
      group_spec(dvp),
      pl.BlockSpec((None, g, sq), lambda t, b, h: (b, h, 0)),
      pl.BlockSpec((None, g, sq), lambda t, b, h: (b, h, 0)),
    ],
    out_specs=[_tile_spec(sub, dp, same), _tile_spec(sub, dvp, same)],
    out_shape=[
      jax.ShapeDtypeStruct((b, sk, hkv, cfg.head_dim), k.dtype),
      jax.ShapeDtypeStruct((b, sk, hkv, cfg.v_head_dim), v.dtype),
    ],
    name="block_sparse_dkdv",
    smem=(sub * (dp + dvp) * size, cfg.block_q * ((dp + dvp) * size + 8)),  # + lse, delta
  )(q_view[0], full, tiles, *head_route_args, q, k, v, d_out, lse, delta)
  return dq[:, : cfg.q_len], dk[:, : cfg.kv_len], dv[:, : cfg.kv_len]


_attention = common.attention_with_vjp(_forward, _backward)


def block_sparse_attention_triton(
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
  num_warps: int | None = None,
  num_stages: int = 3,
) -> tuple[jax.Array, jax.Array]:
  """(output [batch, q_len, q_heads, v_head_dim], lse f32 [batch, q_heads, q_len]).

  Differentiable (Pallas backward kernels). Inputs are assumed validated by
  `ops.block_sparse_attention`; `check_supported` is run here.

  Args:
    interpret: run the kernels in the Pallas interpreter (any backend, CPU
      included) instead of compiling them with Triton.
    routes: optional per-token routes (`common.TokenRoutes`): inside the visited
      tiles, a query sees only keys whose route it lists.
    num_warps, num_stages: Triton launch parameters (default: 4 warps for head
      dims <= 64, else 8; 3 pipeline stages: a 3-deep k/v ring, as the tile id
      is read one step ahead).
  """
  check_supported(q, k, v, mask, routes, score_mod=score_mod)
  del score_mod_params, batch_offset, head_offset  # refused above until supported
  cfg = _config(
    q,
    k,
    v,
    mask,
    scale=scale,
    interpret=interpret,
    routes=routes,
    num_warps=num_warps,
    num_stages=num_stages,
  )
  as_int = lambda x: x.astype(jnp.int32)
  kv_view = (mask.kv_count, mask.kv_index, as_int(mask.kv_partial))
  q_view = (mask.q_count, mask.q_index, as_int(mask.q_partial))
  return _attention(cfg, q, k, v, kv_view, q_view, routes)


def _config(q, k, v, mask, *, scale, interpret, routes=None, num_warps=None, num_stages=3):
  bm, hm = mask.kv_count.shape[:2]
  return _Config(
    **common.Tiling.fields_of(mask),
    scale=scale,
    head_dim=q.shape[-1],
    v_head_dim=v.shape[-1],
    group=q.shape[2] // k.shape[2],
    mask_batch=bm > 1,
    mask_heads=hm > 1,
    num_routes=0 if routes is None else routes.query.shape[-1],
    route_group=1 if routes is None else q.shape[2] // routes.query.shape[1],
    route_batch=routes is not None and routes.query.shape[0] > 1,
    interpret=bool(interpret),
    num_warps=num_warps,
    num_stages=num_stages,
  )


def calibrate_triton(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: common.BlockSparseLayout,
  tile_codes: jax.Array,  # int32 [Bm, Hm, Qb, Kb]: 0 outside the mask, 1 full, 2 partial
  *,
  scale: float,
  masked_output: bool = True,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Re-ttention's calibration in one kernel: (out, lse, lse over the mask, out over
  the mask or None). Every kv tile is visited once; no gradient (sampling only)."""
  check_supported(q, k, v, mask)
  cfg = _config(q, k, v, mask, scale=scale, interpret=interpret)
  return _calibrate(cfg, masked_output, q, k, v, tile_codes)


def _calibrate_kernels(cfg: _Config, masked_output: bool, q, k, v, tile_codes):
  b, _, hq, _ = q.shape
  qb, kb = cfg.num_q_blocks, cfg.num_kv_blocks
  sq, sk = qb * cfg.block_q, kb * cfg.block_kv
  dp, dvp = cfg.padded_dims
  same, kv_head = (lambda h: h), (lambda h: h // cfg.group)
  out_specs = [
    _tile_spec(cfg.block_q, dvp, same),
    _vector_spec(cfg.block_q, sq),
    _vector_spec(cfg.block_q, sq),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((b, sq, hq, cfg.v_head_dim), q.dtype),
    jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
    jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
  ]
  kernel, size = _calibrate_kernel, q.dtype.itemsize
  if masked_output:
    out_specs.append(_tile_spec(cfg.block_q, dvp, same))
    out_shape.append(jax.ShapeDtypeStruct((b, sq, hq, cfg.v_head_dim), q.dtype))
  else:
    kernel = functools.partial(_calibrate_kernel, om_ref=None)
  outs = _call(
    kernel,
    cfg,
    grid=(qb, b, hq),
    in_specs=[
      pl.BlockSpec((None, None, None, kb), lambda t, b, h: (*cfg.mask_row(b, h), t, 0)),
      _tile_spec(cfg.block_q, dp, same),
      _whole_spec(sk, dp, kv_head),
      _whole_spec(sk, dvp, kv_head),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    name="block_sparse_calibrate",
    smem=(cfg.block_q * dp * size, cfg.block_kv * (dp + dvp) * size),
  )(tile_codes.astype(jnp.int32), _pad_seq(q, sq), _pad_seq(k, sk), _pad_seq(v, sk))
  out, lse, lse_m = outs[0][:, : cfg.q_len], outs[1][..., : cfg.q_len], outs[2][..., : cfg.q_len]
  out_m = outs[3][:, : cfg.q_len] if masked_output else None
  return out, lse, lse_m, out_m


_calibrate = common.forward_only(
  _calibrate_kernels,
  "calibrate_attention has no gradient through the Triton kernel (calibration runs at "
  "sampling time); use implementation='xla' to differentiate it.",
)

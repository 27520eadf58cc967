"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering.

Three `pl.pallas_call`s, tied together by `jax.custom_vjp`:

  forward  grid (Qb, B, Hq)  one program per q tile; it loops over the kv tiles
                             its row of the forward view lists (kv_count[b, h, i]
                             entries of kv_index), loads each k/v tile straight
                             from HBM by its id, and runs the online softmax.
                             Writes the output and the natural-log lse.
  dq       grid (Qb, B, Hq)  the same walk, accumulating dQ from p = exp(s - lse).
  dk/dv    grid (Kb, B, Hq)  one program per kv tile and *query* head: it walks
                             the transposed view (q_count/q_index) and
                             accumulates that head's share of dK, dV; shares of
                             the heads of a GQA group are summed afterwards (as
                             FlashAttention-2 does), so k/v are never repeated.

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


def check_supported(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, routes: Any = None
) -> None:
  """Raises ValueError if this kernel cannot run the call (before any work)."""
  del routes  # token routes of any shape are supported
  for name, block in (("block_q", mask.block_q), ("block_kv", mask.block_kv)):
    if block < MIN_BLOCK or block & (block - 1):
      raise ValueError(
        f"the Triton block-sparse kernel needs {name} to be a power of two >= "
        f"{MIN_BLOCK}; the mask has {name}={block}."
      )
  for name, dim in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
    if dim > MAX_HEAD_DIM:
      raise ValueError(
        f"the Triton block-sparse kernel supports {name} <= {MAX_HEAD_DIM}, got {dim}."
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


def _route_columns(cfg: _Config, q_route_ref, rows=slice(None)) -> list[jax.Array]:
  """The query routes of a tile, one int32 [block_q] vector per route slot."""
  if q_route_ref is None:
    return []
  return [q_route_ref[rows, r] for r in range(cfg.num_routes)]


def _routed(columns: list[jax.Array], kv_route_ref, kv_rows) -> jax.Array | None:
  """bool [block_q, block_kv]: the key's route is one of the query's (None: no routes)."""
  if not columns:
    return None
  key = kv_route_ref[kv_rows]
  match = columns[0][:, None] == key[None, :]
  for col in columns[1:]:
    match = match | (col[:, None] == key[None, :])
  return match


def _scores(cfg: _Config, q, k, q_pos, kv_pos, partial, routed=None) -> jax.Array:
  """Scaled scores of one tile, -inf where the pair is hidden."""
  s = _dot(q, k.T) * cfg.scale
  vis = cfg.visible(partial, q_pos[:, None], kv_pos[None, :], routed)
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _forward_kernel(
  count_ref,  # int32 []           kv tiles of this q tile
  index_ref,  # int32 [Kmax]       their ids
  partial_ref,  # int32 [Kmax]     1: apply mask_fn
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

  def step(t, carry):
    j = index_ref[t]
    keys = pl.ds(j * bk, bk)
    k = _load(k_ref.at[keys, :], cfg.head_dim)
    v = _load(v_ref.at[keys, :], cfg.v_head_dim)
    routed = _routed(routes, kv_route_ref, keys)
    s = _scores(cfg, q, k, q_pos, _positions(j * bk, bk), partial_ref[t] != 0, routed)
    return common.online_softmax_update(s, *carry, v, _dot)

  init = (
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
    jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
  )
  m, l, acc = jax.lax.fori_loop(0, count_ref[...], step, init)
  out, lse = common.finalize(m, l, acc)
  _store(o_ref, out, cfg.v_head_dim)
  lse_ref[...] = lse


def _dq_kernel(
  count_ref,  # int32 []
  index_ref,  # int32 [Kmax]
  partial_ref,  # int32 [Kmax]
  q_route_ref,  # int32 [block_q, R] or None
  kv_route_ref,  # int32 [Sk_pad] or None
  q_ref,  # [block_q, Dp]
  k_ref,  # [Sk_pad, Dp]
  v_ref,  # [Sk_pad, Dvp]
  do_ref,  # [block_q, Dvp]
  lse_ref,  # f32 [block_q]  (+inf on empty rows: p = 0 there)
  delta_ref,  # f32 [block_q]  rowsum(dO * O) - dlse
  dq_ref,  # [block_q, Dp]
  *,
  cfg: _Config,
):
  bq, bk = cfg.block_q, cfg.block_kv
  q_pos = _positions(pl.program_id(0) * bq, bq)
  q = _load(q_ref, cfg.head_dim)
  do = _load(do_ref, cfg.v_head_dim)
  lse, delta = lse_ref[...], delta_ref[...]
  routes = _route_columns(cfg, q_route_ref)

  def step(t, dq):
    j = index_ref[t]
    keys = pl.ds(j * bk, bk)
    k = _load(k_ref.at[keys, :], cfg.head_dim)
    v = _load(v_ref.at[keys, :], cfg.v_head_dim)
    routed = _routed(routes, kv_route_ref, keys)
    s = _scores(cfg, q, k, q_pos, _positions(j * bk, bk), partial_ref[t] != 0, routed)
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(do, v.T) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, count_ref[...], step, jnp.zeros(q.shape, jnp.float32))
  _store(dq_ref, dq * cfg.scale, cfg.head_dim)


def _dkdv_kernel(
  count_ref,  # int32 []        q tiles that visit this kv tile
  index_ref,  # int32 [Qmax]    their ids
  partial_ref,  # int32 [Qmax]
  q_route_ref,  # int32 [Sq_pad, R] or None: routes of the whole query head
  kv_route_ref,  # int32 [block_kv] or None: routes of this tile's keys
  q_ref,  # [Sq_pad, Dp]        the whole query head
  k_ref,  # [block_kv, Dp]
  v_ref,  # [block_kv, Dvp]
  do_ref,  # [Sq_pad, Dvp]
  lse_ref,  # f32 [Sq_pad]
  delta_ref,  # f32 [Sq_pad]
  dk_ref,  # f32 [block_kv, Dp]   this query head's share
  dv_ref,  # f32 [block_kv, Dvp]
  *,
  cfg: _Config,
):
  bq, bk = cfg.block_q, cfg.block_kv
  kv_pos = _positions(pl.program_id(0) * bk, bk)
  k = _load(k_ref, cfg.head_dim)
  v = _load(v_ref, cfg.v_head_dim)

  def step(t, carry):
    dk, dv = carry
    i = index_ref[t]
    rows = pl.ds(i * bq, bq)
    q = _load(q_ref.at[rows, :], cfg.head_dim)
    do = _load(do_ref.at[rows, :], cfg.v_head_dim)
    routed = _routed(_route_columns(cfg, q_route_ref, rows), kv_route_ref, slice(None))
    s = _scores(cfg, q, k, _positions(i * bq, bq), kv_pos, partial_ref[t] != 0, routed)
    p = jnp.exp(s - lse_ref[rows][:, None])
    dv = dv + _dot(p.astype(do.dtype).T, do)
    ds = p * (_dot(do, v.T) - delta_ref[rows][:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, count_ref[...], step, init)
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


def _row_specs(cfg: _Config, slots: int):
  """BlockSpecs selecting one row (count, ids, flags) of a mask view for the
  program at grid point (tile, b, h)."""

  def row(tile, b, h):
    return (*cfg.mask_row(b, h), tile)

  return [
    pl.BlockSpec((None, None, None), row),
    pl.BlockSpec((None, None, None, slots), lambda t, b, h: (*row(t, b, h), 0)),
    pl.BlockSpec((None, None, None, slots), lambda t, b, h: (*row(t, b, h), 0)),
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


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name: str):
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=cfg.warps(), num_stages=cfg.num_stages),
    interpret=cfg.interpret,
    name=name,
  )


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _route_inputs(cfg: _Config, routes, sq: int, sk: int, query_tiles: bool):
  """(arrays, BlockSpecs) of the token routes, padded so padding matches nothing;
  query routes as tiles (forward, dq) or whole heads (dk/dv), key routes the other way."""
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
    specs = [
      pl.BlockSpec((None, None, sq, r), lambda t, b, h: (*cfg.route_row(b, h), 0, 0)),
      pl.BlockSpec((None, cfg.block_kv), lambda t, b, h: (batch(b), t)),
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
  route_args, route_specs = _route_inputs(cfg, routes, sq, sk, query_tiles=True)
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
  )(*kv_view, *route_args, _pad_seq(q, sq), _pad_seq(k, sk), _pad_seq(v, sk))
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
  # +inf lse on rows that see nothing makes p = exp(s - lse) = 0 there.
  lse = pad_rows(jnp.where(lse == -jnp.inf, jnp.inf, lse))
  delta = pad_rows(delta)
  q, d_out = _pad_seq(q, sq), _pad_seq(d_out, sq)
  k, v = _pad_seq(k, sk), _pad_seq(v, sk)
  tile_route_args, tile_route_specs = _route_inputs(cfg, routes, sq, sk, query_tiles=True)
  head_route_args, head_route_specs = _route_inputs(cfg, routes, sq, sk, query_tiles=False)

  dq = _call(
    _dq_kernel,
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
  )(*kv_view, *tile_route_args, q, k, v, d_out, lse, delta)

  dk, dv = _call(
    _dkdv_kernel,
    cfg,
    grid=(kb, b, hq),
    in_specs=[
      *_row_specs(cfg, q_view[1].shape[-1]),
      *head_route_specs,
      _whole_spec(sq, dp, same),
      _tile_spec(cfg.block_kv, dp, kv_head),
      _tile_spec(cfg.block_kv, dvp, kv_head),
      _whole_spec(sq, dvp, same),
      _vector_spec(None, sq),
      _vector_spec(None, sq),
    ],
    out_specs=[_tile_spec(cfg.block_kv, dp, same), _tile_spec(cfg.block_kv, dvp, same)],
    out_shape=[
      jax.ShapeDtypeStruct((b, sk, hq, cfg.head_dim), jnp.float32),
      jax.ShapeDtypeStruct((b, sk, hq, cfg.v_head_dim), jnp.float32),
    ],
    name="block_sparse_dkdv",
  )(*q_view, *head_route_args, q, k, v, d_out, lse, delta)
  # Sum the shares of the query heads of each kv head's group.
  group_sum = lambda x: x.reshape(b, sk, hkv, cfg.group, x.shape[-1]).sum(3)
  dk = group_sum(dk)[:, : cfg.kv_len].astype(k.dtype)
  dv = group_sum(dv)[:, : cfg.kv_len].astype(v.dtype)
  return dq[:, : cfg.q_len], dk, dv


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
  num_warps: int | None = None,
  num_stages: int = 2,
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
      dims <= 64, else 8; 2 pipeline stages).
  """
  check_supported(q, k, v, mask, routes)
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


def _config(q, k, v, mask, *, scale, interpret, routes=None, num_warps=None, num_stages=2):
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
  kernel = _calibrate_kernel
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
  )(tile_codes.astype(jnp.int32), _pad_seq(q, sq), _pad_seq(k, sk), _pad_seq(v, sk))
  out, lse, lse_m = outs[0][:, : cfg.q_len], outs[1][..., : cfg.q_len], outs[2][..., : cfg.q_len]
  out_m = outs[3][:, : cfg.q_len] if masked_output else None
  return out, lse, lse_m, out_m


_calibrate = common.forward_only(
  _calibrate_kernels,
  "calibrate_attention has no gradient through the Triton kernel (calibration runs at "
  "sampling time); use implementation='xla' to differentiate it.",
)

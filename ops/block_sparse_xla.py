"""Block-sparse attention in plain JAX: visits only the kept tiles, runs anywhere.

The `implementation="xla"` path of `block_sparse_attention`, and through it of every
op that attends over tiles (MoBA, NSA). Its work scales with the number of kept
(q block, kv block) tiles, not with Qb * Kmax, and its memory with S (no S x S score
matrix):

1. Every kept tile of every (batch, head) becomes one *pair* (q-block row, slot in
   that row's kv list). Pairs are numbered row-major, so pairs of one row are
   consecutive; pair p's row is found by a binary search over the running sum of
   `kv_count` (no O(pairs) index arrays are built).
2. A `while_loop` with a data-dependent trip count walks the pairs in chunks of
   `chunk` pairs: gather the q / k / v tiles, compute the scores, apply the element
   mask on partial tiles, the bounds on ragged tails and the token routes, and merge
   each tile's softmax statistics (`common.tile_softmax`) into per-row running (max,
   sum, output) accumulators, the online softmax of flash attention done with
   scatters. A row's pairs in one chunk are consecutive, so its accumulator is
   rescaled once per chunk.
3. `jax.custom_vjp` supplies the backward pass: a second walk over the same pairs
   recomputes p and dS (`common.softmax_grads`) and scatters dQ, dK, dV (GQA heads of
   a group add into their shared kv head). A `while_loop` with a dynamic trip count
   has no autodiff rule of its own, so the custom rule is what makes the path
   differentiable.

GQA packing: when every query head of a GQA group visits the same tiles (the mask's
head dim is 1, or it divides the kv heads), a row holds the group's G query heads
stacked, `G * block_q` query rows against one k / v tile: one gather of k and v per
group instead of per head, and G-times taller matmuls (token routes shared by the
group are matched once). When every kv tile of a step has one key route (NSA's selection
blocks, MoBA's chunks), each query's routes are compared with it once per tile, not
once per key.

A `score_mod` runs on every chunk's scaled scores (with the chunk's batch rows, heads
and positions as broadcasting index arrays); the backward applies its vjp per chunk
and sums the parameters' cotangents in the loop. A mask_mod element mask reads the
same indices and the mask's parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.pallas_kernels.block_sparse import common

# Score elements per chunk: 2**20 f32 scores (4 MiB) keeps each chunk's
# temporaries cache-sized on CPU and the loop overhead negligible.
_CHUNK_SCORES = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Plan(common.Tiling):
  """Static facts of one call (hashable: the custom_vjp's non-diff argument)."""

  scale: float
  chunk: int  # pairs per loop step
  heads: int  # query heads Hq
  kv_heads: int
  pack: int  # query heads per row: the GQA group when packed, else 1
  score_mod: common.ScoreMod | None = None

  @property
  def row_heads(self) -> int:
    """Hp: rows per (batch, q block), one per `pack` query heads."""
    return self.heads // self.pack

  @property
  def rows(self) -> int:
    """Query rows of a tile: the packed heads' block_q rows each."""
    return self.pack * self.block_q


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _q_rows(plan: _Plan, x: jax.Array) -> jax.Array:
  """Query side [B, Lq, Hq, X] -> [B * Hp * Qb, pack * bq, X] (zero-padded Lq)."""
  b, s, _, d = x.shape
  qb, bq = plan.num_q_blocks, plan.block_q
  x = jnp.pad(x, ((0, 0), (0, qb * bq - s), (0, 0), (0, 0)))
  x = x.reshape(b, qb, bq, plan.row_heads, plan.pack, d).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b * plan.row_heads * qb, plan.rows, d)


def _from_q_rows(plan: _Plan, x: jax.Array, b: int) -> jax.Array:
  """Inverse of `_q_rows`: -> [B, Lq, Hq, X]."""
  qb, bq, d = plan.num_q_blocks, plan.block_q, x.shape[-1]
  x = x.reshape(b, plan.row_heads, qb, plan.pack, bq, d).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, qb * bq, plan.heads, d)[:, : plan.q_len]


def _kv_rows(plan: _Plan, x: jax.Array) -> jax.Array:
  """Key side [B, Lk, Hkv, X] -> [B * Hkv * Kb, bk, X] (zero-padded Lk)."""
  b, s, h, d = x.shape
  kb, bk = plan.num_kv_blocks, plan.block_kv
  x = jnp.pad(x, ((0, 0), (0, kb * bk - s), (0, 0), (0, 0)))
  return x.reshape(b, kb, bk, h, d).transpose(0, 3, 1, 2, 4).reshape(b * h * kb, bk, d)


def _from_kv_rows(plan: _Plan, x: jax.Array, b: int) -> jax.Array:
  """Inverse of `_kv_rows`: -> [B, Lk, Hkv, X]."""
  kb, bk, d = plan.num_kv_blocks, plan.block_kv, x.shape[-1]
  x = x.reshape(b, plan.kv_heads, kb, bk, d).transpose(0, 2, 3, 1, 4)
  return x.reshape(b, kb * bk, plan.kv_heads, d)[:, : plan.kv_len]


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One loop step's pairs (all int32 / bool [C])."""

  valid: jax.Array  # the pair exists (the last chunk is padded)
  row: jax.Array  # q-block row (b, hp, i) flattened
  i: jax.Array  # q tile
  j: jax.Array  # kv tile
  b: jax.Array
  head: jax.Array  # the row's first query head, hp * pack
  kv_row: jax.Array  # kv-block row (b, kv head, j) flattened
  partial: jax.Array  # apply mask_fn


@dataclasses.dataclass(frozen=True)
class _Pairs:
  """The kept tiles as a row-major list of (q-block row, kv-block row) pairs."""

  ends: jax.Array  # int32[N]: running sum of kv_count over the N q-block rows
  kv_index: jax.Array  # int32[N, Kmax]
  kv_partial: jax.Array  # bool[N, Kmax]

  @property
  def total(self) -> jax.Array:
    return self.ends[-1]

  def chunk(self, plan: _Plan, start: jax.Array) -> _Chunk:
    """Rows, kv rows, tile ids and flags of pairs [start, start + plan.chunk)."""
    p = start + jnp.arange(plan.chunk, dtype=jnp.int32)
    row = jnp.searchsorted(self.ends, p, side="right").astype(jnp.int32)
    row = jnp.minimum(row, self.ends.shape[0] - 1)
    row_start = jnp.where(row > 0, self.ends[jnp.maximum(row - 1, 0)], 0)
    slot = jnp.clip(p - row_start, 0, self.kv_index.shape[1] - 1)
    j = self.kv_index[row, slot]
    qb = plan.num_q_blocks
    bh = row // qb
    b, head = bh // plan.row_heads, bh % plan.row_heads * plan.pack
    kv_head = head // (plan.heads // plan.kv_heads)
    kv_row = (b * plan.kv_heads + kv_head) * plan.num_kv_blocks + j
    return _Chunk(p < self.total, row, row % qb, j, b, head, kv_row, self.kv_partial[row, slot])


def _pairs(plan: _Plan, mask: BlockMask, batch: int) -> _Pairs:
  """The pairs of the rows (b, hp, i): mask head (hp * pack) // (Hq // Hm)."""
  heads = jnp.arange(plan.row_heads) * plan.pack // (plan.heads // mask.batch_heads[1])

  def rows(x):  # [Bm, Hm, Qb, ...] -> [B * Hp * Qb, ...]
    x = jnp.take(x, heads, axis=1)
    return jnp.broadcast_to(x, (batch,) + x.shape[1:]).reshape((-1,) + x.shape[3:])

  return _Pairs(
    ends=jnp.cumsum(rows(mask.kv_count), dtype=jnp.int32),
    kv_index=rows(mask.kv_index),
    kv_partial=rows(mask.kv_partial),
  )


@dataclasses.dataclass(frozen=True)
class _RouteTiles:
  """Token routes cut into tiles: query [Br, Hr, Qb, bq, R], key [Br, Kb, bk]."""

  query: jax.Array
  key: jax.Array

  def match(self, plan: _Plan, c: _Chunk) -> jax.Array:  # bool [C, pack|1, bq, bk]
    b = jnp.minimum(c.b, self.query.shape[0] - 1)  # 0 where the routes broadcast
    per_route = plan.heads // self.query.shape[1]  # query heads per route head
    shared = per_route % plan.pack == 0  # one route head for the row's heads
    heads = c.head[:, None] + jnp.arange(1 if shared else plan.pack)
    q_route = self.query[b[:, None], heads // per_route, c.i[:, None]]  # [C, P, bq, R]
    k_route = self.key[b, c.j][:, None]  # [C, 1, bk]
    first = k_route[..., :1]  # [C, 1, 1]

    def one_route_per_tile(_):  # bq * R comparisons per tile instead of bq * bk * R
      hit = jnp.any(q_route == first[..., None], axis=-1, keepdims=True)  # [C, P, bq, 1]
      return jnp.broadcast_to(hit, q_route.shape[:3] + k_route.shape[-1:])

    # Tiles whose keys share one route (NSA's selection blocks, MoBA's chunks: the usual
    # case) match each query once; others compare every key.
    return jax.lax.cond(
      jnp.all(k_route == first),
      one_route_per_tile,
      lambda _: common.route_match(q_route, k_route),
      None,
    )


def _route_tiles(plan: _Plan, routes: common.TokenRoutes | None) -> _RouteTiles | None:
  if routes is None:
    return None
  qb, kb = plan.num_q_blocks, plan.num_kv_blocks
  query = routes.query.astype(jnp.int32)
  pad_q = qb * plan.block_q - query.shape[2]
  query = jnp.pad(query, ((0, 0), (0, 0), (0, pad_q), (0, 0)), constant_values=-1)
  key = jnp.pad(
    routes.key.astype(jnp.int32),
    ((0, 0), (0, kb * plan.block_kv - routes.key.shape[1])),
    constant_values=-2,
  )  # padding: matches no query route
  br, hr, _, r = query.shape
  return _RouteTiles(query.reshape(br, hr, qb, plan.block_q, r), key.reshape(-1, kb, plan.block_kv))


@dataclasses.dataclass(frozen=True)
class _Where:
  """A chunk's index arrays, broadcasting against its scores [C, pack, bq, bk]."""

  b: jax.Array  # int32 [C, 1, 1, 1]
  h: jax.Array  # int32 [C, pack, 1, 1] query heads
  q_pos: jax.Array  # int32 [C, 1, bq, 1]
  kv_pos: jax.Array  # int32 [C, 1, 1, bk]


def _where(plan: _Plan, c: _Chunk) -> _Where:
  return _Where(
    b=c.b[:, None, None, None],
    h=(c.head[:, None] + jnp.arange(plan.pack))[:, :, None, None],
    q_pos=(c.i * plan.block_q)[:, None, None, None] + jnp.arange(plan.block_q)[:, None],
    kv_pos=(c.j * plan.block_kv)[:, None, None, None] + jnp.arange(plan.block_kv),
  )


def _scores(plan: _Plan, c: _Chunk, q_t, k_t, routes, mask_params, sm_params):
  """Scaled, modified and masked scores f32 [C, pack * bq, bk] (-inf where hidden),
  and the score_mod's pullback (None without one)."""
  w = _where(plan, c)
  s = _dot("cqd,ckd->cqk", q_t, k_t) * plan.scale
  s = s.reshape(s.shape[0], plan.pack, plan.block_q, plan.block_kv)
  pullback = None
  if plan.score_mod is not None:
    s, pullback = plan.score_mod.with_vjp(s, w.b, w.h, w.q_pos, w.kv_pos, sm_params)
    s = s.astype(jnp.float32)
  routed = None if routes is None else routes.match(plan, c)
  vis = plan.visible(
    c.partial[:, None, None, None], w.q_pos, w.kv_pos, routed, b=w.b, h=w.h, params=mask_params
  )
  valid = c.valid[:, None, None, None]
  s = jnp.where(valid if vis is None else valid & vis, s, -jnp.inf)
  return s.reshape(s.shape[0], plan.rows, plan.block_kv), pullback


def _num_chunks(plan: _Plan, pairs: _Pairs) -> jax.Array:
  return (pairs.total + plan.chunk - 1) // plan.chunk


def _forward(plan: _Plan, q, k, v, sm_params, mask: BlockMask, routes: common.TokenRoutes | None):
  b = q.shape[0]
  pairs = _pairs(plan, mask, b)
  route_tiles = _route_tiles(plan, routes)
  q_rows = _q_rows(plan, q)  # [N, P * bq, D]
  k_rows, v_rows = _kv_rows(plan, k), _kv_rows(plan, v)  # [B * Hkv * Kb, bk, D|Dv]
  n, rows, dv = q_rows.shape[0], plan.rows, v.shape[3]

  def body(carry):
    step, m_acc, l_acc, o_acc = carry
    c = pairs.chunk(plan, step * plan.chunk)
    row = c.row
    s, _ = _scores(plan, c, q_rows[row], k_rows[c.kv_row], route_tiles, mask.mask_params, sm_params)
    pv = functools.partial(_dot, "cqk,ckd->cqd")
    m_t, l_t, o_t = common.tile_softmax(s, v_rows[c.kv_row], pv)
    # Merge the chunk into its rows: the new row max first, then every tile's share
    # under it; the first pair of a row in this chunk also rescales what the row had.
    m_old = m_acc[row]
    m_acc = m_acc.at[row].max(m_t)
    m_new = m_acc[row]
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    w_t = jnp.exp(m_t - m_ref)  # this tile's weight under the new max
    first = jnp.concatenate([jnp.ones((1,), bool), row[1:] != row[:-1]]) & c.valid
    rescale = jnp.where(first[:, None], jnp.exp(m_old - m_ref) - 1.0, 0.0)
    l_acc = l_acc.at[row].add(l_t * w_t + l_acc[row] * rescale)
    o_acc = o_acc.at[row].add(o_t * w_t[..., None] + o_acc[row] * rescale[..., None])
    return step + 1, m_acc, l_acc, o_acc

  init = (
    jnp.int32(0),
    jnp.full((n, rows), -jnp.inf, jnp.float32),
    jnp.zeros((n, rows), jnp.float32),
    jnp.zeros((n, rows, dv), jnp.float32),
  )
  steps = _num_chunks(plan, pairs)
  _, m_acc, l_acc, o_acc = jax.lax.while_loop(lambda cr: cr[0] < steps, body, init)
  out, lse = common.finalize(m_acc, l_acc, o_acc)  # [N, P * bq, Dv], [N, P * bq]
  lse = _from_q_rows(plan, lse[..., None], b)[..., 0].transpose(0, 2, 1)  # [B, Hq, Lq]
  return _from_q_rows(plan, out, b).astype(q.dtype), lse


def _backward(plan: _Plan, q, k, v, sm_params, mask, routes, out, lse, d_out, d_lse):
  b = q.shape[0]
  pairs = _pairs(plan, mask, b)
  route_tiles = _route_tiles(plan, routes)
  q_rows, do_rows = _q_rows(plan, q), _q_rows(plan, d_out)
  k_rows, v_rows = _kv_rows(plan, k), _kv_rows(plan, v)
  # delta_i = sum_d dO_id O_id, the softmax-Jacobian term; minus dlse_i, which
  # enters ds exactly as -delta does (d lse_i / d s_ij = p_ij).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta - d_lse.transpose(0, 2, 1)  # [B, Lq, Hq]
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf).transpose(0, 2, 1)  # empty rows: p = 0
  delta_rows, lse_rows = (_q_rows(plan, x[..., None])[..., 0] for x in (delta, lse))
  f32 = jnp.float32

  def body(carry):
    step, dq, dk, dv, d_params = carry
    c = pairs.chunk(plan, step * plan.chunk)
    row, kv_row = c.row, c.kv_row
    q_t, k_t, v_t, do_t = q_rows[row], k_rows[kv_row], v_rows[kv_row], do_rows[row]
    s, pullback = _scores(plan, c, q_t, k_t, route_tiles, mask.mask_params, sm_params)
    dp = _dot("cqd,ckd->cqk", do_t, v_t)
    p, ds = common.softmax_grads(s, lse_rows[row], dp, delta_rows[row])
    if pullback is not None:  # d loss / d (modified score) -> d loss / d score
      ds, d_chunk = pullback(ds.reshape(-1, plan.pack, plan.block_q, plan.block_kv))
      ds = ds.reshape(p.shape)
      d_params = common.add_cotangents(d_params, d_chunk, sm_params)
    dv = dv.at[kv_row].add(_dot("cqk,cqd->ckd", p.astype(do_t.dtype), do_t))
    ds = (ds * plan.scale).astype(q_t.dtype)
    dq = dq.at[row].add(_dot("cqk,ckd->cqd", ds, k_t))
    dk = dk.at[kv_row].add(_dot("cqk,cqd->ckd", ds, q_t))
    return step + 1, dq, dk, dv, d_params

  init = (
    jnp.int32(0),
    jnp.zeros(q_rows.shape, f32),
    jnp.zeros(k_rows.shape, f32),
    jnp.zeros(v_rows.shape, f32),
    jax.tree.map(lambda x: jnp.zeros(x.shape, f32), sm_params),
  )
  steps = _num_chunks(plan, pairs)
  _, dq, dk, dv, d_params = jax.lax.while_loop(lambda cr: cr[0] < steps, body, init)
  dq = _from_q_rows(plan, dq, b).astype(q.dtype)
  dk = _from_kv_rows(plan, dk, b).astype(k.dtype)
  dv = _from_kv_rows(plan, dv, b).astype(v.dtype)
  return dq, dk, dv, common.float_cotangents(sm_params, d_params)


_attention = common.attention_with_vjp(_forward, _backward)


def packable(mask: BlockMask, q_heads: int, kv_heads: int) -> bool:
  """Whether the query heads of each GQA group visit the same tiles (the mask's head dim
  divides the kv heads), so that `pack_heads` can stack them into one tile."""
  group, hm = q_heads // kv_heads, mask.batch_heads[1]
  return group > 1 and kv_heads % hm == 0


def block_sparse_attention_xla(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: BlockMask,
  *,
  scale: float,
  chunk: int | None = None,
  routes: common.TokenRoutes | None = None,
  score_mod: common.ScoreMod | None = None,
  score_mod_params=None,
  pack_heads: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(output [batch, q_len, q_heads, v_head_dim], lse f32 [batch, q_heads, q_len]).

  Inputs are assumed validated (see `ops.block_sparse_attention`); the mask's head
  dim divides q_heads (query head h reads mask head h // (q_heads // Hm)).
  `chunk`: tiles per loop step; default ~2**20 score elements per step.
  `pack_heads`: stack each GQA group's query heads into one tile (needs `packable`);
  None: whenever packable.
  """
  b, _, hq, _ = q.shape
  hkv = k.shape[2]
  can_pack = packable(mask, hq, hkv)
  if pack_heads and not can_pack:
    raise ValueError(
      f"pack_heads: the mask's {mask.batch_heads[1]} heads must divide the {hkv} kv heads."
    )
  pack = hq // hkv if (can_pack if pack_heads is None else pack_heads) else 1
  if chunk is None:
    chunk = max(1, _CHUNK_SCORES // (pack * mask.block_q * mask.block_kv))
  chunk = max(1, min(chunk, b * (hq // pack) * mask.num_q_blocks * mask.max_kv_blocks))
  plan = _Plan(
    **common.Tiling.fields_of(mask),
    scale=scale,
    chunk=chunk,
    heads=hq,
    kv_heads=hkv,
    pack=pack,
    score_mod=score_mod,
  )
  return _attention(plan, q, k, v, score_mod_params, mask, routes)

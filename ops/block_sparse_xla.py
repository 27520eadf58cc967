"""Block-sparse attention in plain JAX: visits only the kept tiles, runs anywhere.

The `implementation="xla"` path of `block_sparse_attention`. Its work scales
with the number of kept (q block, kv block) tiles, not with Qb * Kmax, and its
memory with S (no S x S score matrix):

1. Every kept tile of every (batch, head) becomes one *pair* (q-block row,
   slot in that row's kv list). Pairs are numbered row-major, so pairs of one
   row are consecutive; pair p's row is found by a binary search over the
   running sum of `kv_count` (no O(pairs) index arrays are built).
2. A `while_loop` with a data-dependent trip count walks the pairs in chunks
   of `chunk` pairs: gather the q / k / v tiles, compute the scores, apply the
   element mask on partial tiles and the bounds on ragged tails, and merge the
   chunk into per-row running (max, sum, output) accumulators, the online
   softmax of flash attention done with scatters. A row's pairs in one chunk
   are consecutive, so its accumulator is rescaled once per chunk.
3. `jax.custom_vjp` supplies the backward pass: a second walk over the same
   pairs recomputes p = exp(s - lse) and scatters dQ, dK, dV (GQA heads of a
   group add into their shared kv head). A `while_loop` with a dynamic trip
   count has no autodiff rule of its own, so the custom rule is what makes the
   path differentiable.

A `score_mod` runs on every chunk's scaled scores (with the chunk's batch rows,
heads and positions as broadcasting index arrays); the backward applies its vjp
per chunk and sums the parameters' cotangents in the loop. A mask_mod element mask
reads the same indices and the mask's parameters.
"""

from __future__ import annotations

import dataclasses

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
  chunk: int
  score_mod: common.ScoreMod | None = None


def _to_rows(x: jax.Array, block: int) -> jax.Array:
  """[B, S, H, D] -> [B*H*nb, block, D], zero-padding S to a block multiple."""
  b, s, h, d = x.shape
  nb = -(-s // block)
  x = jnp.pad(x, ((0, 0), (0, nb * block - s), (0, 0), (0, 0)))
  return x.reshape(b, nb, block, h, d).transpose(0, 3, 1, 2, 4).reshape(b * h * nb, block, d)


def _from_rows(x: jax.Array, b: int, h: int, s: int) -> jax.Array:
  """Inverse of `_to_rows`: [B*H*nb, block, D] -> [B, S, H, D]."""
  n, block, d = x.shape
  nb = n // (b * h)
  x = x.reshape(b, h, nb, block, d).transpose(0, 2, 3, 1, 4)
  return x.reshape(b, nb * block, h, d)[:, :s]


@dataclasses.dataclass(frozen=True)
class _Pairs:
  """The kept tiles as a row-major list of (q-block row, kv-block row) pairs."""

  ends: jax.Array  # int32[N]: running sum of kv_count over the N q-block rows
  kv_index: jax.Array  # int32[N, Kmax]
  kv_partial: jax.Array  # bool[N, Kmax]
  heads: int  # q heads
  kv_heads: int
  num_q_blocks: int
  num_kv_blocks: int

  @property
  def total(self) -> jax.Array:
    return self.ends[-1]

  def chunk(self, start: jax.Array, size: int):
    """Rows, kv rows, tile ids and flags of pairs [start, start + size)."""
    p = start + jnp.arange(size, dtype=jnp.int32)
    valid = p < self.total
    row = jnp.searchsorted(self.ends, p, side="right").astype(jnp.int32)
    row = jnp.minimum(row, self.ends.shape[0] - 1)
    row_start = jnp.where(row > 0, self.ends[jnp.maximum(row - 1, 0)], 0)
    slot = jnp.clip(p - row_start, 0, self.kv_index.shape[1] - 1)
    j = self.kv_index[row, slot]
    partial = self.kv_partial[row, slot]
    qb = self.num_q_blocks
    i = row % qb
    bh = row // qb
    b, h = bh // self.heads, bh % self.heads
    group = self.heads // self.kv_heads
    kv_row = (b * self.kv_heads + h // group) * self.num_kv_blocks + j
    return _Chunk(valid, row, i, j, b, h, kv_row, partial)


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One loop step's pairs (all int32 / bool [C])."""

  valid: jax.Array  # the pair exists (the last chunk is padded)
  row: jax.Array  # q-block row (b, h, i) flattened
  i: jax.Array  # q tile
  j: jax.Array  # kv tile
  b: jax.Array
  h: jax.Array  # query head
  kv_row: jax.Array  # kv-block row (b, h // group, j) flattened
  partial: jax.Array  # apply mask_fn


@dataclasses.dataclass(frozen=True)
class _RouteTiles:
  """Token routes cut into tiles: query [Br, Hr, Qb, bq, R], key [Br, Kb, bk]."""

  query: jax.Array
  key: jax.Array

  def match(self, c: _Chunk, heads: int) -> jax.Array:  # bool [C, bq, bk]
    b = jnp.minimum(c.b, self.query.shape[0] - 1)  # 0 where the routes broadcast
    hr = c.h // (heads // self.query.shape[1])
    return common.route_match(self.query[b, hr, c.i], self.key[b, c.j])


def _route_tiles(routes: common.TokenRoutes | None, plan: _Plan) -> _RouteTiles | None:
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


def _pairs(mask: BlockMask, batch: int, heads: int, kv_heads: int) -> _Pairs:
  qb, kmax = mask.num_q_blocks, mask.max_kv_blocks
  bcast = lambda x, *tail: jnp.broadcast_to(x, (batch, heads) + tail).reshape((-1,) + tail[1:])
  count = bcast(mask.kv_count, qb)
  return _Pairs(
    ends=jnp.cumsum(count, dtype=jnp.int32),
    kv_index=bcast(mask.kv_index, qb, kmax),
    kv_partial=bcast(mask.kv_partial, qb, kmax),
    heads=heads,
    kv_heads=kv_heads,
    num_q_blocks=qb,
    num_kv_blocks=mask.num_kv_blocks,
  )


@dataclasses.dataclass(frozen=True)
class _Where:
  """A chunk's index arrays, broadcasting against its scores [C, bq, bk]."""

  b: jax.Array  # int32 [C, 1, 1]
  h: jax.Array  # int32 [C, 1, 1] query head
  q_pos: jax.Array  # int32 [C, bq, 1]
  kv_pos: jax.Array  # int32 [C, 1, bk]


def _where(plan: _Plan, c: _Chunk) -> _Where:
  return _Where(
    b=c.b[:, None, None],
    h=c.h[:, None, None],
    q_pos=(c.i * plan.block_q)[:, None, None] + jnp.arange(plan.block_q)[None, :, None],
    kv_pos=(c.j * plan.block_kv)[:, None, None] + jnp.arange(plan.block_kv)[None, None, :],
  )


def _visible(plan: _Plan, c: _Chunk, w: _Where, routes, heads: int, mask_params) -> jax.Array:
  """bool[C, block_q, block_kv]: which pairs of each tile are attended."""
  routed = None if routes is None else routes.match(c, heads)
  vis = plan.visible(
    c.partial[:, None, None], w.q_pos, w.kv_pos, routed, b=w.b, h=w.h, params=mask_params
  )
  valid = c.valid[:, None, None]
  return valid if vis is None else valid & vis


def _scores(plan: _Plan, q_t, k_t) -> jax.Array:
  s = jnp.einsum("cqd,ckd->cqk", q_t, k_t, preferred_element_type=jnp.float32)
  return s * plan.scale


def _modified(plan: _Plan, s: jax.Array, w: _Where, sm_params) -> jax.Array:
  if plan.score_mod is None:
    return s
  return plan.score_mod(s, w.b, w.h, w.q_pos, w.kv_pos, sm_params).astype(jnp.float32)


def _num_chunks(pairs: _Pairs, chunk: int) -> jax.Array:
  return (pairs.total + chunk - 1) // chunk


def _forward(plan: _Plan, q, k, v, sm_params, mask: BlockMask, routes: common.TokenRoutes | None):
  b, _, hq, _ = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  pairs = _pairs(mask, b, hq, hkv)
  route_tiles = _route_tiles(routes, plan)
  q_rows = _to_rows(q, plan.block_q)  # [N, bq, D]
  k_rows = _to_rows(k, plan.block_kv)  # [B*Hkv*Kb, bk, D]
  v_rows = _to_rows(v, plan.block_kv)  # [B*Hkv*Kb, bk, Dv]
  n = q_rows.shape[0]
  c = plan.chunk

  def body(carry):
    step, m_acc, l_acc, o_acc = carry
    ch = pairs.chunk(step * c, c)
    row, kv_row, valid = ch.row, ch.kv_row, ch.valid
    w = _where(plan, ch)
    s = _modified(plan, _scores(plan, q_rows[row], k_rows[kv_row]), w, sm_params)
    s = jnp.where(_visible(plan, ch, w, route_tiles, hq, mask.mask_params), s, -jnp.inf)
    m_t = jnp.max(s, axis=-1)  # [C, bq]
    p = jnp.exp(s - jnp.where(jnp.isfinite(m_t), m_t, 0.0)[..., None])
    l_t = jnp.sum(p, axis=-1)
    o_t = jnp.einsum(
      "cqk,ckd->cqd",
      p.astype(v_rows.dtype),
      v_rows[kv_row],
      preferred_element_type=jnp.float32,
    )
    # Online-softmax merge of the chunk into its rows.
    m_old = m_acc[row]
    m_acc = m_acc.at[row].max(m_t)
    m_new = m_acc[row]
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    w_t = jnp.exp(m_t - m_ref)  # this tile's weight under the new max
    # The first pair of a row in this chunk also rescales what the row had.
    first = jnp.concatenate([jnp.ones((1,), bool), row[1:] != row[:-1]]) & valid
    rescale = jnp.where(first[:, None], jnp.exp(m_old - m_ref) - 1.0, 0.0)
    l_acc = l_acc.at[row].add(l_t * w_t + l_acc[row] * rescale)
    o_acc = o_acc.at[row].add(o_t * w_t[..., None] + o_acc[row] * rescale[..., None])
    return step + 1, m_acc, l_acc, o_acc

  init = (
    jnp.int32(0),
    jnp.full((n, plan.block_q), -jnp.inf, jnp.float32),
    jnp.zeros((n, plan.block_q), jnp.float32),
    jnp.zeros((n, plan.block_q, dv), jnp.float32),
  )
  steps = _num_chunks(pairs, c)
  _, m_acc, l_acc, o_acc = jax.lax.while_loop(lambda cr: cr[0] < steps, body, init)
  nonempty = l_acc > 0
  l_safe = jnp.where(nonempty, l_acc, 1.0)
  out = _from_rows(o_acc / l_safe[..., None], b, hq, plan.q_len).astype(q.dtype)
  lse = jnp.where(nonempty, m_acc + jnp.log(l_safe), -jnp.inf)  # [N, bq]
  lse = lse.reshape(b, hq, -1)[:, :, : plan.q_len]
  return out, lse


def _backward(plan: _Plan, q, k, v, sm_params, mask, routes, out, lse, d_out, d_lse):
  b, _, hq, _ = q.shape
  hkv = k.shape[2]
  pairs = _pairs(mask, b, hq, hkv)
  route_tiles = _route_tiles(routes, plan)
  q_rows = _to_rows(q, plan.block_q)
  k_rows = _to_rows(k, plan.block_kv)
  v_rows = _to_rows(v, plan.block_kv)
  do_rows = _to_rows(d_out, plan.block_q)
  # delta_i = sum_d dO_id O_id, the softmax-Jacobian term; minus dlse_i, which
  # enters ds exactly as -delta does (d lse_i / d s_ij = p_ij).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1) - d_lse  # [B, Hq, Sq]
  as_rows = lambda x: _to_rows(x.transpose(0, 2, 1)[..., None], plan.block_q)[..., 0]
  delta_rows, lse_rows = as_rows(delta), as_rows(lse)  # [N, bq]
  c = plan.chunk

  f32 = jnp.float32
  mod = plan.score_mod

  def body(carry):
    step, dq, dk, dv, d_params = carry
    ch = pairs.chunk(step * c, c)
    row, kv_row = ch.row, ch.kv_row
    q_t, k_t, v_t, do_t = q_rows[row], k_rows[kv_row], v_rows[kv_row], do_rows[row]
    w = _where(plan, ch)
    s = _scores(plan, q_t, k_t)
    if mod is not None:
      s, pullback = mod.with_vjp(s, w.b, w.h, w.q_pos, w.kv_pos, sm_params)
    vis = _visible(plan, ch, w, route_tiles, hq, mask.mask_params)
    p = jnp.where(vis, jnp.exp(s - lse_rows[row][..., None]), 0.0)
    dp = jnp.einsum("cqd,ckd->cqk", do_t, v_t, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_rows[row][..., None])  # d loss / d (modified score)
    if mod is not None:
      ds, d_chunk = pullback(ds.astype(s.dtype))
      d_params = common.add_cotangents(d_params, d_chunk, sm_params)
    ds = ds * plan.scale
    dv = dv.at[kv_row].add(
      jnp.einsum("cqk,cqd->ckd", p.astype(do_t.dtype), do_t, preferred_element_type=f32)
    )
    ds_in = ds.astype(q_t.dtype)
    dq = dq.at[row].add(jnp.einsum("cqk,ckd->cqd", ds_in, k_t, preferred_element_type=f32))
    dk = dk.at[kv_row].add(jnp.einsum("cqk,cqd->ckd", ds_in, q_t, preferred_element_type=f32))
    return step + 1, dq, dk, dv, d_params

  init = (
    jnp.int32(0),
    jnp.zeros(q_rows.shape, jnp.float32),
    jnp.zeros(k_rows.shape, jnp.float32),
    jnp.zeros(v_rows.shape, jnp.float32),
    jax.tree.map(lambda x: jnp.zeros(x.shape, f32), sm_params),
  )
  steps = _num_chunks(pairs, c)
  _, dq, dk, dv, d_params = jax.lax.while_loop(lambda cr: cr[0] < steps, body, init)
  dq = _from_rows(dq, b, hq, plan.q_len).astype(q.dtype)
  dk = _from_rows(dk, b, hkv, plan.kv_len).astype(k.dtype)
  dv = _from_rows(dv, b, hkv, plan.kv_len).astype(v.dtype)
  return dq, dk, dv, common.float_cotangents(sm_params, d_params)


_attention = common.attention_with_vjp(_forward, _backward)


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
) -> tuple[jax.Array, jax.Array]:
  """(output [batch, q_len, q_heads, v_head_dim], lse f32 [batch, q_heads, q_len]).

  Inputs are assumed validated (see `ops.block_sparse_attention`).
  `chunk`: tiles per loop step; default ~2**20 score elements per step.
  """
  if chunk is None:
    chunk = max(1, _CHUNK_SCORES // (mask.block_q * mask.block_kv))
  b, _, hq, _ = q.shape
  chunk = max(1, min(chunk, b * hq * mask.num_q_blocks * mask.max_kv_blocks))
  plan = _Plan(
    **common.Tiling.fields_of(mask),
    scale=scale,
    chunk=chunk,
    score_mod=score_mod,
  )
  return _attention(plan, q, k, v, score_mod_params, mask, routes)

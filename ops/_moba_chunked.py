"""MoBA's chunk-major XLA schedule (`moba_attention(implementation="xla_chunked")`).

The routed block-sparse engine ("xla") visits whole (q tile, kv tile) pairs: a tile is
visited if any of its queries kept any chunk touching it, so with queries that select
unlike their neighbours (untrained models) its work approaches block-causal attention.
This schedule's work is exactly proportional to the kept keys instead, and it is the
faster one on CPU (bench/results/hierarchical_cpu_2026-11-30.md):

1. Every (query row, slot) pair of `moba_selection` names one kv chunk. The pairs are
   sorted by (batch, kv head, chunk) and each chunk's pairs are cut into tiles of
   `rows` query rows (GQA heads of a group share their kv head's tiles), so a tile is
   one dense [rows, C] score matrix against ONE key window (the chunk's C positions
   from its start). Work: Lq * Hq * topk * C, plus < rows padding rows per chunk.
2. A `while_loop` over the tiles (`tiles_per_step` at a time) computes each pair's
   softmax statistics (`common.tile_softmax`), masked per element (key in the chunk,
   causal in the own chunk), into the pair's slot: memory O(B * Hq * Lq * topk * Dv)
   plus one step's scores, never Lq x Lk.
3. The topk parts of each query are LSE-merged: one softmax over the union.
4. `jax.custom_vjp`: the backward walks the same tiles (`common.softmax_grads`) and
   scatter-adds dQ per query row and dK, dV per key window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparse_attention.pallas_kernels.block_sparse import common


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one xla call (hashable: the custom_vjp's static argument)."""

  scale: float
  chunk_size: int
  topk: int
  rows: int  # query rows per tile
  tiles_per_step: int


@dataclasses.dataclass(frozen=True)
class _Tile:
  """`tiles_per_step` tiles of one loop step."""

  row: jax.Array  # int32[S, R]: query row (b * Hq + h) * Lq + t
  slot: jax.Array  # int32[S, R]: output slot (row * topk + s), n3 for padding
  kv: jax.Array  # int32[S]: kv row b * Hkv + hkv
  pos: jax.Array  # int32[S, C]: key positions start .. start + C - 1
  visible: jax.Array  # bool[S, R, C]


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """The tiles: (one kv chunk, up to `rows` query rows that kept it) each."""

  key_ids: jax.Array  # int32[B, Lk + C]: chunk id of each key position, -1 past Lk
  perm: jax.Array  # int32[n3]: (query row, slot) pairs sorted by (batch, kv head, chunk)
  kv: jax.Array  # int32[T]: each tile's kv row, b * Hkv + kv head
  chunk: jax.Array  # int32[T]: its chunk id
  start: jax.Array  # int32[T]: the chunk's first key position
  first: jax.Array  # int32[T]: its first pair's index in perm
  rows: jax.Array  # int32[T]: its number of pairs (0: an unused tile)
  num_tiles: jax.Array  # int32[]: tiles in use

  def tree_flatten(self):
    return dataclasses.astuple(self), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


jax.tree_util.register_pytree_node_class(_Schedule)


def _schedule(block_ids, valid, key_ids, kv_heads: int, nc: int, plan: _Plan, max_tiles: int):
  """Sorts the (query row, slot) pairs by group (batch, kv head, chunk) and
  cuts each group into tiles of `rows` pairs (at most `max_tiles` in all)."""
  b, hq, _, _ = block_ids.shape
  lk, rows = key_ids.shape[1], plan.rows
  bk = jnp.arange(b)[:, None] * kv_heads + jnp.arange(hq)[None, :] // (hq // kv_heads)
  ng = b * kv_heads * nc
  grp = jnp.where(valid, bk[:, :, None, None] * nc + block_ids, ng).reshape(-1)
  perm = jnp.argsort(grp, stable=True).astype(jnp.int32)
  counts = jnp.zeros(ng + 1, jnp.int32).at[grp].add(1)[:ng]
  first = jnp.cumsum(counts, dtype=jnp.int32) - counts
  n_tiles = (counts + rows - 1) // rows
  tile_end = jnp.cumsum(n_tiles, dtype=jnp.int32)
  tile_begin = tile_end - n_tiles
  # Tile w belongs to the last group that begins at or before it (empty groups
  # begin where the next one does and lose the max).
  g_ids = jnp.arange(ng, dtype=jnp.int32)
  tile_grp = jnp.zeros(max_tiles, jnp.int32).at[tile_begin].max(g_ids, mode="drop")
  tile_grp = jax.lax.cummax(tile_grp, axis=0)
  local = (jnp.arange(max_tiles, dtype=jnp.int32) - tile_begin[tile_grp]) * rows
  used = jnp.arange(max_tiles) < tile_end[-1]
  chunk = tile_grp % nc
  kv = tile_grp // nc
  # Each chunk's first key position (lk for unused ids).
  pos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), (b, lk))
  starts = jnp.full((b, nc), lk, jnp.int32).at[jnp.arange(b)[:, None], key_ids].min(pos)
  return _Schedule(
    key_ids=jnp.pad(key_ids, ((0, 0), (0, plan.chunk_size)), constant_values=-1),
    perm=perm,
    kv=kv,
    chunk=chunk,
    start=starts[kv // kv_heads, chunk],
    first=first[tile_grp] + local,
    rows=jnp.where(used, jnp.clip(counts[tile_grp] - local, 0, rows), 0),
    num_tiles=tile_end[-1],
  )


def _tile(plan: _Plan, step, q_shape, kv_heads, sc: _Schedule) -> _Tile:
  b, lq, hq, _ = q_shape
  s_, r_, c_ = plan.tiles_per_step, plan.rows, plan.chunk_size
  n3 = b * hq * lq * plan.topk
  w = jnp.minimum(step * s_ + jnp.arange(s_, dtype=jnp.int32), sc.kv.shape[0] - 1)
  r = jnp.arange(r_, dtype=jnp.int32)
  ok = r < sc.rows[w][:, None]  # [S, R]
  pair = sc.perm[jnp.minimum(sc.first[w][:, None] + r, n3 - 1)]
  row = pair // plan.topk
  kv, chunk = sc.kv[w], sc.chunk[w]
  pos = sc.start[w][:, None] + jnp.arange(c_, dtype=jnp.int32)  # [S, C]
  in_chunk = sc.key_ids[(kv // kv_heads)[:, None], pos] == chunk[:, None]
  q_pos = sc.key_ids.shape[1] - c_ - lq + row % lq  # [S, R]
  visible = ok[:, :, None] & in_chunk[:, None, :] & (pos[:, None, :] <= q_pos[:, :, None])
  return _Tile(row=row, slot=jnp.where(ok, pair, n3), kv=kv, pos=pos, visible=visible)


def _kv_rows(x: jax.Array, pad: int) -> jax.Array:
  """[B, L, H, D] -> [B*H, L + pad, D], zero-padded."""
  b, l, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3).reshape(b * h, l + pad, d)


def _windows(x: jax.Array, rows: jax.Array, starts: jax.Array, size: int) -> jax.Array:
  """x[rows[i], starts[i] : starts[i] + size] for each i: [S, size, D]."""
  d = x.shape[-1]
  take = lambda r, s: jax.lax.dynamic_slice(x, (r, s, 0), (1, size, d))[0]
  return jax.vmap(take)(rows, starts)


def _q_rows(x: jax.Array) -> jax.Array:
  """[B, L, H, D] -> [B*H*L, D]."""
  b, l, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h * l, d)


def _num_steps(plan: _Plan, sc: _Schedule) -> jax.Array:
  return (sc.num_tiles + plan.tiles_per_step - 1) // plan.tiles_per_step


def _forward(plan: _Plan, q, k, v, sc: _Schedule):
  b, lq, hq, _ = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  n3 = b * hq * lq * plan.topk
  q_rows = _q_rows(q)  # [B*Hq*Lq, D]
  k_rows = _kv_rows(k, plan.chunk_size)  # [B*Hkv, Lk + C, D]
  v_rows = _kv_rows(v, plan.chunk_size)  # [B*Hkv, Lk + C, Dv]

  def body(carry):
    step, m_acc, l_acc, o_acc = carry
    t = _tile(plan, step, q.shape, hkv, sc)
    k_t = _windows(k_rows, t.kv, t.pos[:, 0], plan.chunk_size)  # [S, C, D]
    v_t = _windows(v_rows, t.kv, t.pos[:, 0], plan.chunk_size)  # [S, C, Dv]
    s = jnp.where(t.visible, _dot("srd,scd->src", q_rows[t.row], k_t) * plan.scale, -jnp.inf)
    m, l, o = common.tile_softmax(s, v_t, functools.partial(_dot, "src,scd->srd"))
    m_acc = m_acc.at[t.slot].set(m, mode="drop")  # [S, R]
    l_acc = l_acc.at[t.slot].set(l, mode="drop")
    o_acc = o_acc.at[t.slot].set(o, mode="drop")
    return step + 1, m_acc, l_acc, o_acc

  init = (
    jnp.int32(0),
    jnp.full((n3,), -jnp.inf, jnp.float32),
    jnp.zeros((n3,), jnp.float32),
    jnp.zeros((n3, dv), jnp.float32),
  )
  steps = _num_steps(plan, sc)
  _, m_acc, l_acc, o_acc = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
  # Merge the topk per-block parts of every query (the LSE merge).
  m_acc = m_acc.reshape(b, hq, lq, plan.topk)
  m_max = jnp.max(m_acc, axis=-1, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = jnp.exp(m_acc - m_max)  # 0 for unused slots
  l_sum = jnp.sum(l_acc.reshape(w.shape) * w, axis=-1)  # [B, Hq, Lq]
  o_sum = jnp.sum(o_acc.reshape(w.shape + (dv,)) * w[..., None], axis=-2)
  nonempty = l_sum > 0
  l_safe = jnp.where(nonempty, l_sum, 1.0)
  out = (o_sum / l_safe[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
  lse = jnp.where(nonempty, m_max[..., 0] + jnp.log(l_safe), -jnp.inf)
  return out, lse


def _backward(plan: _Plan, q, k, v, sc: _Schedule, out, lse, d_out, d_lse):
  b, lq, hq, _ = q.shape
  hkv = k.shape[2]
  c_ = plan.chunk_size
  q_rows, do_rows = _q_rows(q), _q_rows(d_out)
  k_rows, v_rows = _kv_rows(k, c_), _kv_rows(v, c_)
  # delta = rowsum(dO * O) - dlse: d lse / d s = p enters ds exactly as -delta.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = (delta.transpose(0, 2, 1) - d_lse).reshape(-1)  # [B*Hq*Lq]
  lse_rows = jnp.where(jnp.isfinite(lse), lse, jnp.inf).reshape(-1)  # empty rows: p = 0
  f32 = jnp.float32

  def body(carry):
    step, dq, dk, dv = carry
    t = _tile(plan, step, q.shape, hkv, sc)
    k_t = _windows(k_rows, t.kv, t.pos[:, 0], c_)
    v_t = _windows(v_rows, t.kv, t.pos[:, 0], c_)
    q_t, do_t = q_rows[t.row], do_rows[t.row]  # [S, R, D], [S, R, Dv]
    s = jnp.where(t.visible, _dot("srd,scd->src", q_t, k_t) * plan.scale, -jnp.inf)
    dp = _dot("srd,scd->src", do_t, v_t)
    p, ds = common.softmax_grads(s, lse_rows[t.row], dp, delta[t.row])
    ds = (ds * plan.scale).astype(q.dtype)
    dq = dq.at[t.row].add(_dot("src,scd->srd", ds, k_t))
    kv = t.kv[:, None]
    dk = dk.at[kv, t.pos].add(_dot("src,srd->scd", ds, q_t))
    dv = dv.at[kv, t.pos].add(_dot("src,srd->scd", p.astype(d_out.dtype), do_t))
    return step + 1, dq, dk, dv

  init = (
    jnp.int32(0),
    jnp.zeros(q_rows.shape, f32),
    jnp.zeros(k_rows.shape, f32),
    jnp.zeros(v_rows.shape, f32),
  )
  steps = _num_steps(plan, sc)
  _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
  lk = k.shape[1]
  dq = dq.reshape(b, hq, lq, -1).transpose(0, 2, 1, 3).astype(q.dtype)
  dk = dk.reshape(b, hkv, lk + c_, -1)[:, :, :lk].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv.reshape(b, hkv, lk + c_, -1)[:, :, :lk].transpose(0, 2, 1, 3).astype(v.dtype)
  return dq, dk, dv


_attention = common.attention_with_vjp(_forward, _backward)


def moba_chunked(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  block_ids: jax.Array,  # int32 [batch, q_heads, q_len, topk]: kept chunk ids
  valid: jax.Array,  # bool [batch, q_heads, q_len, topk]
  key_ids: jax.Array,  # int32 [batch|1, kv_len]: each key's chunk id
  *,
  chunk_size: int,
  num_chunks: int,  # static bound on the chunk ids
  scale: float,
  tile_rows: int,  # query rows per tile
  step_scores: int,  # score elements per loop step
) -> tuple[jax.Array, jax.Array]:
  """(out [batch, q_len, q_heads, v_head_dim] in q's dtype, lse f32 [batch, q_heads,
  q_len]) of MoBA given its selection; inputs validated by `moba_attention`."""
  b, lq, hq, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  topk = block_ids.shape[-1]
  rows = min(tile_rows, -(-lq * (hq // hkv) // 8) * 8)  # a chunk has <= Lq * G pairs
  n3 = b * hq * lq * topk
  max_tiles = -(-n3 // rows) + min(b * hkv * num_chunks, n3)
  per_step = max(1, min(step_scores // (rows * chunk_size), max_tiles))
  plan = _Plan(scale, chunk_size, topk, rows, per_step)
  key_ids = jnp.broadcast_to(key_ids, (b, lk))
  sched = _schedule(block_ids, valid, key_ids, hkv, num_chunks, plan, max_tiles)
  return _attention(plan, q, k, v, sched)

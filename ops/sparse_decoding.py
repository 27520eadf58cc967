"""MoBA and NSA decoding: new tokens against a KV cache at a cost set by the selection.

`moba_attention` and `nsa_attention` take the queries as the LAST positions of k, so a
model with a fixed-capacity cache and a traced fill level has to hand them the whole
capacity (right-aligned), and every decoding step costs O(capacity). The two ops here
take the cache as `decode_attention` does (left-aligned, `lengths[b]` tokens before the
new ones, traced) and do per step only what the method itself needs:

* MoBA: the gate of every complete chunk before the query's own (q . mean key, from the
  cached mean keys `k_gate`: O(capacity / chunk) per query), then attention over the
  top-k chunks' keys only, gathered from the cache: O(topk * chunk) per query.
* NSA: the compressed branch over the cached compressed keys (O(capacity / stride)), the
  selection from its probabilities (`nsa.nsa_selection`'s rule, the same code), the
  selected branch over the n kept blocks gathered from the cache (O(n * select_len)) and
  the window branch through `decode_attention` (O(window), flash-decoding kernels on GPU
  and TPU).

Both equal their op on the same tokens (`moba_attention` / `nsa_attention` with k the
first `lengths[b] + n` keys), row by row, up to float32 round-off. Like the ops'
selections, the gathered branches run in XLA on every backend; their memory is
O(batch * heads * n * kept keys * head_dim), so they are meant for decoding (n of 1-16
new tokens), not prefill (a model prefills with the op itself).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, element_masks
from sparse_attention.ops.block_mask import (
  BlockMask,
  from_block_layout,
  num_blocks,
  scatter_columns,
)
from sparse_attention.ops.block_sparse import _resolve, block_sparse_attention
from sparse_attention.ops.decoding import (
  _check_lengths,
  _on_cpu,
  _visible,
  decode_attention,
  pick_kernel,
)
from sparse_attention.ops.nsa import _check_inputs, _mix, _select_chunk, _selection_config
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes

_HIGHEST = jax.lax.Precision.HIGHEST


def _softmax(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """s float32 [..., K] (-inf: hidden) -> (p [..., K], lse [...]); a row that sees
  nothing gets p = 0 and lse = -inf (the ops' empty-row rule)."""
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(total > 0, total, 1.0)
  lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, -jnp.inf)
  return p, lse[..., 0]


def _grouped(q: jax.Array, heads: int) -> jax.Array:
  """q [B, n, Hq, D] -> float32 [B, heads, Hq // heads, n, D]."""
  b, n, hq, d = q.shape
  return q.astype(jnp.float32).reshape(b, n, heads, hq // heads, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(o: jax.Array) -> jax.Array:
  """[B, H, G, n, Dv] -> [B, n, H * G, Dv]."""
  b, h, g, n, dv = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, n, h * g, dv)


def attend_blocks(
  q: jax.Array,  # [B, n, Hq, D]
  k: jax.Array,  # [B, C, Hkv, D]
  v: jax.Array,  # [B, C, Hkv, Dv]
  positions: jax.Array,  # int32 [B, n]: the queries' positions
  block_ids: jax.Array,  # int32 [B, Hr, n, K]: the kept blocks of each (route head, query)
  valid: jax.Array,  # bool [B, Hr, n, K]
  block_len: int,
  scale: float,
) -> tuple[jax.Array, jax.Array]:
  """One softmax over the keys of each query's kept blocks, causal (key <= position).

  Block j holds keys [j * block_len, (j + 1) * block_len). Route head r (Hr = Hq: one
  selection per query head, MoBA; Hr = Hkv: one per GQA group, NSA) reads kv head
  r * Hkv // Hr and serves query heads r * Hq // Hr .. (r + 1) * Hq // Hr - 1. Each
  kept block is one contiguous slice of the cache (a gather of whole blocks, no O(C)
  work; a ragged last block's slice is shifted back and the earlier keys masked). Kept
  ids must be distinct.

  Returns:
    (out float32 [B, n, Hq, Dv], lse float32 [B, Hq, n]).
  """
  b, n, hq, _ = q.shape
  capacity, hkv = k.shape[1], k.shape[2]
  hr, kept = block_ids.shape[1], block_ids.shape[-1]
  width = min(block_len, capacity)
  start = block_ids * block_len  # [B, Hr, n, K]
  at = jnp.clip(start, 0, capacity - width)
  kv_head = jnp.arange(hr) * hkv // hr  # [Hr]

  def block(x, b_, h, a):  # x [B, C, Hkv, Dx] -> the block's rows [width, Dx]
    return jax.lax.dynamic_slice(x[b_], (a, h, 0), (width, 1, x.shape[3]))[:, 0]

  take = lambda x: jax.vmap(  # over batch, route head, query, slot
    jax.vmap(jax.vmap(jax.vmap(block, (None, None, None, 0)), (None, None, None, 0)),
             (None, None, 0, 0)),
    (None, 0, None, 0),
  )(x, jnp.arange(b), kv_head, at)  # [B, Hr, n, K, width, Dx]  # fmt: skip
  key = at[..., None] + jnp.arange(width, dtype=jnp.int32)  # [B, Hr, n, K, width]
  seen = valid[..., None] & (key >= start[..., None])
  seen &= key <= positions[:, None, :, None, None]
  flat = lambda x: x.reshape(b, hr, n, kept * width, *x.shape[5:]).astype(jnp.float32)
  k_kept, v_kept, seen = flat(take(k)), flat(take(v)), seen.reshape(b, hr, n, kept * width)
  s = jnp.einsum("brgnd,brnkd->brgnk", _grouped(q, hr), k_kept, precision=_HIGHEST) * scale
  p, lse = _softmax(jnp.where(seen[:, :, None], s, -jnp.inf))  # [B, Hr, G, n, K * l]
  out = jnp.einsum("brgnk,brnkd->brgnd", p, v_kept, precision=_HIGHEST)
  return _ungrouped(out), lse.reshape(b, hq, n)


def selected_blocks_mask(
  block_ids: jax.Array,  # int32 [B, Hr, n, K]
  valid: jax.Array,  # bool [B, Hr, n, K]
  lengths: jax.Array,  # int32 [B]
  *,
  q_heads: int,
  rows: int,
  capacity: int,
  block_len: int,
) -> tuple[BlockMask, TokenRoutes]:
  """The kernels' form of `attend_blocks`: (BlockMask, TokenRoutes) for the n new
  tokens padded to `rows` query rows (one q block per (batch, head)).

  The mask lists, per (batch, query head), the union of the blocks its new tokens kept
  (kv tiles = the blocks); tiles holding keys at or after the first new token are
  partial, under the fill-level predicate of `decode_attention`. The routes keep each
  token to its own blocks: query routes = its kept ids (-1: none; padding rows see
  nothing), key routes = j // block_len."""
  b, hr, n, kept = block_ids.shape
  nb = num_blocks(capacity, block_len)
  ids = jnp.where(valid, block_ids, -1)
  layout = scatter_columns(ids.reshape(b, hr, 1, n * kept), valid.reshape(b, hr, 1, -1), nb)
  layout = jnp.repeat(layout, q_heads // hr, axis=1)  # [B, Hq, 1, nb]
  last_key = jnp.minimum((jnp.arange(nb) + 1) * block_len, capacity) - 1
  partial = (last_key[None, :] > lengths[:, None])[:, None, None, :]  # [B, 1, 1, nb]
  mask = from_block_layout(
    layout,
    layout & ~partial,
    block_q=rows,
    block_kv=block_len,
    q_len=rows,
    kv_len=capacity,
    mask_fn=element_masks.MaskMod(_visible(rows, None), has_params=True),
    mask_params=(lengths,),
    max_kv_blocks=min(nb, n * kept),
    max_q_blocks=1,
  )
  query = jnp.pad(ids, ((0, 0), (0, 0), (0, rows - n), (0, 0)), constant_values=-1)
  key = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32) // block_len, (b, capacity))
  return mask, TokenRoutes(query=query, key=key)


def _selected_decode(
  q, k, v, positions, lengths, block_ids, valid, block_len, scale, implementation, interpret, op
) -> tuple[jax.Array, jax.Array]:
  """`attend_blocks` on the xla path (CPU default), or the kept blocks through
  `block_sparse_attention` (a kernel, or "reference") with `selected_blocks_mask`:
  (out float32 [B, n, Hq, Dv], lse [B, Hq, n])."""
  b, n, hq, _ = q.shape
  capacity = k.shape[1]
  if implementation == "xla" or (implementation is None and not interpret and _on_cpu()):
    return attend_blocks(q, k, v, positions, block_ids, valid, block_len, scale)
  build = functools.partial(
    selected_blocks_mask, block_ids, valid, lengths, q_heads=hq, capacity=capacity,
    block_len=block_len,
  )  # fmt: skip
  pad = lambda rows: jnp.pad(q, ((0, 0), (0, rows - n), (0, 0), (0, 0)))
  if implementation == "reference":
    impl, rows = "reference", n
  else:

    def resolve_at(rows: int) -> str:
      mask, routes = build(rows=rows)
      return _resolve(implementation, interpret, pad(rows), k, v, mask, op, routes)

    impl, rows = pick_kernel(implementation, interpret, n, resolve_at)
    if impl == "xla":  # no kernel takes it
      return attend_blocks(q, k, v, positions, block_ids, valid, block_len, scale)
  mask, routes = build(rows=rows)
  out, lse = block_sparse_attention(
    pad(rows), k, v, mask, routes=routes, scale=scale, implementation=impl,
    interpret=interpret, return_lse=True,
  )  # fmt: skip
  return out[:, :n].astype(jnp.float32), lse[..., :n]


def _check_summary(op: str, name: str, x: Any, expected: tuple, dtype: Any, what: str) -> None:
  if not hasattr(x, "shape") or tuple(x.shape) != expected:
    raise ValueError(
      f"{op}: {name} must be [batch, blocks, kv_heads, head_dim] = {expected} ({what}), got "
      f"{getattr(x, 'shape', type(x).__name__)}."
    )
  if x.dtype != dtype:
    raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected the cache's {dtype}.")


def moba_gate_keys(k_cache: jax.Array, *, chunk_size: int) -> jax.Array:
  """The mean key of every chunk of a cache, `[B, ceil(C / chunk_size), Hkv, D]` in k's
  dtype (averaged in float32, as `moba_attention` does): `moba_decode_attention`'s
  k_gate. O(C); a model keeps them in its cache and recomputes only the chunks a step
  completes (the last chunk of the capacity may be ragged; only complete ones are read)."""
  b, c, h, d = k_cache.shape
  nb = -(-c // chunk_size)
  padded = jnp.pad(k_cache.astype(jnp.float32), ((0, 0), (0, nb * chunk_size - c), (0, 0), (0, 0)))
  sums = padded.reshape(b, nb, chunk_size, h, d).sum(axis=2)
  counts = jnp.minimum(c - jnp.arange(nb) * chunk_size, chunk_size).astype(jnp.float32)
  return (sums / counts[None, :, None, None]).astype(k_cache.dtype)


def moba_decode_attention(
  q: jax.Array,  # [batch, n, q_heads, head_dim]: the new tokens' queries
  k_cache: jax.Array,  # [batch, capacity, kv_heads, head_dim], position t at row t
  v_cache: jax.Array,  # [batch, capacity, kv_heads, v_head_dim]
  k_gate: jax.Array,  # [batch, ceil(capacity / chunk_size), kv_heads, head_dim]
  lengths: jax.Array,  # int[batch]: tokens in the cache before the new ones
  *,
  chunk_size: int,
  topk: int,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """MoBA for n new tokens against a left-aligned KV cache, at O(topk * chunk) per token.

  New token i of row b sits at position t = lengths[b] + i; its keys and values must
  already be in the cache. It keeps its own chunk t // chunk_size (keys up to t) and
  the topk - 1 complete chunks before it with the largest gate q_t . k_gate[j] (float32,
  ties toward the older chunk), and attends the union in one softmax: `moba_attention`'s
  rule (docs/moba.md), equal to it on the first lengths[b] + n keys of row b.

  Args:
    q, k_cache, v_cache: as `decode_attention`'s (GQA allowed).
    k_gate: the chunks' mean keys in the cache's dtype (`moba_gate_keys`); read for the
      complete chunks before each new token's own only.
    lengths: int [batch] fill level before this step (traced is fine).
    chunk_size, topk: MoBA's chunk size and chunks kept per token (own one included).
    scale: softmax scale, default head_dim ** -0.5.
    implementation, interpret: as `block_topk_decode_attention`'s (the kept chunks
      through a kernel on GPU / TPU, gathered in XLA on CPU).
    return_lse: also return the logsumexp, float32 [batch, q_heads, n].

  Returns:
    [batch, n, q_heads, v_head_dim] in q's dtype (and the lse).
  """
  op = "moba_decode_attention"
  shape = checks.check_qkv(q, k_cache, v_cache, op)
  for name, x in (("chunk_size", chunk_size), ("topk", topk)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
      raise ValueError(f"{op}: {name} must be a Python int >= 1, got {x!r}.")
  b, n, capacity = shape.batch, shape.q_len, shape.kv_len
  expected = (b, num_blocks(capacity, chunk_size), shape.kv_heads, shape.head_dim)
  _check_summary(op, "k_gate", k_gate, expected, k_cache.dtype, "moba_gate_keys")
  if n > capacity:
    raise ValueError(f"{op}: {n} new tokens do not fit a cache of capacity {capacity}.")
  lengths = _check_lengths(lengths, b, n, capacity, op)
  scale = checks.check_scale(scale, shape, op)
  positions = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)  # [B, n]
  ids, valid = _gated_blocks(q, k_gate, positions, chunk_size, topk, force_first=False)
  out, lse = _selected_decode(
    q, k_cache, v_cache, positions, lengths, ids, valid, chunk_size, scale, implementation,
    interpret, op,
  )  # fmt: skip
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def _gated_blocks(q, k_gate, positions, block_len, topk, *, force_first):
  """The blocks each (query head, new token) keeps: its own block positions // block_len,
  (force_first: block 0,) and the best of the complete blocks before its own by the gate
  q . k_gate[j] (float32, ties toward the older block), topk in all.

  Returns (ids, valid) int32 / bool [B, Hq, n, K], K = min(topk, blocks)."""
  b, n, hq, _ = q.shape
  nb, hkv = k_gate.shape[1], k_gate.shape[2]
  own = jnp.broadcast_to((positions // block_len)[:, None, :, None], (b, hq, n, 1))
  ids, valid = own, jnp.ones_like(own, dtype=bool)
  past = min(topk - 1, nb - 1)
  if past > 0:
    gate = jnp.einsum(
      "bhgnd,bjhd->bhgnj", _grouped(jax.lax.stop_gradient(q), hkv),
      jax.lax.stop_gradient(k_gate).astype(jnp.float32), precision=_HIGHEST,
    ).reshape(b, hq, n, nb)  # fmt: skip
    j = jnp.arange(nb, dtype=jnp.int32)
    candidate = j < own  # complete blocks before the own
    gate = jnp.where(candidate, gate, -jnp.inf)
    if force_first:
      gate = jnp.where(candidate & (j == 0), jnp.inf, gate)
    _, chosen = jax.lax.top_k(gate, past)  # lax.top_k: ties toward the lower index
    ids = jnp.concatenate([chosen.astype(jnp.int32), own], axis=-1)
    valid = jnp.concatenate([chosen < own, valid], axis=-1)
  return ids, valid


def block_topk_decode_attention(
  q: jax.Array,  # [batch, n, q_heads, head_dim]: the new tokens' queries
  k_cache: jax.Array,  # [batch, capacity, kv_heads, head_dim], position t at row t
  v_cache: jax.Array,  # [batch, capacity, kv_heads, v_head_dim]
  k_means: jax.Array,  # [batch, ceil(capacity / block_size), kv_heads, head_dim]
  lengths: jax.Array,  # int[batch]: tokens in the cache before the new ones
  *,
  block_size: int,
  topk: int,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Kinetics-style block top-k decoding: each new token attends its topk best blocks.

  For any trained model, no retraining: the cache is cut into blocks of block_size
  keys; new token i of row b (position t = lengths[b] + i) keeps, per query head, its
  own (newest) block (keys up to t), the first block (attention sinks) and the
  topk - 2 complete blocks in between with the largest q_t . mean(k_block) (float32,
  ties toward the older block): per-token cost O(topk * block_size + capacity /
  block_size), flat in the cache length. With topk >= the number of blocks it is exact
  full-cache attention.

  Args:
    q, k_cache, v_cache, lengths: as `decode_attention`'s.
    k_means: the blocks' mean keys in the cache's dtype (`moba_gate_keys(k_cache,
      chunk_size=block_size)`; a model keeps them in its cache and updates the blocks a
      step completes).
    block_size: keys per block (kernels: a power of two >= 16 is their tile).
    topk: blocks per token, the own and the first included (>= 1; 1: own block only).
    scale: softmax scale, default head_dim ** -0.5.
    implementation, interpret: None (CPU: the kept blocks gathered in XLA; GPU / TPU:
      the backend's kernel over the kept blocks, falling back to the gather), "xla",
      "reference", or a kernel name as `block_sparse_attention`'s.
    return_lse: also return the logsumexp, float32 [batch, q_heads, n].

  Returns:
    [batch, n, q_heads, v_head_dim] in q's dtype (and the lse).
  """
  op = "block_topk_decode_attention"
  shape = checks.check_qkv(q, k_cache, v_cache, op)
  for name, x in (("block_size", block_size), ("topk", topk)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
      raise ValueError(f"{op}: {name} must be a Python int >= 1, got {x!r}.")
  b, n, capacity = shape.batch, shape.q_len, shape.kv_len
  expected = (b, num_blocks(capacity, block_size), shape.kv_heads, shape.head_dim)
  _check_summary(op, "k_means", k_means, expected, k_cache.dtype, "moba_gate_keys")
  if n > capacity:
    raise ValueError(f"{op}: {n} new tokens do not fit a cache of capacity {capacity}.")
  lengths = _check_lengths(lengths, b, n, capacity, op)
  scale = checks.check_scale(scale, shape, op)
  positions = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)
  ids, valid = _gated_blocks(q, k_means, positions, block_size, topk, force_first=True)
  out, lse = _selected_decode(
    q, k_cache, v_cache, positions, lengths, ids, valid, block_size, scale, implementation,
    interpret, op,
  )  # fmt: skip
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def nsa_decode_attention(
  q: jax.Array,  # [batch, n, q_heads, head_dim]
  k_cache: jax.Array,  # [batch, capacity, kv_heads, head_dim]
  v_cache: jax.Array,  # [batch, capacity, kv_heads, v_head_dim]
  k_cmp: jax.Array,  # [batch, Nc(capacity), kv_heads, head_dim]
  v_cmp: jax.Array,  # [batch, Nc(capacity), kv_heads, v_head_dim]
  gates: jax.Array,  # [batch, n, q_heads, 3]
  lengths: jax.Array,  # int[batch]
  *,
  block_len: int = 32,
  stride: int = 16,
  select_len: int = 64,
  num_select: int = 16,
  window: int = 512,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
) -> jax.Array:
  """NSA for n new tokens against a left-aligned KV cache with compressed blocks.

  New token i of row b sits at position t = lengths[b] + i (its keys and values already
  in the cache). The three branches and their gated mix are `nsa_attention`'s
  (docs/nsa.md), equal to it on the first lengths[b] + n keys of row b:
  compressed blocks over the cached k_cmp / v_cmp (block c is read once complete,
  c * stride + block_len - 1 <= t), the n kept selection blocks gathered from the cache,
  and the window through `decode_attention` (its kernels on GPU / TPU).

  Args:
    q, k_cache, v_cache: as `decode_attention`'s (GQA allowed).
    k_cmp, v_cmp: the compressed keys / values of the cache's blocks, Nc =
      num_compressed_blocks(capacity, block_len, stride) rows in q's dtype; row c is
      read only once its block is complete (a model fills them in as they complete).
    gates: [batch, n, q_heads, 3], the (compression, selection, window) gates.
    lengths: int [batch] fill level before this step (traced is fine).
    block_len, stride, select_len, num_select, window, scale: as `nsa_attention`'s.
    implementation, interpret: the selected and window branches', as
      `block_topk_decode_attention`'s and `decode_attention`'s.

  Returns:
    [batch, n, q_heads, v_head_dim] in q's dtype.
  """
  op = "nsa_decode_attention"
  cfg = _check_inputs(
    q, k_cache, v_cache, k_cmp, v_cmp, gates, block_len, stride, select_len, num_select,
    window, scale, op=op,
  )  # fmt: skip
  b, n, hq, _ = q.shape
  hkv, dv = k_cache.shape[2], v_cache.shape[3]
  lengths = _check_lengths(lengths, b, n, cfg.kv_len, op)
  positions = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)  # [B, n]
  nc = cfg.num_compressed
  if nc > 0:
    s = jnp.einsum(
      "bhgnd,bchd->bhgnc", _grouped(q, hkv), k_cmp.astype(jnp.float32), precision=_HIGHEST
    ) * cfg.scale  # fmt: skip
    complete = jnp.arange(nc) * stride + block_len - 1 <= positions[:, None, None, :, None]
    p, _ = _softmax(jnp.where(complete, s, -jnp.inf))  # [B, Hkv, G, n, Nc]
    o_cmp = jnp.einsum("bhgnc,bchd->bhgnd", p, v_cmp.astype(jnp.float32), precision=_HIGHEST)
    o_cmp = _ungrouped(o_cmp)
  else:
    o_cmp = jnp.zeros((b, n, hq, dv), jnp.float32)
  select = _selection_config(
    op, q.shape, k_cmp.shape, cfg.kv_len, block_len, stride, select_len, num_select, cfg.scale
  )
  qg = jax.lax.stop_gradient(q).astype(jnp.float32).reshape(b, n, hkv, hq // hkv, -1)
  kc = jax.lax.stop_gradient(k_cmp).astype(jnp.float32)
  one_row = lambda q_b, t_b, kc_b: _select_chunk(select, q_b[None], t_b, kc_b[None], None)
  ids, valid = jax.vmap(one_row)(qg, positions, kc)  # [B, 1, Hkv, n, num_select]
  o_slc, _ = _selected_decode(
    q, k_cache, v_cache, positions, lengths, ids[:, 0], valid[:, 0], select_len, cfg.scale,
    implementation, interpret, op,
  )  # fmt: skip
  o_win = decode_attention(
    q,
    k_cache,
    v_cache,
    lengths,
    window=window - 1,
    scale=cfg.scale,
    implementation=implementation,
    interpret=interpret,
  )  # fmt: skip  keys t - window < j <= t
  branches = (o.astype(q.dtype) for o in (o_cmp, o_slc, o_win))  # as the op's tiled paths
  return _mix(q.dtype, gates, *branches)[0]


__all__ = [
  "attend_blocks",
  "block_topk_decode_attention",
  "moba_decode_attention",
  "moba_gate_keys",
  "nsa_decode_attention",
  "selected_blocks_mask",
]

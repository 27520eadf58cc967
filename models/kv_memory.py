"""Bounded KV caches for long generation: attention sinks and a hierarchical memory.

Two `DecodePolicy` kinds of `models/lm.py` (dense attention, no score_mod) whose cache
has a fixed number of rows however many tokens are decoded, so a step costs the same at
token 100 and at token 100,000 and the model can decode past `config.max_len`:

* "sinks" (StreamingLLM): the first `anchors` tokens plus the `window` most recent ones.
* "hierarchical": the first `anchors` tokens, a compressed memory of `compressed_blocks`
  slots and the recent window. Tokens leave the window `block_size` at a time; each
  such block is mean-pooled (keys and values) into one compressed slot. When every slot
  is taken, two adjacent slots merge into their token-weighted mean: the pair of equal
  size with the smallest size, the oldest such pair on ties (an exponential histogram:
  slot sizes are powers of two blocks that never decrease with age, so old context is
  kept ever coarser and the memory covers any length); with no equal pair (once about
  2^compressed_blocks blocks were pooled), the two oldest slots. Each compressed slot's
  score gets + log(tokens pooled) with `pooled_bias` (one key standing for m tokens of
  about equal score weighs as m; off by default: on the study's byte LM it over-weighs
  the pooled past, bench/results/long_generation_cpu_*.md).

Attention runs over [anchors | compressed | window] with one softmax. Positions are
those of the layout, as Echo-Forcing (and StreamingLLM) assign them: keys are cached
unrotated and rotated at attention time by their index among the live entries, the
query last; so RoPE positions stay below the cache's row count (checked to be <= the
trained `config.max_len`) however long the sequence is. While nothing has left the
window (length <= anchors + window) the layout positions are the true ones and a step
equals the full cache (tests/test_kv_memory.py).

The cache (`LayerCache` per block) holds k, v [B, R, Hkv, D] with R = anchors +
compressed_blocks + window + block_size - 1 rows: anchors at rows 0 .. anchors - 1, the
compressed slots after them (oldest first), then a ring buffer of window + block_size -
1 rows for the recent tokens (a block is pooled when the ring would overflow, so between
`window` and `window + block_size - 1` recent tokens are kept exact). `counts` int32
[compressed_blocks] holds the tokens pooled in each slot (0 = empty). Where everything
else sits is a function of the cache's length. "sinks" is the same structure with no
compressed slots and blocks of one token (dropped, not pooled).

A step of n new tokens runs them one at a time (a `lax.scan` inside each layer: token
i's attention needs only the earlier tokens' keys of the same layer), each through
`ops.decode_attention` over the gathered layout, so the implementations are the op's:
xla on CPU, the block-sparse kernels (Triton / Mosaic GPU / Mosaic TPU) elsewhere;
pooled_bias is a `score_mod` reading the per-row bias. Prefill is therefore sequential
(n steps of cost O(R)), which is what makes it bounded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import decode_attention

MEMORY_POLICIES = ("sinks", "hierarchical")


def geometry(policy: Any) -> tuple[int, int, int, int]:
  """(anchors, compressed slots, window, block) of a bounded policy."""
  if policy.kind == "sinks":
    return policy.anchors, 0, policy.window, 1
  return policy.anchors, policy.compressed_blocks, policy.window, policy.block_size


def num_rows(policy: Any) -> int:
  """R: the cache's rows (and 1 + the largest RoPE position) of a bounded policy."""
  a, c, w, bs = geometry(policy)
  return a + c + w + bs - 1


def check(policy: Any, config: Any) -> None:
  """ValueError naming the field if a "sinks" / "hierarchical" policy does not fit."""
  kind = policy.kind
  if config.attention != "dense" or config.score_mod is not None:
    raise ValueError(
      f"DecodePolicy.kind={kind!r} needs attention='dense' without a score_mod, got "
      f"attention={config.attention!r}, score_mod={config.score_mod!r}."
    )
  minimum = {"anchors": 0, "window": 1, "compressed_blocks": 1 if kind == "hierarchical" else 0}
  for name, low in minimum.items():
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"DecodePolicy.{name} must be an int >= {low}, got {value!r}.")
  if not isinstance(policy.pooled_bias, bool):
    raise ValueError(f"DecodePolicy.pooled_bias must be a bool, got {policy.pooled_bias!r}.")
  rows = num_rows(policy)
  if rows > config.max_len:
    what = (
      "anchors + window"
      if kind == "sinks"
      else ("anchors + compressed_blocks + window + block_size - 1")
    )
    raise ValueError(
      f"DecodePolicy.window: {what} = {rows} cache rows exceed the model's max_len "
      f"{config.max_len} (the RoPE positions of the cache must stay in the trained range)."
    )


def init_layer(batch: int, policy: Any, config: Any, dtype: Any) -> dict[str, jax.Array]:
  """The arrays of one block's bounded cache (see the module docstring)."""
  _, c, _, _ = geometry(policy)
  kv = jnp.zeros((batch, num_rows(policy), config.num_kv_heads, config.head_dim), dtype)
  return dict(k=kv, v=kv, counts=jnp.zeros((c,), jnp.int32))


def cache_bytes(cache: Any) -> int:
  """Bytes held by a cache's arrays (any `Cache`)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache))


# ---------------------------------------------------------------------------- one token


def _pooled(count: jax.Array, a: int, bs: int, w: int) -> jax.Array:
  """Tokens that have left the window (pooled or dropped) once `count` tokens were seen."""
  u = jnp.maximum(count - a, 0)
  return bs * (jnp.maximum(u - w, 0) // bs)


def _merge(slots, counts, new, new_count):
  """slots [B, C, H, D] (all taken), counts [C] + a new slot -> C slots: the adjacent
  pair of equal size with the smallest size merged (oldest on ties; with no equal pair
  the two oldest), as the token-weighted mean."""
  ext = jnp.concatenate([slots, new[:, None]], axis=1)  # [B, C + 1, H, D]
  ext_n = jnp.concatenate([counts, new_count[None]])  # [C + 1]
  total = ext_n[:-1] + ext_n[1:]
  equal = ext_n[:-1] == ext_n[1:]
  # the first minimum: the oldest; no equal pair: the oldest pair
  i = jnp.where(jnp.any(equal), jnp.argmin(jnp.where(equal, total, jnp.iinfo(jnp.int32).max)), 0)
  wa = (ext_n[i] / total[i]).astype(jnp.float32)
  merged = wa * ext[:, i].astype(jnp.float32) + (1 - wa) * ext[:, i + 1].astype(jnp.float32)
  j = jnp.arange(counts.shape[0])
  src = jnp.where(j > i, j + 1, j)
  out = jnp.take(ext, src, axis=1)
  out = jnp.where((j == i)[None, :, None, None], merged.astype(out.dtype)[:, None], out)
  return out, jnp.where(j == i, total[i], jnp.take(ext_n, src))


def _insert(k_mem, v_mem, counts, t, k_t, v_t, policy):
  """Writes token t (k_t, v_t [B, H, D], unrotated) into the memory, pooling the oldest
  window block first when the ring is full."""
  a, c, w, bs = geometry(policy)
  ring = w + bs - 1
  u = t - a  # index in the stream after the anchors (< 0: t is an anchor)
  old, new = _pooled(t, a, bs, w), _pooled(t + 1, a, bs, w)
  if c:  # pool the block [old, old + bs) when it leaves the window

    def pool(args):
      k_mem, v_mem, counts = args
      rows = a + c + (old + jnp.arange(bs)) % ring
      km = jnp.mean(jnp.take(k_mem, rows, axis=1).astype(jnp.float32), axis=1)
      vm = jnp.mean(jnp.take(v_mem, rows, axis=1).astype(jnp.float32), axis=1)
      km, vm = km.astype(k_mem.dtype), vm.astype(v_mem.dtype)
      filled = old // bs  # blocks pooled before this one
      size = jnp.int32(bs)

      def append(_):
        at = (0, a + jnp.minimum(filled, c - 1), 0, 0)
        return (
          jax.lax.dynamic_update_slice(k_mem, km[:, None], at),
          jax.lax.dynamic_update_slice(v_mem, vm[:, None], at),
          counts.at[jnp.minimum(filled, c - 1)].set(size),
        )

      def merge(_):
        ks, n = _merge(k_mem[:, a : a + c], counts, km, size)
        vs, _ = _merge(v_mem[:, a : a + c], counts, vm, size)
        return k_mem.at[:, a : a + c].set(ks), v_mem.at[:, a : a + c].set(vs), n

      return jax.lax.cond(filled < c, append, merge, None)

    k_mem, v_mem, counts = jax.lax.cond(new > old, pool, lambda args: args, (k_mem, v_mem, counts))
  row = jnp.where(u < 0, t, a + c + jnp.maximum(u, 0) % ring)
  at = (0, row, 0, 0)
  k_mem = jax.lax.dynamic_update_slice(k_mem, k_t[:, None].astype(k_mem.dtype), at)
  v_mem = jax.lax.dynamic_update_slice(v_mem, v_t[:, None].astype(v_mem.dtype), at)
  return k_mem, v_mem, counts


def _layout(counts, count, policy):
  """Rows in layout order once `count` tokens were seen: (rows int32 [R] (position p
  reads row rows[p]), live entries int32 [], log-size bias float32 [R])."""
  a, c, w, bs = geometry(policy)
  ring, r = w + bs - 1, num_rows(policy)
  anchors = jnp.minimum(count, a)
  pooled = _pooled(count, a, bs, w)
  slots = jnp.sum(counts > 0) if c else jnp.int32(0)
  recent = jnp.maximum(count - a, 0) - pooled
  p = jnp.arange(r, dtype=jnp.int32)
  cp = jnp.clip(p - anchors, 0, max(c - 1, 0))
  rp = a + c + (pooled + jnp.maximum(p - anchors - slots, 0)) % ring
  rows = jnp.where(p < anchors, p, jnp.where(p < anchors + slots, a + cp, rp))
  bias = jnp.zeros((r,), jnp.float32)
  if c and policy.pooled_bias:
    size = jnp.take(counts, cp).astype(jnp.float32)
    in_slots = (p >= anchors) & (p < anchors + slots)
    bias = jnp.where(in_slots, jnp.log(jnp.maximum(size, 1.0)), 0.0)
  return rows, anchors + slots + recent, bias


def _size_bias(score, b, h, q_idx, kv_idx, bias):
  del b, h, q_idx
  return score + bias[kv_idx]


def decode(attn: Any, x: jax.Array, cache: Any, length: jax.Array, policy: Any):
  """`Attention.decode` for a bounded policy: x [B, n, dim], the cache's `length` tokens
  before -> ([B, n, dim], the new LayerCache)."""
  from sparse_attention.models import lm  # lm imports this module lazily

  c = attn.config
  b, n, _ = x.shape
  q = attn.wq(x).reshape(b, n, c.num_heads, c.head_dim)
  k = attn.wk(x).reshape(b, n, c.num_kv_heads, c.head_dim)
  v = attn.wv(x).reshape(b, n, c.num_kv_heads, c.head_dim)
  r = num_rows(policy)
  slots = geometry(policy)[1]
  positions = jnp.arange(r, dtype=jnp.int32)[None]
  rot = (lambda y, pos: lm.rope(y, pos, c.rope_theta)) if c.rope else (lambda y, pos: y)

  def step(carry, token):
    k_mem, v_mem, counts, t = carry
    q_t, k_t, v_t = token
    k_mem, v_mem, counts = _insert(k_mem, v_mem, counts, t, k_t, v_t, policy)
    rows, live, bias = _layout(counts, t + 1, policy)
    k_l = rot(jnp.take(k_mem, rows, axis=1).astype(q.dtype), positions)
    v_l = jnp.take(v_mem, rows, axis=1).astype(q.dtype)
    q_l = rot(q_t[:, None], jnp.reshape(live - 1, (1, 1)))
    mod = {}
    if slots and policy.pooled_bias:
      mod = dict(score_mod=_size_bias, score_mod_params=bias)
    o = decode_attention(
      q_l, k_l, v_l, jnp.broadcast_to(live - 1, (b,)), implementation=c.implementation, **mod
    )
    return (k_mem, v_mem, counts, t + 1), o[:, 0]

  xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0))
  init = (cache.k, cache.v, cache.counts, jnp.asarray(length, jnp.int32))
  (k_mem, v_mem, counts, _), o = jax.lax.scan(step, init, xs)  # o [n, B, Hq, D]
  o = jnp.moveaxis(o, 0, 1).reshape(b, n, c.num_heads * c.head_dim)
  return attn.wo(o), lm.LayerCache(k=k_mem, v=v_mem, counts=counts)


__all__ = ["MEMORY_POLICIES", "cache_bytes", "check", "decode", "geometry", "num_rows"]

"""What the block-sparse kernels share: the mask they read and the tile math.

Kernels import nothing from `sparse_attention.ops`; they take any object with
the `BlockSparseLayout` attributes (an `ops.BlockMask` is one), so the layers
stay ordered (ops -> pallas_kernels). The tile functions below are written
with plain `jnp` so they lower inside a Pallas kernel (Triton or Mosaic) and
run batched in the XLA path alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)
LOG2E = math.log2(math.e)


class Unsupported(NotImplementedError):
  """A kernel cannot take this call (its shapes, dtypes or block sizes), raised before
  any work; `implementation=None` then falls back to the next implementation. Distinct
  from ValueError, which means the call itself is wrong."""


def refuse_mods(kernel: str, mask: Any, score_mod: Any) -> None:
  """Raises Unsupported for a score_mod or a mask_mod (a predicate of b, h and
  parameters), which `kernel` does not take."""
  if score_mod is not None:
    raise Unsupported(f"the {kernel} kernel does not take a score_mod.")
  if getattr(mask.mask_fn, "per_batch_head", False):
    raise Unsupported(f"the {kernel} kernel does not take a mask_mod (create_block_mask).")


class BlockSparseLayout(Protocol):
  """The compact mask a kernel walks (see ops/block_mask.py for the format)."""

  kv_count: jax.Array  # int32[Bm, Hm, Qb]
  kv_index: jax.Array  # int32[Bm, Hm, Qb, Kmax]
  kv_partial: jax.Array  # bool[Bm, Hm, Qb, Kmax]
  q_count: jax.Array  # int32[Bm, Hm, Kb]
  q_index: jax.Array  # int32[Bm, Hm, Kb, Qmax]
  q_partial: jax.Array  # bool[Bm, Hm, Kb, Qmax]
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  mask_fn: Any


@dataclasses.dataclass(frozen=True)
class Tiling:
  """A mask's static geometry and element mask: what every path's static
  configuration starts from (hashable, so it can be a jit/custom_vjp static)."""

  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  mask_fn: Any

  @staticmethod
  def fields_of(mask: BlockSparseLayout) -> dict[str, Any]:
    """The Tiling fields of a mask, to build a (subclass) config from."""
    return dict(
      block_q=mask.block_q,
      block_kv=mask.block_kv,
      q_len=mask.q_len,
      kv_len=mask.kv_len,
      mask_fn=mask.mask_fn,
    )

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  def tail_tile(self, ids: jax.Array, along_q: bool) -> jax.Array:
    """bool: which of the tile ids are the ragged last tile of their axis."""
    length, block = (self.q_len, self.block_q) if along_q else (self.kv_len, self.block_kv)
    if length % block == 0:
      return jnp.zeros(ids.shape, bool)
    return ids == length // block

  def visible(
    self,
    partial: Any,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    routed: jax.Array | None = None,
    *,
    b: Any = None,
    h: Any = None,
    params: tuple = (),
  ) -> jax.Array | None:
    """`visibility` with this tiling's static facts."""
    return visibility(
      self.mask_fn,
      partial,
      q_pos,
      kv_pos,
      q_len=self.q_len,
      kv_len=self.kv_len,
      block_q=self.block_q,
      block_kv=self.block_kv,
      routed=routed,
      b=b,
      h=h,
      params=params,
    )


def full_tiles_first(
  tiling: Tiling,
  count: jax.Array,  # int32 [..., N]
  index: jax.Array,  # int32 [..., N, M]
  partial: jax.Array,  # bool/int [..., N, M]
  along_q: bool,  # the listed tiles are q tiles (the transposed view)
  routed: bool,  # token routes: every tile is masked
) -> tuple[jax.Array, jax.Array]:
  """Each row's tiles reordered so that the full ones come first, for kernels that run
  two loops (the element mask only in the second): (int32 [..., N, M] tile id * 2 +
  partial, int32 [..., N] the number of full tiles). Masked tiles are the partial ones,
  the ragged last tile of the axis, and all of them under token routes; softmax
  accumulation does not depend on the order. Padding slots go last."""
  partial = partial.astype(bool)
  masked = partial | tiling.tail_tile(index, along_q) | routed
  valid = jnp.arange(index.shape[-1]) < count[..., None]
  order = jnp.argsort(jnp.where(valid, masked.astype(jnp.int32), 2), axis=-1, stable=True)
  pick = lambda x: jnp.take_along_axis(x, order, -1)
  tiles = pick(index) * 2 + pick(partial.astype(jnp.int32))
  return tiles.astype(jnp.int32), jnp.sum(valid & ~masked, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TokenRoutes:
  """Per-token routing on top of a BlockMask (MoBA / NSA block selection).

  Key j is visible to query i of head h only if `key[b, j]` is one of
  `query[b, h // (Hq // Hr), i, :]`: each query lists the routes (e.g. the ids of
  the key blocks it selected) it may attend to, each key names its route. Negative
  query entries are padding and match nothing; key routes must be >= 0. The
  BlockMask still decides which tiles are visited (build it from the union of the
  routes so that no kept pair lies in a skipped tile); routes then select the
  pairs inside them, exactly per token.
  """

  query: jax.Array  # int32 [B|1, Hr, Lq, R], Hr divides the query heads
  key: jax.Array  # int32 [B|1, Lk]


jax.tree_util.register_dataclass(TokenRoutes, data_fields=["query", "key"], meta_fields=[])


def route_match(
  q_route: jax.Array,  # int32 [..., block_q, R]
  kv_route: jax.Array,  # int32 [..., block_kv]
) -> jax.Array:  # bool [..., block_q, block_kv]
  """Whether each key's route is among each query's routes (array form)."""
  return jnp.any(q_route[..., :, None, :] == kv_route[..., None, :, None], axis=-1)


def element_visible(mask_fn: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any, params: tuple):
  """An element mask on a tile: position predicates take (q_idx, kv_idx); mask_mods
  (`per_batch_head`) also the batch row, the query head and the mask's parameters
  (`BlockMask.mask_params`). b, h: int32 scalars or arrays broadcasting with the
  positions."""
  if getattr(mask_fn, "per_batch_head", False):
    return mask_fn.evaluate(b, h, q_idx, kv_idx, params)
  return mask_fn(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class ScoreMod:
  """A user's `fn(score, b, h, q_idx, kv_idx[, params]) -> score` on the scaled float32
  logits, before the mask (FlexAttention's score_mod); static and hashable by `fn`, its
  parameters (any pytree of arrays) are traced data passed at each call."""

  fn: Callable
  has_params: bool

  def __call__(self, score, b, h, q_idx, kv_idx, params):
    if self.has_params:
      return self.fn(score, b, h, q_idx, kv_idx, params)
    return self.fn(score, b, h, q_idx, kv_idx)

  def with_vjp(self, score, b, h, q_idx, kv_idx, params):
    """(modified score, pullback): pullback(d_modified) -> (d_score, d_params)."""
    return jax.vjp(lambda s, p: self(s, b, h, q_idx, kv_idx, p), score, params)


class _Reader:
  """A parameter inside a kernel: a Pallas ref read by indexing (`p[h]`, `table[i, h]`,
  `c[...]`), each read recorded as (leaf, index, value)."""

  def __init__(self, ref: Any, leaf: int, reads: list):
    self._ref, self._leaf, self._reads = ref, leaf, reads

  def __getitem__(self, index):
    value = self._ref[index]
    self._reads.append((self._leaf, index, value))
    return value


class _Replayer:
  """A parameter replaying recorded values in read order (a pure function of them)."""

  def __init__(self, values: Any):
    self._values = values

  def __getitem__(self, index):
    return next(self._values)


def score_mod_vjp_in_kernel(
  score_mod: ScoreMod, score, b, h, q_idx, kv_idx, param_refs: Any
) -> tuple[jax.Array, Callable]:
  """A score_mod inside a kernel whose parameters are refs (a pytree of refs, read by
  indexing). Returns (modified score, pullback); pullback(d_modified) -> (d_score,
  reads), `reads` a list of (leaf number in the parameters' flattened order, index,
  cotangent of the value read there): the kernel adds each cotangent into that leaf's
  gradient at that index (an atomic add on GPUs). Works because every read is recorded
  on the way and the function is replayed, for jax.vjp, as a pure function of the
  score and the values read."""
  leaves, tree = jax.tree.flatten(param_refs)
  reads: list = []
  readers = tree.unflatten([_Reader(r, i, reads) for i, r in enumerate(leaves)])
  out = score_mod(score, b, h, q_idx, kv_idx, readers)
  where = [(leaf, index) for leaf, index, _ in reads]

  def replay(s, values):
    it = iter(values)
    return score_mod(s, b, h, q_idx, kv_idx, tree.unflatten([_Replayer(it)] * len(leaves)))

  _, pull = jax.vjp(replay, score, [v for _, _, v in reads])

  def pullback(d_out):
    d_score, d_values = pull(d_out)
    return d_score, [(leaf, index, d) for (leaf, index), d in zip(where, d_values, strict=True)]

  return out, pullback


def visibility(
  mask_fn: Any,
  partial: Any,  # bool, broadcastable to the tile: apply mask_fn here
  q_pos: jax.Array,  # int32 [..., block_q, 1] absolute query positions
  kv_pos: jax.Array,  # int32 [..., 1, block_kv] absolute key positions
  *,
  q_len: int,
  kv_len: int,
  block_q: int,
  block_kv: int,
  routed: jax.Array | None = None,  # bool [..., block_q, block_kv] route match
  b: Any = None,  # int32 batch row(s), for mask_mods
  h: Any = None,  # int32 query head(s), for mask_mods
  params: tuple = (),  # the mask's parameters, for mask_mods
) -> jax.Array | None:
  """Which (query, key) pairs of a tile are attended; None if all of them.

  The element mask applies where `partial`; positions past q_len / kv_len
  (the ragged tails of the last blocks) are never visible; with token routes,
  only pairs whose routes match (`routed`). Only the parts the static facts can
  need are computed.
  """
  vis = routed
  if mask_fn is not None:
    element = element_visible(mask_fn, b, h, q_pos, kv_pos, params)
    by_fn = jnp.logical_or(jnp.logical_not(partial), element)
    vis = by_fn if vis is None else vis & by_fn
  if q_len % block_q:
    in_q = q_pos < q_len
    vis = in_q if vis is None else vis & in_q
  if kv_len % block_kv:
    in_kv = kv_pos < kv_len
    vis = in_kv if vis is None else vis & in_kv
  return vis


def per_row(x: jax.Array, shape) -> jax.Array:
  """A [rows] vector broadcast over the columns of a [rows, cols] tile (explicitly:
  Mosaic GPU lowers this form, not `x[:, None]`)."""
  return jax.lax.broadcast_in_dim(x, shape, (0,))


def online_softmax_update(
  s: jax.Array,  # f32 [bq, bk] scaled scores, -inf where hidden (log2 units if base2)
  m_prev: jax.Array,  # f32 [bq] running max (-inf: nothing seen yet)
  l_prev: jax.Array,  # f32 [bq] running sum of exp(s - m)
  acc_prev: jax.Array | None,  # f32 [bq, Dv] running sum of exp(s - m) v; None: no output
  v: jax.Array,  # [bk, Dv]
  dot,  # (a, b) -> f32 a @ b, the backend's matmul
  *,
  base2: bool = False,
  accumulate=None,  # (acc, p) -> acc + p @ v, in place of dot where given
):
  """One flash-attention step; rows that have seen nothing stay (-inf, 0, 0).
  With acc_prev None only the statistics (m, l) are updated (acc stays None).

  With base2, scores are in log2 units (the softmax scale times log2(e) folded in)
  and exp2 replaces exp: one `ex2` per element on GPUs instead of a libdevice expf.
  """
  exp = jnp.exp2 if base2 else jnp.exp
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # no (-inf) - (-inf)
  correction = exp(m_prev - m_safe)
  p = exp(s - per_row(m_safe, s.shape))
  l_next = correction * l_prev + jnp.sum(p, axis=-1)
  if acc_prev is None:
    return m_next, l_next, None
  acc_scaled = per_row(correction, acc_prev.shape) * acc_prev
  if accumulate is not None:
    return m_next, l_next, accumulate(acc_scaled, p)
  return m_next, l_next, acc_scaled + dot(p.astype(v.dtype), v)


def finalize(m: jax.Array, l: jax.Array, acc: jax.Array | None, *, base2: bool = False):
  """(normalised output f32 [bq, Dv] (None if acc is), natural-log lse f32 [bq]); empty
  rows give 0 and -inf. With base2, m is in log2 units."""
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  out = None if acc is None else acc * per_row(1.0 / l_safe, acc.shape)
  lse = (m + jnp.log2(l_safe)) * LN2 if base2 else m + jnp.log(l_safe)
  return out, jnp.where(nonempty, lse, -jnp.inf)


def attention_with_vjp(forward: Callable, backward: Callable) -> Callable:
  """Ties a forward and a backward pass into one differentiable attention.

  Returns `attention(cfg, q, k, v, *rest) -> (out, lse)`, a `jax.custom_vjp` with
  `cfg` static, from
    forward(cfg, q, k, v, *rest) -> (out, lse)
    backward(cfg, q, k, v, *rest, out, lse, d_out, d_lse) -> (dq, dk, dv, *d_lead).
  The backward's cotangents cover q, k, v and the first len(d_lead) of `rest` (e.g.
  score_mod parameters); the other arguments (mask metadata, routes) get none.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def attention(cfg, q, k, v, *rest):
    return forward(cfg, q, k, v, *rest)

  def attention_fwd(cfg, q, k, v, *rest):
    out, lse = forward(cfg, q, k, v, *rest)
    return (out, lse), (q, k, v, rest, out, lse)

  def attention_bwd(cfg, residuals, cotangents):
    q, k, v, rest, out, lse = residuals
    grads = backward(cfg, q, k, v, *rest, out, lse, *cotangents)
    return (*grads, *(None for _ in rest[len(grads) - 3 :]))

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


def _floating(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def add_cotangents(acc: Any, d: Any, params: Any) -> Any:
  """acc (f32 sums, like `params`) plus the cotangents `d` of a vjp of `params`
  (integer leaves carry float0 cotangents: they are skipped)."""
  return jax.tree.map(lambda a, g, p: a + g.astype(a.dtype) if _floating(p) else a, acc, d, params)


def float_cotangents(params: Any, grads: Any) -> Any:
  """Cotangents of a parameter pytree: `grads` (f32 sums) cast to each floating leaf's
  dtype, None for integer leaves (they get no gradient)."""

  def one(p, g):
    return g.astype(p.dtype) if _floating(p) else None

  return jax.tree.map(one, params, grads)


def forward_only(fn: Callable, message: str) -> Callable:
  """`fn(cfg, masked_output, *arrays)` as a `jax.custom_vjp` (the first two arguments
  static) whose gradient raises NotImplementedError(message): for kernels that run at
  sampling time only (Re-ttention's calibration), so that differentiating them fails
  loudly instead of silently giving zeros."""
  wrapped = jax.custom_vjp(fn, nondiff_argnums=(0, 1))

  def fwd(cfg, masked_output, *arrays):
    return fn(cfg, masked_output, *arrays), None

  def bwd(cfg, masked_output, residuals, cotangents):
    raise NotImplementedError(message)

  wrapped.defvjp(fwd, bwd)
  return wrapped

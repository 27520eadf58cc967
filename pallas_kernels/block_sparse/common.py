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
  """A [..., rows] vector broadcast over the columns of a [..., rows, cols] tile
  (explicitly: Mosaic GPU lowers this form, not `x[:, None]`). Leading dims batch
  tiles (the XLA path)."""
  return jax.lax.broadcast_in_dim(x, shape, tuple(range(x.ndim)))


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


def tile_softmax(
  s: jax.Array,  # f32 [..., bq, bk] scaled scores, -inf where hidden
  v: jax.Array,  # [..., bk, Dv]
  dot,  # (a, b) -> f32 a @ b, batched over the leading dims
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One tile's own softmax statistics, for paths that compute tiles independently and
  merge them afterwards (the XLA path): (m f32 [..., bq] the row max (-inf: the row sees
  nothing here), l = sum exp(s - m) [..., bq], acc = exp(s - m) @ v f32 [..., bq, Dv]).
  What `online_softmax_update` gives from an empty state."""
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - per_row(jnp.where(m == -jnp.inf, 0.0, m), s.shape))
  return m, jnp.sum(p, axis=-1), dot(p.astype(v.dtype), v)


def softmax_grads(
  s: jax.Array,  # f32 [..., bq, bk] scaled scores, -inf where hidden (log2 units if base2)
  lse: jax.Array,  # f32 [..., bq] the rows' logsumexp (+inf on rows that see nothing)
  dp: jax.Array,  # f32 [..., bq, bk] dO @ v^T
  delta: jax.Array,  # f32 [..., bq] rowsum(dO * O) - d lse
  *,
  base2: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """One tile of the flash-attention backward: (p = exp(s - lse), ds = p * (dp - delta)),
  both f32 [..., bq, bk]; ds is d loss / d s (times the scale: d loss / d (q.k)). Hidden
  pairs give p = ds = 0. dV += p^T dO, dQ += ds k, dK += ds^T q."""
  exp = jnp.exp2 if base2 else jnp.exp
  p = exp(s - per_row(lse, s.shape))
  return p, p * (dp - per_row(delta, s.shape))


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


# ---------------------------------------------------------------------------
# score_mod / mask_mod inside kernels: what they trace to, checked before any work.
# ---------------------------------------------------------------------------

_READ_SCOPE = "sparse_attention_param_read"


@dataclasses.dataclass(frozen=True)
class ModRead:
  """One parameter read of a score_mod or mask_mod (`p[h]`, `table[bucket, h]`)."""

  fn: str  # "score_mod" or "mask_mod"
  leaf: int  # the leaf, in the flattened order of that function's parameters
  shape: tuple[int, ...]  # the value read: () for a scalar read, else a gather
  on_positions: bool  # the index depends on the score or the positions (not b, h only)


@dataclasses.dataclass(frozen=True)
class ModTrace:
  """What a call's score_mod and mask_mod trace to on one tile."""

  primitives: frozenset[str]  # every primitive, param reads excluded
  reads: tuple[ModRead, ...]


class _Probe:
  """A parameter leaf while tracing a mod: indexing reads it (a gather on the array, in
  a named scope so that its primitives are told apart from the function's own)."""

  def __init__(self, leaf: jax.Array, fn: str, number: int, reads: list):
    self._leaf, self._fn, self._number, self._reads = leaf, fn, number, reads

  def __getitem__(self, index):
    with jax.named_scope(_READ_SCOPE):
      value = self._leaf[index]
    parts = index if isinstance(index, tuple) else (index,)
    arrays = [x for x in parts if isinstance(x, jax.Array)]
    self._reads.append((self._fn, self._number, jnp.shape(value), arrays))
    return value


def _primitives(jaxpr: Any) -> set[str]:
  """Names of the primitives of a jaxpr and of its sub-jaxprs, param reads excluded."""
  names = set()
  for eqn in jaxpr.eqns:
    if _READ_SCOPE in str(eqn.source_info.name_stack):
      continue
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner)
  return names


def trace_mods(
  mask: Any, score_mod: ScoreMod | None, score_mod_params: Any, rows: int, cols: int
) -> ModTrace | None:
  """Traces the call's score_mod and mask_mod (a `per_batch_head` element mask) on a
  [rows, cols] tile, with scalar b, h as kernels pass them; None if there is neither.
  A score_mod with parameters whose values are not given is not traced.

  Raises:
    Unsupported: a function reads its parameters other than by indexing (in kernels
      they are refs), or fails to trace on a tile.
  """
  fns = []
  if score_mod is not None and (score_mod_params is not None or not score_mod.has_params):
    fns.append(
      ("score_mod", score_mod_params, lambda s, b, h, i, j, p: score_mod(s, b, h, i, j, p))
    )
  if getattr(getattr(mask, "mask_fn", None), "per_batch_head", False):
    element = lambda s, b, h, i, j, p: element_visible(mask.mask_fn, b, h, i, j, p)
    fns.append(("mask_mod", tuple(mask.mask_params), element))
  if not fns:
    return None
  from jax._src.interpreters import partial_eval as pe  # noqa: PLC0415 (dce_jaxpr)

  primitives, reads = set(), []
  for name, params, fn in fns:
    leaves, tree = jax.tree.flatten(params)
    found: list = []  # (fn, leaf, shape, index arrays) per read, in order

    def probe(s, b, h, i, j, *leaves, fn=fn, name=name, tree=tree, found=found):
      found.clear()
      probes = [_Probe(x, name, n, found) for n, x in enumerate(leaves)]
      out = fn(s, b, h, i, j, tree.unflatten(probes))
      return out, [a for *_, arrays in found for a in arrays]

    args = (
      jax.ShapeDtypeStruct((rows, cols), jnp.float32),
      *(jax.ShapeDtypeStruct((), jnp.int32),) * 2,
      jax.ShapeDtypeStruct((rows, 1), jnp.int32),
      jax.ShapeDtypeStruct((1, cols), jnp.int32),
      *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves),
    )
    try:
      closed = jax.make_jaxpr(probe)(*args)
    except (TypeError, AttributeError, IndexError) as e:
      raise Unsupported(
        f"the {name} does not trace on a kernel tile ({e}); inside kernels its parameters "
        "are refs, read by indexing (p[h], table[i, h], c[...])."
      ) from None
    primitives |= _primitives(closed.jaxpr)
    outputs = len(closed.jaxpr.outvars)
    first = outputs - sum(len(arrays) for *_, arrays in found)
    for f, n, shape, arrays in found:
      used = [False] * outputs
      used[first : first + len(arrays)] = [True] * len(arrays)
      first += len(arrays)
      _, inputs = pe.dce_jaxpr(closed.jaxpr, used, instantiate=False)
      on_positions = any(inputs[k] for k in (0, 3, 4))  # the score, q_idx, kv_idx
      reads.append(ModRead(f, n, tuple(shape), on_positions))
  return ModTrace(frozenset(primitives), tuple(reads))


def check_mods_lower(
  kernel: str,
  rules: set[str] | None,
  mask: Any,
  score_mod: Any,
  score_mod_params: Any,
  rows: int = 16,
  cols: int = 16,
) -> ModTrace | None:
  """Raises Unsupported if the call's score_mod or mask_mod traces to a primitive with
  no lowering in `rules` (primitive names; None: not checked) or does not trace on a
  tile (see `trace_mods`). Returns the trace (None: no mods)."""
  trace = trace_mods(mask, score_mod, score_mod_params, rows, cols)
  if trace is not None and rules is not None:
    missing = sorted(trace.primitives - rules)
    if missing:
      raise Unsupported(
        f"the {kernel} kernel cannot lower the score_mod/mask_mod: no lowering for {missing}."
      )
  return trace

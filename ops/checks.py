"""Input validation shared by the attention ops: fail before computing.

Every error names the argument and the shape or dtype expected of it.
Nothing is silently truncated or broadcast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.pallas_kernels.block_sparse.common import ScoreMod

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """Sizes of one attention call, q/k/v as [batch, seq, heads, head_dim]."""

  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  kv_heads: int
  head_dim: int  # of q and k
  v_head_dim: int

  @property
  def group(self) -> int:
    """Query heads per kv head (1: MHA; q_heads: MQA)."""
    return self.q_heads // self.kv_heads


def check_qkv(q: Any, k: Any, v: Any, op: str) -> AttentionShape:
  """Validates q, k, v and returns their sizes."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{op}: {name} must be an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(
        f"{op}: {name} must have rank 4, [batch, seq, heads, head_dim], got shape {tuple(x.shape)}."
      )
    if not any(x.dtype == d for d in SUPPORTED_DTYPES):
      raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16.")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
  b, sq, hq, d = q.shape
  bk, sk, hk, dk = k.shape
  bv, sv, hv, dv = v.shape
  if not (b == bk == bv):
    raise ValueError(f"{op}: batch sizes differ: q {b}, k {bk}, v {bv}.")
  if sk != sv:
    raise ValueError(f"{op}: k and v lengths differ: k {sk}, v {sv} (dim 1).")
  if hk != hv:
    raise ValueError(f"{op}: k and v head counts differ: k {hk}, v {hv} (dim 2).")
  if dk != d:
    raise ValueError(f"{op}: k head_dim must equal q's: q {d}, k {dk} (dim 3); v's may differ.")
  if hq % hk:
    raise ValueError(
      f"{op}: k/v heads ({hk}) must divide q heads ({hq}) for grouped-query attention."
    )
  if min(b, sq, sk, hq, d, dv) == 0:
    raise ValueError(
      f"{op}: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
    )
  return AttentionShape(b, sq, sk, hq, hk, d, dv)


def check_block_mask(mask: Any, shape: AttentionShape, op: str) -> BlockMask:
  """The BlockMask must describe exactly this q_len x kv_len and broadcast."""
  if not isinstance(mask, BlockMask):
    raise ValueError(
      f"{op}: mask must be a BlockMask (see sparse_attention.ops.masks), got {type(mask).__name__}."
    )
  if (mask.q_len, mask.kv_len) != (shape.q_len, shape.kv_len):
    raise ValueError(
      f"{op}: mask was built for q_len={mask.q_len}, kv_len={mask.kv_len}, but q has "
      f"{shape.q_len} positions and k {shape.kv_len}."
    )
  _check_batch_heads("mask", mask.batch_heads, shape, op)
  return mask


def check_dense_mask(mask: Any, shape: AttentionShape, op: str) -> Any:
  """A boolean [B|1, H|1, q_len, kv_len] mask."""
  if not hasattr(mask, "shape") or mask.ndim != 4:
    raise ValueError(
      f"{op}: mask must be a BlockMask or a bool array [batch|1, heads|1, "
      f"{shape.q_len}, {shape.kv_len}], got shape {getattr(mask, 'shape', None)}."
    )
  if mask.dtype != np.bool_:
    raise ValueError(f"{op}: a dense mask must be bool, got dtype {mask.dtype}.")
  if tuple(mask.shape[2:]) != (shape.q_len, shape.kv_len):
    raise ValueError(
      f"{op}: mask shape {tuple(mask.shape)} must end in (q_len, kv_len) = "
      f"({shape.q_len}, {shape.kv_len})."
    )
  _check_batch_heads("mask", tuple(mask.shape[:2]), shape, op)
  return mask


def _check_batch_heads(name: str, bh: tuple[int, int], shape: AttentionShape, op: str):
  bm, hm = bh
  if bm not in (1, shape.batch) or hm not in (1, shape.q_heads):
    raise ValueError(
      f"{op}: {name} batch/heads dims are ({bm}, {hm}); each must be 1 or match q's "
      f"(batch {shape.batch}, query heads {shape.q_heads})."
    )


def check_scale(scale: Any, shape: AttentionShape, op: str) -> float:
  """The softmax scale, 1/sqrt(head_dim) by default. Static (a Python number), finite
  and > 0."""
  if scale is None:
    return 1.0 / math.sqrt(shape.head_dim)
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
    raise ValueError(f"{op}: scale must be a Python float or None, got {scale!r}.")
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"{op}: scale must be finite and > 0, got {scale!r}.")
  return float(scale)


def check_routes(routes: Any, shape: AttentionShape, op: str) -> Any:
  """Token routes: query int [B|1, Hr, q_len, R] with Hr dividing the query heads,
  key int [B|1, kv_len], the same batch dim (1 or the batch) in both."""
  if routes is None:
    return None
  query, key = getattr(routes, "query", None), getattr(routes, "key", None)
  if query is None or key is None:
    raise ValueError(f"{op}: routes must be a TokenRoutes(query=..., key=...), got {routes!r}.")
  for name, x, rank in (("routes.query", query, 4), ("routes.key", key, 2)):
    if x.ndim != rank or not np.issubdtype(np.dtype(x.dtype), np.integer):
      raise ValueError(
        f"{op}: {name} must be an integer array of rank {rank}, got {x.dtype} {tuple(x.shape)}."
      )
  br, hr, lq, _ = query.shape
  if br not in (1, shape.batch) or key.shape[0] != br:
    raise ValueError(
      f"{op}: routes.query and routes.key must share a batch dim of 1 or {shape.batch}, got "
      f"{br} and {key.shape[0]}."
    )
  if hr < 1 or shape.q_heads % hr:
    raise ValueError(
      f"{op}: routes.query has {hr} heads (dim 1); it must divide the {shape.q_heads} query heads."
    )
  if lq != shape.q_len or key.shape[1] != shape.kv_len:
    raise ValueError(
      f"{op}: routes.query has {lq} queries (dim 2) and routes.key {key.shape[1]} keys "
      f"(dim 1); expected q_len={shape.q_len}, kv_len={shape.kv_len}."
    )
  return routes


def routes_to_dense(routes: Any, q_heads: int) -> Any:
  """bool [B|1, q_heads, q_len, kv_len]: where the routes allow query -> key (O(S^2):
  for the reference)."""
  query = jnp.repeat(routes.query, q_heads // routes.query.shape[1], axis=1)
  key = routes.key[:, None, None, :, None]
  return jnp.any(query[:, :, :, None, :] == key, axis=-1)


def check_row_scale(row_scale: Any, shape: AttentionShape, op: str) -> Any:
  """A float [B|1, H|1, q_len] per-query output scale."""
  if row_scale is None:
    return None
  if (
    not hasattr(row_scale, "shape")
    or row_scale.ndim != 3
    or not jnp.issubdtype(row_scale.dtype, jnp.floating)
  ):
    raise ValueError(
      f"{op}: row_scale must be a float array [batch|1, q_heads|1, {shape.q_len}], got "
      f"{getattr(row_scale, 'dtype', None)} {getattr(row_scale, 'shape', None)}."
    )
  _check_batch_heads("row_scale", tuple(row_scale.shape[:2]), shape, op)
  if row_scale.shape[2] != shape.q_len:
    raise ValueError(
      f"{op}: row_scale has {row_scale.shape[2]} rows (dim 2); expected q_len={shape.q_len}."
    )
  return row_scale


def is_concrete(x: Any) -> bool:
  """Whether x's values are known now: not a jax Tracer (as under jit, vmap or grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_values_in_range(
  x: Any, name: str, low: float, high: float, *, closed: bool = False, note: str = ""
) -> None:
  """Raises ValueError naming `name` if the concrete array `x` holds a value outside
  [low, high) ([low, high] if `closed`; NaN is outside).

  Traced values (under jit or vmap) are not checked: they are unknown until the program
  runs; whoever feeds the jitted program checks its data on the host.

  Args:
    x: an array (or anything np.asarray takes).
    name: how the error names x, e.g. "LM: tokens".
    low, high: the bounds.
    closed: include `high`.
    note: appended to the expected interval, e.g. " (vocab_size=256)".
  """
  if not is_concrete(x):
    return
  values = np.asarray(x)
  inside = (values >= low) & ((values <= high) if closed else (values < high))
  if inside.all():
    return
  where = tuple(int(i) for i in np.argwhere(~inside)[0])
  bounds = f"[{low}, {high}{']' if closed else ')'}"
  raise ValueError(
    f"{name} must lie in {bounds}{note}; got {values[where].item()!r} at index {where}."
  )


def check_score_mod(score_mod: Any, params: Any, op: str) -> ScoreMod | None:
  """The user's score_mod as a `ScoreMod` (None if not given); its parameters must be a
  pytree of arrays (gradients flow to the floating ones)."""
  if score_mod is None:
    if params is not None:
      raise ValueError(f"{op}: score_mod_params given without a score_mod.")
    return None
  if isinstance(score_mod, ScoreMod):
    return score_mod
  if not callable(score_mod):
    raise ValueError(f"{op}: score_mod must be callable, got {type(score_mod).__name__}.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(
        f"{op}: score_mod_params{jax.tree_util.keystr(path)} must be an array, got "
        f"{type(leaf).__name__} (close over Python numbers instead)."
      )
  return ScoreMod(score_mod, has_params=params is not None)

"""Batched Lloyd k-means: `kmeans`, `kmeans_inertia`, `kmeans_plusplus_init`.

What `kmeans(x, init, iterations=T)` computes, for each batch row independently:

  c_0 = init
  for t in 1..T:   a_t = argmin_j dist(x_i, c_{t-1, j})          (assignment, E-step)
                   c_t[j] = mean of the points with a_t = j       (update, M-step)
                            or c_{t-1}[j] if no point has a_t = j (empty cluster)
  return c_T, argmin_j dist(x_i, c_{T, j})                        (one more assignment)

so T = 0 returns init and the assignments to it, and the returned assignments always
belong to the returned centroids. This is scikit-learn's
`KMeans(init=init, n_init=1, max_iter=T, algorithm="lloyd", tol=0)`: its loop runs at
most max_iter (assignment, update) steps and, when it stops early, stops at a fixed
point (labels unchanged, or centers unchanged since tol=0), which further steps would
not move; it then re-assigns to the final centers. Two differences: scikit-learn
relocates an empty cluster to far-away points where this keeps its previous centroid,
and scikit-learn subtracts the data mean before iterating (it only changes rounding).

Distances: squared Euclidean, as (||x||^2 - 2 x.c) + ||c||^2 in float32 with x.c a
full-precision float32 matmul (see `pallas_kernels/kmeans/__init__.py`); argmin ties go
to the lower centroid index. The expansion loses precision when ||x|| is large against
the distances between points (data far from the origin): centre such data first
(subtract its mean, add it back to the centroids). Means are float32 sums divided by
float32 counts. Inputs in bfloat16 / float16 are upcast; centroids stay float32 across
iterations and are cast to x's dtype once at the end, after the last assignment pass
(which uses the float32 centroids).

Implementations:
  "reference"      plain jnp: the full [batch, n, k] distance matrix, jnp.argmin, and the
                   update as a one-hot [batch, n, k] matmul. The oracle.
  "xla"            chunks of block_n points (lax.map), each walking the centroids in
                   tiles of block_k (lax.scan) with an online argmin: at most
                   batch x block_n x block_k distances exist at a time. The update is
                   `jax.ops.segment_sum` (a scatter-add over the points, no one-hot).
  "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu"
                   the assignment as a fused Pallas kernel (`pallas_kernels/kmeans`):
                   Mosaic GPU (Hopper: wgmma on exact bf16 splits of the operands, so
                   still f32-accurate), Triton (any GPU), Mosaic TPU; the same
                   segment_sum update as "xla". The update stays in XLA: it
                   reads x once and does O(n d) adds against the assignment's O(n k d)
                   multiply-adds, so it is memory-bound and a kernel would save nothing
                   but the launch; a Pallas version would need atomic adds on GPU
                   (non-deterministic summation order) or a sort by cluster.
  "pallas"         the platform's kernel, best first as `ops/dispatch.py` orders them
                   (Hopper: Mosaic GPU, then Triton; other GPUs: Triton; TPU: Mosaic
                   TPU); off GPU/TPU only with interpret=True: Triton.
  None             the platform's first kernel that takes the call, else "xla" (always
                   "xla" on CPU).

Not differentiable in a useful sense (assignments are piecewise constant); the kernels'
inputs are wrapped in `stop_gradient`. The kernels run on the whole batch (no shard_map
over a mesh, unlike the attention ops).

`sparse_attention.ops` exports the function `kmeans` under this module's name, so
`sparse_attention.ops.kmeans` is the function; the module (IMPLEMENTATIONS, the xla
tiles) is `importlib.import_module("sparse_attention.ops.kmeans")`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import checks, dispatch
from sparse_attention.pallas_kernels import kmeans as common
from sparse_attention.pallas_kernels.kmeans import gpu, mosaic_gpu, tpu

IMPLEMENTATIONS = (
  "reference", "xla", "pallas", "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu"
)  # fmt: skip

_KERNELS = {
  "pallas_mosaic_gpu": (mosaic_gpu.check_supported, mosaic_gpu.assign_mosaic_gpu),
  "pallas_triton": (gpu.check_supported, gpu.assign_triton),
  "pallas_tpu": (tpu.check_supported, tpu.assign_tpu),
}
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HIGHEST = jax.lax.Precision.HIGHEST

# The xla path's default tiles: chunks of XLA_BLOCK_N points against tiles of at most
# XLA_BLOCK_K centroids (an [n, k] f32 distance tile of 4 MiB at most per batch row).
XLA_BLOCK_N = 1024
XLA_BLOCK_K = 1024


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def _check_points(x: Any, op: str) -> tuple[int, int, int]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{op}: x must be an array [batch, n, d], got {type(x).__name__}.")
  if x.ndim != 3 or min(x.shape) == 0:
    raise ValueError(
      f"{op}: x must have shape [batch, n, d] with no empty dim, got {tuple(x.shape)}."
    )
  if not any(x.dtype == t for t in _DTYPES):
    raise ValueError(f"{op}: x has dtype {x.dtype}; expected float32, bfloat16 or float16.")
  return tuple(x.shape)


def _check_positive_int(value: Any, name: str, op: str, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{op}: {name} must be a Python int >= {minimum}, got {value!r}.")
  return int(value)


def _check_args(x, init, iterations, block_n, block_k, op: str) -> None:
  b, _, d = _check_points(x, op)
  if not hasattr(init, "shape") or not hasattr(init, "dtype"):
    raise ValueError(f"{op}: init must be an array [batch, k, d], got {type(init).__name__}.")
  if init.ndim != 3 or init.shape[0] != b or init.shape[2] != d or init.shape[1] == 0:
    raise ValueError(
      f"{op}: init must have shape [batch, k, d] = [{b}, k >= 1, {d}] (x's batch and d), "
      f"got {tuple(init.shape)}."
    )
  if not any(init.dtype == t for t in _DTYPES):
    raise ValueError(f"{op}: init has dtype {init.dtype}; expected float32, bfloat16 or float16.")
  _check_positive_int(iterations, "iterations", op, minimum=0)
  for name, block in (("block_n", block_n), ("block_k", block_k)):
    if block is not None:
      _check_positive_int(block, name, op)


# ---------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------


def kmeans(
  x: jax.Array,  # [batch, n, d] float32 / bfloat16 / float16
  init: jax.Array,  # [batch, k, d] float
  *,
  iterations: int,
  implementation: str | None = None,
  interpret: bool = False,
  block_n: int | None = None,
  block_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Batched Lloyd k-means from given initial centroids (see the module docstring for
  the exact iteration, distance and rounding).

  Args:
    x: the points, [batch, n, d]; each batch row is clustered on its own.
    init: initial centroids [batch, k, d] (e.g. `kmeans_plusplus_init`); k may exceed n.
    iterations: Lloyd steps (assignment + update), a Python int >= 0 (static under jit):
      scikit-learn's max_iter with tol=0.
    implementation: None, "reference", "xla", "pallas", "pallas_mosaic_gpu",
      "pallas_triton" or "pallas_tpu" (module docstring).
    interpret: run a Pallas kernel in the interpreter (the TPU kernel in the TPU
      interpreter, the Mosaic GPU one in Mosaic GPU's) instead of compiling it: for
      tests on CPU.
    block_n, block_k: points per chunk / program and centroids per tile of the "xla"
      path and the kernels (None: each one's default; kernels refuse sizes their
      hardware cannot tile). Ignored by "reference".

  Returns:
    (centroids [batch, k, d] in x's dtype, assignments int32 [batch, n]): the centroids
    after `iterations` steps and each point's nearest of them (ties: the lower index).
    The inertia is `kmeans_inertia(x, centroids, assignments)`.

  Raises:
    ValueError: bad shapes or dtypes (naming the argument), iterations not an int >= 0,
      an unknown implementation, or a kernel asked for by name that cannot take the call.
  """
  op = "kmeans"
  _check_args(x, init, iterations, block_n, block_k, op)
  k = init.shape[1]

  def check(kernel: str) -> None:
    # Mosaic GPU's SMEM holds bf16 parts of the points: how many depends on the dtype.
    dtype = {"dtype": x.dtype} if kernel == "pallas_mosaic_gpu" else {}
    _KERNELS[kernel][0](tuple(x.shape), k, block_n=block_n, block_k=block_k, **dtype)

  impl = dispatch.resolve(
    implementation, interpret=interpret, op=op, implementations=IMPLEMENTATIONS, check=check
  )
  return _kmeans(x, init, int(iterations), impl, interpret, block_n, block_k)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _kmeans(x, init, iterations: int, impl: str, interpret: bool, block_n, block_k):
  """The validated call, jitted whole (one program, also when called eagerly)."""
  if impl == "reference":
    centroids, assignments = _lloyd(x, init, iterations, _assign_reference, _update_reference)
  elif impl == "xla":
    assign = functools.partial(_assign_xla, block_n=block_n, block_k=block_k)
    centroids, assignments = _lloyd(x, init, iterations, assign, _update_segment_sum)
  else:
    kernel = functools.partial(
      _KERNELS[impl][1], block_n=block_n, block_k=block_k, interpret=interpret
    )

    def assign(x, xx, c):
      x, xx, c = jax.lax.stop_gradient((x, xx, c))
      return kernel(x, xx, c, common.squared_norms(c))

    centroids, assignments = _lloyd(x, init, iterations, assign, _update_segment_sum)
  return centroids.astype(x.dtype), assignments


def _lloyd(x, init, iterations: int, assign, update):
  """`iterations` (assign, update) steps from init, then one more assignment.
  assign(x, xx, c f32) -> int32 [B, n]; update(x f32, a, c) -> c f32."""
  x32 = x.astype(jnp.float32)
  xx = common.squared_norms(x32)  # [B, n]

  def step(_, c):
    return update(x32, assign(x, xx, c), c)

  c = jax.lax.fori_loop(0, iterations, step, init.astype(jnp.float32))
  return c, assign(x, xx, c)


# ---------------------------------------------------------------------------
# reference: the whole [B, n, k] matrix.
# ---------------------------------------------------------------------------


def _assign_reference(x, xx, c):
  xc = jnp.einsum("bnd,bkd->bnk", x.astype(jnp.float32), c, precision=_HIGHEST)
  dist = common.distances(xx[:, :, None], xc, common.squared_norms(c)[:, None, :])
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)  # first minimum: the lower index


def _update_reference(x32, a, c):
  onehot = (a[:, :, None] == jnp.arange(c.shape[1])[None, None, :]).astype(jnp.float32)
  sums = jnp.einsum("bnk,bnd->bkd", onehot, x32, precision=_HIGHEST)
  counts = jnp.sum(onehot, axis=1)  # [B, k]
  return jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1.0)[..., None], c)


# ---------------------------------------------------------------------------
# xla: chunks of points x tiles of centroids, online argmin; segment-sum update.
# ---------------------------------------------------------------------------


def _assign_xla(x, xx, c, *, block_n: int | None, block_k: int | None):
  b, n, d = x.shape
  k = c.shape[1]
  bn, bk = min(block_n or XLA_BLOCK_N, n), min(block_k or XLA_BLOCK_K, k)
  n_tiles, k_tiles = -(-n // bn), -(-k // bk)
  # Padding points are cut off; padding centroids have ||c||^2 = +inf.
  xs = jnp.pad(x, ((0, 0), (0, n_tiles * bn - n), (0, 0))).reshape(b, n_tiles, bn, d)
  xxs = jnp.pad(xx, ((0, 0), (0, n_tiles * bn - n))).reshape(b, n_tiles, bn)
  cs = jnp.pad(c, ((0, 0), (0, k_tiles * bk - k), (0, 0))).reshape(b, k_tiles, bk, d)
  ccs = jnp.pad(common.squared_norms(c), ((0, 0), (0, k_tiles * bk - k)), constant_values=jnp.inf)
  ccs = ccs.reshape(b, k_tiles, bk)
  starts = jnp.arange(k_tiles, dtype=jnp.int32) * bk

  def chunk(points):
    xt, xxt = points  # [B, bn, d], [B, bn]
    xt = xt.astype(jnp.float32)

    def tile(carry, centroids):
      ct, cct, start = centroids  # [B, bk, d], [B, bk], ()
      xc = jnp.einsum("bnd,bkd->bnk", xt, ct, precision=_HIGHEST)
      dist = common.distances(xxt[:, :, None], xc, cct[:, None, :])
      return common.argmin_update(dist, -1, start, *carry), None

    init = (jnp.full((b, bn, 1), jnp.inf, jnp.float32), jnp.zeros((b, bn, 1), jnp.int32))
    tiles = (jnp.moveaxis(cs, 1, 0), jnp.moveaxis(ccs, 1, 0), starts)
    if k_tiles == 1:
      (_, arg), _ = tile(init, jax.tree.map(lambda a: a[0], tiles))
    else:
      (_, arg), _ = jax.lax.scan(tile, init, tiles)
    return arg[..., 0]  # [B, bn]

  args = jax.lax.map(chunk, (jnp.moveaxis(xs, 1, 0), jnp.moveaxis(xxs, 1, 0)))
  return jnp.moveaxis(args, 0, 1).reshape(b, n_tiles * bn)[:, :n]


def _update_segment_sum(x32, a, c):
  b, n, d = x32.shape
  k = c.shape[1]
  segments = (a + (jnp.arange(b, dtype=jnp.int32) * k)[:, None]).reshape(b * n)
  sums = jax.ops.segment_sum(x32.reshape(b * n, d), segments, num_segments=b * k)
  counts = jax.ops.segment_sum(jnp.ones((b * n,), jnp.float32), segments, num_segments=b * k)
  sums, counts = sums.reshape(b, k, d), counts.reshape(b, k)
  return jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1.0)[..., None], c)


# ---------------------------------------------------------------------------
# Inertia and seeding.
# ---------------------------------------------------------------------------


def kmeans_inertia(
  x: jax.Array,  # [batch, n, d]
  centroids: jax.Array,  # [batch, k, d]
  assignments: jax.Array,  # int [batch, n], values in [0, k)
) -> jax.Array:
  """The k-means objective per batch row, float32 [batch]: sum_i ||x_i - c_{a_i}||^2.

  scikit-learn's `inertia_` for `kmeans`'s outputs. Computed from the differences
  x_i - c_{a_i} in float32 (not the expanded form the assignment uses), so it has no
  cancellation error; costs one gather of the assigned centroids ([batch, n, d]).
  Out-of-range assignments raise (when concrete) rather than being clamped.
  """
  op = "kmeans_inertia"
  b, n, d = _check_points(x, op)
  if (
    not hasattr(centroids, "shape")
    or centroids.ndim != 3
    or (centroids.shape[0], centroids.shape[2]) != (b, d)
  ):
    raise ValueError(
      f"{op}: centroids must have shape [batch, k, d] = [{b}, k, {d}], got "
      f"{getattr(centroids, 'shape', type(centroids).__name__)}."
    )
  if (
    not hasattr(assignments, "shape")
    or tuple(assignments.shape) != (b, n)
    or not jnp.issubdtype(assignments.dtype, jnp.integer)
  ):
    raise ValueError(
      f"{op}: assignments must be an integer array [batch, n] = [{b}, {n}], got "
      f"{getattr(assignments, 'dtype', None)} {getattr(assignments, 'shape', None)}."
    )
  checks.check_values_in_range(assignments, f"{op}: assignments", 0, centroids.shape[1])
  assigned = jnp.take_along_axis(
    centroids.astype(jnp.float32), assignments[..., None].astype(jnp.int32), axis=1
  )  # [B, n, d]
  diff = x.astype(jnp.float32) - assigned
  return jnp.sum(diff * diff, axis=(1, 2))


def kmeans_plusplus_init(x: jax.Array, k: int, *, key: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii, 2007), each batch row independently.

  The first centroid is a uniformly random point; each next one is a point drawn with
  probability proportional to its squared distance to the nearest centroid chosen so
  far (a point already chosen has probability 0; if every distance is 0, uniform). This
  is the plain algorithm: scikit-learn's `kmeans_plusplus` is the greedy variant (it
  draws 2 + log k candidates per step and keeps the one that lowers the potential
  most), so the two give different seeds from the same data.

  Args:
    x: points [batch, n, d] (float32, bfloat16 or float16).
    k: centroids to choose, a Python int in [1, n].
    key: a `jax.random` key; batch row b uses `jax.random.split(key, batch)[b]`.

  Returns:
    [batch, k, d] in x's dtype: k points of each row (exact copies). O(n d) work and
    O(n) extra memory per centroid (distances in float32 from differences).
  """
  op = "kmeans_plusplus_init"
  _, n, _ = _check_points(x, op)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"{op}: k must be a Python int in [1, n={n}], got {k!r}.")
  k = int(k)
  typed = hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
  if not (typed and key.shape == ()) and not raw:
    raise ValueError(
      f"{op}: key must be a single jax.random key (jax.random.key(s) or PRNGKey(s)), got "
      f"{getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}."
    )
  return _plusplus(x, key, k)


@functools.partial(jax.jit, static_argnums=(2,))
def _plusplus(x, key, k: int):
  return jax.vmap(functools.partial(_plusplus_one, k=k))(x, jax.random.split(key, x.shape[0]))


def _plusplus_one(x, key, *, k: int):
  """k-means++ seeds of one row x [n, d]."""
  x32 = x.astype(jnp.float32)
  n = x.shape[0]
  key, first_key = jax.random.split(key)

  def sq_dist(center):
    diff = x32 - center
    return jnp.sum(diff * diff, axis=-1)  # [n]

  first = jax.random.randint(first_key, (), 0, n)
  chosen = jnp.zeros((k,), jnp.int32).at[0].set(first)

  def step(i, carry):
    chosen, d2, key = carry
    key, sub = jax.random.split(key)
    logits = jnp.where(jnp.sum(d2) > 0, jnp.log(d2), 0.0)  # log 0 = -inf: never drawn
    j = jax.random.categorical(sub, logits).astype(jnp.int32)
    return chosen.at[i].set(j), jnp.minimum(d2, sq_dist(x32[j])), key

  chosen, _, _ = jax.lax.fori_loop(1, k, step, (chosen, sq_dist(x32[first]), key))
  return x[chosen]

"""K-means assignment kernels (Lloyd's E-step), and the tile math they share with the
XLA path of `sparse_attention.ops.kmeans`.

`gpu.py` (Triton), `mosaic_gpu.py` (Mosaic GPU, Hopper) and `tpu.py` (Mosaic TPU) each
compute, for every point, the index of its nearest centroid: a program holds a tile of
points and walks the centroids tile by tile, keeping a running minimum distance and its
index (an online argmin, as flash attention keeps a running max). The centroid update
(segment sums) is not a kernel: see `ops/kmeans.py`.

One distance, everywhere (reference, xla, every kernel), in float32:

  dist(x, c) = (||x||^2 - 2 x.c) + ||c||^2

evaluated in that order, with ||x||^2 and ||c||^2 computed once per call by
`squared_norms` (plain jnp, outside the kernels) and x.c a float32 matmul at full
precision (`Precision.HIGHEST`: no bf16 passes on TPU, no TF32 on GPU; Mosaic GPU's
wgmma sums exact products of bf16 parts that add up to the operands). The
implementations then differ only in the summation order of x.c (the matmul's), so exact
ties stay ties where the inputs are exact (small integers, as in the tests). Ties go to
the lower centroid index: inside a tile by taking the smallest index attaining the
minimum, across tiles because tiles are walked in ascending order and a later tile
replaces the running minimum only if strictly smaller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention.pallas_kernels.block_sparse.common import Unsupported

__all__ = ["Unsupported", "argmin_update", "distances", "squared_norms"]

# The within-tile argmin runs on float32 indices (Mosaic reduces float vectors on every
# TPU generation); they are exact below 2**24.
MAX_CENTROIDS = 2**24


def squared_norms(a: jax.Array) -> jax.Array:
  """||a||^2 over the last axis, float32 (a upcast first)."""
  a = a.astype(jnp.float32)
  return jnp.sum(a * a, axis=-1)


def distances(xx: jax.Array, xc: jax.Array, cc: jax.Array) -> jax.Array:
  """Squared distances (xx - 2 xc) + cc, float32, broadcasting xx / cc against the
  [points, centroids] (or transposed) tile xc. Padding centroids carry cc = +inf."""
  return (xx - 2.0 * xc) + cc


def argmin_update(
  dist: jax.Array,  # f32 [..., bn, bk] (axis=-1) or [bk, bn] (axis=0): one tile
  axis: int,  # the centroid axis of `dist`
  start,  # int32 index of the tile's first centroid
  best: jax.Array,  # f32, dist's shape with `axis` of size 1: running min (+inf at first)
  arg: jax.Array,  # int32, like best: its centroid index
) -> tuple[jax.Array, jax.Array]:
  """One step of the online argmin over centroid tiles: (best, arg) after this tile.

  Ties go to the lower index: the smallest index attaining the tile's minimum, and a
  later tile wins only if strictly smaller. Written with plain jnp so that it lowers in
  Triton and Mosaic kernels and runs batched in the XLA path.
  """
  axis = axis % dist.ndim
  tile_min = jnp.min(dist, axis=axis, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, dist.shape, axis).astype(jnp.float32)
  size = jnp.float32(dist.shape[axis])
  first = jnp.min(jnp.where(dist == tile_min, index, size), axis=axis, keepdims=True)
  better = tile_min < best
  return jnp.where(better, tile_min, best), jnp.where(better, first.astype(jnp.int32) + start, arg)

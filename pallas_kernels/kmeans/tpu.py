"""K-means assignment for TPUs: Pallas with the Mosaic lowering.

One `pl.pallas_call`, grid (batch, n_tiles, k_tiles): step (b, i, t) takes points
[i * block_n, (i + 1) * block_n) of batch row b and centroid tile t, and updates a
running minimum and its index in VMEM scratch (the online argmin over the "arbitrary"
last axis, as flash attention's kv axis); the last centroid tile writes the indices.
The points' block index does not change along t, so Pallas DMAs them once per point
tile; centroid tiles stream (double-buffered).

The tile is transposed, centroids on sublanes and points on lanes:

  cx   = c_tile @ x.T                        f32 [block_k, block_n], Precision.HIGHEST
  dist = (||x||^2 - 2 cx) + ||c_tile||^2     ||x||^2 a [1, block_n] row, ||c||^2 a
                                             [block_k, 1] column (`kmeans.distances`)
  (best, arg) <- online argmin over axis 0   [1, block_n] rows (`kmeans.argmin_update`)

so the per-point results are lane-dense rows: the output int32 [batch, 1, n_pad] is
written in dense (1, block_n) stores, with no sublane-to-lane relayout of a reduction.

Padding: the wrapper pads the points to a multiple of block_n and the centroids to a
multiple of block_k with ||c||^2 = +inf (never nearest). d is a whole dim of every
block, so any d tiles. bfloat16 / float16 points are upcast in VMEM; centroids are f32.

Policy (`check_supported`, shapes alone): block_n a multiple of 128 (the lanes of the
output rows), block_k a multiple of 8 (sublanes), and the double-buffered blocks plus
the distance tile within VMEM_BUDGET (this bounds d: about 11k at the smallest tiles).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparse_attention.pallas_kernels import kmeans as common

# Bytes of VMEM the blocks of one step may take: below the 16 MiB default scoped limit
# of v5e (v6e: 32 MiB), leaving room for Mosaic's own temporaries.
VMEM_BUDGET = 12 * 2**20


def _round_up(a: int, m: int) -> int:
  return -(-a // m) * m


def default_blocks(n: int, k: int, d: int) -> tuple[int, int]:
  """(block_n, block_k): 512 points x 256 centroids (a 512 KiB f32 distance tile); for
  large d fewer points, then fewer centroids, so that the blocks fit VMEM_BUDGET; small
  problems take one tile."""
  block_n, block_k = min(512, _round_up(n, 128)), min(256, _round_up(k, 8))
  while block_n > 128 and _vmem_bytes(block_n, block_k, d) > VMEM_BUDGET:
    block_n //= 2
  while block_k > 8 and _vmem_bytes(block_n, block_k, d) > VMEM_BUDGET:
    block_k = max(8, _round_up(block_k // 2, 8))
  return block_n, block_k


def _vmem_bytes(block_n: int, block_k: int, d: int) -> int:
  """Two buffers of the point and centroid blocks (f32, d padded to lanes), the
  distance tile and its index tile, and the small rows and columns."""
  lanes = _round_up(d, 128)
  return 4 * (2 * (block_n + block_k) * lanes + 3 * block_k * block_n + 8 * block_n)


def check_supported(
  x_shape: tuple[int, int, int],  # [batch, n, d]
  k: int,
  *,
  block_n: int | None = None,
  block_k: int | None = None,
) -> None:
  """Raises `Unsupported` if the Mosaic kernel cannot take the call (shapes only)."""
  _, n, d = x_shape
  if k > common.MAX_CENTROIDS:
    raise common.Unsupported(f"the TPU k-means kernel supports k <= 2**24, got {k}.")
  default_n, default_k = default_blocks(n, k, d)
  bn, bk = block_n or default_n, block_k or default_k
  if bn % 128:
    raise common.Unsupported(
      f"the TPU k-means kernel needs block_n to be a multiple of 128 (points lie on "
      f"lanes), got {bn}."
    )
  if bk % 8:
    raise common.Unsupported(
      f"the TPU k-means kernel needs block_k to be a multiple of 8 (sublanes), got {bk}."
    )
  if _vmem_bytes(bn, bk, d) > VMEM_BUDGET:
    raise common.Unsupported(
      f"the TPU k-means kernel's blocks at block_n={bn}, block_k={bk}, d={d} need "
      f"{_vmem_bytes(bn, bk, d)} bytes of VMEM, over its budget of {VMEM_BUDGET}."
    )


def _assign_kernel(x_ref, xx_ref, c_ref, cc_ref, arg_ref, best_ref, index_ref, *, block_k):
  """Step (b, i, t): points tile i against centroid tile t."""
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, jnp.inf, jnp.float32)
    index_ref[...] = jnp.zeros(index_ref.shape, jnp.int32)

  x = x_ref[...].astype(jnp.float32)  # [bn, d]
  cx = jax.lax.dot_general(
    c_ref[...], x, (((1,), (1,)), ((), ())),
    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )  # [bk, bn]  # fmt: skip
  dist = common.distances(xx_ref[...], cx, cc_ref[...])
  best, index = common.argmin_update(dist, 0, t * block_k, best_ref[...], index_ref[...])
  best_ref[...] = best
  index_ref[...] = index

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    arg_ref[...] = index_ref[...]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "interpret"))
def assign_tpu(
  x: jax.Array,  # [batch, n, d] float32 / bfloat16 / float16
  xx: jax.Array,  # f32 [batch, n]: squared_norms(x)
  centroids: jax.Array,  # f32 [batch, k, d]
  cc: jax.Array,  # f32 [batch, k]: squared_norms(centroids)
  *,
  block_n: int | None = None,
  block_k: int | None = None,
  interpret: Any = False,
) -> jax.Array:
  """The index of each point's nearest centroid, int32 [batch, n] (ties: lower index).

  Args:
    x, xx, centroids, cc: the points, the centroids and their squared norms.
    block_n, block_k: points per step (a multiple of 128), centroids per step (a
      multiple of 8); None: `default_blocks`.
    interpret: False (compile with Mosaic), True (the Pallas TPU interpreter on any
      backend, raising on out-of-bounds reads) or a `pltpu.InterpretParams`.

  Raises:
    Unsupported: see `check_supported`.
  """
  b, n, d = x.shape
  k = centroids.shape[1]
  check_supported(x.shape, k, block_n=block_n, block_k=block_k)
  if interpret is True:
    interpret = pltpu.InterpretParams(out_of_bounds_reads="raise")
  default_n, default_k = default_blocks(n, k, d)
  bn, bk = block_n or default_n, block_k or default_k
  n_pad, k_pad = _round_up(n, bn), _round_up(k, bk)
  if n_pad != n:
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0)))
    xx = jnp.pad(xx, ((0, 0), (0, n_pad - n)))
  c = jnp.pad(centroids.astype(jnp.float32), ((0, 0), (0, k_pad - k), (0, 0)))
  cc = jnp.pad(cc, ((0, 0), (0, k_pad - k)), constant_values=jnp.inf)
  arg = pl.pallas_call(
    functools.partial(_assign_kernel, block_k=bk),
    grid=(b, n_pad // bn, k_pad // bk),
    in_specs=[
      pl.BlockSpec((None, bn, d), lambda j, i, t: (j, i, 0)),
      pl.BlockSpec((None, 1, bn), lambda j, i, t: (j, 0, i)),
      pl.BlockSpec((None, bk, d), lambda j, i, t: (j, t, 0)),
      pl.BlockSpec((None, bk, 1), lambda j, i, t: (j, t, 0)),
    ],
    out_specs=pl.BlockSpec((None, 1, bn), lambda j, i, t: (j, 0, i)),
    out_shape=jax.ShapeDtypeStruct((b, 1, n_pad), jnp.int32),
    scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32), pltpu.VMEM((1, bn), jnp.int32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="kmeans_assign_tpu",
  )(x, xx[:, None, :], c, cc[:, :, None])
  return arg[:, 0, :n]

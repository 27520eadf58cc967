"""K-means assignment for GPUs: Pallas with the Triton lowering.

One `pl.pallas_call`, grid (n_tiles, batch): the program at (i, b) loads points
[i * block_n, (i + 1) * block_n) of batch row b, [block_n, d] (held in registers for the
whole program), and walks the centroids of row b in tiles of block_k, loaded straight
from HBM by `pl.ds` (the whole centroid array is the program's block, i.e. a pointer):

  xc   = x @ c_tile.T                        f32 [block_n, block_k], Precision.HIGHEST
  dist = (||x||^2 - 2 xc) + ||c_tile||^2     (`kmeans.distances`)
  (best, arg) <- online argmin               (`kmeans.argmin_update`, ties to the lower index)

and writes arg, int32 [block_n]. ||x||^2 and ||c||^2 come from the wrapper
(`kmeans.squared_norms`), the same numbers every implementation uses.

Padding: the wrapper pads the points to a multiple of block_n (their results are cut
off) and the centroids to a multiple of block_k with ||c||^2 = +inf, so padding
centroids are never nearest; d is padded to a power of two inside the blocks and masked
on load (zeros add nothing to a dot product). bfloat16 / float16 points are loaded in
their dtype and upcast in registers; centroids are float32.

Precision: float32 matmuls at HIGHEST lower to Triton's "ieee" fp32 dot (CUDA cores,
not TF32 tensor cores): TF32's 10-bit mantissa would move points that lie near a
boundary to another cluster, and the tests compare assignments with scikit-learn's.

Policy (`check_supported`, from shapes alone): d <= MAX_DIM (the [block_n, d] tile of
points stays in registers), block sizes powers of two >= 16, int32 offsets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_attention.pallas_kernels import kmeans as common

MAX_DIM = 256
MIN_BLOCK = 16
MAX_ELEMENTS = 2**31 - 1


def default_blocks(n: int, k: int, d: int) -> tuple[int, int]:
  """(block_n, block_k): 64 x 64 distance tiles; 32 centroids per tile at d > 128, so
  that the f32 [block_n, d] points and [block_k, d] centroid tile fit the registers and
  shared memory of 4 warps. Small problems take smaller tiles (>= 16)."""
  block_n = min(64, max(MIN_BLOCK, pl.next_power_of_2(n)))
  block_k = min(64 if d <= 128 else 32, max(MIN_BLOCK, pl.next_power_of_2(k)))
  return block_n, block_k


def check_supported(
  x_shape: tuple[int, int, int],  # [batch, n, d]
  k: int,
  *,
  block_n: int | None = None,
  block_k: int | None = None,
) -> None:
  """Raises `Unsupported` if this kernel cannot take the call (shapes only)."""
  b, n, d = x_shape
  if d > MAX_DIM:
    raise common.Unsupported(
      f"the Triton k-means kernel keeps a [block_n, d] tile of points in registers and "
      f"supports d <= {MAX_DIM}; got d={d}."
    )
  if k > common.MAX_CENTROIDS:
    raise common.Unsupported(f"the Triton k-means kernel supports k <= 2**24, got {k}.")
  default_n, default_k = default_blocks(n, k, d)
  block_n, block_k = block_n or default_n, block_k or default_k
  for name, block in (("block_n", block_n), ("block_k", block_k)):
    if block < MIN_BLOCK or block & (block - 1):
      raise common.Unsupported(
        f"the Triton k-means kernel needs {name} to be a power of two >= {MIN_BLOCK}, got {block}."
      )
  padded = b * (n + block_n) * pl.next_power_of_2(d)
  if padded > MAX_ELEMENTS:
    raise common.Unsupported(
      f"the Triton k-means kernel addresses points with int32 offsets; batch x padded n x "
      f"padded d = {padded} elements exceeds 2**31 - 1."
    )


def _load(ref, d: int) -> jax.Array:
  """A [rows, d_padded] tile as float32, zero past d."""
  padded = ref.shape[-1]
  if padded == d:
    return ref[...].astype(jnp.float32)
  tile = plgpu.load(ref, mask=(jnp.arange(padded) < d)[None, :], other=0.0)
  return tile.astype(jnp.float32)


def _assign_kernel(x_ref, xx_ref, c_ref, cc_ref, arg_ref, *, d: int, block_k: int):
  """Program (i, b): the nearest centroid of each of block_n points."""
  x = _load(x_ref, d)  # [bn, dp]
  xx = xx_ref[...][:, None]  # [bn, 1]
  block_n = x.shape[0]

  def step(t, carry):
    rows = pl.ds(t * block_k, block_k)
    c = c_ref[rows, :]  # [bk, dp] f32, zero-padded by the wrapper
    xc = jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    dist = common.distances(xx, xc, cc_ref[rows][None, :])  # [bn, bk]
    return common.argmin_update(dist, 1, t * block_k, *carry)

  init = (jnp.full((block_n, 1), jnp.inf, jnp.float32), jnp.zeros((block_n, 1), jnp.int32))
  _, arg = jax.lax.fori_loop(0, c_ref.shape[0] // block_k, step, init)
  arg_ref[...] = arg[:, 0]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "interpret"))
def assign_triton(
  x: jax.Array,  # [batch, n, d] float32 / bfloat16 / float16
  xx: jax.Array,  # f32 [batch, n]: squared_norms(x)
  centroids: jax.Array,  # f32 [batch, k, d]
  cc: jax.Array,  # f32 [batch, k]: squared_norms(centroids)
  *,
  block_n: int | None = None,
  block_k: int | None = None,
  interpret: bool = False,
) -> jax.Array:
  """The index of each point's nearest centroid, int32 [batch, n] (ties: lower index).

  Args:
    x, xx, centroids, cc: the points, the centroids and their squared norms.
    block_n, block_k: points per program, centroids per loop step (powers of two
      >= 16); None: `default_blocks`.
    interpret: run in the Pallas interpreter (any backend) instead of compiling.

  Raises:
    Unsupported: see `check_supported`.
  """
  b, n, d = x.shape
  k = centroids.shape[1]
  check_supported(x.shape, k, block_n=block_n, block_k=block_k)
  default_n, default_k = default_blocks(n, k, d)
  bn, bk = block_n or default_n, block_k or default_k
  n_pad, k_pad, dp = pl.cdiv(n, bn) * bn, pl.cdiv(k, bk) * bk, pl.next_power_of_2(d)
  if n_pad != n:
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0)))
    xx = jnp.pad(xx, ((0, 0), (0, n_pad - n)))
  c = jnp.pad(centroids.astype(jnp.float32), ((0, 0), (0, k_pad - k), (0, dp - d)))
  cc = jnp.pad(cc, ((0, 0), (0, k_pad - k)), constant_values=jnp.inf)
  arg = pl.pallas_call(
    functools.partial(_assign_kernel, d=d, block_k=bk),
    grid=(n_pad // bn, b),
    in_specs=[
      pl.BlockSpec((None, bn, dp), lambda i, j: (j, i, 0)),
      pl.BlockSpec((None, bn), lambda i, j: (j, i)),
      pl.BlockSpec((None, k_pad, dp), lambda i, j: (j, 0, 0)),
      pl.BlockSpec((None, k_pad), lambda i, j: (j, 0)),
    ],
    out_specs=pl.BlockSpec((None, bn), lambda i, j: (j, i)),
    out_shape=jax.ShapeDtypeStruct((b, n_pad), jnp.int32),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="kmeans_assign_triton",
  )(x, xx, c, cc)
  return arg[:, :n]

"""K-means assignment for Hopper GPUs (sm90+): Pallas on Mosaic GPU.

One `plgpu.kernel`, grid (n_tiles, batch), one CTA per tile of block_n points of a
batch row: block_n // 64 consumer warpgroups of 64 points each and one producer
warpgroup. The consumers TMA-copy their points into SMEM once; the producer streams
the row's centroids, tile by tile of block_k, into a two-slot SMEM ring (TMA, a
`consumed` barrier per slot). Per centroid tile a consumer computes

  xc   = x @ c_tile.T                        f32 [64, block_k], wgmma (see Precision)
  dist = (||x||^2 - 2 xc) + ||c_tile||^2     (`kmeans.distances`)
  (best, arg) <- online argmin               ties to the lower index (`_argmin_update`)

and writes arg, int32 [64], through SMEM. ||x||^2 and ||c||^2 come from the wrapper
(`kmeans.squared_norms`), the same numbers every implementation uses.

Precision: wgmma takes bf16/f16 operands, or f32 ones that it reads as TF32 (a 10-bit
mantissa: points near a boundary would move to another cluster, and the centroids are
always f32, also for bf16 points). So the wrapper splits the operands into bf16 parts
that sum to them exactly (`split_bf16`): centroids (f32) into 3 parts (hi, mid, lo: 3 x
8 bits cover f32's 24), float32 points into 3, float16 points into 2, bfloat16 points
are 1. x.c is the sum of the part products x_i . c_j with i + j <= 2 (the dropped ones
add up to at most ~2**-23 of |x||c|: f32's own rounding), smallest first, each product
exact in the f32 accumulator: f32-accurate like the Triton kernel's ieee dot (the same
numbers up to rounding in the summation), at 3 wgmmas per tile for bf16 points, 5 for
f16 and 6 for f32 ones (Hopper's bf16 tensor cores run ~15x its f32 FMA rate). Parts
of values below ~2**-110 underflow (bf16 has f32's exponent range): an absolute error
far below any distance the expansion resolves.

Padding: the wrapper pads the points to a multiple of block_n (results cut off), the
centroids to a multiple of block_k with ||c||^2 = +inf (never nearest) and d to a
multiple of 64 with zeros (wgmma's K granule for 128-byte swizzled bf16 rows).

Policy (`check_supported`, shapes and dtypes only): block_n 64 or 128, block_k a
multiple of 8 up to 256 (wgmma's N), the SMEM of the point parts and the centroid ring
within SMEM_BUDGET (this bounds d: 384 for f32 points, 576 for f16, 896 for bf16),
batch <= 65535 (the grid's second dim). Mosaic GPU's interpreter (jax >= 0.11.2) runs
the kernel on CPU (`interpret=True`); it takes wgmma operands from SMEM, as this kernel
does anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparse_attention.pallas_kernels import kmeans as common

ROWS = 64  # points per consumer warpgroup: one wgmma M tile
BLOCK_N = (64, 128)
MAX_BLOCK_K = 256  # wgmma's largest N
STAGES = 2  # centroid tiles in flight (the SMEM ring)
D_GRANULE = 64  # d is padded to this: 128-byte rows of bf16 (the swizzle)
C_PARTS = 3  # bf16 parts of the f32 centroids
# SMEM the buffers may take: below the 227 KiB of an sm90 CTA, leaving room for the
# barriers and the 1 KiB alignment of swizzled buffers.
SMEM_BUDGET = 200 * 1024
MAX_BATCH = 65535

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a [64, n] wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def x_parts(dtype: Any) -> int:
  """bf16 parts that hold a point of this dtype exactly (f32: 3, f16: 2, bf16: 1)."""
  return {"float32": 3, "float16": 2, "bfloat16": 1}[jnp.dtype(dtype).name]


def split_bf16(a: jax.Array, parts: int) -> jax.Array:
  """bf16 [parts, *a.shape] summing to a (exactly, for parts >= 24 / 8 of its mantissa
  bits): each part is the bf16 rounding of what the previous ones left; the remainders
  are exact in f32."""
  rest, out = a.astype(jnp.float32), []
  for _ in range(parts):
    part = rest.astype(jnp.bfloat16)
    out.append(part)
    rest = rest - part.astype(jnp.float32)
  return jnp.stack(out)


def _pairs(parts: int) -> tuple[tuple[int, int], ...]:
  """(point part, centroid part) products that make x.c, smallest first."""
  pairs = [(i, j) for i in range(parts) for j in range(C_PARTS) if i + j <= 2]
  return tuple(sorted(pairs, key=lambda p: -sum(p)))


def _padded_d(d: int) -> int:
  return -(-d // D_GRANULE) * D_GRANULE


def _smem_bytes(block_n: int, block_k: int, d: int, parts: int) -> int:
  """The point parts, the centroid ring (parts and norms), the norms and results."""
  dp = _padded_d(d)
  points = block_n * (2 * parts * dp + 8)
  return points + STAGES * block_k * (2 * C_PARTS * dp + 4)


def default_blocks(n: int, k: int, d: int, dtype: Any = jnp.float32) -> tuple[int, int]:
  """(block_n, block_k): 128 points (2 consumer warpgroups) x 128 centroids; at large d
  fewer centroids (down to 64), then 64 points, then fewer centroids (down to 8), so
  that the SMEM fits SMEM_BUDGET. Small problems take smaller tiles."""
  parts = x_parts(dtype)
  block_n, block_k = 64 if n <= 64 else 128, min(128, -(-k // 8) * 8)
  fits = lambda: _smem_bytes(block_n, block_k, d, parts) <= SMEM_BUDGET
  while not fits() and block_k > 64:
    block_k = max(64, block_k // 2)
  if not fits():
    block_n = 64
  while not fits() and block_k > 8:
    block_k = max(8, block_k // 2 // 8 * 8)
  return block_n, block_k


def check_supported(
  x_shape: tuple[int, int, int],  # [batch, n, d]
  k: int,
  *,
  dtype: Any = jnp.float32,
  block_n: int | None = None,
  block_k: int | None = None,
) -> None:
  """Raises `Unsupported` if this kernel cannot take the call (shapes, dtype)."""
  b, n, d = x_shape
  if not any(jnp.dtype(dtype) == t for t in (jnp.float32, jnp.bfloat16, jnp.float16)):
    raise common.Unsupported(
      f"the Mosaic GPU k-means kernel takes float32, bfloat16 or float16 points, got {dtype}."
    )
  if k > common.MAX_CENTROIDS:
    raise common.Unsupported(f"the Mosaic GPU k-means kernel supports k <= 2**24, got {k}.")
  if b > MAX_BATCH:
    raise common.Unsupported(
      f"the Mosaic GPU k-means kernel supports batch <= {MAX_BATCH} (a grid dim), got {b}."
    )
  default_n, default_k = default_blocks(n, k, d, dtype)
  block_n, block_k = block_n or default_n, block_k or default_k
  if block_n not in BLOCK_N:
    raise common.Unsupported(
      f"the Mosaic GPU k-means kernel needs block_n in {BLOCK_N}, got {block_n}."
    )
  if block_k % 8 or not 8 <= block_k <= MAX_BLOCK_K:
    raise common.Unsupported(
      f"the Mosaic GPU k-means kernel needs block_k to be a multiple of 8 in [8, "
      f"{MAX_BLOCK_K}] (wgmma's N), got {block_k}."
    )
  size = _smem_bytes(block_n, block_k, d, x_parts(dtype))
  if size > SMEM_BUDGET:
    raise common.Unsupported(
      f"the Mosaic GPU k-means kernel's SMEM ({size} bytes at block_n={block_n}, "
      f"block_k={block_k}, d={d}, {jnp.dtype(dtype).name} points) exceeds {SMEM_BUDGET}."
    )


# ---------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------


def _dot(x_parts_smem, c_parts_smem, parts: int, block_k: int) -> jax.Array:
  """f32 [64, block_k]: sum of the part products x_i @ c_j.T (`_pairs`), wgmma into one
  accumulator (each an exact product, accumulated in f32)."""

  def products(acc_ref):
    for i, j in _pairs(parts):
      plgpu.wgmma(acc_ref, x_parts_smem.at[i], c_parts_smem.at[j].transpose((1, 0)))
    return acc_ref[...]

  return pl.run_scoped(products, plgpu.ACC((ROWS, block_k), jnp.float32))


def _argmin_update(dist, start, best, arg):
  """The online argmin over [64, bk] tiles in the wgmma layout (`kmeans.argmin_update`
  for this layout): the smallest index at the tile's minimum; a later tile wins only
  if strictly smaller."""
  shape = dist.shape
  tile_min = jnp.min(dist, axis=1)  # [64]
  index = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  at_min = dist == lax.broadcast_in_dim(tile_min, shape, (0,))
  first = jnp.min(jnp.where(at_min, index, shape[1]), axis=1)
  better = tile_min < best
  return jnp.where(better, tile_min, best), jnp.where(better, first + start, arg)


def _producer(c_ref, cc_ref, c_smem, cc_smem, c_bar, consumed, *, block_k: int):
  """Streams centroid tile t of this CTA's batch row into ring slot t % STAGES once its
  previous tenant is consumed (one copy per part and one for the norms, each on its own
  barrier: TMA boxes have at most 5 dims); then waits out the last consumed phases."""
  b, k_tiles = lax.axis_index("b"), cc_ref.shape[1] // block_k

  def step(t, _):
    slot, tile = lax.rem(t, STAGES), pl.ds(t * block_k, block_k)
    bar = lambda j: c_bar.at[slot * (C_PARTS + 1) + j]  # slot's barrier j

    @pl.when(t >= STAGES)
    def _():
      plgpu.barrier_wait(consumed.at[slot])

    for j in range(C_PARTS):
      plgpu.copy_gmem_to_smem(c_ref.at[b, j, tile], c_smem.at[slot, j], bar(j))
    plgpu.copy_gmem_to_smem(cc_ref.at[b, tile], cc_smem.at[slot], bar(C_PARTS))

  lax.fori_loop(0, k_tiles, step, None)
  drain = lambda t, _: plgpu.barrier_wait(consumed.at[lax.rem(t, STAGES)])
  lax.fori_loop(jnp.maximum(k_tiles - STAGES, 0), k_tiles, drain, None)


def _assign_kernel(x_ref, xx_ref, c_ref, cc_ref, arg_ref, scratch, barriers, *, block_k: int):
  """CTA (i, b): x_ref bf16 [B, P, n_pad, dp], xx_ref f32 [B, n_pad], c_ref bf16
  [B, 3, k_pad, dp], cc_ref f32 [B, k_pad] (+inf past k) -> arg_ref int32 [B, n_pad]."""
  x_smem, xx_smem, c_smem, cc_smem, arg_smem = scratch
  x_bar, c_bar, consumed = barriers
  wg, wgs = lax.axis_index("wg"), x_smem.shape[0]

  @pl.when(wg == wgs)
  def _producer_warpgroup():
    _producer(c_ref, cc_ref, c_smem, cc_smem, c_bar, consumed, block_k=block_k)

  @pl.when(wg < wgs)
  def _consumer():
    b, rows = lax.axis_index("b"), pl.ds((lax.axis_index("n") * wgs + wg) * ROWS, ROWS)
    parts = x_smem.shape[1]
    bar = lambda i: x_bar.at[wg * (parts + 1) + i]  # one per part, one for the norms
    for i in range(parts):
      plgpu.copy_gmem_to_smem(x_ref.at[b, i, rows], x_smem.at[wg, i], bar(i))
    plgpu.copy_gmem_to_smem(xx_ref.at[b, rows], xx_smem.at[wg], bar(parts))
    for i in range(parts + 1):
      plgpu.barrier_wait(bar(i))
    xx = lax.broadcast_in_dim(plgpu.load(xx_smem.at[wg], layout=_ROW), (ROWS, block_k), (0,))

    def step(t, carry):
      slot = lax.rem(t, STAGES)
      for j in range(C_PARTS + 1):
        plgpu.barrier_wait(c_bar.at[slot * (C_PARTS + 1) + j])  # its parts, its norms
      xc = _dot(x_smem.at[wg], c_smem.at[slot], parts, block_k)
      cc = plgpu.load(cc_smem.at[slot], layout=_COL)
      plgpu.barrier_arrive(consumed.at[slot])
      dist = common.distances(xx, xc, lax.broadcast_in_dim(cc, (ROWS, block_k), (1,)))
      return _argmin_update(dist, t * block_k, *carry)

    init = (plgpu.layout_cast(jnp.full((ROWS,), jnp.inf, jnp.float32), _ROW),)
    init += (plgpu.layout_cast(jnp.zeros((ROWS,), jnp.int32), _ROW),)
    _, arg = lax.fori_loop(0, cc_ref.shape[1] // block_k, step, init)
    arg_smem.at[wg][...] = arg
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(arg_smem.at[wg], arg_ref.at[b, rows])
    plgpu.wait_smem_to_gmem(0)


def _smem(shape) -> Any:
  """bf16 wgmma operand tiles: 128-byte rows, swizzled."""
  transforms = (plgpu.TilingTransform((8, D_GRANULE)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, jnp.bfloat16, transforms=transforms)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "interpret"))
def assign_mosaic_gpu(
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
    block_n, block_k: points per CTA (64 or 128: one or two consumer warpgroups),
      centroids per ring slot (a multiple of 8 up to 256); None: `default_blocks`.
    interpret: run in Mosaic GPU's interpreter (on CPU) instead of compiling.

  Raises:
    Unsupported: see `check_supported`.
  """
  b, n, d = x.shape
  k = centroids.shape[1]
  check_supported(x.shape, k, dtype=x.dtype, block_n=block_n, block_k=block_k)
  default_n, default_k = default_blocks(n, k, d, x.dtype)
  bn, bk = block_n or default_n, block_k or default_k
  n_pad, k_pad, dp, parts = pl.cdiv(n, bn) * bn, pl.cdiv(k, bk) * bk, _padded_d(d), x_parts(x.dtype)
  x_split = jnp.pad(split_bf16(x, parts), ((0, 0), (0, 0), (0, n_pad - n), (0, dp - d)))
  c_split = jnp.pad(split_bf16(centroids, C_PARTS), ((0, 0), (0, 0), (0, k_pad - k), (0, dp - d)))
  xx = jnp.pad(xx, ((0, 0), (0, n_pad - n)))
  cc = jnp.pad(cc, ((0, 0), (0, k_pad - k)), constant_values=jnp.inf)
  wgs = bn // ROWS
  scratch = (
    _smem((wgs, parts, ROWS, dp)),  # points
    plgpu.SMEM((wgs, ROWS), jnp.float32),  # ||x||^2
    _smem((STAGES, C_PARTS, bk, dp)),  # centroid ring
    plgpu.SMEM((STAGES, bk), jnp.float32),  # ||c||^2 ring
    plgpu.SMEM((wgs, ROWS), jnp.int32),  # results
  )
  barriers = (
    plgpu.Barrier(num_barriers=wgs * (parts + 1)),  # point parts, their norms
    plgpu.Barrier(num_barriers=STAGES * (C_PARTS + 1)),  # centroid tile parts, norms
    plgpu.Barrier(num_arrivals=wgs, num_barriers=STAGES),  # slot consumed
  )
  arg = plgpu.kernel(
    functools.partial(_assign_kernel, block_k=bk),
    out_type=jax.ShapeDtypeStruct((b, n_pad), jnp.int32),
    scratch_types=[scratch, barriers],
    grid=(n_pad // bn, b),
    grid_names=("n", "b"),
    num_threads=wgs + 1,
    thread_name="wg",
    interpret=plgpu.InterpretGPUParams() if interpret else None,
    kernel_name="kmeans_assign_mosaic_gpu",
  )(
    jnp.moveaxis(x_split, 0, 1),  # [B, P, n_pad, dp]
    xx,
    jnp.moveaxis(c_split, 0, 1),  # [B, 3, k_pad, dp]
    cc,
  )
  return arg[:, :n]

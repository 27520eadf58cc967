"""ops.kmeans: every implementation (reference, xla, the Triton, Mosaic GPU and Mosaic TPU
kernels interpreted on CPU) against scikit-learn's Lloyd KMeans from the same init, the
reference against a NumPy brute force, and the edge semantics (ties, empty clusters,
iterations=0, bfloat16, jit, argument errors, kernel refusals, dispatch, lowering for CUDA
and TPU)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from sklearn.cluster import KMeans

from sparse_attention import ops
from sparse_attention.pallas_kernels import kmeans as common
from sparse_attention.pallas_kernels.kmeans import gpu, mosaic_gpu, tpu

# (implementation, extra kwargs): the xla path at its default tiles and at small ragged
# ones (several chunks and centroid tiles, none full), the kernels likewise.
IMPLS = {
  "reference": ("reference", {}),
  "xla": ("xla", {}),
  "xla_small_tiles": ("xla", dict(block_n=96, block_k=7)),
  "triton": ("pallas_triton", dict(interpret=True, block_n=64, block_k=16)),
  "mosaic_gpu": ("pallas_mosaic_gpu", dict(interpret=True, block_n=128, block_k=8)),
  "tpu": ("pallas_tpu", dict(interpret=True, block_n=128, block_k=8)),
}
# Mosaic GPU's interpreter takes ~0.1 s per CTA and call: the full-size op tests leave it
# out, and `test_mosaic_gpu_*` run it on smaller data.
FULL_SIZE = [name for name in IMPLS if name != "mosaic_gpu"]
BATCH, N, D, K, ITERATIONS = 2, 700, 24, 20, 6


def _default_tiles(name: str):
  """IMPLS[name] at the implementation's default tiles (fewer interpreted steps)."""
  impl, kwargs = IMPLS[name]
  return impl, {key: v for key, v in kwargs.items() if key == "interpret"}


def _blobs(batch: int, n: int, d: int, k: int, seed: int) -> np.ndarray:
  """float32 [batch, n, d]: points around k random centres that overlap enough for
  Lloyd to move for several iterations."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(batch, k, d)) * 3.0
  which = rng.integers(0, k, size=(batch, n))
  points = np.take_along_axis(centres, which[..., None], axis=1) + rng.normal(size=(batch, n, d))
  return points.astype(np.float32)


def _data(seed: int = 0):
  x = _blobs(BATCH, N, D, K, seed)
  rng = np.random.default_rng(seed + 100)
  init = np.stack([x[b, rng.choice(N, K, replace=False)] for b in range(BATCH)])
  return x, init


def _run(name: str, x, init, iterations: int):
  impl, kwargs = IMPLS[name]
  return ops.kmeans(jnp.asarray(x), jnp.asarray(init), iterations=iterations,
                    implementation=impl, **kwargs)  # fmt: skip


def _numpy_lloyd(x: np.ndarray, init: np.ndarray, iterations: int):
  """Brute force in float64: direct differences, first minimum, empty clusters keep."""
  x, c = x.astype(np.float64), init.astype(np.float64).copy()

  def assign(c):
    dist = ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)  # [B, n, k]
    return dist.argmin(-1)

  for _ in range(iterations):
    a = assign(c)
    for b in range(x.shape[0]):
      for j in range(c.shape[1]):
        members = x[b, a[b] == j]
        if len(members):
          c[b, j] = members.mean(0)
  return c, assign(c)


def _sklearn(x: np.ndarray, init: np.ndarray, iterations: int):
  """scikit-learn's Lloyd from the same init, per batch row (float64)."""
  out = []
  for b in range(x.shape[0]):
    km = KMeans(
      n_clusters=init.shape[1], init=init[b].astype(np.float64), n_init=1,
      max_iter=iterations, algorithm="lloyd", tol=0,
    ).fit(x[b].astype(np.float64))  # fmt: skip
    out.append((km.cluster_centers_, km.labels_, km.inertia_))
  return [np.stack(z) for z in zip(*out, strict=True)]


def _assert_like(centroids, assignments, inertia, want_c, want_a, want_inertia, rtol=1e-4):
  """Centroids and inertia to rtol (relative to the largest |centroid| / the inertia),
  assignments differing on at most 0.1% of the points."""
  centroids = np.asarray(jnp.asarray(centroids, jnp.float32))
  err = np.abs(centroids - want_c).max()
  assert err <= rtol * np.abs(want_c).max(), f"centroids off by {err}"
  np.testing.assert_allclose(np.asarray(inertia), want_inertia, rtol=rtol)
  differ = int((np.asarray(assignments) != want_a).sum())
  assert differ <= 1e-3 * want_a.size, f"{differ} of {want_a.size} assignments differ"


@pytest.mark.parametrize("iterations", [0, 4])
def test_reference_matches_numpy_brute_force(iterations):
  x, init = _data(seed=1)
  c, a = _run("reference", x, init, iterations)
  want_c, want_a = _numpy_lloyd(x, init, iterations)
  assert c.dtype == jnp.float32 and a.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(c), want_c, atol=1e-5 * np.abs(want_c).max())
  np.testing.assert_array_equal(np.asarray(a), want_a)
  if iterations == 0:
    np.testing.assert_array_equal(np.asarray(c), init)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_matches_sklearn_lloyd(name):
  """sklearn's max_iter=T with tol=0 is our iterations=T: it stops early only at a
  fixed point, and re-assigns to the final centers as we do."""
  x, init = _data(seed=5)  # assignments still change in step 6; no cluster empties
  want_c, want_a, want_inertia = _sklearn(x, init, ITERATIONS)
  c, a = _run(name, x, init, ITERATIONS)
  assert c.shape == (BATCH, K, D) and a.shape == (BATCH, N) and a.dtype == jnp.int32
  _assert_like(c, a, ops.kmeans_inertia(jnp.asarray(x), c, a), want_c, want_a, want_inertia)
  # An off-by-one in what `iterations` means would show: one step fewer is far off.
  fewer_c, _, _ = _sklearn(x, init, ITERATIONS - 1)
  assert np.abs(np.asarray(c) - fewer_c).max() > 1e-2


def test_default_is_xla_on_cpu():
  x, init = _data(seed=2)
  c, a = ops.kmeans(jnp.asarray(x), jnp.asarray(init), iterations=2)
  c_xla, a_xla = _run("xla", x, init, 2)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(c_xla))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a_xla))


def _tie_problem():
  """Points and 20 centroids with exact ties (small integers: exact in float32):
  centroids 1 and 17 coincide (tiles 0 and 2 at block_k 8), so do 18 and 19 (one
  tile); the origin is equidistant from centroids 0 (+e0) and 1 (-e0)."""
  d, k = 8, 20
  c = np.zeros((1, k, d), np.float32)
  for j in range(k):
    c[0, j, j % d] = 10.0 + j  # far from everything below
  c[0, 0] = 0
  c[0, 0, 0] = 1.0
  c[0, 1] = 0
  c[0, 1, 0] = -1.0
  c[0, 17] = c[0, 1]
  c[0, 18] = 0
  c[0, 18, 1] = 5.0
  c[0, 19] = c[0, 18]
  x = np.zeros((1, 130, d), np.float32)  # the origin: 0 and 1 (and 17) at distance 1
  x[0, 40:80, 0] = -2.0  # nearest: 1 and its copy 17
  x[0, 80:, 1] = 6.0  # nearest: 18 and its copy 19
  want = np.zeros((1, 130), np.int32)
  want[0, 40:80], want[0, 80:] = 1, 18
  return x, c, want


@pytest.mark.parametrize("name", list(IMPLS))
def test_ties_go_to_the_lower_index(name):
  x, init, want = _tie_problem()
  _, a = _run(name, x, init, 0)
  np.testing.assert_array_equal(np.asarray(a), want)


@pytest.mark.parametrize("name", list(IMPLS))
def test_empty_cluster_keeps_its_centroid(name):
  """Duplicates 17 and 19 lose every tie (never assigned) and the far centroids 2..16
  own no point: all keep their values; 0, 1 and 18 move to their points' means."""
  x, init, want = _tie_problem()
  x = x.copy()
  x[0, :40, 2] = np.linspace(-0.5, 0.5, 40)  # centroid 0's points, mean: 0 except dim 0
  c, a = _run(name, x, init, 3)
  c = np.asarray(c)
  kept = [j for j in range(init.shape[1]) if j not in (0, 1, 18)]
  np.testing.assert_array_equal(c[0, kept], init[0, kept])
  want_c, want_a = _numpy_lloyd(x, init, 3)
  np.testing.assert_allclose(c, want_c, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a), want_a)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_bfloat16(name):
  """bf16 points: centroids come back in bf16; accumulation is f32, so up to the final
  rounding they are sklearn's on the same (upcast) values."""
  x, init = _data(seed=3)
  x16 = jnp.asarray(x, jnp.bfloat16)
  exact = np.asarray(x16.astype(jnp.float32))
  want_c, want_a, want_inertia = _sklearn(exact, init, ITERATIONS)
  impl, kwargs = _default_tiles(name)
  c, a = ops.kmeans(x16, jnp.asarray(init), iterations=ITERATIONS, implementation=impl, **kwargs)
  assert c.dtype == jnp.bfloat16 and a.dtype == jnp.int32
  differ = int((np.asarray(a) != want_a).sum())
  assert differ <= 1e-3 * want_a.size
  err = np.abs(np.asarray(c.astype(jnp.float32)) - want_c).max()
  assert err <= 2**-8 * np.abs(want_c).max()  # bf16 rounding of the result
  inertia = ops.kmeans_inertia(x16, c, a)  # from the rounded centroids
  np.testing.assert_allclose(np.asarray(inertia), want_inertia, rtol=1e-3)


@pytest.mark.parametrize("name", ["xla", "triton", "tpu"])
def test_jit_with_traced_inputs(name):
  x, init = _data(seed=4)
  impl, kwargs = _default_tiles(name)
  run = lambda x, init: ops.kmeans(x, init, iterations=3, implementation=impl, **kwargs)
  c, a = jax.jit(run)(jnp.asarray(x), jnp.asarray(init))
  want_c, want_a = _numpy_lloyd(x, init, 3)
  np.testing.assert_allclose(np.asarray(c), want_c, atol=1e-4)
  assert int((np.asarray(a) != want_a).sum()) <= 1


def test_xla_never_holds_the_n_by_k_matrix():
  """Compiled temporaries of the xla path stay far below one [n, k] f32 matrix (the
  reference's, which must exceed it: the check can fail)."""
  n, k, d = 16384, 2048, 16
  x = jax.ShapeDtypeStruct((1, n, d), jnp.float32)
  init = jax.ShapeDtypeStruct((1, k, d), jnp.float32)
  matrix = n * k * 4

  def temp(impl):
    run = lambda x, init: ops.kmeans(x, init, iterations=1, implementation=impl)
    return jax.jit(run).lower(x, init).compile().memory_analysis().temp_size_in_bytes

  assert temp("reference") >= matrix
  assert temp("xla") < matrix / 8


def test_inertia_matches_numpy_and_checks_assignments():
  x, init = _data(seed=5)
  c, a = _run("xla", x, init, 2)
  c64, x64 = np.asarray(c, np.float64), x.astype(np.float64)
  want = ((x64 - np.take_along_axis(c64, np.asarray(a)[..., None], axis=1)) ** 2).sum((1, 2))
  np.testing.assert_allclose(np.asarray(ops.kmeans_inertia(jnp.asarray(x), c, a)), want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"kmeans_inertia: assignments must lie in \[0, 20\)"):
    ops.kmeans_inertia(jnp.asarray(x), c, a.at[0, 3].set(K))
  with pytest.raises(ValueError, match="kmeans_inertia: assignments must be an integer array"):
    ops.kmeans_inertia(jnp.asarray(x), c, a[:, :-1])
  with pytest.raises(ValueError, match="kmeans_inertia: centroids must have shape"):
    ops.kmeans_inertia(jnp.asarray(x), c[:, :, :-1], a)


def test_kmeans_plusplus_init():
  """Seeds are points of their row; with two tight, far-apart blobs the second seed
  always lands in the other blob (the first's blob has D^2 ~ 0); keys matter."""
  rng = np.random.default_rng(6)
  batch, n = 16, 64
  x = rng.normal(size=(batch, n, 4)).astype(np.float32) * 0.01
  x[:, n // 2 :, 0] += 100.0
  seeds = ops.kmeans_plusplus_init(jnp.asarray(x), 2, key=jax.random.key(0))
  assert seeds.shape == (batch, 2, 4) and seeds.dtype == jnp.float32
  s = np.asarray(seeds)
  for b in range(batch):
    for j in range(2):
      assert (x[b] == s[b, j]).all(-1).any()  # an exact copy of a point of row b
    assert (s[b, 0, 0] > 50) != (s[b, 1, 0] > 50)
  other = ops.kmeans_plusplus_init(jnp.asarray(x), 2, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(other), s)
  k_all = ops.kmeans_plusplus_init(jnp.asarray(x[:1]), n, key=jax.random.PRNGKey(2))
  assert len(np.unique(np.asarray(k_all)[0], axis=0)) == n  # every point once


def _kmeans(x=None, init=None, **kwargs):
  """ops.kmeans on x [2, 10, 4] and init [2, 3, 4] (zeros) unless given, iterations=1."""
  x = jnp.zeros((2, 10, 4), jnp.float32) if x is None else x
  init = jnp.zeros((2, 3, 4), jnp.float32) if init is None else init
  return ops.kmeans(x, init, **{"iterations": 1, **kwargs})


def _plusplus(k, key=None):
  key = jax.random.key(0) if key is None else key
  return ops.kmeans_plusplus_init(jnp.zeros((2, 10, 4), jnp.float32), k, key=key)


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: _kmeans(x=jnp.zeros((10, 4)), init=jnp.zeros((3, 4))), "x must have shape"),
    (lambda: _kmeans(x=jnp.zeros((2, 10, 4), jnp.int32)), "x has dtype int32"),
    (lambda: _kmeans(init=jnp.zeros((2, 3, 5))), r"init must have shape .*\[2, k >= 1, 4\]"),
    (lambda: _kmeans(init=jnp.zeros((1, 3, 4))), "init must have shape"),
    (lambda: _kmeans(init=jnp.zeros((2, 0, 4))), "init must have shape"),
    (lambda: _kmeans(init=jnp.zeros((2, 3, 4), jnp.int32)), "init has dtype int32"),
    (lambda: _kmeans(iterations=-1), "iterations must be a Python int >= 0, got -1"),
    (lambda: _kmeans(iterations=2.0), "iterations must be"),
    (lambda: _kmeans(iterations=True), "iterations must be"),
    (lambda: jax.jit(lambda i: _kmeans(iterations=i))(3), "iterations must be"),
    (lambda: _kmeans(block_n=0), "block_n must be a Python int >= 1"),
    (lambda: _kmeans(implementation="cuda"), "implementation must be None or one of"),
    (lambda: _kmeans(implementation="pallas"), "interpret=True"),
    (lambda: _plusplus(0), r"k must be a Python int in \[1, n=10\]"),
    (lambda: _plusplus(11), "k must be"),
    (lambda: _plusplus(2, key=0), "key must be a single jax.random key"),
  ],
)
def test_bad_arguments_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_kernel_refusals():
  """Policy from shapes alone: Unsupported from the kernel, a ValueError when asked for
  by name, and implementation=None still runs (xla on CPU)."""
  with pytest.raises(common.Unsupported, match="d <= 256"):
    gpu.check_supported((1, 100, 300), 8)
  with pytest.raises(common.Unsupported, match="power of two"):
    gpu.check_supported((1, 100, 32), 8, block_k=24)
  with pytest.raises(common.Unsupported, match="multiple of 128"):
    tpu.check_supported((1, 100, 32), 8, block_n=64)
  with pytest.raises(common.Unsupported, match="VMEM"):
    tpu.check_supported((1, 100, 12000), 8)
  gpu.check_supported((1, 100, 256), 1000)
  assert tpu.default_blocks(10**6, 1000, 4096) == (128, 128)
  tpu.check_supported((1, 100, 11000), 1000)
  x, init = jnp.ones((1, 20, 300)), jnp.ones((1, 2, 300))
  with pytest.raises(ValueError, match="implementation='pallas_triton'.*d <= 256"):
    ops.kmeans(x, init, iterations=1, implementation="pallas_triton", interpret=True)
  c, a = ops.kmeans(x, init, iterations=1)
  assert c.shape == (1, 2, 300) and int(a.max()) == 0


def test_lowers_for_cuda_and_tpu():
  """The Triton kernel lowers to Triton IR for an H200 and the Mosaic kernel to a TPU
  custom call, from this CPU host (bf16 points, d not a power of two)."""
  x = jax.ShapeDtypeStruct((2, 1000, 96), jnp.bfloat16)
  init = jax.ShapeDtypeStruct((2, 100, 96), jnp.float32)
  run = lambda impl: lambda x, init: ops.kmeans(x, init, iterations=2, implementation=impl)
  assert "xla.gpu.triton" in testutil.lower_for_cuda(run("pallas_triton"), x, init)
  lowered = jax.jit(run("pallas_tpu")).trace(x, init).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


# ---------------------------------------------------------------------------
# The Mosaic GPU kernel (Hopper), interpreted on CPU and lowered for CUDA.
# ---------------------------------------------------------------------------


def _assign_reference(x, c) -> np.ndarray:
  """The reference assignment of points x [B, n, d] to centroids c [B, k, d]."""
  _, a = ops.kmeans(x, c, iterations=0, implementation="reference")
  return np.asarray(a)


def _assign_mosaic(x, c, **kwargs) -> np.ndarray:
  xx, cc = common.squared_norms(x), common.squared_norms(c)
  return np.asarray(mosaic_gpu.assign_mosaic_gpu(x, xx, c, cc, interpret=True, **kwargs))


@pytest.mark.parametrize(
  "batch, n, k, d, dtype, block_n, block_k",
  [
    (2, 130, 37, 24, jnp.float32, 64, 8),  # ragged n and k: 3 x 5 tiles, none full
    (1, 200, 70, 100, jnp.bfloat16, 128, 16),  # 2 consumer warpgroups, d padded to 128
    (1, 100, 20, 64, jnp.float16, None, None),  # the default tiles
  ],
)
def test_mosaic_gpu_kernel_matches_reference(batch, n, k, d, dtype, block_n, block_k):
  rng = np.random.default_rng(n + k)
  x = jnp.asarray(rng.normal(size=(batch, n, d)), dtype)
  c = jnp.asarray(rng.normal(size=(batch, k, d)), jnp.float32)
  a = _assign_mosaic(x, c, block_n=block_n, block_k=block_k)
  assert a.shape == (batch, n) and a.dtype == np.int32
  np.testing.assert_array_equal(a, _assign_reference(x, c))


def test_mosaic_gpu_split_is_exact_and_f32_accurate():
  """The bf16 parts sum to the operands exactly; so points between pairs of centroids
  1e-3 apart (distance gaps ~1e-3 of |x||c|) get the reference's assignments, where one
  bf16 (or TF32) product, 2**-9 (2**-11) relative, would flip about half of them."""
  rng = np.random.default_rng(7)
  for dtype, parts in ((jnp.float32, 3), (jnp.float16, 2), (jnp.bfloat16, 1)):
    a = jnp.asarray(rng.normal(size=(1000,)) * 10.0 ** rng.integers(-4, 4, 1000), dtype)
    split = np.asarray(mosaic_gpu.split_bf16(a, parts), np.float64)
    np.testing.assert_array_equal(split.sum(0), np.asarray(a, np.float64))
  base = rng.normal(size=(1, 8, 64))
  c = np.concatenate([base, base + 1e-3 * rng.normal(size=base.shape)], axis=1)
  x = np.repeat(c[:, :8], 16, axis=1) + rng.normal(size=(1, 128, 64))
  x, c = jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
  want = _assign_reference(x, c)
  np.testing.assert_array_equal(_assign_mosaic(x, c), want)
  coarse = _assign_reference(x.astype(jnp.bfloat16), c.astype(jnp.bfloat16).astype(jnp.float32))
  assert (coarse != want).sum() > 16  # the test can fail


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mosaic_gpu_op_matches_sklearn(dtype):
  """The op with the interpreted kernel (default tiles: 2 x 2 CTAs per call) is
  scikit-learn's Lloyd, on a smaller problem than `test_matches_sklearn_lloyd`'s."""
  x = _blobs(2, 256, 16, 8, seed=8)
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # exact in dtype
  rng = np.random.default_rng(9)
  init = np.stack([x[b, rng.choice(256, 8, replace=False)] for b in range(2)])
  want_c, want_a, want_inertia = _sklearn(x, init, 3)
  c, a = ops.kmeans(jnp.asarray(x, dtype), jnp.asarray(init), iterations=3,
                    implementation="pallas_mosaic_gpu", interpret=True)  # fmt: skip
  assert c.dtype == dtype and a.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(a), want_a)
  rtol = 1e-4 if dtype == jnp.float32 else 2**-8
  err = np.abs(np.asarray(c.astype(jnp.float32)) - want_c).max()
  assert err <= rtol * np.abs(want_c).max(), f"centroids off by {err}"
  inertia = ops.kmeans_inertia(jnp.asarray(x, dtype), c, a)
  np.testing.assert_allclose(np.asarray(inertia), want_inertia, rtol=1e-3)


def test_mosaic_gpu_refusals():
  """Shapes and dtypes alone: Unsupported from the kernel, a ValueError when asked for by
  name. The SMEM bound on d depends on the dtype (bf16 points take one part, f32 three)."""
  check = mosaic_gpu.check_supported
  with pytest.raises(common.Unsupported, match=r"block_n in \(64, 128\)"):
    check((1, 100, 32), 8, block_n=32)
  with pytest.raises(common.Unsupported, match="multiple of 8"):
    check((1, 100, 32), 8, block_k=12)
  with pytest.raises(common.Unsupported, match="multiple of 8"):
    check((1, 100, 32), 8, block_k=264)
  with pytest.raises(common.Unsupported, match="SMEM"):
    check((1, 100, 600), 8)
  with pytest.raises(common.Unsupported, match="SMEM"):
    check((1, 100, 64), 300, block_n=128, block_k=256)
  with pytest.raises(common.Unsupported, match="batch <= 65535"):
    check((70000, 100, 32), 8)
  with pytest.raises(common.Unsupported, match="float32, bfloat16 or float16"):
    check((1, 100, 32), 8, dtype=jnp.int32)
  check((1, 100, 600), 8, dtype=jnp.bfloat16)
  check((1, 100, 256), 1000)
  assert mosaic_gpu.default_blocks(10**6, 1000, 32) == (128, 128)
  x, init = jnp.ones((1, 20, 16)), jnp.ones((1, 2, 16))
  with pytest.raises(ValueError, match="implementation='pallas_mosaic_gpu'.*block_n"):
    ops.kmeans(x, init, iterations=1, implementation="pallas_mosaic_gpu", interpret=True,
               block_n=32)  # fmt: skip


@pytest.mark.parametrize(
  "capability, d, dtype, block_n, expected",
  [
    ("9.0", 24, jnp.float32, None, "pallas_mosaic_gpu"),  # Hopper: Mosaic GPU first
    ("9.0", 24, jnp.float32, 32, "pallas_triton"),  # Mosaic GPU refuses block_n=32
    ("9.0", 600, jnp.bfloat16, None, "pallas_mosaic_gpu"),  # bf16 points: one part fits
    ("9.0", 600, jnp.float32, None, "xla"),  # both refuse d=600 (SMEM; d > 256)
    ("8.0", 24, jnp.float32, None, "pallas_triton"),  # not Hopper
  ],
)
def test_none_picks_mosaic_gpu_then_triton_on_hopper(
  monkeypatch, capability, d, dtype, block_n, expected
):
  km = importlib.import_module("sparse_attention.ops.kmeans")
  picked = []
  monkeypatch.setattr(km, "_kmeans", lambda x, init, iterations, impl, *_: picked.append(impl))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(
    jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)]
  )
  ops.kmeans(jnp.ones((1, 100, d), dtype), jnp.ones((1, 8, d)), iterations=1, block_n=block_n)
  assert picked == [expected]


def test_mosaic_gpu_lowers_for_cuda():
  """The op with the Mosaic GPU kernel lowers to Mosaic GPU custom calls (wgmma and TMA
  built on this CPU host): bf16 points at d=96 (padded to 128), f32 points at d=256
  (default tiles 64 x 24)."""
  run = lambda x, init: ops.kmeans(x, init, iterations=2, implementation="pallas_mosaic_gpu")
  for (b, n, k, d), dtype in (((2, 1000, 100, 96), jnp.bfloat16), ((1, 300, 50, 256), jnp.float32)):
    x = jax.ShapeDtypeStruct((b, n, d), dtype)
    init = jax.ShapeDtypeStruct((b, k, d), jnp.float32)
    assert "custom_call @mosaic_gpu" in testutil.lower_for_cuda(run, x, init)


_MOSAIC_COMPILE = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from sparse_attention import ops

device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
tpu = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
for x, init in [
  (tpu((2, 1000, 96), jnp.bfloat16), tpu((2, 100, 96), jnp.float32)),
  (tpu((1, 300, 700), jnp.float32), tpu((1, 9, 700), jnp.float32)),
]:
  run = lambda x, init: ops.kmeans(x, init, iterations=2, implementation="pallas_tpu")
  jax.jit(run).trace(x, init).lower().compile()
print("compiled for v5e")
"""


def test_mosaic_compiles_for_v5e_without_a_tpu():
  """libtpu compiles the Mosaic kernel for a v5e topology on this host: Mosaic's layout
  and VMEM errors show up here."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
  )
  run = subprocess.run(
    [sys.executable, "-c", _MOSAIC_COMPILE], env=env, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "compiled for v5e" in run.stdout, run.stdout

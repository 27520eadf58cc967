"""hilo_attention: xla vs reference (outputs, gradients), the reference vs NumPy, errors."""

import functools
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from flax import nnx

from sparse_attention.models.litv2 import HiLo
from sparse_attention.ops import hilo
from sparse_attention.ops.hilo import hilo_attention, padded_grid, pooled_grid


def split_heads(num_heads: int, alpha: float, ws: int) -> tuple[int, int]:
  """(h_heads, l_heads) as LITv2 splits them."""
  l_heads = num_heads if ws == 1 else int(num_heads * alpha)
  return num_heads - l_heads, l_heads


def inputs(batch, grid, ws, h_heads, l_heads, head_dim, dtype=jnp.float32, seed=0):
  """Random (hi_q, hi_k, hi_v, lo_q, lo_k, lo_v); None for a branch with 0 heads."""
  n = grid[0] * grid[1]
  m = n // (ws * ws)
  rng = np.random.default_rng(seed)
  shapes = [(n, h_heads)] * 3 + [(n, l_heads), (m, l_heads), (m, l_heads)]
  out = []
  for tokens, heads in shapes:
    x = rng.standard_normal((batch, tokens, heads, head_dim), np.float32)
    out.append(jnp.asarray(x, dtype) if heads else None)
  return tuple(out)


def numpy_hilo(hq, hk, hv, lq, lk, lv, grid, ws, scale):
  """float64, explicit loop over the windows for Hi-Fi; plain softmax for Lo-Fi."""
  hp, wp = grid

  def attend(q, k, v):  # [n, D], [m, D], [m, D]
    s = q @ k.T * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v

  hi = lo = None
  if hq is not None:
    hq, hk, hv = (np.asarray(x, np.float64) for x in (hq, hk, hv))
    hi = np.zeros(hv.shape)
    for gi in range(hp // ws):
      for gj in range(wp // ws):
        tok = [(gi * ws + i) * wp + gj * ws + j for i in range(ws) for j in range(ws)]
        for b in range(hq.shape[0]):
          for h in range(hq.shape[2]):
            hi[b, tok, h] = attend(hq[b, tok, h], hk[b, tok, h], hv[b, tok, h])
  if lq is not None:
    lq, lk, lv = (np.asarray(x, np.float64) for x in (lq, lk, lv))
    lo = np.zeros(lq.shape[:3] + lv.shape[3:])
    for b in range(lq.shape[0]):
      for h in range(lq.shape[2]):
        lo[b, :, h] = attend(lq[b, :, h], lk[b, :, h], lv[b, :, h])
  return hi, lo


CASES = [  # (grid, ws, num_heads, alpha)
  ((8, 8), 2, 4, 0.5),
  ((6, 10), 2, 10, 0.9),
  ((8, 12), 4, 4, 0.5),
  ((4, 4), 2, 4, 1.0),  # Lo-Fi only
  ((5, 7), 1, 4, 0.9),  # ws 1: plain MSA, every head Lo-Fi
  ((8, 4), 4, 2, 0.0),  # Hi-Fi only
]


@pytest.mark.parametrize("grid, ws, num_heads, alpha", [CASES[i] for i in (1, 2, 4, 5)])
def test_reference_matches_numpy_windows(grid, ws, num_heads, alpha):
  h, l = split_heads(num_heads, alpha, ws)
  args = inputs(2, grid, ws, h, l, 8, seed=1)
  fn = functools.partial(
    hilo_attention, grid=grid, window_size=ws, scale=0.4, implementation="reference"
  )
  out = jax.jit(fn)(*args)
  expected = numpy_hilo(*args, grid, ws, 0.4)
  for a, e in zip(out, expected, strict=True):
    assert (a is None) == (e is None)
    if e is not None:
      np.testing.assert_allclose(np.asarray(a), e, atol=2e-5, rtol=2e-5)


XLA_CASES = [("xla", *c, jnp.float32) for c in CASES] + [
  ("xla", *CASES[i], jnp.bfloat16) for i in (1, 2, 4)
]
# The Pallas path (block-sparse kernels, interpreted): alpha 0.5/0.9/1.0, ws 1/2/4,
# padded-size grids, f32 and bf16, on both kernels.
PALLAS_CASES = [
  (kernel, *CASES[i], dtype)
  for kernel in ("pallas_triton", "pallas_tpu")
  for i, dtype in (
    (0, jnp.float32),
    (1, jnp.bfloat16),
    (2, jnp.float32),
    (3, jnp.float32),
    (4, jnp.float32),
  )
]


@pytest.mark.parametrize(
  "implementation, grid, ws, num_heads, alpha, dtype", XLA_CASES + PALLAS_CASES
)
def test_matches_reference_outputs_and_grads(implementation, grid, ws, num_heads, alpha, dtype):
  h, l = split_heads(num_heads, alpha, ws)
  args = inputs(2, grid, ws, h, l, 16, dtype=dtype, seed=len(CASES) * ws + num_heads)
  n = grid[0] * grid[1]
  rng = np.random.default_rng(1)
  cotangents = tuple(
    None if not heads else jnp.asarray(rng.standard_normal((2, n, heads, 16)), dtype)
    for heads in (h, l)
  )

  @functools.partial(jax.jit, static_argnums=0)
  def run(implementation, args):  # outputs and the vjp of every input
    fn = functools.partial(
      hilo_attention,
      grid=grid,
      window_size=ws,
      implementation=implementation,
      interpret=implementation.startswith("pallas"),
    )
    outs, vjp = jax.vjp(lambda a: fn(*a), args)
    return outs, vjp(cotangents)[0]

  (out_x, grad_x), (out_r, grad_r) = run(implementation, args), run("reference", args)
  for a, e in zip(out_x, out_r, strict=True):
    assert (a is None) == (e is None)
    if e is not None:
      assert a.dtype == dtype
      testutil.assert_close(a, e, dtype, "out", "out")
  for name, a, e in zip(
    ("hi_q", "hi_k", "hi_v", "lo_q", "lo_k", "lo_v"), grad_x, grad_r, strict=True
  ):
    if e is not None:
      assert a.dtype == dtype
      testutil.assert_close(a, e, dtype, "grad", f"grad of {name}")


@pytest.mark.parametrize(
  "budget, batch, grid, ws, chunks",
  [
    (3 * 4 * 64 * 16, 6, (8, 8), 2, (3, 64)),  # batch chunks of 3
    (9 * 4 * 16, 2, (8, 8), 2, (1, 9)),  # query chunks of 9: the last one overlaps
    (5 * 4 * 15, 1, (5, 3), 1, (1, 5)),  # ws 1, query chunks of 5
  ],
)
def test_xla_lofi_chunks_match_reference(monkeypatch, budget, batch, grid, ws, chunks):
  """The chunked Lo-Fi loop (batch chunks, query chunks, clamped last chunk)."""
  monkeypatch.setattr(hilo, "_LOFI_CHUNK_SCORES", budget)
  n = grid[0] * grid[1]
  _, _, _, q, k, v = inputs(batch, grid, ws, 0, 4, 8, seed=5)
  assert hilo._lofi_chunks(batch, n, 4, k.shape[1]) == chunks
  cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(implementation, q, k, v):
    fn = lambda *x: hilo_attention(
      None, None, None, *x, grid=grid, window_size=ws, implementation=implementation
    )[1]
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)

  (out_x, grads_x), (out_r, grads_r) = run("xla", q, k, v), run("reference", q, k, v)
  testutil.assert_close(out_x, out_r, jnp.float32, "out")
  for a, e in zip(grads_x, grads_r, strict=True):
    testutil.assert_close(a, e, jnp.float32, "grad")


def test_none_implementation_is_xla_and_jits():
  args = inputs(1, (4, 6), 2, 1, 3, 8)
  a = jax.jit(lambda *x: hilo_attention(*x, grid=(4, 6), window_size=2))(*args)
  b = hilo_attention(*args, grid=(4, 6), window_size=2, implementation="xla")
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_grid_helpers():
  assert padded_grid(7, 9, 2) == (8, 10)
  assert padded_grid(8, 8, 4) == (8, 8)
  assert pooled_grid((8, 10), 2) == (4, 5)


@pytest.mark.parametrize(
  "implementation, height, width, ws, alpha",
  [
    ("xla", 7, 9, 2, 0.5),
    ("xla", 5, 6, 4, 0.75),
    ("xla", 7, 5, 1, 0.9),
    ("pallas_triton", 7, 9, 2, 0.5),
    ("pallas_tpu", 5, 6, 4, 0.75),
  ],
)
def test_layer_matches_reference_on_padded_grids(implementation, height, width, ws, alpha):
  layers = {
    impl: HiLo(
      32,
      4,
      window_size=ws,
      alpha=alpha,
      implementation=impl,
      interpret=impl.startswith("pallas"),
      rngs=nnx.Rngs(3),
    )
    for impl in (implementation, "reference")
  }
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, height * width, 32)), jnp.float32)

  def loss(m, x):
    out = m(x, height, width)
    return jnp.sum(jnp.sin(out)), out

  run = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, out_x), grad_x = run(layers[implementation], x)
  (_, out_r), grad_r = run(layers["reference"], x)
  assert out_x.shape == (2, height * width, 32)
  testutil.assert_close(out_x, out_r, jnp.float32, "out")
  for a, e in zip(jax.tree.leaves(grad_x), jax.tree.leaves(grad_r), strict=True):
    testutil.assert_close(a, e, jnp.float32, "grad")


def _bad(**changes):
  """Valid inputs (grid 4x4, ws 2, 1 Hi-Fi + 2 Lo-Fi heads) with some replaced."""
  names = ("hi_q", "hi_k", "hi_v", "lo_q", "lo_k", "lo_v")
  kwargs = dict(zip(names, inputs(1, (4, 4), 2, 1, 2, 8), strict=True))
  kwargs.update(grid=(4, 4), window_size=2)
  kwargs.update(changes)
  return kwargs


Z = jnp.zeros


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(grid=(5, 4)), "multiples of window_size"),
    (dict(grid=(4,)), "grid must be"),
    (dict(window_size=0), "window_size must be"),
    (dict(window_size=2.0), "window_size must be"),
    (dict(hi_q=Z((1, 15, 1, 8))), "hi_q has 15 tokens"),
    (dict(hi_k=Z((1, 16, 1, 4))), "hi_k head_dim"),
    (dict(hi_v=Z((1, 16, 8))), "hi_v must have rank 4"),
    (dict(lo_k=Z((1, 16, 2, 8)), lo_v=Z((1, 16, 2, 8))), "lo_k has 16 tokens.*pooled grid"),
    (dict(lo_k=Z((1, 4, 1, 8)), lo_v=Z((1, 4, 1, 8))), "lo_k has 1 heads.*no grouped"),
    (dict(lo_v=Z((2, 4, 2, 8))), "lo_v batch 2"),
    (dict(hi_q=None), "hi_q is None"),
    (dict(hi_q=None, hi_k=None, hi_v=None, lo_q=None, lo_k=None, lo_v=None), "both branches"),
    (dict(lo_q=Z((1, 16, 2, 8), jnp.int32)), "lo_q has dtype int32"),
    (dict(hi_k=Z((1, 16, 1, 8), jnp.bfloat16)), "must share one dtype"),
    (
      dict(
        lo_q=Z((1, 16, 2, 8), jnp.bfloat16),
        lo_k=Z((1, 4, 2, 8), jnp.bfloat16),
        lo_v=Z((1, 4, 2, 8), jnp.bfloat16),
      ),
      "both branches must share one dtype",
    ),
    (dict(lo_q=Z((2, 16, 2, 8)), lo_k=Z((2, 4, 2, 8)), lo_v=Z((2, 4, 2, 8))), "batch sizes differ"),
    (dict(hi_q=np.zeros((1, 16, 1, 8)).tolist()), "hi_q must be an array"),
    (dict(implementation="cudnn"), "implementation must be"),
    (dict(implementation="pallas"), "interpret=True"),  # no kernel compiles for CPU
    (dict(scale="big"), "scale must be"),
  ],
)
def test_bad_inputs_raise(changes, match):
  kwargs = _bad(**changes)
  with pytest.raises(ValueError, match=match):
    hilo_attention(**kwargs)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(dim=30, num_heads=4), "multiple of num_heads"),
    (dict(dim=32, num_heads=4, window_size=0), "window_size"),
    (dict(dim=32, num_heads=4, alpha=1.5), "alpha"),
    (dict(dim=32, num_heads=4, implementation="cuda"), "implementation"),
  ],
)
def test_layer_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    HiLo(**kwargs, rngs=nnx.Rngs(0))


def test_layer_bad_input_raises():
  layer = HiLo(32, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x must be \[batch, H\*W = 20, dim = 32\]"):
    layer(jnp.zeros((1, 21, 32)), 4, 5)


# ---------------------------------------------------------------------- the CPU bench's baselines


def _bench_hilo_cpu():
  """bench/hilo_cpu.py as a module (its flags are defined, not parsed)."""
  bench = str(testutil.ROOT / "bench")
  if bench not in sys.path:
    sys.path.insert(0, bench)
  return importlib.import_module("hilo_cpu")


def _numpy_attention(q, k, v, scale):  # [B, N, h, D] x [B, M, h, D] -> [B, N, h, D]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def _np_linear(layer, x):
  return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def test_bench_sra_baseline_is_pvt_spatial_reduction_attention():
  # PVT's SRA, brute force: keys/values from each sr x sr patch (a conv with kernel =
  # stride = sr), LayerNorm, kv Linear; every query sees every reduced token.
  hilo_cpu = _bench_hilo_cpu()
  b, hgt, wid, dim, heads, sr = 2, 4, 6, 16, 2, 2
  layer = hilo_cpu.SRA(dim, heads, sr_ratio=sr, rngs=nnx.Rngs(3))
  ln = layer.norm
  ln.scale[...] = jnp.linspace(0.5, 1.5, dim)  # a LayerNorm that is not the identity
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, hgt * wid, dim)), np.float64)
  grid = x.reshape(b, hgt, wid, dim)
  patches = np.stack(
    [
      grid[:, i * sr : (i + 1) * sr, j * sr : (j + 1) * sr].reshape(b, -1)
      for i in range(hgt // sr)
      for j in range(wid // sr)
    ],
    axis=1,
  )  # [B, M, sr*sr*dim], each patch (row, col, channel)
  red = _np_linear(layer.sr, patches)
  mu, var = red.mean(-1, keepdims=True), red.var(-1, keepdims=True)
  red = (red - mu) / np.sqrt(var + ln.epsilon) * np.asarray(ln.scale[...])
  red = red + np.asarray(ln.bias[...])
  hd = dim // heads
  q = _np_linear(layer.q, x).reshape(b, -1, heads, hd)
  kv = _np_linear(layer.kv, red).reshape(b, -1, 2, heads, hd)
  o = _numpy_attention(q, kv[:, :, 0], kv[:, :, 1], hd**-0.5).reshape(b, -1, dim)
  want = _np_linear(layer.proj, o)
  got = layer(jnp.asarray(x, jnp.float32), hgt, wid)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_bench_window_baseline_is_local_window_attention():
  # HiLo(alpha=0): every head attends inside its ws x ws window (W-MSA, no bias).
  b, side, dim, heads, ws = 2, 6, 16, 2, 3
  layer = HiLo(dim, heads, window_size=ws, alpha=0.0, rngs=nnx.Rngs(4))
  assert (layer.h_heads, layer.l_heads) == (heads, 0)
  x = np.asarray(jax.random.normal(jax.random.key(1), (b, side * side, dim)), np.float64)
  hd = dim // heads
  qkv = _np_linear(layer.h_qkv, x).reshape(b, side, side, 3, heads, hd)
  out = np.zeros((b, side, side, heads, hd))
  for i in range(0, side, ws):
    for j in range(0, side, ws):
      w = qkv[:, i : i + ws, j : j + ws].reshape(b, ws * ws, 3, heads, hd)
      o = _numpy_attention(w[:, :, 0], w[:, :, 1], w[:, :, 2], hd**-0.5)
      out[:, i : i + ws, j : j + ws] = o.reshape(b, ws, ws, heads, hd)
  want = _np_linear(layer.h_proj, out.reshape(b, -1, dim))
  got = layer(jnp.asarray(x, jnp.float32), side, side)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)

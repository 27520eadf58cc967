r"""HiLo on a GPU: our layer (pallas and xla) vs an MSA layer on cuDNN vs PyTorch HiLo.

Made for ONE call on the lent GPU (the `device` tool), e.g.

  pip install --no-deps -e . && PYTHONUNBUFFERED=1 python bench/hilo_gpu.py --out_dir=$OUT

Per case (batch, grid, width, heads; bf16, alpha 0.9, window 2, projections included):
  - ours: `models.litv2.HiLo` with implementation "pallas" (the block-sparse kernels) and
    "xla" (the pure-JAX path), jitted; first checked against the reference op;
  - MSA: qkv Linear + `jax.nn.dot_product_attention(implementation="cudnn")` + proj;
  - PyTorch HiLo: LITv2's layer (bench/hilo_torch.py: explicit attention, eager), and
    the same under torch.compile.
Then LITv2-S forward images/s at batch 64, 224x224 (bf16 parameters). The table is
printed and written to --out_dir as hilo_gpu_<card>_<date>.md. Targets (issue): faster
than the cuDNN MSA layer at every size, and at least 2x faster than PyTorch HiLo.
`--interpret --torch_device=cpu --cases=2x8x8x64x4 --skip=cudnn,litv2` dry-runs it on CPU.
"""

from __future__ import annotations

import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sparse_attention.models import litv2
from sparse_attention.models.litv2 import HiLo

_CASES = flags.DEFINE_list(
  "cases",
  ["64x14x14x384x12", "8x64x64x384x12", "8x128x128x192x6"],
  "batch x H x W x dim x heads.",
)
_ALPHA = flags.DEFINE_float("alpha", 0.9, "Fraction of Lo-Fi heads.")
_WS = flags.DEFINE_integer("window_size", 2, "Window size.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs (median).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Interpret the kernels (CPU dry run).")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cuda", "Device for the PyTorch layer.")
_SKIP = flags.DEFINE_list("skip", [], "Skip: cudnn, torch, litv2, xla, pallas.")


def cast_params(module: nnx.Module, dtype) -> None:
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  nnx.update(module, jax.tree.map(cast, nnx.state(module)))


def time_layer(layer, x, height, width) -> float:
  fn, state = benchutil.jitted_forward(layer, height, width)
  return benchutil.median_seconds(fn, state, x, repeats=_REPEATS.value, warmup=2)


def check_against_reference(layer: HiLo, x, height, width) -> float:
  """Max relative error of the layer vs the same layer on the reference op."""
  reference = nnx.clone(layer)
  reference.implementation = "reference"
  out = benchutil.jitted_forward(layer, height, width)
  ref = benchutil.jitted_forward(reference, height, width)
  a = np.asarray(out[0](out[1], x), np.float32)
  b = np.asarray(ref[0](ref[1], x), np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def torch_hilo_seconds(batch, height, width, dim, heads, compiled: bool) -> float:
  """PyTorch HiLo (LITv2's layer, bench/hilo_torch.py) in bf16; CUDA events."""
  import hilo_torch  # torch is imported only here: the rest of the bench runs without it
  import torch

  layer = hilo_torch.make_layer(
    "hilo",
    dim=dim,
    heads=heads,
    height=height,
    width=width,
    window_size=_WS.value,
    alpha=_ALPHA.value,
  )
  dev = _TORCH_DEVICE.value
  dtype = torch.bfloat16 if dev == "cuda" else torch.float32
  layer = layer.to(dev, dtype).eval()
  fn = torch.compile(layer) if compiled else layer
  x = torch.randn(batch, height * width, dim, device=dev, dtype=dtype)
  with torch.no_grad():
    for _ in range(3):
      fn(x)
    times = []
    for _ in range(_REPEATS.value):
      if dev == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
      else:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
  return float(np.median(times))


def litv2_images_per_second() -> float:
  config = litv2.litv2_s()
  model = litv2.LITv2(config, rngs=nnx.Rngs(0))
  model.eval()
  cast_params(model, jnp.bfloat16)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jnp.zeros((64, 224, 224, 3), jnp.bfloat16)
  return 64 / benchutil.median_seconds(fn, state, x, repeats=_REPEATS.value, warmup=2)


def _row(case: str, times: dict) -> list[str]:
  """A table row: times in ms and the ratios of the peers to ours (pallas)."""
  batch, height, width, dim, heads = case.split("x")
  ms = lambda k: "" if times.get(k) is None else f"{times[k] * 1e3:.3f}"
  ratio = lambda a: (
    ""
    if times.get(a) is None or times.get("pallas") is None
    else f"{times[a] / times['pallas']:.2f}x"
  )
  return [
    f"b{batch} {height}x{width} c{dim} h{heads}",
    *(ms(k) for k in ("pallas", "xla", "msa", "torch", "torch_compiled")),
    *(ratio(k) for k in ("msa", "torch", "torch_compiled")),
  ]


def main(argv):
  del argv
  print(benchutil.machine(), flush=True)
  skip = set(_SKIP.value)
  rows, notes = [], []
  for case in _CASES.value:
    batch, height, width, dim, heads = (int(v) for v in case.split("x"))
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, height * width, dim), jnp.bfloat16)
    times = {}
    for impl in ("pallas", "xla"):
      if impl in skip:
        continue
      layer = HiLo(
        dim,
        heads,
        window_size=_WS.value,
        alpha=_ALPHA.value,
        rngs=rngs,
        implementation=impl,
        interpret=_INTERPRET.value,
      )
      cast_params(layer, jnp.bfloat16)
      err = benchutil.attempt(f"check {impl}", check_against_reference, layer, x, height, width)
      if err is not None:
        notes.append(f"{case}: HiLo {impl} vs reference op, max relative error {err:.1e}")
      times[impl] = benchutil.attempt(f"HiLo {impl}", time_layer, layer, x, height, width)
    if "cudnn" not in skip:
      msa = benchutil.MSA(dim, heads, implementation="cudnn", rngs=rngs)
      cast_params(msa, jnp.bfloat16)
      times["msa"] = benchutil.attempt("MSA cudnn", time_layer, msa, x, height, width)
    if "torch" not in skip:
      for compiled in (False, True):
        key = "torch_compiled" if compiled else "torch"
        times[key] = benchutil.attempt(
          key, torch_hilo_seconds, batch, height, width, dim, heads, compiled
        )
    rows.append(_row(case, times))
    print(" | ".join(rows[-1]), flush=True)
  if "litv2" not in skip:
    ips = benchutil.attempt("LITv2-S", litv2_images_per_second)
    if ips is not None:
      notes.append(f"LITv2-S forward, batch 64, 224x224, bf16: {ips:,.0f} images/s")
  header = [
    "case",
    "ours pallas ms",
    "ours xla ms",
    "MSA cuDNN ms",
    "torch HiLo ms",
    "torch HiLo compiled ms",
    "MSA / ours",
    "torch / ours",
    "torch compiled / ours",
  ]
  text = (
    "\n".join(
      [
        f"# HiLo layer on {benchutil.machine()}, {benchutil.today()}",
        "",
        f"bf16, alpha {_ALPHA.value}, window {_WS.value}, projections included, forward; median "
        f"of {_REPEATS.value}. 'X / ours' > 1: ours (pallas) is faster.",
        "",
        benchutil.format_table(header, rows),
        "",
        *[f"- {n}" for n in notes],
      ]
    )
    + "\n"
  )
  print("\n" + text)
  benchutil.write_result("hilo_gpu", text, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)

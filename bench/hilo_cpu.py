r"""HiLo attention layer vs the attention layers the HiLo paper compares it with, on this CPU.

The LITv2 paper (Pan et al., "Fast Vision Transformers with HiLo Attention", NeurIPS
2022) reports HiLo 1.4x faster than spatial-reduction attention and 1.6x faster than
local window attention on CPU. This bench times, at the same width and heads (forward
only, projections included, every layer jitted, in the same run, alternating):

  hilo      `models.litv2.HiLo`: h_qkv, l_q, l_kv on the ws x ws average-pooled grid,
            window and pooled attention through `ops.hilo_attention(implementation="xla")`,
            h_proj, l_proj; alpha 0.9 (10 Lo-Fi + 2 Hi-Fi heads), window 2
  sra       PVT's spatial-reduction attention (`SRA` below): q Linear; keys and values from
            the map reduced by a strided conv (kernel = stride = sr_ratio, as a Linear on
            the sr x sr patches) + LayerNorm, then a kv Linear; every head attends to the
            (H/sr)(W/sr) reduced tokens through the same Lo-Fi xla path as HiLo; proj.
            sr_ratio 2 (PVT's stage 3)
  window    local window attention (Swin's W-MSA without relative position bias or
            shift): `HiLo(alpha=0, window_size=window)`, i.e. every head is a Hi-Fi head:
            qkv Linear, attention inside window x window windows (HiLo's Hi-Fi xla path),
            proj. window 7 (Swin's)
  msa       plain multi-head self-attention: qkv Linear,
            `jax.nn.dot_product_attention(implementation="xla")`, proj
  msa_ours  the same MSA through HiLo(window_size=1) (this library's xla attention path)

at the token grids of LITv2's stage 3 at 224 / 448 / 896 pixels (dim 384, 12 heads of
32). With a Python that has torch (`--torch_python`, default /tmp/torchenv/bin/python;
"" to skip), the same three layers in PyTorch (bench/hilo_torch.py: LITv2's own HiLo
code, PVT's SRA, W-MSA; float32, eager) run in a worker process between the JAX
rounds, so the paper's ratios are also measured in the authors' framework.

  python bench/hilo_cpu.py [--dtype=float32] [--repeats=5] [--rounds=3]
"""

from __future__ import annotations

import json
import os
import subprocess

import benchutil
import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from sparse_attention.models.litv2 import HiLo
from sparse_attention.ops import hilo_attention

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per round (median).")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 3, "Rounds alternating the layers; the best round median is reported."
)
_DIM = flags.DEFINE_integer("dim", 384, "Layer width.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads.")
_ALPHA = flags.DEFINE_float("alpha", 0.9, "HiLo's fraction of Lo-Fi heads.")
_WS = flags.DEFINE_integer("window_size", 2, "HiLo's window size.")
_SR = flags.DEFINE_integer("sr_ratio", 2, "SRA's spatial-reduction ratio (PVT stage 3: 2).")
_WINDOW = flags.DEFINE_integer("window", 7, "Local window attention's window (Swin: 7).")
_CASES = flags.DEFINE_list(
  "cases", ["14x64", "28x4", "56x2"], "Token grid side x batch, e.g. 14x64 (grid 14x14, batch 64)."
)
_TORCH_PYTHON = flags.DEFINE_string(
  "torch_python", "/tmp/torchenv/bin/python", "A Python with torch for the PyTorch layers."
)
_OUT = flags.DEFINE_string("out", "", "Write the table here (default bench/results/...).")

HERE = os.path.dirname(os.path.abspath(__file__))
JAX_LAYERS = ("hilo", "sra", "window", "msa", "msa_ours")
TORCH_LAYERS = ("hilo", "sra", "window")


class SRA(nnx.Module):
  """PVT's spatial-reduction attention at width `dim`: x [B, H*W, dim] -> [B, H*W, dim].

  q = Linear(x); the H x W map is reduced by a conv with kernel = stride = sr_ratio
  (written as a Linear over each sr x sr patch, channels (row, col, channel)), then
  LayerNorm; k, v = Linear(reduced); every head attends to all (H/sr)(W/sr) reduced
  tokens; out = Linear(attention). H and W must be multiples of sr_ratio.
  """

  def __init__(self, dim: int, num_heads: int, *, sr_ratio: int, rngs: nnx.Rngs):
    self.num_heads, self.sr_ratio = num_heads, sr_ratio
    self.q = nnx.Linear(dim, dim, rngs=rngs)
    self.kv = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.sr = nnx.Linear(sr_ratio * sr_ratio * dim, dim, rngs=rngs) if sr_ratio > 1 else None
    self.norm = nnx.LayerNorm(dim, rngs=rngs) if sr_ratio > 1 else None

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    b, n, c = x.shape  # [B, H*W, C]
    h, hd, sr = self.num_heads, c // self.num_heads, self.sr_ratio
    q = self.q(x).reshape(b, n, h, hd)  # [B, N, h, hd]
    reduced = x
    if self.sr is not None:  # [B, H/sr, sr, W/sr, sr, C] -> patches [B, M, sr*sr*C]
      patches = x.reshape(b, height // sr, sr, width // sr, sr, c).transpose(0, 1, 3, 2, 4, 5)
      reduced = self.norm(self.sr(patches.reshape(b, -1, sr * sr * c)))  # [B, M, C]
    kv = self.kv(reduced).reshape(b, -1, 2, h, hd)  # [B, M, 2, h, hd]
    _, out = hilo_attention(
      None,
      None,
      None,
      q,
      kv[:, :, 0],
      kv[:, :, 1],
      grid=(height, width),
      window_size=sr,
      implementation="xla",
    )
    return self.proj(out.reshape(b, n, c))


def jax_layers(dim: int, heads: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
  """The JAX layers of the module docstring, by name."""
  return {
    "hilo": HiLo(dim, heads, window_size=_WS.value, alpha=_ALPHA.value, rngs=rngs),
    "sra": SRA(dim, heads, sr_ratio=_SR.value, rngs=rngs),
    "window": HiLo(dim, heads, window_size=_WINDOW.value, alpha=0.0, rngs=rngs),
    "msa": benchutil.MSA(dim, heads, rngs=rngs),
    # HiLo with window 1 is plain MSA (l_q and l_kv instead of one qkv Linear).
    "msa_ours": HiLo(dim, heads, window_size=1, rngs=rngs),
  }


def torch_seconds(side: int, batch: int) -> dict[str, float] | None:
  """{layer: median seconds} of the PyTorch layers (bench/hilo_torch.py), or None."""
  spec = dict(
    batch=batch,
    side=side,
    dim=_DIM.value,
    heads=_HEADS.value,
    window_size=_WS.value,
    alpha=_ALPHA.value,
    sr_ratio=_SR.value,
    window=_WINDOW.value,
    repeats=_REPEATS.value,
    kinds=list(TORCH_LAYERS),
  )
  # Passive OpenMP waits: on a shared, oversubscribed CPU, spinning threads at torch's
  # barriers made its layers several times slower (measured at load ~10 on 2 cores).
  env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
  run = subprocess.run(
    [_TORCH_PYTHON.value, os.path.join(HERE, "hilo_torch.py"), json.dumps(spec)],
    capture_output=True,
    text=True,
    timeout=1800,
    env=env,
  )
  if run.returncode:
    print(f"  [torch {side}x{side}] failed: {run.stderr.strip()[-300:]}", flush=True)
    return None
  return json.loads(run.stdout.strip().splitlines()[-1])


def torch_version() -> str:
  run = subprocess.run(
    [
      _TORCH_PYTHON.value,
      "-c",
      "import sys, torch; print(torch.__version__, sys.version.split()[0])",
    ],
    capture_output=True,
    text=True,
  )
  return run.stdout.strip() if run.returncode == 0 else ""


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  dim, heads = _DIM.value, _HEADS.value
  layers = jax_layers(dim, heads, nnx.Rngs(0))
  if dtype != jnp.float32:
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    for layer in layers.values():
      nnx.update(layer, jax.tree.map(cast, nnx.state(layer)))
  use_torch = bool(_TORCH_PYTHON.value) and os.path.exists(_TORCH_PYTHON.value)
  torch_info = torch_version() if use_torch else ""
  use_torch = bool(torch_info)
  load_start = os.getloadavg()
  ms = lambda t: f"{t * 1e3:.1f}" if t is not None else ""
  speedup = lambda a, b: f"{a / b:.2f}x" if a is not None and b is not None else ""
  jax_rows, torch_rows = [], []
  for case in _CASES.value:
    side, batch = (int(v) for v in case.split("x"))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, side * side, dim), jnp.float32)
    x = x.astype(dtype)
    fns = {name: benchutil.jitted_forward(layer, side, side) for name, layer in layers.items()}
    times = {name: float("inf") for name in fns}
    torch_times = {name: float("inf") for name in TORCH_LAYERS} if use_torch else None
    for _ in range(_ROUNDS.value):  # alternate, so a busy moment hits every layer
      for name, (fn, state) in fns.items():
        t = benchutil.median_seconds(fn, state, x, repeats=_REPEATS.value)
        times[name] = min(times[name], t)
      if torch_times is not None:
        got = torch_seconds(side, batch)
        for name in TORCH_LAYERS:
          torch_times[name] = min(torch_times[name], got[name]) if got else None
    hi = times["hilo"]
    jax_rows.append(
      [
        f"{side}x{side}",
        batch,
        side * side,
        *(ms(times[n]) for n in JAX_LAYERS),
        *(speedup(times[n], hi) for n in ("sra", "window", "msa", "msa_ours")),
      ]
    )
    print(" | ".join(str(c) for c in jax_rows[-1]), flush=True)
    if torch_times is not None:
      t_hi = torch_times["hilo"]
      torch_rows.append(
        [
          f"{side}x{side}",
          batch,
          *(ms(torch_times[n]) for n in TORCH_LAYERS),
          speedup(torch_times["sra"], t_hi),
          speedup(torch_times["window"], t_hi),
          speedup(t_hi, hi),
        ]
      )
      print("torch: " + " | ".join(str(c) for c in torch_rows[-1]), flush=True)
  load_end = os.getloadavg()

  loads = lambda la: "/".join(f"{v:.1f}" for v in la)
  hilo = layers["hilo"]
  jax_header = ["grid", "batch", "tokens", "HiLo ms", "SRA ms", "window ms", "MSA ms"]
  jax_header += ["MSA (ours) ms", "SRA / HiLo", "window / HiLo", "MSA / HiLo", "MSA (ours) / HiLo"]
  text = (
    "# HiLo layer vs spatial-reduction, local window and full attention layers (forward, "
    "projections included)\n\n"
    f"{benchutil.machine()}; {benchutil.today()}; load average (1/5/15 min) "
    f"{loads(load_start)} at the start, {loads(load_end)} at the end (shared machine: "
    "the layers alternate within each round, so the load hits them alike; ratios are "
    "of the same run).\n\n"
    f"`python bench/hilo_cpu.py` (dim {dim}, {heads} heads, {dtype.name}; best of "
    f"{_ROUNDS.value} alternating rounds, each the median of {_REPEATS.value} runs). "
    f"HiLo: models.litv2.HiLo, alpha {_ALPHA.value} ({hilo.l_heads} Lo-Fi + "
    f"{hilo.h_heads} Hi-Fi heads), window {_WS.value}. SRA: PVT's spatial-reduction "
    f"attention, sr_ratio {_SR.value} (strided conv + LayerNorm for keys/values). "
    f"window: local window attention, {_WINDOW.value}x{_WINDOW.value} windows, all "
    "heads (W-MSA without relative position bias). These three share ops.hilo_attention's "
    "xla path (SRA its Lo-Fi branch, window its Hi-Fi branch). MSA: qkv Linear + "
    "jax.nn.dot_product_attention(xla) + proj; MSA (ours): the same through HiLo("
    "window_size=1), this library's xla path. X / HiLo: X's time over HiLo's (> 1: HiLo "
    "is faster). The paper (LITv2, NeurIPS 2022) reports HiLo 1.4x faster than SRA and "
    "1.6x faster than local window attention on CPU.\n\n"
    "## JAX (this library)\n\n" + benchutil.format_table(jax_header, jax_rows) + "\n"
  )
  if torch_rows:
    torch_header = ["grid", "batch", "HiLo ms", "SRA ms", "window ms", "SRA / HiLo"]
    torch_header += ["window / HiLo", "torch HiLo / our HiLo"]
    text += (
      f"\n## PyTorch (bench/hilo_torch.py; torch {torch_info.split()[0]}, Python "
      f"{torch_info.split()[-1]}, float32, eager, no_grad, default threads, "
      "OMP_WAIT_POLICY=PASSIVE)\n\n"
      "LITv2's own HiLo code, PVT's SRA (nn.Conv2d + nn.LayerNorm) and W-MSA, explicit "
      "attention as in the authors' repositories, timed in a worker process after each "
      "JAX round of the same case. Last column: PyTorch HiLo's time over our HiLo's.\n\n"
      + benchutil.format_table(torch_header, torch_rows)
      + "\n"
    )
  else:
    text += "\nPyTorch layers: not run (no --torch_python with torch).\n"
  print("\n" + text)
  out = _OUT.value or os.path.join(HERE, "results", f"hilo_cpu_{benchutil.today()}.md")
  with open(out, "w") as f:
    f.write(text)
  print(f"written to {out}")


if __name__ == "__main__":
  app.run(main)

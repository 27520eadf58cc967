r"""Block-sparse attention (xla path) vs dense XLA attention on this CPU.

Forward time and XLA's memory figure (arguments + outputs + temporaries) of
`block_sparse_attention(implementation="xla")` on random 128x128 tile layouts
at several densities, against `jax.nn.dot_product_attention(implementation=
"xla")` measured in the same run, at seq 4096 and 16384 (8 heads, head_dim 64).
The 16384 dense baseline is compiled for its memory figure but only run with
--run_long_dense (it needs ~17 GiB).

  python bench/block_sparse_cpu.py [--dtype=float32] [--repeats=5]
"""

from __future__ import annotations

import os

import benchutil
import jax
import jax.numpy as jnp
from absl import app, flags

from sparse_attention.ops import block_sparse_attention

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case (median).")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Tile size (block_q = block_kv).")
_SEQS = flags.DEFINE_list("seqs", ["4096", "16384"], "Sequence lengths.")
_DENSITIES = flags.DEFINE_list("densities", ["1.0", "0.25", "0.1"], "Tile densities.")
_GRAD = flags.DEFINE_bool("grad", True, "Also time forward+backward at the first seq.")
_RUN_LONG_DENSE = flags.DEFINE_bool("run_long_dense", False, "Run dense XLA beyond 4096.")
_OUT = flags.DEFINE_string("out", "", "Write the table here (default bench/results/...).")


def dense_xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def sparse_xla(q, k, v, mask):
  return block_sparse_attention(q, k, v, mask, implementation="xla")


def loss_of(fn):
  return jax.jit(jax.grad(lambda q, k, v, *m: jnp.sum(fn(q, k, v, *m).astype(jnp.float32))))


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  heads, dim, block = _HEADS.value, _HEAD_DIM.value, _BLOCK.value
  header = ["seq", "path", "tile density", "fwd ms", "speed-up", "memory MiB"]
  if _GRAD.value:
    header += ["fwd+bwd ms", "fwd+bwd speed-up"]
  rows = []
  for n, seq in enumerate(int(s) for s in _SEQS.value):
    q, k, v = benchutil.random_qkv(1, seq, heads, dim, dtype)
    grad = _GRAD.value and n == 0
    run_dense = seq <= 4096 or _RUN_LONG_DENSE.value
    dense_mem = benchutil.compiled_bytes(dense_xla, q, k, v)
    t_dense = (
      benchutil.median_seconds(jax.jit(dense_xla), q, k, v, repeats=_REPEATS.value)
      if run_dense
      else None
    )
    t_dense_g = (
      benchutil.median_seconds(loss_of(dense_xla), q, k, v, repeats=_REPEATS.value)
      if grad
      else None
    )
    row = [
      seq,
      "dense jax.nn.dpa (xla)",
      "1.000",
      f"{t_dense * 1e3:.1f}" if t_dense else "not run",
      "1.00x" if t_dense else "-",
      benchutil.mib(dense_mem),
    ]
    if _GRAD.value:
      row += [f"{t_dense_g * 1e3:.1f}" if grad else "", "1.00x" if grad else ""]
    rows.append(row)
    for density in (float(d) for d in _DENSITIES.value):
      mask = benchutil.random_mask(seq, heads, block, density)
      actual = float(jnp.mean(mask.kv_count)) / mask.num_kv_blocks
      fwd = jax.jit(sparse_xla)
      t = benchutil.median_seconds(fwd, q, k, v, mask, repeats=_REPEATS.value)
      mem = benchutil.compiled_bytes(sparse_xla, q, k, v, mask)
      row = [
        seq,
        "block-sparse (xla)",
        f"{actual:.3f}",
        f"{t * 1e3:.1f}",
        f"{t_dense / t:.2f}x" if t_dense else "-",
        benchutil.mib(mem),
      ]
      if _GRAD.value:
        if grad:
          t_g = benchutil.median_seconds(loss_of(sparse_xla), q, k, v, mask, repeats=_REPEATS.value)
          row += [f"{t_g * 1e3:.1f}", f"{t_dense_g / t_g:.2f}x"]
        else:
          row += ["", ""]
      rows.append(row)
      print(" | ".join(str(c) for c in row), flush=True)

  title = (
    f"# Block-sparse attention, xla path vs dense XLA attention\n\n"
    f"{benchutil.machine()}; {benchutil.today()}\n"
    f"batch 1, {heads} heads, head_dim {dim}, {dtype.name}, tiles {block}x{block}, "
    f"random layouts; median of {_REPEATS.value} runs. Memory: XLA's compiled "
    f"arguments + outputs + temporaries. Speed-up: dense time / ours, same run.\n"
  )
  text = title + "\n" + benchutil.format_table(header, rows) + "\n"
  print("\n" + text)
  out = _OUT.value or os.path.join(
    os.path.dirname(__file__), "results", f"block_sparse_cpu_{benchutil.today()}.md"
  )
  with open(out, "w") as f:
    f.write(text)
  print(f"written to {out}")


if __name__ == "__main__":
  app.run(main)

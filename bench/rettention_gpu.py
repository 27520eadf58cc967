r"""Re-ttention on a GPU: one DiT attention layer at 16k-32k tokens, dense cuDNN vs plain
block-sparse at 3.1% vs Re-ttention's sparse step and calibration, and the cost of the
whole sampling schedule.

Made for ONE call on the lent GPU (the `device` tool, an H100 or H200), e.g.

  pip install --no-deps -e . && PYTHONUNBUFFERED=1 python bench/rettention_gpu.py \
      --out_dir=$OUT

`--dry_run` runs the same script on a CPU at a tiny size (xla paths, the Triton kernels
interpreted) to check it end to end; it prints the table and writes nothing unless
--out_dir is given.

1. Correctness on the card (small shape): `calibrate_attention` (Triton, one pass: O,
   lse, lse over the mask, O^M) and the row-scaled sparse step against the float32
   reference.
2. Timing, per sequence length (default 16384 and 32768 tokens; batch 1, 16 heads,
   head_dim 128, bf16) and per mask granularity (`--granularities`; the masks are
   `dit.local_window_mask` at density 1/32 with 128x128 tiles): "tiles", the
   kernel-friendly window, every query tile keeps the 4 (16k) or 8 (32k) kv tiles
   around it; "tokens", the authors' token band |i - j| <= N / 64 (256 / 512 tokens),
   5 / 9 tiles per query tile, the partial ones element-masked. Forward:
     op level   q, k, v -> attention output:
                  dense      jax.nn.dot_product_attention(implementation="cudnn")
                  sparse     block_sparse_attention(implementation="pallas_triton")
                  rettention the same with row_scale=r (Re-ttention's sparse step)
                  calibrate  calibrate_attention(implementation="pallas_triton"): dense
                             attention plus lse over the mask and O^M
     layer      models/dit.py `Attention` (qkv Linear, attention, proj Linear) in each
                mode, x [1, N, heads * head_dim]; "rettention" adds the cached Delta,
                "calibrate" also computes Delta = W_o (O - r O^M)
3. The schedule: per `--schedules` entry steps:dense_steps:recalibrate_every (default
   20:5:5, the paper's PixArt setting: steps 0-4 dense, calibration at 5, 10, 15, the
   other 12 steps sparse), the summed attention time of the schedule against `steps`
   dense cuDNN steps.

A table (ms, latency reduction vs cuDNN dense) is printed and written under --out_dir
as rettention_gpu_<card>_<date>.md. Target (issue 5): self-attention latency down by at
least 90% vs cuDNN dense (the paper's first version, arXiv:2505.22918v1, reports over 92%
self-attention latency reduction on an H100).
"""

from __future__ import annotations

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sparse_attention.models import dit
from sparse_attention.ops import block_sparse_attention, calibrate_attention, reference_attention

_SEQS = flags.DEFINE_list("seqs", ["16384", "32768"], "Sequence lengths (tokens).")
_HEADS = flags.DEFINE_integer("heads", 16, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension (64 or 128).")
_BLOCK = flags.DEFINE_integer("block", 128, "Tile size (block_q = block_kv).")
_DENSITY = flags.DEFINE_float("density", 1 / 32, "Local-window density (kv tiles kept).")
_GRANULARITIES = flags.DEFINE_list(
  "granularities", ["tiles", "tokens"], "Mask granularities (dit.local_window_mask)."
)
_SCHEDULES = flags.DEFINE_list(
  "schedules", ["20:5:5"], "steps:dense_steps:recalibrate_every sampling schedules."
)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per measurement (median).")
_SKIP = flags.DEFINE_list("skip", [], "Parts to skip: check, layer.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Tiny CPU run: 512 tokens, 2 heads of 64, tiles of 32, xla / interpreted."
)

MODES = ("dense", "sparse", "rettention", "calibrate")
MASKED = MODES[1:]  # the modes that depend on the mask


class Setup:
  """The implementations and sizes of this run (the GPU's, or the dry run's)."""

  def __init__(self):
    self.dry = _DRY_RUN.value
    self.seqs = [512] if self.dry else [int(s) for s in _SEQS.value]
    self.heads = 2 if self.dry else _HEADS.value
    self.head_dim = 64 if self.dry else _HEAD_DIM.value
    self.block = 32 if self.dry else _BLOCK.value
    self.repeats = 2 if self.dry else _REPEATS.value
    self.dtype = jnp.bfloat16
    self.dense_impl = "xla" if self.dry else "cudnn"  # jax.nn.dot_product_attention
    self.layer_impl = "xla" if self.dry else "pallas_triton"  # dit.Attention's ops
    self.interpret = self.dry  # the op-level Triton kernels, interpreted on a CPU

  def mask(self, seq: int, granularity: str = "tiles"):
    return dit.local_window_mask(
      seq, density=_DENSITY.value, block=self.block, granularity=granularity
    )


def seconds(setup: Setup, fn, *args) -> float:
  return benchutil.median_seconds(fn, *args, repeats=setup.repeats, warmup=2)


def ratio_of(mask) -> jax.Array:
  """A plausible r [1, H, N] (the mask's softmax share): values in [0.05, 0.6]."""
  return jnp.linspace(0.05, 0.6, mask.q_len, dtype=jnp.float32)[None, None]


# ---------------------------------------------------------------------------
# 1. Correctness on the card.
# ---------------------------------------------------------------------------


def correctness(setup: Setup) -> list[str]:
  n, blk = (256, 32) if setup.dry else (2048, setup.block)
  mask = dit.local_window_mask(n, density=_DENSITY.value, block=blk)
  q, k, v = benchutil.random_qkv(1, n, setup.heads, setup.head_dim, setup.dtype, seed=3)
  cal = jax.jit(
    lambda q, k, v: calibrate_attention(
      q, k, v, mask, implementation="pallas_triton", interpret=setup.interpret
    )
  )(q, k, v)
  out, lse = reference_attention(q, k, v, return_lse=True)
  out_m, lse_m = reference_attention(q, k, v, mask=mask, return_lse=True)
  r = cal.mass_ratio
  step = jax.jit(
    lambda q, k, v, r: block_sparse_attention(
      q, k, v, mask, implementation="pallas", row_scale=r, interpret=setup.interpret
    )
  )(q, k, v, r)
  want_step = out_m.astype(jnp.float32) * jnp.swapaxes(r, 1, 2)[..., None]
  rows = []
  for what, got, want in (
    ("calibrate: out", cal.out, out),
    ("calibrate: lse", cal.lse, lse),
    ("calibrate: lse over the mask", cal.lse_masked, lse_m),
    ("calibrate: O^M", cal.out_masked, out_m),
    ("sparse step: r * O^M", step, want_step),
  ):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
    ok = err <= 3e-2 and np.isfinite(got).all()
    rows.append(f"| {what} | {err:.1e} | {'pass' if ok else 'FAIL'} |")
    print(f"  {'PASS' if ok else 'FAIL'} {what}: relative max error {err:.1e}", flush=True)
  return rows


# ---------------------------------------------------------------------------
# 2. Timing.
# ---------------------------------------------------------------------------


def op_times(setup: Setup, seq: int, granularity: str, modes) -> dict[str, float | None]:
  mask = setup.mask(seq, granularity)
  q, k, v = benchutil.random_qkv(1, seq, setup.heads, setup.head_dim, setup.dtype)
  r = jnp.broadcast_to(ratio_of(mask), (1, setup.heads, seq))
  kernel = "pallas" if setup.dry else "pallas_triton"
  sparse = lambda q, k, v, r=None: block_sparse_attention(
    q, k, v, mask, implementation=kernel, row_scale=r, interpret=setup.interpret
  )
  fns = {
    "dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=setup.dense_impl),
    "sparse": lambda q, k, v: sparse(q, k, v),
    "rettention": lambda q, k, v: sparse(q, k, v, r),
    "calibrate": lambda q, k, v: calibrate_attention(
      q,
      k,
      v,
      mask,
      implementation="pallas_triton",
      interpret=setup.interpret,
    ),
  }
  return {
    m: benchutil.attempt(f"op {m} {seq} {granularity}", seconds, setup, jax.jit(fns[m]), q, k, v)
    for m in modes
  }


def layer_times(setup: Setup, seq: int, granularity: str, modes) -> dict[str, float | None]:
  dim = setup.heads * setup.head_dim
  mask = setup.mask(seq, granularity)
  layer = dit.Attention(
    dim,
    setup.heads,
    implementation=setup.layer_impl,
    dense_implementation=setup.dense_impl,
    rngs=nnx.Rngs(0),
  )
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda a: a.astype(setup.dtype), state)  # bf16 weights: bf16 matmuls
  x = jax.random.normal(jax.random.key(1), (1, seq, dim), jnp.float32).astype(setup.dtype)
  cache = dit.LayerCache(
    jnp.broadcast_to(ratio_of(mask), (1, setup.heads, seq)),
    jnp.zeros((1, seq, dim), setup.dtype),
  )

  def run(mode):
    def f(state, x, cache):
      out, new = nnx.merge(graphdef, state)(x, mode=mode, mask=mask, cache=cache)
      return out, new

    return jax.jit(f)

  return {
    m: benchutil.attempt(f"layer {m} {seq} {granularity}", seconds, setup, run(m), state, x, cache)
    for m in modes
  }


def schedule_counts(spec: str) -> tuple[int, dict[str, int]]:
  steps, dense_steps, every = (int(x) for x in spec.split(":"))
  counts = {m: 0 for m in MODES}
  for i in range(steps):
    if i < dense_steps:
      counts["dense"] += 1
    elif (i - dense_steps) % every == 0:
      counts["calibrate"] += 1
    else:
      counts["rettention"] += 1
  return steps, counts


def main(argv):
  del argv
  setup = Setup()
  machine = benchutil.machine()
  print(machine, flush=True)
  lines = [
    f"# Re-ttention on {machine}, {benchutil.today()}" + (" (DRY RUN)" if setup.dry else ""),
    "",
  ]
  if "check" not in set(_SKIP.value):
    print("1. kernels vs reference", flush=True)
    checks = benchutil.attempt("check", correctness, setup) or ["| check | | FAILED to run |"]
    lines += [
      "## Kernels vs the float32 reference (bf16, small shape)",
      "",
      "| what | rel. max error | |",
      "|---|---|---|",
      *checks,
      "",
    ]
  print("2. timing", flush=True)
  rows, sched_rows, notes = [], [], []
  fmt = lambda t: "" if t is None else f"{t * 1e3:.3f}"
  cut = lambda t, base: "" if t is None or base is None else f"{100 * (1 - t / base):.1f}%"
  levels = ["op"] + ([] if "layer" in set(_SKIP.value) else ["layer"])
  for seq in setup.seqs:
    for level in levels:
      measure = op_times if level == "op" else layer_times
      base = None  # the dense time: measured once per (seq, level), with the first mask
      for granularity in _GRANULARITIES.value:
        mask = setup.mask(seq, granularity)
        density = float(jnp.mean(mask.block_layout()[0]))
        times = measure(setup, seq, granularity, MODES if base is None else MASKED)
        if "dense" in times:
          base = times["dense"]
          rows.append([str(seq), level, "-", "dense", "1", fmt(base), ""])
          print(" | ".join(rows[-1]), flush=True)
        times["dense"] = base
        for m in MASKED:
          rows.append(
            [str(seq), level, granularity, m, "1" if m == "calibrate" else f"{density:.4f}"]
            + [fmt(times[m]), cut(times[m], base)]
          )
          print(" | ".join(rows[-1]), flush=True)
        for spec in _SCHEDULES.value:
          steps, counts = schedule_counts(spec)
          if any(times[m] is None for m, c in counts.items() if c):
            continue
          total = sum(c * times[m] for m, c in counts.items() if c)
          dense_total = steps * base if base is not None else None
          sparse_total = steps * times["sparse"] if times["sparse"] is not None else None
          sched_rows.append(
            [
              str(seq),
              level,
              granularity,
              spec,
              ", ".join(f"{c} {m}" for m, c in counts.items() if c),
              fmt(dense_total),
              fmt(total),
              cut(total, dense_total),
              fmt(sparse_total),
              cut(sparse_total, dense_total),
            ]
          )
        if base is not None and times["rettention"] is not None and level == "op":
          cut_pct = 100 * (1 - times["rettention"] / base)
          notes.append(
            f"{seq} tokens, {granularity}: Re-ttention's sparse step cuts the attention "
            f"latency by {cut_pct:.1f}% vs dense ({setup.dense_impl}) (target >= 90% vs "
            f"cuDNN: {'met' if cut_pct >= 90 else 'NOT met'})"
          )
  dims = (
    f"batch 1, {setup.heads} heads, head_dim {setup.head_dim}, bf16, tiles "
    f"{setup.block}x{setup.block}, local windows at density {_DENSITY.value:.4f}"
  )
  impls = (
    f"dense: jax.nn.dot_product_attention(implementation={setup.dense_impl!r}); sparse ops: "
    + ("xla / interpreted Triton (dry run)" if setup.dry else "Pallas Triton kernels")
  )
  lines += [
    f"## Forward times ({dims}; median of {setup.repeats})",
    "",
    f"{impls}. op: q, k, v -> output; layer: models/dit.py Attention (qkv and proj "
    "Linears included). mask: tiles = the tile window (kernel-friendly), tokens = the "
    "authors' token band |i - j| <= int(density N) // 2. density: the share of kv tiles "
    "visited. reduction: 1 - time / dense time at the same level.",
    "",
    benchutil.format_table(
      ["tokens", "level", "mask", "mode", "tile density", "ms", "reduction vs dense"], rows
    ),
    "",
    "## Schedule-amortised attention time",
    "",
    "Sum over the sampling steps of each step's time (dense steps: cuDNN; calibration "
    "steps: calibrate; the others: the Re-ttention sparse step) against every step dense, "
    "and plain sparse on every step for comparison.",
    "",
    benchutil.format_table(
      [
        "tokens",
        "level",
        "mask",
        "schedule",
        "steps",
        "all dense ms",
        "Re-ttention ms",
        "reduction",
        "all sparse ms",
        "reduction",
      ],
      sched_rows,
    ),
    "",
  ] + [f"- {n}" for n in notes]
  text = "\n".join(lines) + "\n"
  print("\n" + text, flush=True)
  if setup.dry and not _OUT_DIR.value:
    print(f"dry run: nothing written; {benchutil.elapsed():.0f} s")
    return
  benchutil.write_result("rettention_gpu", text, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)

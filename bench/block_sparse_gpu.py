r"""Block-sparse Pallas kernels on a GPU: check against the reference, then time
them against cuDNN, JAX's Pallas `mha` and PyTorch `flex_attention`, all in one run.

Made for ONE call on the lent GPU (the `device` tool), e.g.

  pip install --no-deps -e . && PYTHONUNBUFFERED=1 python bench/block_sparse_gpu.py \
      --out_dir=$OUT

1. Correctness on the card: our kernels (forward, lse, dQ/dK/dV) vs the float32
   reference at small shapes (GQA, ragged lengths, empty rows, several masks).
2. Timing, per (seq, heads) case (default 16384 x 16 heads and 65536 x 8 heads,
   head_dim 128, bf16, 128x128 tiles): random tile layouts at each density and the
   causal mask; ours forward and forward+backward; cuDNN dense (full or causal);
   JAX's Pallas GPU `mha`; torch `flex_attention` (torch.compile) on the SAME tile
   layouts; and the time to build the mask on device.
3. A table (times, effective TF/s, ratios) printed and written under --out_dir
   as block_sparse_gpu_<card>_<date>.md, with the issue's targets checked.

Effective TF/s counts 4*B*H*Sq*Sk*D x tile density (x0.5 for causal), x3.5 for
forward+backward, as ../shared/ANCHORS.md does. Every peer runs in its own
try/except: a peer that fails prints why and leaves its cells empty.
`--interpret --seqs=256:2 --torch_device=cpu` dry-runs the script on a CPU.
"""

from __future__ import annotations

import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import block_sparse_attention, masks, reference_attention

_SEQS = flags.DEFINE_list("seqs", ["16384:16", "65536:8"], "seq:heads cases to time.")
_DENSITIES = flags.DEFINE_list(
  "densities", ["1.0", "0.5", "0.25", "0.1", "0.03"], "Random-layout tile densities."
)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Tile size (block_q = block_kv).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (median).")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Stop starting new cases after this.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Interpret the kernels (CPU dry run).")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cuda", "Device for flex_attention.")
_SKIP = flags.DEFINE_list("skip", [], "Peers to skip: cudnn, mha, flex, check, backward.")
_CHECK_LEN = flags.DEFINE_integer("check_len", 1000, "Sequence length of the correctness check.")


# ---------------------------------------------------------------------------
# 1. Correctness on the card.
# ---------------------------------------------------------------------------


def ours(q, k, v, mask, **kw):
  return block_sparse_attention(
    q, k, v, mask, implementation="pallas", return_lse=True, interpret=_INTERPRET.value, **kw
  )


def _grads(attend, q, k, v, mask):
  ct = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3] + (v.shape[-1],), jnp.float32)

  def loss(q, k, v):
    out, lse = attend(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_case(name, mask, q, k, v, tol):
  reference = lambda q, k, v, m: reference_attention(q, k, v, mask=m, return_lse=True)
  out, lse = jax.jit(ours)(q, k, v, mask)
  r_out, r_lse = jax.jit(reference)(q, k, v, mask)
  (_, grads), (_, r_grads) = _grads(ours, q, k, v, mask), _grads(reference, q, k, v, mask)
  errors = {}
  for what, a, b in [("out", out, r_out), ("lse", lse, r_lse)] + [
    (f"d{n}", g, r) for n, g, r in zip("qkv", grads, r_grads, strict=True)
  ]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    same_inf = np.isneginf(a) == np.isneginf(b)
    fin = np.isfinite(b)
    err = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
    errors[what] = (
      err / max(1.0, float(np.max(np.abs(b[fin])))) if fin.any() else 0.0,
      bool(same_inf.all() and np.isfinite(a[fin]).all()),
    )
  ok = all(e <= tol and fine for e, fine in errors.values())
  detail = ", ".join(f"{w} {e:.1e}" for w, (e, _) in errors.items())
  print(f"  {'PASS' if ok else 'FAIL'} {name} {q.dtype}: relative max errors {detail}")
  return ok


def correctness() -> list[str]:
  rows, n = [], _CHECK_LEN.value  # not a multiple of the tiles: ragged tails
  cases = {
    "causal": masks.causal(n, n, block_q=64, block_kv=64),
    "causal, empty rows": masks.causal(n, n, block_q=64, block_kv=64, offset=-150),
    "window+anchors": masks.window_with_anchors(
      n, n, window=100, num_anchors=2, offset=3, block_q=128, block_kv=64
    ),
    "random layout 0.3": masks.from_layout(
      benchutil.random_layout(n, 4, 128, 0.3), block_q=128, block_kv=128, q_len=n, kv_len=n
    ),
  }
  for dtype, tol in ((jnp.bfloat16, 5e-2), (jnp.float32, 1e-4)):
    q = benchutil.random_qkv(2, n, 4, 128, dtype, seed=1)[0]
    _, k, v = benchutil.random_qkv(2, n, 2, 128, dtype, seed=2)
    for name, mask in cases.items():
      ok = benchutil.attempt(f"check {name}", check_case, name, mask, q, k, v, tol)
      rows.append(f"| {name} | {jnp.dtype(dtype).name} | {'pass' if ok else 'FAIL'} |")
  return rows


# ---------------------------------------------------------------------------
# 2. Timing.
# ---------------------------------------------------------------------------


def flops(b, h, s, d, density):
  return 4.0 * b * h * s * s * d * density


def time_jax(fn, *args) -> float:
  return benchutil.median_seconds(fn, *args, repeats=_REPEATS.value, warmup=2)


def torch_flex(layout: np.ndarray | None, causal: bool, q, k, v, backward: bool):
  """Seconds per torch flex_attention call on the same tiles (compiled)."""
  import torch
  from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
  )

  dev = _TORCH_DEVICE.value
  blk = _BLOCK.value
  b, s, h, d = q.shape
  to_t = lambda x: torch.tensor(np.asarray(x.astype(jnp.float32))).to(dev, torch.bfloat16)
  tq, tk, tv = (to_t(x).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D]
  if causal:
    block_mask = create_block_mask(
      lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, s, s, device=dev, BLOCK_SIZE=blk
    )
  else:
    lay = torch.tensor(layout)  # [1, H, Qb, Kb] bool
    counts = lay.sum(-1).to(torch.int32)
    order = torch.argsort((~lay).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    zeros = torch.zeros_like(counts)
    lay_dev = lay.to(dev)
    # Every listed tile is full (no mask_mod work, as in ours); the mask_mod
    # states the same layout for paths that evaluate it (eager, CPU).
    block_mask = BlockMask.from_kv_blocks(
      zeros.to(dev),
      order.to(dev),
      counts.to(dev),
      order.to(dev),
      BLOCK_SIZE=blk,
      seq_lengths=(s, s),
      mask_mod=lambda b, h, q_idx, kv_idx: lay_dev[0, h, q_idx // blk, kv_idx // blk],
    )
  flex = torch.compile(flex_attention, dynamic=False)
  if backward:
    for t in (tq, tk, tv):
      t.requires_grad_(True)

  def run():
    out = flex(tq, tk, tv, block_mask=block_mask)
    if backward:
      out.sum().backward()
    return out

  for _ in range(2):
    run()
  if dev == "cuda":
    torch.cuda.synchronize()
    times = []
    for _ in range(_REPEATS.value):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      run()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))
  times = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def mask_build_seconds(seq: int, heads: int) -> float:
  """Device time to build a top-k mask from pooled scores (the dynamic case)."""
  blk = _BLOCK.value
  nb = seq // blk
  scores = jax.random.normal(jax.random.PRNGKey(0), (1, heads, nb, nb))
  build = jax.jit(
    lambda s: (
      masks.topk_blocks(
        s, max(1, nb // 10), block_q=blk, block_kv=blk, q_len=seq, kv_len=seq
      ).kv_index
    )
  )
  return time_jax(build, scores)


def time_case(seq: int, heads: int, rows: list[list[str]], notes: list[str]) -> None:
  d, blk = _HEAD_DIM.value, _BLOCK.value
  q, k, v = benchutil.random_qkv(1, seq, heads, d, jnp.bfloat16)
  skip = set(_SKIP.value)
  backward = "backward" not in skip
  fmt_ms = lambda t: "" if t is None else f"{t * 1e3:.3f}"
  tfs = lambda t, f: "" if t is None else f"{f / t / 1e12:.0f}"
  ratio = lambda a, b: "" if a is None or b is None else f"{a / b:.2f}x"

  # Dense baselines: cuDNN (full and causal) and JAX's Pallas mha.
  base = {}
  for causal in (False, True):
    if "cudnn" not in skip:
      cudnn = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn"
      )
      base["cudnn", causal] = benchutil.attempt("cudnn", time_jax, jax.jit(cudnn), q, k, v)
      if backward:
        base["cudnn_bwd", causal] = benchutil.attempt(
          "cudnn fwd+bwd", time_jax, benchutil.fwd_bwd(cudnn), q, k, v
        )
    if "mha" not in skip:
      base["mha", causal] = benchutil.attempt(
        "pallas mha", time_jax, _pallas_mha(causal, d), q, k, v
      )
  for causal in (False, True):
    f = flops(1, heads, seq, d, 0.5 if causal else 1.0)
    label = "causal" if causal else "full"
    for peer in ("cudnn", "mha"):
      t = base.get((peer, causal))
      t_b = base.get((f"{peer}_bwd", causal))
      name = "cuDNN dense" if peer == "cudnn" else "JAX Pallas mha"
      rows.append(
        [
          f"{seq}x{heads}",
          f"{name} ({label})",
          "1.000" if not causal else "0.500",
          fmt_ms(t),
          tfs(t, f),
          "",
          "",
          fmt_ms(t_b),
          tfs(t_b, 3.5 * f),
          "",
          "",
        ]
      )

  build = benchutil.attempt("mask build", mask_build_seconds, seq, heads)
  cases = [(float(x), False) for x in _DENSITIES.value] + [(None, True)]
  for density, causal in cases:
    if benchutil.elapsed() > _BUDGET.value:
      notes.append(f"stopped at {seq}x{heads} before {density or 'causal'}: budget reached")
      return
    if causal:
      mask = masks.causal(seq, seq, block_q=blk, block_kv=blk)
      layout, label, dens = None, "causal", 0.5
    else:
      layout = np.asarray(benchutil.random_layout(seq, heads, blk, density))
      mask = masks.from_layout(layout, block_q=blk, block_kv=blk, q_len=seq, kv_len=seq)
      label, dens = "random", float(layout.mean())
    f = flops(1, heads, seq, d, dens)
    fwd = lambda q, k, v, m: ours(q, k, v, m)[0]
    t = benchutil.attempt("ours fwd", time_jax, jax.jit(fwd), q, k, v, mask)
    t_b = (
      benchutil.attempt("ours fwd+bwd", time_jax, benchutil.fwd_bwd(fwd), q, k, v, mask)
      if backward
      else None
    )
    tf = tf_b = None
    if "flex" not in skip:
      tf = benchutil.attempt("flex fwd", torch_flex, layout, causal, q, k, v, False)
      if backward:
        tf_b = benchutil.attempt("flex fwd+bwd", torch_flex, layout, causal, q, k, v, True)
    dense_t = base.get(("cudnn", causal))
    rows.append(
      [
        f"{seq}x{heads}",
        f"ours, {label}",
        f"{dens:.3f}",
        fmt_ms(t),
        tfs(t, f),
        ratio(dense_t, t),
        ratio(tf, t),
        fmt_ms(t_b),
        tfs(t_b, 3.5 * f),
        ratio(tf_b, t_b),
        fmt_ms(tf),
      ]
    )
    print(" | ".join(rows[-1]), flush=True)
    if build is not None and t is not None and density is not None and density <= 0.1:
      notes.append(
        f"{seq}x{heads}: building a top-k mask on device took {build * 1e3:.3f} ms = "
        f"{100 * build / t:.2f}% of the forward at density {dens:.3f} (target < 1% at 64k)"
      )


def _pallas_mha(causal: bool, head_dim: int):
  from jax.experimental.pallas.ops.gpu import attention

  sizes = attention.BlockSizes(block_q=128, block_k=128)
  return jax.jit(
    lambda q, k, v: attention.mha(
      q,
      k,
      v,
      None,
      sm_scale=head_dim**-0.5,
      causal=causal,
      block_sizes=sizes,
      interpret=_INTERPRET.value,
    )
  )


def main(argv):
  del argv
  print(benchutil.machine(), flush=True)
  lines = [f"# Block-sparse Pallas kernels on {benchutil.machine()}, {benchutil.today()}", ""]
  if "check" not in set(_SKIP.value):
    print("1. kernel vs reference on this device")
    lines += (
      ["## Kernel vs reference (forward, lse, dQ/dK/dV)", "", "| mask | dtype | |", "|---|---|---|"]
      + correctness()
      + [""]
    )
  print("2. timing")
  rows: list[list[str]] = []
  notes: list[str] = []
  for case in _SEQS.value:
    seq, heads = (int(x) for x in case.split(":"))
    benchutil.attempt(f"case {case}", time_case, seq, heads, rows, notes)
  header = [
    "seq x heads",
    "what",
    "tile density",
    "fwd ms",
    "fwd TF/s",
    "vs cuDNN dense",
    "vs flex",
    "fwd+bwd ms",
    "fwd+bwd TF/s",
    "fwd+bwd vs flex",
    "flex fwd ms",
  ]
  lines += [
    "## Timing (bf16, batch 1, head_dim "
    f"{_HEAD_DIM.value}, tiles {_BLOCK.value}x{_BLOCK.value}; median of {_REPEATS.value})",
    "",
    "TF/s: 4*B*H*S*S*D x tile density (x3.5 for fwd+bwd). 'vs X': X's time / ours.",
    "",
    benchutil.format_table(header, rows),
    "",
  ] + [f"- {n}" for n in notes]
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  benchutil.write_result("block_sparse_gpu", text, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)

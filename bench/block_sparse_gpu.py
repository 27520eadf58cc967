r"""Block-sparse Pallas kernels on a GPU: check against the reference, then time
the Mosaic GPU and Triton kernels against cuDNN and JAX's Pallas `mha`, in one run.

Made for ONE call on the lent GPU (the `device` tool; fits 8 minutes on an H200):

  pip install --no-deps -e . && PYTHONUNBUFFERED=1 python bench/block_sparse_gpu.py \
      --out_dir=$OUT

1. Correctness on the card: each kernel (forward, lse, dQ/dK/dV) vs the float32
   reference at small shapes (GQA, ragged lengths, empty rows, several masks).
2. Forward timing at 16384 x 16 heads (random tile layouts at densities 1.0, 0.5,
   0.25, 0.1, 0.03, and causal) and 65536 x 8 heads (0.1, 0.03); forward+backward
   at 16384 x 16, density 0.1. head_dim 128, bf16, 128x128 tiles. Peers measured in
   the same run: cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`,
   dense or causal) and JAX's Pallas GPU `mha`; ratios are against that cuDNN.
   torch flex_attention is NOT run: its H200 numbers are quoted from
   shared/ANCHORS.md (2026-11-26) and marked as such.
3. Decoding: one new token per sequence (batch 8, 32 query / 8 kv heads) against a
   bf16 KV cache of 4k / 32k / 128k filled to the end, `decode_attention` (the kernels
   with the kv range split across programs, merged by lse) vs cuDNN over the cache
   with `key_value_seq_lengths`; tokens/s.
4. A table printed and written under --out_dir as block_sparse_gpu_<card>_<date>.md.

Effective TF/s counts 4*B*H*Sq*Sk*D x tile density (x0.5 for causal), x3.5 for
forward+backward, as shared/ANCHORS.md does. Every measurement runs in its own
try/except: one that fails prints why and leaves its cell empty.
`--smoke` runs the correctness part interpreted on a CPU at toy sizes (tested).
"""

from __future__ import annotations

import functools

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import (
  block_sparse_attention,
  decode_attention,
  masks,
  reference_attention,
)

# (seq, heads): densities of the forward cases ("causal" for the causal mask).
_CASES = {
  (16384, 16): ["1.0", "0.5", "0.25", "0.1", "0.03", "causal"],
  (65536, 8): ["0.1", "0.03"],
}
_BACKWARD_CASE = (16384, 16, 0.1)  # forward+backward
KERNELS = ("pallas_mosaic_gpu", "pallas_triton")
# torch flex_attention on an H200, from shared/ANCHORS.md (2026-11-26): ms per
# (seq, heads, density) forward, and forward+backward.
FLEX_ANCHORS = {
  (16384, 16, 0.5): 2.73,
  (16384, 16, 0.25): 1.43,
  (16384, 16, 0.1): 0.64,
  (16384, 16, 0.03): 0.28,
  (65536, 8, 0.1): 4.40,
  (65536, 8, 0.03): 1.49,
  (16384, 16, 1.0): 5.31,
}
FLEX_ANCHORS_BWD = {(16384, 16, 0.1): 2.43}
_SMOKE = flags.DEFINE_bool(
  "smoke", False, "CPU dry run: the correctness part only, interpreted, at toy sizes."
)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Tile size (block_q = block_kv).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (median).")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Stop starting new cases after this.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Interpret the kernels (CPU dry run).")
_SKIP = flags.DEFINE_list("skip", [], "Parts to skip: cudnn, mha, check, backward, decode.")
_CHECK_LEN = flags.DEFINE_integer("check_len", 1000, "Sequence length of the correctness check.")


# ---------------------------------------------------------------------------
# 1. Correctness on the card.
# ---------------------------------------------------------------------------


def ours(q, k, v, mask, kernel="pallas", **kw):
  interpret = _INTERPRET.value or _SMOKE.value
  return block_sparse_attention(
    q, k, v, mask, implementation=kernel, return_lse=True, interpret=interpret, **kw
  )


def _grads(attend, q, k, v, mask):
  ct = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3] + (v.shape[-1],), jnp.float32)

  def loss(q, k, v):
    out, lse = attend(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_case(kernel, name, mask, q, k, v, tol):
  reference = lambda q, k, v, m: reference_attention(q, k, v, mask=m, return_lse=True)
  attend = functools.partial(ours, kernel=kernel)
  out, lse = jax.jit(attend)(q, k, v, mask)
  r_out, r_lse = jax.jit(reference)(q, k, v, mask)
  (_, grads), (_, r_grads) = _grads(attend, q, k, v, mask), _grads(reference, q, k, v, mask)
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
  print(f"  {'PASS' if ok else 'FAIL'} {kernel} {name} {q.dtype}: relative max errors {detail}")
  return ok


def correctness() -> list[str]:
  rows, n = [], _CHECK_LEN.value  # not a multiple of the tiles: ragged tails
  heads, dim = (4, 128) if not _SMOKE.value else (2, 64)
  cases = {
    "causal": masks.causal(n, n, block_q=64, block_kv=64),
    # rows before n * 0.15 see nothing (at --check_len=130, 19 of them)
    "causal, empty rows": masks.causal(n, n, block_q=64, block_kv=64, offset=-(n * 3 // 20)),
    "window+anchors": masks.window_with_anchors(
      n, n, window=100, num_anchors=2, offset=3, block_q=128, block_kv=64
    ),
    "random layout 0.3": masks.from_layout(
      benchutil.random_layout(n, 4, 128, 0.3), block_q=128, block_kv=128, q_len=n, kv_len=n
    ),
  }
  if _SMOKE.value:
    cases = dict(list(cases.items())[1:2])
  runs = [(kernel, jnp.bfloat16, 5e-2) for kernel in KERNELS]
  runs += [("pallas_triton", jnp.float32, 1e-4)] if not _SMOKE.value else []
  for kernel, dtype, tol in runs:
    q = benchutil.random_qkv(2, n, heads, dim, dtype, seed=1)[0]
    _, k, v = benchutil.random_qkv(2, n, heads // 2, dim, dtype, seed=2)
    for name, mask in cases.items():
      ok = benchutil.attempt(f"check {name}", check_case, kernel, name, mask, q, k, v, tol)
      row = f"| {kernel} | {name} | {jnp.dtype(dtype).name} | {'pass' if ok else 'FAIL'} |"
      rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# 2. Timing.
# ---------------------------------------------------------------------------


def flops(b, h, s, d, density):
  return 4.0 * b * h * s * s * d * density


def time_jax(fn, *args) -> float:
  return benchutil.median_seconds(fn, *args, repeats=_REPEATS.value, warmup=2)


def time_case(seq: int, heads: int, rows: list[list[str]], notes: list[str]) -> None:
  """Forward (and, for _BACKWARD_CASE, forward+backward) of both kernels at every
  density of the case, with cuDNN and Pallas mha measured on the same inputs."""
  d, blk = _HEAD_DIM.value, _BLOCK.value
  q, k, v = benchutil.random_qkv(1, seq, heads, d, jnp.bfloat16)
  skip = set(_SKIP.value)
  fmt_ms = lambda t: "" if t is None else f"{t * 1e3:.3f}"
  tfs = lambda t, f: "" if t is None else f"{f / t / 1e12:.0f}"
  ratio = lambda a, b: "" if a is None or b is None else f"{a / b:.2f}x"
  base = {}
  for causal in (False, True):
    cudnn = lambda q, k, v, c=causal: jax.nn.dot_product_attention(
      q, k, v, is_causal=c, implementation="cudnn"
    )
    if "cudnn" not in skip:
      base["cudnn", causal] = benchutil.attempt("cudnn", time_jax, jax.jit(cudnn), q, k, v)
    if "mha" not in skip:
      base["mha", causal] = benchutil.attempt(
        "pallas mha", time_jax, _pallas_mha(causal, d), q, k, v
      )
    for peer, name in (("cudnn", "cuDNN dense"), ("mha", "JAX Pallas mha")):
      t, f = base.get((peer, causal)), flops(1, heads, seq, d, 0.5 if causal else 1.0)
      label = "causal" if causal else "full"
      rows.append(
        [
          f"{seq}x{heads}",
          f"{name} ({label})",
          "",
          fmt_ms(t),
          tfs(t, f),
          ratio(base.get(("cudnn", causal)), t),
          "",
          "",
          "",
          "",
        ]
      )
  for density in _CASES[seq, heads]:
    if benchutil.elapsed() > _BUDGET.value:
      notes.append(f"stopped at {seq}x{heads} before {density}: budget reached")
      return
    causal = density == "causal"
    if causal:
      mask = masks.causal(seq, seq, block_q=blk, block_kv=blk)
      dens = 0.5
    else:
      layout = np.asarray(benchutil.random_layout(seq, heads, blk, float(density)))
      mask = masks.from_layout(layout, block_q=blk, block_kv=blk, q_len=seq, kv_len=seq)
      dens = float(layout.mean())
    f = flops(1, heads, seq, d, dens)
    flex = None if causal else FLEX_ANCHORS.get((seq, heads, float(density)))
    for kernel in KERNELS:
      fwd = lambda q, k, v, m, kernel=kernel: ours(q, k, v, m, kernel=kernel)[0]
      t = benchutil.attempt(f"{kernel} fwd", time_jax, jax.jit(fwd), q, k, v, mask)
      t_b = flex_b = None
      if (seq, heads, float(density) if not causal else None) == _BACKWARD_CASE:
        if "backward" not in skip:
          t_b = benchutil.attempt(
            f"{kernel} fwd+bwd", time_jax, benchutil.fwd_bwd(fwd), q, k, v, mask
          )
          if "cudnn" not in skip and kernel == KERNELS[0]:
            cudnn_b = benchutil.attempt(
              "cudnn fwd+bwd",
              time_jax,
              benchutil.fwd_bwd(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
              ),
              q,
              k,
              v,
            )
            if cudnn_b is not None:
              notes.append(f"cuDNN dense fwd+bwd at {seq}x{heads}: {cudnn_b * 1e3:.3f} ms")
        flex_b = FLEX_ANCHORS_BWD.get(_BACKWARD_CASE)
      row = [
        f"{seq}x{heads}",
        f"{kernel}, {'causal' if causal else 'random'}",
        f"{dens:.3f}",
        fmt_ms(t),
        tfs(t, f),
        ratio(base.get(("cudnn", causal)), t),
        "" if flex is None or t is None else f"{flex * 1e-3 / t:.2f}x (anchor)",
        fmt_ms(t_b),
        tfs(t_b, 3.5 * f),
        "" if flex_b is None or t_b is None else f"{flex_b * 1e-3 / t_b:.2f}x (anchor)",
      ]
      rows.append(row)
      print(" | ".join(row), flush=True)


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


_DECODE_CACHES = (4096, 32768, 131072)


def decode_rows(batch: int = 8, heads: int = 32, kv_heads: int = 8) -> list[list[str]]:
  """Decode tokens/s: decode_attention (kernels, split kv) vs cuDNN over the cache."""
  rows = []
  d = _HEAD_DIM.value
  for capacity in _DECODE_CACHES:
    keys = jax.random.split(jax.random.PRNGKey(capacity), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, capacity, kv_heads, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, capacity, kv_heads, d), jnp.bfloat16)
    lengths = jnp.full((batch,), capacity - 1, jnp.int32)
    ours_fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n))
    cudnn = jax.jit(
      lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=n + 1, implementation="cudnn"
      )
    )
    t_ours = benchutil.attempt(f"decode ours {capacity}", time_jax, ours_fn, q, k, v, lengths)
    t_cudnn = None
    if "cudnn" not in set(_SKIP.value):
      t_cudnn = benchutil.attempt(f"decode cudnn {capacity}", time_jax, cudnn, q, k, v, lengths)
    tok = lambda t: f"{batch / t:,.0f}" if t else "-"
    ratio = f"{t_cudnn / t_ours:.2f}x" if t_ours and t_cudnn else "-"
    ms = lambda t: f"{t * 1e3:.3f}" if t else "-"
    rows.append([f"{capacity:,}", ms(t_ours), tok(t_ours), ms(t_cudnn), tok(t_cudnn), ratio])
    print(rows[-1], flush=True)
  return rows


def main(argv):
  del argv
  print(benchutil.machine(), flush=True)
  lines = [f"# Block-sparse Pallas kernels on {benchutil.machine()}, {benchutil.today()}", ""]
  if "check" not in set(_SKIP.value):
    print("1. kernels vs reference on this device")
    header = "| kernel | mask | dtype | |\n|---|---|---|---|"
    lines += ["## Kernels vs reference (forward, lse, dQ/dK/dV)", "", header]
    lines += correctness() + [""]
  if _SMOKE.value:
    print("\n".join(lines))
    return
  print("2. timing")
  rows: list[list[str]] = []
  notes: list[str] = []
  for seq, heads in _CASES:
    benchutil.attempt(f"case {seq}x{heads}", time_case, seq, heads, rows, notes)
  header = [
    "seq x heads",
    "what",
    "tile density",
    "fwd ms",
    "fwd TF/s",
    "vs cuDNN (same run)",
    "vs flex (ANCHORS.md)",
    "fwd+bwd ms",
    "fwd+bwd TF/s",
    "fwd+bwd vs flex (ANCHORS.md)",
  ]
  lines += [
    "## Timing (bf16, batch 1, head_dim "
    f"{_HEAD_DIM.value}, tiles {_BLOCK.value}x{_BLOCK.value}; median of {_REPEATS.value})",
    "",
    "TF/s: 4*B*H*S*S*D x tile density (x3.5 for fwd+bwd). 'vs X': X's time / ours. "
    "cuDNN is measured in this run (dense, or causal for the causal rows); flex is NOT: "
    "its times are quoted from shared/ANCHORS.md (torch flex_attention, H200, 2026-11-26).",
    "",
    benchutil.format_table(header, rows),
    "",
  ] + [f"- {n}" for n in notes]
  if "decode" not in set(_SKIP.value):
    print("3. decoding")
    decode_header = ["cache", "ours ms", "ours tok/s", "cuDNN ms", "cuDNN tok/s", "vs cuDNN"]
    lines += [
      "",
      "## Decoding (1 new token, batch 8, 32 query / 8 kv heads, bf16 cache filled to the end)",
      "",
      "ours: `decode_attention` (implementation None: the platform's kernel, kv range split",
      "across programs and merged by lse); cuDNN: `jax.nn.dot_product_attention(",
      'implementation="cudnn", key_value_seq_lengths=fill)` over the cache.',
      "",
      benchutil.format_table(decode_header, benchutil.attempt("decode", decode_rows) or []),
    ]
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  benchutil.write_result("block_sparse_gpu", text, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)

r"""MoBA (and NSA, when it has a Pallas path) on a GPU: check the Pallas path against
the reference, then time it against the xla path and cuDNN dense causal attention.

Made for ONE call on the lent GPU (the `device` tool), e.g.

  pip install --no-deps -e . && PYTHONUNBUFFERED=1 python bench/hierarchical_gpu.py \
      --out_dir=$OUT

1. Correctness on the card: `moba_attention(implementation="pallas")` (the routed
   block-sparse Triton kernel) vs "reference" at small shapes (GQA, ragged lengths,
   packed segments, decoding), forward, lse and dQ/dK/dV, bf16 and f32. Both run in
   one jit so that XLA computes the (shared, discrete) selection once: two separate
   compilations could round a gate differently and flip a near-tie.
2. Timing, per (seq, heads) case (default 8k, 32k, 64k and 128k with 16 query heads,
   batch 1, head_dim 128, bf16: the issue's targets are MoBA fwd+bwd at 128k >= 8x
   cuDNN dense causal, NSA fwd at 64k >= 5x, both no slower than dense at 8k) and per
   (chunk, topk) config (default 128/8, the issue's; e.g. --configs=512:3,128:8):
   moba forward and forward+backward with implementation "xla" and "pallas", the
   selection alone (`moba_selection`, shared by both), and cuDNN dense causal
   (`jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`). Inputs:
   "random" (i.i.d. q, k, v: neighbouring queries select unrelated chunks, so a q
   tile's union of selections, which the kernel visits, approaches all past chunks)
   and "clustered" (queries share a random direction per 256 positions plus noise:
   neighbours select alike, as in trained models). The "tiles" column is the fraction
   of the causal tiles the kernel visits. Unless --skip=nsa, an NSA row (the paper's
   l=32, d=16, l'=64, n=16, w=512; mean-pooled compression) if `nsa_attention`
   accepts implementation="pallas"; left out when it raises ValueError.
3. A table (times, ratios vs cuDNN) printed and written under --out_dir (default
   bench/results) as hierarchical_gpu_<card>_<date>.md.

Every measurement runs in its own try/except: one that fails prints why and leaves
its cells empty. `--dry_run` runs everything on a CPU with interpreted kernels and
tiny shapes (no cuDNN; nothing written unless --out_dir is given).
"""

from __future__ import annotations

import dataclasses
import functools

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import masks, moba
from sparse_attention.ops.moba import moba_attention, moba_selection

_SEQS = flags.DEFINE_list(
  "seqs", ["8192:16", "32768:16", "65536:16", "131072:16"], "seq:heads cases to time."
)
_CONFIGS = flags.DEFINE_list("configs", ["128:8"], "MoBA chunk_size:topk configs.")
_INPUTS = flags.DEFINE_list("inputs", ["random", "clustered"], "Input kinds: random, clustered.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_GROUP = flags.DEFINE_integer("group", 1, "Query heads per kv head (GQA).")
_BLOCK_Q = flags.DEFINE_integer("block_q", 0, "MoBA Pallas block_q (0: the op's default).")
_BLOCK_KV = flags.DEFINE_integer("block_kv", 0, "MoBA Pallas block_kv (0: the op's default).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median).")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Stop starting new measurements after this.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")
_SKIP = flags.DEFINE_list("skip", [], "Skip: check, cudnn, xla, pallas, selection, backward, nsa.")
_CHECK_LEN = flags.DEFINE_integer("check_len", 1000, "Sequence length of the correctness check.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "CPU dry run: interpreted kernels, tiny shapes, no cuDNN."
)

CLUSTER = 256  # positions sharing a query direction in the "clustered" inputs


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run's parameters (the flags, or the dry run's tiny ones)."""

  seqs: tuple[tuple[int, int], ...]
  configs: tuple[tuple[int, int], ...]
  inputs: tuple[str, ...]
  head_dim: int
  group: int
  block_q: int | None
  block_kv: int | None
  repeats: int
  check_len: int
  skip: frozenset[str]
  interpret: bool


def settings() -> Settings:
  pairs = lambda items: tuple(tuple(int(x) for x in item.split(":")) for item in items)
  block = lambda x: x or None
  if _DRY_RUN.value:
    return Settings(
      seqs=((256, 2),),
      configs=((32, 2), (16, 4)),
      inputs=tuple(_INPUTS.value),
      head_dim=32,
      group=_GROUP.value,
      block_q=block(_BLOCK_Q.value),
      block_kv=block(_BLOCK_KV.value),
      repeats=1,
      check_len=100,
      skip=frozenset(_SKIP.value) | {"cudnn"},
      interpret=True,
    )
  return Settings(
    seqs=pairs(_SEQS.value),
    configs=pairs(_CONFIGS.value),
    inputs=tuple(_INPUTS.value),
    head_dim=_HEAD_DIM.value,
    group=_GROUP.value,
    block_q=block(_BLOCK_Q.value),
    block_kv=block(_BLOCK_KV.value),
    repeats=_REPEATS.value,
    check_len=_CHECK_LEN.value,
    skip=frozenset(_SKIP.value),
    interpret=False,
  )


def moba_fn(s: Settings, implementation: str, chunk_size: int, topk: int, **kw):
  """(q, k, v) -> (out, lse) of moba_attention with this implementation."""
  pallas = implementation == "pallas"
  extra = dict(interpret=s.interpret, block_q=s.block_q, block_kv=s.block_kv) if pallas else {}

  def attend(q, k, v):
    return moba_attention(
      q,
      k,
      v,
      chunk_size=chunk_size,
      topk=topk,
      implementation=implementation,
      return_lse=True,
      **extra,
      **kw,
    )

  return attend


# ---------------------------------------------------------------------------
# 1. Correctness on the card.
# ---------------------------------------------------------------------------


def _loss_grads(attend, ct_out, ct_lse):
  def loss(q, k, v):
    out, lse = attend(q, k, v)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * ct_out) + jnp.sum(finite * ct_lse), (out, lse)

  return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)


def check_case(s: Settings, name: str, q, k, v, tol: float, **kw) -> bool:
  rng = np.random.default_rng(7)
  ct_out = rng.standard_normal(q.shape[:3] + (v.shape[-1],), np.float32)
  ct_lse = rng.standard_normal((q.shape[0], q.shape[2], q.shape[1]), np.float32)
  ours = _loss_grads(moba_fn(s, "pallas", **kw), ct_out, ct_lse)
  reference = _loss_grads(moba_fn(s, "reference", **kw), ct_out, ct_lse)
  # One jit: the selection is computed once for both (see the module docstring).
  (grads, (out, lse)), (r_grads, (r_out, r_lse)) = jax.jit(
    lambda q, k, v: (ours(q, k, v), reference(q, k, v))
  )(q, k, v)
  errors = {}
  for what, a, b in [("out", out, r_out), ("lse", lse, r_lse)] + [
    (f"d{n}", g, r) for n, g, r in zip("qkv", grads, r_grads, strict=True)
  ]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    fin = np.isfinite(b)
    same_inf = bool((np.isneginf(a) == np.isneginf(b)).all() and np.isfinite(a[fin]).all())
    err = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
    errors[what] = (err / max(1.0, float(np.max(np.abs(b[fin])))) if fin.any() else 0.0, same_inf)
  ok = all(e <= tol and fine for e, fine in errors.values())
  detail = ", ".join(f"{w} {e:.1e}" for w, (e, _) in errors.items())
  print(f"  {'PASS' if ok else 'FAIL'} {name} {q.dtype}: relative max errors {detail}", flush=True)
  return ok


def correctness(s: Settings) -> list[str]:
  rows, n, d = [], s.check_len, min(s.head_dim, 128)
  chunk = max(8, n // 10)
  seg = jnp.asarray(np.repeat([[1, 2]], [n * 3 // 10, n - n * 3 // 10], axis=1), jnp.int32)
  seg = jnp.concatenate([seg, jnp.ones((1, n), jnp.int32)])  # row 0: two segments
  cases = {
    f"GQA 2, C={chunk}, topk 3": dict(lq=n, chunk_size=chunk, topk=3),
    f"segments, C={chunk + 3}, topk 4": dict(lq=n, chunk_size=chunk + 3, topk=4, segment_ids=seg),
    f"decode Lq={n // 25}, C={chunk // 2}, topk 2": dict(lq=n // 25, chunk_size=chunk // 2, topk=2),
  }
  for dtype, tol in ((jnp.bfloat16, 5e-2), (jnp.float32, 1e-4)):
    _, k, v = benchutil.random_qkv(2, n, 2, d, dtype, seed=2)
    for name, case in cases.items():
      case = dict(case)
      lq = case.pop("lq")
      q = benchutil.random_qkv(2, lq, 4, d, dtype, seed=1)[0]
      ok = benchutil.attempt(
        f"check {name}", functools.partial(check_case, **case), s, name, q, k, v, tol
      )
      rows.append(f"| {name} | {jnp.dtype(dtype).name} | {'pass' if ok else 'FAIL'} |")
  return rows


# ---------------------------------------------------------------------------
# 2. Timing.
# ---------------------------------------------------------------------------


def time_jax(s: Settings, fn, *args) -> float:
  return benchutil.median_seconds(fn, *args, repeats=s.repeats, warmup=2)


def make_inputs(kind: str, seq: int, heads: int, s: Settings):
  """bf16 q [1, seq, heads, D], k and v [1, seq, heads // group, D]."""
  d = s.head_dim
  q = benchutil.random_qkv(1, seq, heads, d, jnp.float32, seed=1)[0]
  _, k, v = benchutil.random_qkv(1, seq, heads // s.group, d, jnp.bfloat16, seed=2)
  if kind == "clustered":
    n = -(-seq // CLUSTER)
    base = jax.random.normal(jax.random.PRNGKey(3), (1, n, heads, d), jnp.float32)
    q = jnp.repeat(base, CLUSTER, axis=1)[:, :seq] + 0.25 * q
  elif kind != "random":
    raise ValueError(f"unknown input kind {kind!r} (random, clustered)")
  return q.astype(jnp.bfloat16), k, v


def visited_fraction(s: Settings, q, k, chunk_size: int, topk: int) -> float:
  """Tiles the Pallas path visits / tiles of the causal mask (same tiling)."""
  kernel = "pallas_triton"
  geo = moba._pallas_geometry(kernel, q, k, chunk_size, topk, s.block_q, s.block_kv)
  build = jax.jit(
    lambda q, k: (
      moba._pallas_inputs(q, k, chunk_size=chunk_size, topk=topk, segment_ids=None, geo=geo)[
        0
      ].kv_count
    )
  )
  visited = float(jnp.sum(build(q, k)))
  lq, lk = q.shape[1], k.shape[1]
  causal = masks.causal(lq, lk, block_q=geo.block_q, block_kv=geo.block_kv, offset=lk - lq)
  return visited / (float(np.sum(np.asarray(causal.kv_count))) * q.shape[0] * q.shape[2])


fmt_ms = lambda t: "" if t is None else f"{t * 1e3:.2f}"
ratio = lambda base, t: "" if base is None or t is None else f"{base / t:.2f}x"


def row(case, what, config, inputs, tiles, t, t_b, base):
  return [
    case,
    what,
    config,
    inputs,
    tiles,
    fmt_ms(t),
    ratio(base.get("fwd"), t),
    fmt_ms(t_b),
    ratio(base.get("bwd"), t_b),
  ]


def over_budget(notes: list[str], what: str) -> bool:
  if benchutil.elapsed() > _BUDGET.value:
    notes.append(f"skipped {what}: budget of {_BUDGET.value:.0f} s reached")
    print(f"  skipped {what}: budget reached", flush=True)
    return True
  return False


def time_case(s: Settings, seq: int, heads: int, rows: list[list[str]], notes: list[str]):
  case = f"{seq}x{heads}"
  skip = s.skip
  backward = "backward" not in skip
  base: dict[str, float | None] = {}
  q, k, v = make_inputs("random", seq, heads, s)
  if "cudnn" not in skip:
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
    base["fwd"] = benchutil.attempt("cudnn", time_jax, s, jax.jit(cudnn), q, k, v)
    if backward:
      base["bwd"] = benchutil.attempt(
        "cudnn fwd+bwd", time_jax, s, benchutil.fwd_bwd(cudnn), q, k, v
      )
    rows.append(
      row(case, "cuDNN dense causal", "", "", "1.000", base["fwd"], base.get("bwd"), base)
    )
    print(" | ".join(rows[-1]), flush=True)

  for chunk, topk in s.configs:
    config = f"C={chunk}, topk={topk}"
    for kind in s.inputs:
      if over_budget(notes, f"{case} {config} {kind}"):
        return
      q, k, v = make_inputs(kind, seq, heads, s)
      if "selection" not in skip:
        select = jax.jit(lambda q, k, c=chunk, t=topk: moba_selection(q, k, chunk_size=c, topk=t))
        t = benchutil.attempt("selection", time_jax, s, select, q, k)
        rows.append(row(case, "moba selection only", config, kind, "", t, None, base))
        print(" | ".join(rows[-1]), flush=True)
      for impl in ("xla", "pallas"):
        if impl in skip or over_budget(notes, f"{case} {config} {kind} {impl}"):
          continue
        attend = moba_fn(s, impl, chunk, topk)
        fwd = lambda q, k, v, a=attend: a(q, k, v)[0]
        t = benchutil.attempt(f"moba {impl} fwd", time_jax, s, jax.jit(fwd), q, k, v)
        t_b = None
        if backward:
          t_b = benchutil.attempt(
            f"moba {impl} fwd+bwd", time_jax, s, benchutil.fwd_bwd(fwd), q, k, v
          )
        tiles = ""
        if impl == "pallas":
          frac = benchutil.attempt("tile density", visited_fraction, s, q, k, chunk, topk)
          tiles = "" if frac is None else f"{frac:.3f}"
        rows.append(row(case, f"moba {impl}", config, kind, tiles, t, t_b, base))
        print(" | ".join(rows[-1]), flush=True)

  if "nsa" not in skip and not over_budget(notes, f"{case} NSA"):
    time_nsa(s, case, seq, heads, rows, notes, base)


def time_nsa(s: Settings, case, seq, heads, rows, notes, base) -> None:
  """An NSA row if nsa_attention has a Pallas path (ValueError: none, left out)."""
  from sparse_attention.ops import nsa

  q, k, v = make_inputs("random", seq, heads, s)
  block_len, stride = 32, 16
  k_cmp = nsa.compress_mean(k, block_len=block_len, stride=stride)
  v_cmp = nsa.compress_mean(v, block_len=block_len, stride=stride)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(4), q.shape[:3] + (3,)))
  gates = gates.astype(q.dtype)

  def attend(q, k, v):
    return nsa.nsa_attention(
      q,
      k,
      v,
      k_cmp,
      v_cmp,
      gates,
      block_len=block_len,
      stride=stride,
      implementation="pallas",
      interpret=s.interpret,
    )

  try:
    jax.eval_shape(attend, q, k, v)  # raises ValueError at once without a Pallas path
  except ValueError as e:
    notes.append(f"NSA left out: nsa_attention has no Pallas path ({str(e)[:120]})")
    print(f"  NSA left out: {str(e)[:200]}", flush=True)
    return
  t = benchutil.attempt("nsa pallas fwd", time_jax, s, jax.jit(attend), q, k, v)
  t_b = None
  if "backward" not in s.skip:
    t_b = benchutil.attempt("nsa pallas fwd+bwd", time_jax, s, benchutil.fwd_bwd(attend), q, k, v)
  config = f"l={block_len}, d={stride}, l'=64, n=16, w=512"
  rows.append(row(case, "NSA pallas", config, "random", "", t, t_b, base))
  print(" | ".join(rows[-1]), flush=True)


def main(argv):
  del argv
  s = settings()
  print(benchutil.machine(), flush=True)
  lines = [f"# MoBA / NSA (hierarchical) attention on {benchutil.machine()}, {benchutil.today()}"]
  lines.append("")
  if s.interpret:
    lines += ["DRY RUN: interpreted kernels on CPU, tiny shapes; the times mean nothing.", ""]
  if "check" not in s.skip:
    print("1. moba pallas vs reference on this device", flush=True)
    lines += (
      ["## moba pallas vs reference (forward, lse, dQ/dK/dV)", "", "| case | dtype | |"]
      + ["|---|---|---|"]
      + correctness(s)
      + [""]
    )
  print("2. timing", flush=True)
  rows: list[list[str]] = []
  notes: list[str] = []
  for seq, heads in s.seqs:
    benchutil.attempt(f"case {seq}x{heads}", time_case, s, seq, heads, rows, notes)
  header = [
    "seq x heads",
    "what",
    "config",
    "inputs",
    "tiles",
    "fwd ms",
    "fwd vs cuDNN",
    "fwd+bwd ms",
    "fwd+bwd vs cuDNN",
  ]
  blocks = f"{s.block_q or 'default'}x{s.block_kv or 'default'}"
  lines += [
    f"## Timing (bf16, batch 1, head_dim {s.head_dim}, GQA group {s.group}, "
    f"Pallas tiles {blocks}; median of {s.repeats})",
    "",
    "'vs cuDNN': cuDNN dense causal time / this time (> 1: faster than cuDNN). 'tiles': "
    "fraction of the causal tiles the Pallas kernel visits (each computed in full). "
    "moba times include the selection (its own row).",
    "",
    benchutil.format_table(header, rows),
    "",
  ] + [f"- {n}" for n in notes]
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  if s.interpret and not _OUT_DIR.value:
    print(f"dry run: nothing written; {benchutil.elapsed():.0f} s")
    return
  benchutil.write_result("hierarchical_gpu", text, _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)

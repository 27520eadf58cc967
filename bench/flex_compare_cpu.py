r"""This library's programmable attention against PyTorch FlexAttention, on this CPU.

Not part of the test suite (the tests never need torch). Two processes: this script
(jax) builds the inputs and our outputs, writes them to a .npz, and runs
bench/flex_compare_torch.py in a Python that has torch (`--torch_python`), which
computes FlexAttention on the same arrays and writes its results back.

1. Agreement, float32, B2 H4 (2 kv heads, GQA) S256 D64, 64-tiles: the five cases of
   tests/test_programmable.py (softcap + causal; ALiBi with learned slopes + packed
   documents; T5 relative bias from a learned table, bidirectional buckets, no mask;
   prefix-LM with per-row prefixes; a causal 40-key window as a plain predicate).
   Output, lse and the gradients of q, k, v and the parameters for the loss
   sum(out * ct) of our "reference", "xla" and interpreted Triton kernel against eager
   FlexAttention (autograd), each also against a float64 dense computation.
2. Timing, forward, float32, B1 H8 S4096 D64, 128-tiles: causal, causal sliding window,
   causal packed documents, softcap + causal; our jitted "xla" path against
   `torch.compile(flex_attention)` with its block mask (eager if it does not compile,
   said in the table), one after the other in this run.

  python bench/flex_compare_cpu.py --torch_python=/tmp/torchenv/bin/python
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import block_sparse_attention, masks, score_mods

_TORCH_PYTHON = flags.DEFINE_string(
  "torch_python", "/tmp/torchenv/bin/python", "A Python with torch and numpy (no jax needed)."
)
_TRITON = flags.DEFINE_bool("triton", True, "Also the interpreted Triton kernel (part 1).")
_TIME_SEQ = flags.DEFINE_integer("time_seq", 4096, "Sequence length of part 2 (0: skip).")
_WINDOW = flags.DEFINE_integer("window", 512, "Sliding window of part 2 (keys back).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward calls per case (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of (ours, flex) in turn; best median kept.")
_OUT = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")

B, S, HQ, HKV, D, BLOCK = 2, 256, 4, 2, 64, 64
HERE = os.path.dirname(os.path.abspath(__file__))
# The score_mods of tests/test_programmable.py; flex_compare_torch.py restates them in torch.
softcap = score_mods.Softcap(20.0)
alibi = score_mods.alibi  # slopes [HQ]
t5_bias = score_mods.T5Bias(num_buckets=16, max_distance=64)  # table [16, HQ]


def window40(b, h, q_idx, kv_idx):
  return (kv_idx <= q_idx) & (q_idx - kv_idx < 40)


def _segments(lengths_per_row, seq):
  """int32 [rows, seq]: document ids from document lengths."""
  rows = [np.repeat(np.arange(len(lens)), lens)[:seq] for lens in lengths_per_row]
  assert all(len(r) == seq for r in rows)
  return np.stack(rows).astype(np.int32)


def _small_cases(arrays):
  """name -> (BlockMask, score_mod, params key or None)."""
  geo = dict(block_q=BLOCK, block_kv=BLOCK)
  segments = jnp.asarray(arrays["segments"])
  return {
    "softcap_causal": (masks.causal(S, S, **geo), softcap, None),
    "alibi_documents": (masks.document(segments, causal=True, **geo), alibi, "slopes"),
    "t5_bias_no_mask": (masks.dense(S, S, **geo), t5_bias, "table"),
    "prefix_lm": (masks.prefix_lm(jnp.asarray(arrays["prefix"]), S, **geo), None, None),
    "window40_predicate": (masks.create_block_mask(window40, 1, 1, S, S, **geo), None, None),
  }


def _run_torch(what: str, arrays: dict, tmp: str) -> dict:
  src, dst = os.path.join(tmp, f"{what}_in.npz"), os.path.join(tmp, f"{what}_out.npz")
  np.savez(src, threads=os.cpu_count(), **arrays)
  script = os.path.join(HERE, "flex_compare_torch.py")
  # A fresh inductor cache: the first compiled call is a cold compile, every round.
  env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(dir=tmp))
  subprocess.run([_TORCH_PYTHON.value, script, what, src, dst], check=True, env=env)
  return dict(np.load(dst))


def _grads(attend, q, k, v, params, ct):
  """out, lse and d(sum(out * ct))/d(q, k, v[, params])."""

  def loss(q, k, v, p):
    out, lse = attend(q, k, v, p)
    return jnp.sum(out * ct), (out, lse)

  argnums = (0, 1, 2) if params is None else (0, 1, 2, 3)
  grads, (out, lse) = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, params)
  return (out, lse, *grads)


def _dense_f64(q, k, v, visible, score_mod, params):
  """The definition in float64 (as tests/test_programmable.py)."""
  g = HQ // HKV
  kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * D**-0.5
  if score_mod is not None:
    idx = functools.partial(jnp.arange, dtype=jnp.int32)
    args = (s, idx(B)[:, None, None, None], idx(HQ)[None, :, None, None])
    args = (*args, idx(S)[:, None], idx(S)[None, :])
    s = score_mod(*args, params) if params is not None else score_mod(*args)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / l[..., None], vv)
  return out, m[..., 0] + jnp.log(l)


def agreement(tmp: str) -> tuple[str, dict]:
  keys = jax.random.split(jax.random.key(0), 6)
  arrays = {
    "q": np.asarray(jax.random.normal(keys[0], (B, S, HQ, D))),
    "k": np.asarray(jax.random.normal(keys[1], (B, S, HKV, D))),
    "v": np.asarray(jax.random.normal(keys[2], (B, S, HKV, D))),
    "ct": np.asarray(jax.random.normal(keys[3], (B, S, HQ, D))),
    "slopes": np.asarray(0.5 ** jnp.arange(1, HQ + 1, dtype=jnp.float32) + 0.01),
    "table": np.asarray(0.5 * jax.random.normal(keys[4], (16, HQ))),
    "segments": _segments([[64, 100, 92], [30, 130, 40, 56]], S),
    "prefix": np.array([10, 150], np.int32),
    "block": np.int32(BLOCK),
  }
  cases = _small_cases(arrays)
  arrays["cases"] = np.array(json.dumps({n: c[2] for n, c in cases.items()}))
  flex = _run_torch("accuracy", arrays, tmp)
  rel = np.arange(-4 * 1024, 4 * 1024, dtype=np.int32)
  buckets_equal = np.array_equal(np.asarray(t5_bias.bucket(jnp.asarray(rel))), flex["t5_buckets"])

  q, k, v, ct = (jnp.asarray(arrays[x]) for x in ("q", "k", "v", "ct"))
  impls = ["reference", "xla"] + (["pallas_triton"] if _TRITON.value else [])
  rows = []
  err = lambda a, b: f"{float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.1e}"
  for name, (mask, score_mod, param) in cases.items():
    params = None if param is None else jnp.asarray(arrays[param])
    with jax.enable_x64(True):
      f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x), jnp.float64)
      visible = jnp.asarray(mask.to_dense())
      attend = lambda q, k, v, p: _dense_f64(q, k, v, visible, score_mod, p)  # noqa: B023
      exact = [np.asarray(x) for x in _grads(attend, f64(q), f64(k), f64(v), f64(params), ct)]
    flex_out, flex_lse = flex[f"{name}/out"], flex[f"{name}/lse"]
    rows.append(
      [name, "flex (eager)", "", "", err(flex_out, exact[0]), err(flex_lse, exact[1]), ""]
    )
    for impl in impls:
      kw = dict(interpret=True) if impl == "pallas_triton" else {}
      attend = lambda q, k, v, p: block_sparse_attention(  # noqa: B023
        q, k, v, mask, implementation=impl, return_lse=True, score_mod=score_mod,  # noqa: B023
        score_mod_params=p, **kw,  # noqa: B023
      )  # fmt: skip
      start = time.perf_counter()
      ours = _grads(attend, q, k, v, params, ct)
      rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
      grads = max(rel(a, b) for a, b in zip(ours[2:], exact[2:], strict=True))
      label = "pallas_triton (interpreted)" if impl == "pallas_triton" else impl
      rows.append([
        name, label, err(ours[0], flex_out), err(ours[1], flex_lse), err(ours[0], exact[0]),
        err(ours[1], exact[1]), f"{grads:.1e}",
      ])  # fmt: skip
      print(rows[-1], f"{time.perf_counter() - start:.1f} s", flush=True)
  table = benchutil.format_table(
    [
      "case", "implementation", "out vs flex", "lse vs flex", "out vs f64", "lse vs f64",
      "grads vs f64 (relative)",
    ],
    rows,
  )  # fmt: skip
  facts = {
    "torch": f"{flex['torch_version']} (Python {flex['python_version']})",
    "buckets": "equal" if buckets_equal else "DIFFERENT",
  }
  return table, facts


def _time_cases(seq: int):
  geo = dict(block_q=128, block_kv=128)
  rng = np.random.default_rng(0)
  lens = []
  while sum(lens) < seq:
    lens.append(int(rng.integers(64, 1024)))
  lens[-1] -= sum(lens) - seq
  segments = _segments([lens], seq)
  cases = {
    "causal": (masks.causal(seq, seq, **geo), None),
    "sliding": (masks.sliding_window(seq, seq, window=_WINDOW.value, causal=True, **geo), None),
    "document": (masks.document(jnp.asarray(segments), causal=True, **geo), None),
    "softcap_causal": (masks.causal(seq, seq, **geo), softcap),
  }
  return cases, segments, lens


def timing(tmp: str) -> tuple[str, str]:
  seq, hq = _TIME_SEQ.value, 8
  cases, segments, lens = _time_cases(seq)
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, seq, hq, D)) for key in keys)
  fns, rows, ours, best = {}, {}, {}, {}
  for name, (mask, score_mod) in cases.items():
    fns[name] = jax.jit(
      lambda q, k, v, m, mod=score_mod: block_sparse_attention(
        q, k, v, m, implementation="xla", score_mod=mod
      )
    )
    start = time.perf_counter()
    ours[name] = np.asarray(fns[name](q, k, v, mask))
    rows[name] = [name, f"{mask.block_density():.2f}", "", f"{time.perf_counter() - start:.1f}"]
  arrays = {
    "q": np.asarray(q),
    "k": np.asarray(k),
    "v": np.asarray(v),
    "segments": segments,
    "block": np.int32(128),
    "window": np.int32(_WINDOW.value),
    "repeats": np.int32(_REPEATS.value),
    "cases": np.array(json.dumps({n: None for n in cases})),
  }
  loads, flex = [], None
  for _ in range(_ROUNDS.value):
    for name, (mask, _) in cases.items():
      t = benchutil.median_seconds(fns[name], q, k, v, mask, repeats=_REPEATS.value)
      best[name] = min(best.get(name, np.inf), t * 1e3)
      print(name, f"ours {t * 1e3:.0f} ms", flush=True)
    loads.append(os.getloadavg()[0])
    got = _run_torch("timing", arrays, tmp)
    if flex is not None:
      for name in cases:
        got[f"{name}/ms"] = min(got[f"{name}/ms"], flex[f"{name}/ms"])
        got[f"{name}/first_s"] = max(got[f"{name}/first_s"], flex[f"{name}/first_s"])
        got[f"{name}/mask_s"] = min(got[f"{name}/mask_s"], flex[f"{name}/mask_s"])
    flex = got
    loads.append(os.getloadavg()[0])
  for name in cases:
    rows[name][2] = f"{best[name]:.0f}"
  table = []
  for name, row in rows.items():
    ms_flex = float(flex[f"{name}/ms"])
    err = float(np.max(np.abs(ours[name] - flex[f"{name}/out"])))
    table.append([
      *row, str(flex[f"{name}/mode"]), f"{ms_flex:.0f}", f"{float(flex[f'{name}/first_s']):.1f}",
      f"{float(flex[f'{name}/mask_s']) * 1e3:.0f}", f"{ms_flex / float(row[2]):.2f}x",
      f"{err:.1e}",
    ])  # fmt: skip
  text = benchutil.format_table(
    [
      "mask", "tile density", "ours ms", "ours first call s", "flex", "flex ms",
      "flex first call s", "flex create_block_mask ms", "flex ms / ours ms", "max abs diff",
    ],
    table,
  )  # fmt: skip
  note = (
    f"B1 H8 S{seq} D64 float32, 128-tiles; sliding: causal, keys i-{_WINDOW.value}..i; "
    f"document: {len(lens)} packed documents of {lens} tokens, causal inside each. "
    f"{_ROUNDS.value} rounds of (ours, then flex in its own process), best median of "
    f"{_REPEATS.value} calls each; first call = compile (flex: with a cold inductor cache "
    "each round, the slowest round's). "
    f"Load average (1 min) after each part: {', '.join(f'{x:.1f}' for x in loads)}."
  )
  return text, note


def main(argv):
  del argv
  tmp = tempfile.mkdtemp(prefix="flex_compare_")
  load = os.getloadavg()[0]
  part1, facts = agreement(tmp)
  print(part1, flush=True)
  part2, note = timing(tmp) if _TIME_SEQ.value else ("(skipped)", "")
  print(part2, flush=True)
  text = (
    f"# Programmable attention vs PyTorch FlexAttention, {benchutil.machine()} "
    f"({benchutil.today()})\n\n"
    f"`python bench/flex_compare_cpu.py` (torch side: bench/flex_compare_torch.py); torch "
    f"{facts['torch']}, CPU wheel; jax side Python {sys.version.split()[0]}; load average (1 min) "
    f"at start {load:.1f}.\n\n"
    "## 1. Agreement (float32, B2 H4 (2 kv heads) S256 D64, 64-tiles)\n\n"
    "Max abs differences of the output and the lse against eager FlexAttention (its "
    "unfused float32 path; FlexAttention has no backward on CPU, so gradients are compared "
    "with float64 only) and against float64 dense attention of the same functions; grads: "
    "the largest max abs difference, relative to the largest float64 value, over the "
    "gradients of q, k, v and the score_mod parameters "
    "(slopes, table) for the loss sum(out * ct). "
    f"T5 buckets of relative positions -4096..4095, torch vs jax: {facts['buckets']}.\n\n"
    f"{part1}\n\n"
    '## 2. Forward time at 4096 (ours: jitted `implementation="xla"`; flex: '
    "`torch.compile(flex_attention)` with its block mask, eager where said)\n\n"
    f"{note}\n\n{part2}\n"
  )
  out_dir = _OUT.value or os.path.join(HERE, "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"flex_compare_cpu_{benchutil.today()}.md")
  with open(path, "w") as f:
    f.write(text)
  print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)

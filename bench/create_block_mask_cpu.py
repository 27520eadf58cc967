r"""`masks.create_block_mask` at 131072 x 131072 with 128-tiles, on this CPU.

Two predicates: a causal sliding window written as a plain predicate (no parameters)
and packed documents (`segment_ids` as the predicate's parameter, a gather per
element). For each: the jitted builder's compile time, its build time once compiled
(median), XLA's memory analysis of the compiled builder (arguments + outputs +
temporaries), and the peak resident memory of a process that builds it (each predicate
in its own process under `/usr/bin/time -v`; a process that only builds a tiny mask
gives the baseline of jax itself). Checks: at full size the window's tile layout equals
`masks.sliding_window`'s (classified on the host by interval arithmetic); at small
sizes both masks' `to_dense()` and tile classes equal brute force (as
tests/test_programmable.py::test_mask_mod_equals_brute_force_and_never_retraces).

  python bench/create_block_mask_cpu.py [--seq=131072] [--window=4096]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import masks

_SEQ = flags.DEFINE_integer("seq", 131072, "q_len = kv_len.")
_BLOCK = flags.DEFINE_integer("block", 128, "block_q = block_kv.")
_WINDOW = flags.DEFINE_integer("window", 4096, "Keys each query sees (causal window).")
_DOC_LEN = flags.DEFINE_integer("mean_doc_len", 2048, "Mean length of the packed documents.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed builds after the first (median).")
_ONE = flags.DEFINE_enum("one", "", ["", "window", "document", "baseline"], "Internal: one.")
_OUT = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")


def window_mod(window):
  def mod(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

  return mod


def document_mod(b, h, q_idx, kv_idx, segment_ids):
  return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)


def segments(seq, mean_len, seed=0):
  """int32 [1, seq]: document ids of documents with lengths uniform in 1..2*mean_len."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, 2 * mean_len, size=2 * seq // mean_len + 8)
  ids = np.repeat(np.arange(len(lens)), lens)[:seq]
  assert len(ids) == seq
  return ids[None].astype(np.int32)


def builder(which, seq, block, window):
  """(jitted builder, its argument)."""
  geo = dict(block_q=block, block_kv=block)
  if which == "window":
    mod = window_mod(window)  # defined once: its identity is static
    return jax.jit(lambda: masks.create_block_mask(mod, 1, 1, seq, seq, **geo)), ()
  seg = jnp.asarray(segments(seq, _DOC_LEN.value))
  fn = jax.jit(lambda s: masks.create_block_mask(document_mod, 1, 1, seq, seq, params=s, **geo))
  return fn, (seg,)


def measure_one(which):
  """In this process: compile, build, memory analysis; prints one parseable line."""
  seq, block, window = _SEQ.value, _BLOCK.value, _WINDOW.value
  if which == "baseline":
    m = masks.create_block_mask(window_mod(8), 1, 1, 256, 256, block_q=128, block_kv=128)
    jax.block_until_ready(m)
    print("RESULT baseline")
    return
  fn, args = builder(which, seq, block, window)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  xla = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
  start = time.perf_counter()
  mask = jax.block_until_ready(compiled(*args))
  first_s = time.perf_counter() - start
  build_s = benchutil.median_seconds(compiled, *args, repeats=_REPEATS.value, warmup=0)
  visited, full = (np.asarray(x)[0, 0] for x in mask.block_layout())
  same = ""
  if which == "window":
    ref = masks.sliding_window(
      seq, seq, window=window - 1, causal=True, block_q=block, block_kv=block
    )
    r_visited, r_full = (np.asarray(x)[0, 0] for x in ref.block_layout())
    same = str(bool(np.array_equal(visited, r_visited) and np.array_equal(full, r_full)))
  print(
    f"RESULT {which} compile_s={compile_s:.2f} first_s={first_s:.2f} build_s={build_s:.2f} "
    f"xla_bytes={xla} temp_bytes={stats.temp_size_in_bytes} "
    f"out_bytes={stats.output_size_in_bytes} visited={int(visited.sum())} "
    f"partial={int((visited & ~full).sum())} tiles={visited.size} kmax={mask.max_kv_blocks} "
    f"same_as_sliding_window={same}",
    flush=True,
  )


def brute_force_checks():
  """Small sizes: to_dense() and the tile classes equal brute force."""
  lines = []
  for seq, block, window in ((1000, 128, 300), (777, 64, 40)):
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    seg = segments(seq, 90, seed=seq)
    cases = {
      "window": (
        masks.create_block_mask(window_mod(window), 1, 1, seq, seq, block_q=block, block_kv=block),
        (j <= i) & (i - j < window),
      ),
      "document": (
        masks.create_block_mask(
          document_mod, 1, 1, seq, seq, block_q=block, block_kv=block, params=jnp.asarray(seg)
        ),
        (seg[0][:, None] == seg[0][None, :]) & (j <= i),
      ),
    }
    for name, (mask, dense) in cases.items():
      nb = -(-seq // block)
      pad = np.zeros((nb * block, nb * block), bool)
      pad[:seq, :seq] = dense
      valid = np.zeros_like(pad)
      valid[:seq, :seq] = True
      tiles = lambda x, nb=nb, block=block: (
        x.reshape(nb, block, nb, block).swapaxes(1, 2).reshape(nb, nb, -1)
      )
      any_ = tiles(pad).any(-1)
      all_ = (tiles(pad) | ~tiles(valid)).all(-1)
      visited, full = (np.asarray(x)[0, 0] for x in mask.block_layout())
      ok = (
        np.array_equal(np.asarray(mask.to_dense())[0, 0], dense)
        and np.array_equal(visited, any_)
        and np.array_equal(full, any_ & all_)
      )
      lines.append(f"{name} {seq}x{seq}, {block}-tiles: {'equal' if ok else 'DIFFERENT'}")
      print(lines[-1], flush=True)
  return lines


def _run(which):
  """(RESULT fields, peak RSS in KiB) of a child process measuring `which`."""
  argv = [
    "/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), f"--one={which}",
    f"--seq={_SEQ.value}", f"--block={_BLOCK.value}", f"--window={_WINDOW.value}",
    f"--mean_doc_len={_DOC_LEN.value}", f"--repeats={_REPEATS.value}",
  ]  # fmt: skip
  run = subprocess.run(argv, capture_output=True, text=True, check=True)
  line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
  print(line, flush=True)
  fields = dict(kv.split("=") for kv in line.split()[2:])
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
  return fields, rss


def main(argv):
  del argv
  if _ONE.value:
    measure_one(_ONE.value)
    return
  load = os.getloadavg()[0]
  checks = brute_force_checks()
  _, base_rss = _run("baseline")
  rows, notes = [], []
  seq, block = _SEQ.value, _BLOCK.value
  for which in ("window", "document"):
    f, rss = _run(which)
    rows.append([
      which, f"{float(f['compile_s']):.1f}", f"{float(f['first_s']):.1f}",
      f"{float(f['build_s']):.1f}", benchutil.mib(int(f["xla_bytes"])),
      benchutil.mib(int(f["temp_bytes"])), f"{rss / 1024:,.0f}",
      f"{(rss - base_rss) / 1024:,.0f}", f"{int(f['visited']) / int(f['tiles']):.4f}",
      f["partial"], f["kmax"],
    ])  # fmt: skip
    if which == "window":
      notes.append(f"window layout equal to masks.sliding_window's: {f['same_as_sliding_window']}")
  table = benchutil.format_table(
    [
      "predicate", "compile s", "first call s", "build s (compiled)", "XLA MiB (args+out+temp)",
      "XLA temp MiB", "peak RSS MiB", "peak RSS over baseline MiB", "tile density",
      "partial tiles", "Kmax",
    ],
    rows,
  )  # fmt: skip
  dense_gib = seq * seq / 2**30
  text = (
    f"# create_block_mask at {seq:,} x {seq:,}, {benchutil.machine()} ({benchutil.today()})\n\n"
    f"`python bench/create_block_mask_cpu.py`: `masks.create_block_mask(mask_mod, 1, 1, {seq}, "
    f"{seq}, block_q={block}, block_kv={block})` jitted, {(seq // block) ** 2:,} tiles, "
    f"{seq * seq:.2e} predicate evaluations per build. window: `(kv_idx <= q_idx) & (q_idx - "
    f"kv_idx < {_WINDOW.value})`; document: `(seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= "
    f"q_idx)` with `seg` (int32 [1, {seq}], documents of 1..{2 * _DOC_LEN.value - 1} tokens) "
    "passed as `params`. Kmax is left at its default (the whole grid), so the output holds "
    "[Qb, Kb] index arrays. Peak RSS: `/usr/bin/time -v` of a process doing one predicate "
    f"(compile + {1 + _REPEATS.value} builds + layout read-back); baseline = a process "
    f"building a 256 x 256 mask: {base_rss / 1024:,.0f} MiB. The S x S boolean mask would "
    f"take {dense_gib:,.1f} GiB. Load average (1 min) at start: {load:.1f} (2 shared cores; "
    "times move with it).\n\n"
    f"{table}\n\n"
    + "".join(f"- {n}\n" for n in notes)
    + "- brute force (`to_dense()` and tile classes vs a dense NumPy evaluation): "
    + "; ".join(checks)
    + ". The test suite checks the same at 100 x 100 with 32 x 16 tiles: "
    "tests/test_programmable.py::test_mask_mod_equals_brute_force_and_never_retraces.\n"
  )
  out_dir = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"create_block_mask_cpu_{benchutil.today()}.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)

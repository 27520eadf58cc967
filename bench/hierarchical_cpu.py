r"""MoBA and NSA "xla" paths on this CPU: forward and forward+backward times.

Each op runs whole (selection included), jitted, at batch 1, 8 query heads, 2 kv
heads (GQA 4), head_dim 64, float32, per sequence length and input kind:
"random" (i.i.d. q, k, v: neighbouring queries select unrelated blocks) and
"clustered" (queries share a random direction per 256 positions plus noise:
neighbours select alike, as in trained models).

* MoBA: chunk 128, topk 4, each name in --moba_implementations.
* NSA: the paper's l=32, d=16, l'=64, n=16, w=512 (the LM's defaults l=16, d=8,
  l'=32, n=4, w=64 scaled to long sequences), mean-pooled compression, random gates,
  each name in --nsa_implementations.

With --baseline=REV, ops/moba.py and ops/nsa.py of git revision REV are loaded as
modules beside the current ones (they import the rest of the current package), and
each implementation also runs as "<name>@REV": before and after in the same process.
The implementations of a case are timed in alternating rounds; each cell is the best
round's median (a shared machine's load only ever adds time). A name the op does not
accept is left out.

  python bench/hierarchical_cpu.py [--seqs=4096,16384] [--baseline=REV] [--out=...]
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import benchutil
import jax
import jax.numpy as jnp
from absl import app, flags

from sparse_attention.ops import moba, nsa

_SEQS = flags.DEFINE_list("seqs", ["4096", "16384"], "Sequence lengths.")
_INPUTS = flags.DEFINE_list("inputs", ["random", "clustered"], "Input kinds.")
_OPS = flags.DEFINE_list("ops", ["moba", "nsa"], "Ops to time.")
_MOBA = flags.DEFINE_list("moba_implementations", ["xla"], "MoBA implementations.")
_NSA = flags.DEFINE_list("nsa_implementations", ["xla"], "NSA implementations.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per round (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds alternating the implementations.")
_GRAD = flags.DEFINE_bool("grad", True, "Also time forward+backward.")
_LABEL = flags.DEFINE_string("label", "", "A first column naming the code measured.")
_BASELINE = flags.DEFINE_string("baseline", "", "Also time ops/{moba,nsa}.py of this git rev.")
_OUT = flags.DEFINE_string("out", "", "Also write the table to this file.")

CLUSTER = 256  # positions sharing a query direction in the "clustered" inputs
MOBA = dict(chunk_size=128, topk=4)
NSA = dict(block_len=32, stride=16, select_len=64, num_select=16, window=512)


def inputs(kind: str, seq: int):
  """q [1, seq, H, D], k, v [1, seq, Hkv, D], float32."""
  d = _HEAD_DIM.value
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, seq, _HEADS.value, d))
  k, v = (jax.random.normal(key, (1, seq, _KV_HEADS.value, d)) for key in keys[1:3])
  if kind == "clustered":
    base = jax.random.normal(keys[3], (1, -(-seq // CLUSTER), _HEADS.value, d))
    q = jnp.repeat(base, CLUSTER, axis=1)[:, :seq] + 0.25 * q
  elif kind != "random":
    raise ValueError(f"unknown input kind {kind!r} (random, clustered)")
  return q, k, v


_MODULES = {"moba": moba, "nsa": nsa}  # "name@rev" -> the baseline's module, see load


def load_baseline(rev: str) -> None:
  """Loads ops/moba.py and ops/nsa.py of git revision `rev` as "moba@rev", "nsa@rev"."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = tempfile.mkdtemp()
  for name in ("moba", "nsa"):
    source = subprocess.run(
      ["git", "-C", root, "show", f"{rev}:ops/{name}.py"], check=True, capture_output=True
    ).stdout
    path = os.path.join(folder, f"{name}_{rev}.py")
    with open(path, "wb") as f:
      f.write(source)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    _MODULES[f"{name}@{rev}"] = module


def module_and_name(op: str, implementation: str):
  """("xla@REV" -> the baseline's module and "xla"; "xla" -> the current module)."""
  name, _, rev = implementation.partition("@")
  return _MODULES[f"{op}@{rev}" if rev else op], name


def moba_fn(implementation: str):
  lib, name = module_and_name("moba", implementation)

  def attend(q, k, v):
    return lib.moba_attention(q, k, v, implementation=name, **MOBA)

  return attend


def nsa_fn(implementation: str):
  lib, name = module_and_name("nsa", implementation)
  cmp = dict(block_len=NSA["block_len"], stride=NSA["stride"])

  def attend(q, k, v):
    k_cmp, v_cmp = lib.compress_mean(k, **cmp), lib.compress_mean(v, **cmp)
    gates = jax.nn.sigmoid(q[..., :3])  # [B, L, Hq, 3]
    return lib.nsa_attention(q, k, v, k_cmp, v_cmp, gates, implementation=name, **NSA)

  return attend


def accepted(make, implementation: str, q, k, v) -> bool:
  try:
    jax.eval_shape(make(implementation), q, k, v)
  except (ValueError, KeyError) as e:
    print(f"  {implementation} left out: {str(e)[:160]}", flush=True)
    return False
  return True


def time_case(op: str, make, implementations, kind: str, seq: int) -> list[list[str]]:
  q, k, v = inputs(kind, seq)
  names = [i for i in implementations if accepted(make, i, q, k, v)]
  fns = {(i, "fwd"): jax.jit(make(i)) for i in names}
  if _GRAD.value:
    fns.update({(i, "bwd"): benchutil.fwd_bwd(make(i)) for i in names})
  best = {}
  for _ in range(_ROUNDS.value):
    for key, fn in fns.items():
      t = benchutil.median_seconds(fn, q, k, v, repeats=_REPEATS.value)
      best[key] = min(best.get(key, float("inf")), t)
  ms = lambda key: f"{best[key] * 1e3:.0f}" if key in best else ""
  rows = [[_LABEL.value, op, i, kind, str(seq), ms((i, "fwd")), ms((i, "bwd"))] for i in names]
  for r in rows:
    print("| " + " | ".join(r) + " |", flush=True)
  return rows


def main(argv):
  del argv
  rows = []
  rev = _BASELINE.value
  with_baseline = lambda names: names + ([f"{n}@{rev}" for n in names] if rev else [])
  if rev:
    load_baseline(rev)
  for seq in (int(s) for s in _SEQS.value):
    for kind in _INPUTS.value:
      if "moba" in _OPS.value:
        rows += time_case("MoBA", moba_fn, with_baseline(_MOBA.value), kind, seq)
      if "nsa" in _OPS.value:
        rows += time_case("NSA", nsa_fn, with_baseline(_NSA.value), kind, seq)
  header = ["code", "op", "implementation", "inputs", "seq", "fwd ms", "fwd+bwd ms"]
  text = (
    f"{benchutil.machine()}; {benchutil.today()}; batch 1, {_HEADS.value} query heads, "
    f"{_KV_HEADS.value} kv heads, head_dim {_HEAD_DIM.value}, float32; MoBA {MOBA}; "
    f"NSA {NSA}; best of {_ROUNDS.value} rounds' medians of {_REPEATS.value} runs.\n\n"
    + benchutil.format_table(header, rows)
    + "\n"
  )
  print("\n" + text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)

r"""MoBA and NSA decoding on this CPU: the decoding ops vs dense and vs the full op.

One decoding step's attention (1 new token, batch 1, GQA 8 query / 2 kv heads,
head_dim 128, float32) against a cache of 4k / 32k / 128k positions filled to the
end, at lm_1b's settings: MoBA chunks of 512, top 3; NSA l=32, d=16, l'=64, n=16,
w=512, mean-pooled compression. Per cache size, timed in the same run, alternating:

* dense: `jax.nn.dot_product_attention(implementation="xla")` over the whole cache
  (what the step costs without sparsity);
* moba decode / nsa decode: `ops.moba_decode_attention` / `ops.nsa_decode_attention`
  on the left-aligned cache (the LM's generation step);
* moba full op / nsa full op: the op itself with the query as the last position of
  the cache, which is what a model without the decoding ops runs per step (MoBA: the
  whole cache as k; NSA: the op has no query offset, so the LM ran it over max_len
  queries, "nsa full op (L queries)", timed up to --nsa_full_op_max).

The cached summaries (MoBA's chunk mean keys, NSA's compressed keys) are inputs, as in
the LM's cache. tokens/s = 1 / step time.

  python bench/sparse_decode_cpu.py [--capacities=4096,32768,131072] [--nsa_full_op_max=4096]
"""

from __future__ import annotations

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sparse_attention.ops import (
  compress_mean,
  moba_attention,
  moba_decode_attention,
  moba_gate_keys,
  nsa_attention,
  nsa_decode_attention,
)

_CAPACITIES = flags.DEFINE_list("capacities", ["4096", "32768", "131072"], "KV cache sizes.")
_MOBA_FULL_MAX = flags.DEFINE_integer("moba_full_op_max", 131072, "Largest cache for MoBA's op.")
_NSA_FULL_MAX = flags.DEFINE_integer("nsa_full_op_max", 4096, "Largest cache for NSA's op.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per round (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds alternating the variants; best median kept.")
_OUT = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")

MOBA = dict(chunk_size=512, topk=3)
NSA = dict(block_len=32, stride=16, select_len=64, num_select=16, window=512)
HQ, HKV, D = 8, 2, 128


def _variants(capacity: int):
  """{name: (jitted fn, args)} for one cache size, all for the last position."""
  key = jax.random.split(jax.random.PRNGKey(capacity), 4)
  q = jax.random.normal(key[0], (1, 1, HQ, D))
  k = jax.random.normal(key[1], (1, capacity, HKV, D))
  v = jax.random.normal(key[2], (1, capacity, HKV, D))
  gates = jax.nn.sigmoid(jax.random.normal(key[3], (1, 1, HQ, 3)))
  lengths = jnp.array([capacity - 1], jnp.int32)
  geometry = dict(block_len=NSA["block_len"], stride=NSA["stride"])
  k_cmp, v_cmp = compress_mean(k, **geometry), compress_mean(v, **geometry)
  k_gate = moba_gate_keys(k, chunk_size=MOBA["chunk_size"])
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  out = {
    "dense": (jax.jit(dense), (q, k, v)),
    "moba decode": (
      jax.jit(lambda *a: moba_decode_attention(*a, **MOBA)),
      (q, k, v, k_gate, lengths),
    ),
    "nsa decode": (
      jax.jit(lambda *a: nsa_decode_attention(*a, **NSA, implementation="xla")),
      (q, k, v, k_cmp, v_cmp, gates, lengths),
    ),
  }
  if capacity <= _MOBA_FULL_MAX.value:
    out["moba full op"] = (jax.jit(lambda *a: moba_attention(*a, **MOBA)), (q, k, v))
  if capacity <= _NSA_FULL_MAX.value:
    q_all = jnp.zeros((1, capacity, HQ, D)).at[:, -1:].set(q)
    g_all = jnp.zeros((1, capacity, HQ, 3)).at[:, -1:].set(gates)
    nsa_full = lambda *a: nsa_attention(*a, **NSA, implementation="xla")[:, -1:]
    out["nsa full op (L queries)"] = (jax.jit(nsa_full), (q_all, k, v, k_cmp, v_cmp, g_all))
  return out


def main(argv):
  del argv
  rows = []
  for capacity in map(int, _CAPACITIES.value):
    variants = _variants(capacity)
    results = {name: fn(*args) for name, (fn, args) in variants.items()}
    check = [("moba decode", "moba full op"), ("nsa decode", "nsa full op (L queries)")]
    err = {
      a: float(np.max(np.abs(np.asarray(results[a]) - np.asarray(results[b]))))
      for a, b in check
      if b in results
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(_ROUNDS.value):
      for name, (fn, args) in variants.items():
        t = benchutil.median_seconds(fn, *args, repeats=_REPEATS.value)
        best[name] = min(best[name], t)
    for name, t in best.items():
      rows.append([
        f"{capacity:,}", name, f"{t * 1e3:.2f}", f"{1 / t:,.0f}",
        f"{best['dense'] / t:.2f}x", f"{err[name]:.1e}" if name in err else "",
      ])  # fmt: skip
      print(rows[-1], flush=True)
  header = ["cache", "step", "ms", "tok/s", "vs dense", "max |diff| vs full op"]
  text = (
    f"# MoBA and NSA decoding, {benchutil.machine()} ({benchutil.today()})\n\n"
    f"`python bench/sparse_decode_cpu.py`: one new token at the end of a full cache, batch "
    f"1, {HQ} query / {HKV} kv heads, head_dim {D}, float32. MoBA {MOBA}; NSA {NSA} "
    f"(mean-pooled compression). dense = `jax.nn.dot_product_attention(implementation="
    f'"xla")` over the cache; decode = the `ops` decoding op on the left-aligned cache; '
    f"full op = `moba_attention` with the query last / `nsa_attention` over all L "
    f"positions (the LM's step before the decoding ops). Best of {_ROUNDS.value} "
    f"alternating rounds of the median of {_REPEATS.value} steps.\n\n"
    + benchutil.format_table(header, rows)
    + "\n"
  )
  benchutil.write_result("sparse_decode", text, _OUT.value)


if __name__ == "__main__":
  app.run(main)

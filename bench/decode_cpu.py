r"""Decoding throughput on this CPU: `ops.decode_attention` vs dense attention.

One decoding step's attention: n new tokens (default 1) of batch rows whose KV cache
(capacity 4k / 32k / 128k, bf16 or f32, GQA 8 query / 2 kv heads, head_dim 128) is
filled to a given fraction. The baseline is `jax.nn.dot_product_attention
(implementation="xla")` on the whole cache with `key_value_seq_lengths` = the fill
(what a JAX user writes without this library: it reads every row of the cache); the
ours column is `decode_attention` on the xla path (tiles up to the fill only). Both
jitted, timed in the same run, alternating; tokens/s = batch * n / step time.

  python bench/decode_cpu.py [--capacities=4096,32768,131072] [--fills=1.0,0.25]
"""

from __future__ import annotations

import benchutil
import jax
import jax.numpy as jnp
from absl import app, flags

from sparse_attention.ops import decode_attention

_CAPACITIES = flags.DEFINE_list("capacities", ["4096", "32768", "131072"], "KV cache sizes.")
_FILLS = flags.DEFINE_list("fills", ["1.0", "0.25"], "Fill level as a fraction of capacity.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_NEW = flags.DEFINE_integer("new_tokens", 1, "New tokens per step (n).")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads (GQA).")
_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Cache dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per round (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds alternating the two; best median kept.")
_OUT = flags.DEFINE_string("out_dir", "", "Where to write the table (default bench/results).")


def _dense(q, k, v, lengths):
  """The new tokens are the last n of the fill: causal among themselves via the query
  offset is not expressible here, so n = 1 is the exact comparison (n > 1 lets the new
  tokens see each other, a slight overcount of the baseline's work, never less)."""
  return jax.nn.dot_product_attention(
    q, k, v, key_value_seq_lengths=lengths + q.shape[1], implementation="xla"
  )


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  b, n, hq, hkv, d = _BATCH.value, _NEW.value, _HEADS.value, _KV_HEADS.value, _DIM.value
  ours = jax.jit(lambda q, k, v, lengths: decode_attention(q, k, v, lengths, implementation="xla"))
  dense = jax.jit(_dense)
  rows = []
  for capacity in map(int, _CAPACITIES.value):
    key = jax.random.split(jax.random.PRNGKey(capacity), 3)
    q = jax.random.normal(key[0], (b, n, hq, d), dtype)
    k = jax.random.normal(key[1], (b, capacity, hkv, d), dtype)
    v = jax.random.normal(key[2], (b, capacity, hkv, d), dtype)
    for fill in map(float, _FILLS.value):
      lengths = jnp.full((b,), int(fill * capacity) - n, jnp.int32)
      err = jnp.max(jnp.abs(ours(q, k, v, lengths).astype(jnp.float32) - dense(q, k, v, lengths)))
      best = {"ours": float("inf"), "dense": float("inf")}
      for _ in range(_ROUNDS.value):
        for name, fn in (("ours", ours), ("dense", dense)):
          t = benchutil.median_seconds(fn, q, k, v, lengths, repeats=_REPEATS.value)
          best[name] = min(best[name], t)
      tok = lambda t: f"{b * n / t:,.0f}"
      rows.append([
        f"{capacity:,}", f"{fill:.2f}", f"{best['dense'] * 1e3:.2f}", f"{best['ours'] * 1e3:.2f}",
        tok(best["dense"]), tok(best["ours"]), f"{best['dense'] / best['ours']:.2f}x",
        f"{float(err):.1e}",
      ])  # fmt: skip
      print(rows[-1], flush=True)
  header = [
    "cache", "fill", "dense ms", "ours ms", "dense tok/s", "ours tok/s", "speedup", "max |diff|",
  ]  # fmt: skip
  text = (
    f"# Decoding attention, {benchutil.machine()} ({benchutil.today()})\n\n"
    f"`python bench/decode_cpu.py`: batch {b}, {n} new token(s), {hq} query / {hkv} kv "
    f"heads, head_dim {d}, {dtype.name}. dense = `jax.nn.dot_product_attention("
    f'implementation="xla", key_value_seq_lengths=fill)` over the whole cache; ours = '
    f'`decode_attention(implementation="xla")`, tiles up to the fill. Best of '
    f"{_ROUNDS.value} alternating rounds of the median of {_REPEATS.value} steps.\n\n"
    + benchutil.format_table(header, rows)
    + "\n"
  )
  benchutil.write_result("decode", text, _OUT.value)


if __name__ == "__main__":
  app.run(main)

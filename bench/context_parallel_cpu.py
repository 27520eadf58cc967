r"""Context-parallel (ring) attention on 1, 2, 4, 8 fake CPU devices.

For dense causal attention (`context_parallel.block_sparse_attention` with the causal
element mask) and MoBA (`context_parallel.moba_attention`), forward + backward of one
attention layer (batch 1, 4 query heads / 2 kv heads of 64, float32):

  * per-device peak memory: XLA's figure (arguments + outputs + temporaries) of the
    compiled SPMD program, per device; compiled only, so it goes to 128k tokens;
  * time per step: the median of timed runs, at the lengths in --time_lengths. The fake
    devices share this machine's cores, so the time shows the total work and the ring's
    overhead, not a speed-up;
  * ring steps skipped: (step, device) pairs whose sub-mask keeps no tile (they run no
    attention), of n x n. Causal (zig-zag) and a 4k sliding window from the host plan
    (`ring_occupancy`); MoBA from its selection on random inputs, and on inputs biased
    to select recent chunks (as trained models mostly do: "MoBA recent").

n = 1 is the unsharded op. The sequence is in zig-zag order (`SequenceLayout`).

  python bench/context_parallel_cpu.py [--lengths=8192,...] [--time_lengths=8192,16384]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import benchutil  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sparse_attention.ops import context_parallel as cp  # noqa: E402
from sparse_attention.ops import element_masks as em  # noqa: E402

_LENGTHS = flags.DEFINE_list(
  "lengths", ["8192", "16384", "32768", "65536", "131072"], "Sequence lengths (memory)."
)
_TIME_DENSE = flags.DEFINE_list("time_dense", ["8192"], "Lengths timed for dense causal.")
_TIME_MOBA = flags.DEFINE_list("time_moba", ["8192", "16384", "32768"], "Lengths timed for MoBA.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Context axis sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per case (median).")
_CHUNK = flags.DEFINE_integer("moba_chunk", 512, "MoBA chunk size.")
_TOPK = flags.DEFINE_integer("moba_topk", 3, "MoBA chunks per query (own included).")
_OUT = flags.DEFINE_string("out", "", "Write the table here (default bench/results/).")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 64


def attend(kind: str, layout: cp.SequenceLayout):
  """fn(q, k, v) -> out: the attention `kind` over `layout` (stored order)."""
  if kind == "dense causal":  # else MoBA
    return lambda q, k, v: cp.block_sparse_attention(
      q, k, v, em.Band(None, 0), layout=layout, block_q=BLOCK, block_kv=BLOCK
    )
  return lambda q, k, v: cp.moba_attention(
    q, k, v, chunk_size=_CHUNK.value, topk=_TOPK.value, layout=layout, block_q=BLOCK,
    block_kv=BLOCK,
  )  # fmt: skip


def step_fn(kind: str, n: int, length: int):
  """(jitted fwd + bwd step, its input shardings) on a (data 1, context n) mesh."""
  mesh = jax.make_mesh(
    (1, n), ("data", "context"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n]
  )
  layout = cp.SequenceLayout(length, n)
  sharding = NamedSharding(mesh, P(None, "context"))
  grad = benchutil.fwd_bwd(attend(kind, layout))
  return mesh, jax.jit(grad, in_shardings=(sharding,) * 3)


def per_device_bytes(kind: str, n: int, length: int) -> int:
  mesh, step = step_fn(kind, n, length)
  q = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), jnp.float32)
  with jax.set_mesh(mesh):
    stats = step.lower(q, kv, kv).compile().memory_analysis()
  return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def inputs(length: int, recent: bool):
  """Random q, k, v; `recent`: q > 0 and the keys' mean growing with their chunk, so
  MoBA's gates rank the past chunks newest first (a local selection)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, length, HEADS, HEAD_DIM))
  k, v = (jax.random.normal(x, (1, length, KV_HEADS, HEAD_DIM)) for x in keys[1:])
  if recent:
    q = jnp.abs(q) + 1.0
    k = (
      k + 4.0 * (jnp.arange(length) // _CHUNK.value / (length / _CHUNK.value))[None, :, None, None]
    )
  return q, k, v


def seconds(kind: str, n: int, length: int) -> float:
  mesh, step = step_fn(kind, n, length)
  q, k, v = inputs(length, kind == "MoBA recent")
  with jax.set_mesh(mesh):
    return benchutil.median_seconds(step, q, k, v, repeats=_REPEATS.value)


def moba_skipped(n: int, length: int, recent: bool) -> int:
  """(step, device) pairs of the MoBA ring with no kept tile (`inputs`): a device
  skips step t when none of its queries selected a chunk with keys on shard d - t."""
  layout = cp.SequenceLayout(length, n)
  q, k, _ = inputs(length, recent)
  chunk = _CHUNK.value
  ids = jnp.arange(length) // chunk
  num_chunks = -(-length // chunk)
  kbar = (
    jax.ops.segment_sum(k[0], ids, num_chunks) / jnp.bincount(ids, length=num_chunks)[:, None, None]
  )
  chosen, valid = jax.jit(cp._moba_select, static_argnums=3)(q, kbar[None], ids, _TOPK.value)
  chosen = np.where(np.asarray(valid), np.asarray(chosen), -1)[0]  # [H, L, topk]
  owner = np.zeros(length, np.int64)  # the shard holding each position
  owner[layout.shard_positions()] = np.arange(n)[:, None]
  skipped = 0
  for d in range(n):
    rows = np.sort(layout.shard_positions()[d])
    sel = np.unique(chosen[:, rows])
    sel = sel[sel >= 0]
    shards = set(np.unique(owner[(sel[:, None] * chunk + np.arange(chunk)).reshape(-1)]))
    skipped += sum((d - t) % n not in shards for t in range(n))
  return skipped


def band_skipped(fn, n: int, length: int) -> int:
  occupancy = cp.ring_occupancy(fn, cp.SequenceLayout(length, n), block_q=BLOCK, block_kv=BLOCK)
  return int((occupancy == 0).sum())


def main(argv):
  del argv
  lengths = [int(x) for x in _LENGTHS.value]
  devices = [int(x) for x in _DEVICES.value]
  timed = {
    "dense causal": set(map(int, _TIME_DENSE.value)),
    "MoBA": set(map(int, _TIME_MOBA.value)),
    "MoBA recent": set(map(int, _TIME_MOBA.value)),
  }
  mem_rows, time_rows, skip_rows = [], [], []
  for kind in ("dense causal", "MoBA", "MoBA recent"):
    for length in lengths:
      if kind == "MoBA recent" and length not in timed[kind]:
        continue  # its memory is MoBA's
      mem = [benchutil.attempt(f"{kind} {length} n={n}", per_device_bytes, kind, n, length)
             for n in devices]  # fmt: skip
      mem_rows.append([kind, f"{length // 1024}k"] + [benchutil.mib(m) if m else "-" for m in mem])
      print(mem_rows[-1], f"{benchutil.elapsed():.0f} s", flush=True)
      if length in timed[kind]:
        t = [benchutil.attempt(f"{kind} {length} n={n}", seconds, kind, n, length) for n in devices]
        time_rows.append([kind, f"{length // 1024}k"] + [f"{x:.2f}" if x else "-" for x in t])
        print(time_rows[-1], f"{benchutil.elapsed():.0f} s", flush=True)
  for length in lengths:
    for name, count in (
      ("causal (zig-zag)", lambda n, length=length: band_skipped(em.Band(None, 0), n, length)),
      ("sliding 4k", lambda n, length=length: band_skipped(em.Band(-4095, 0), n, length)),
      ("MoBA (random q, k)", lambda n, length=length: moba_skipped(n, length, False)),
      ("MoBA recent", lambda n, length=length: moba_skipped(n, length, True)),
    ):
      skip_rows.append([name, f"{length // 1024}k"] + [f"{count(n)} / {n * n}" for n in devices])
  head = ["attention", "tokens"] + [f"n={n}" for n in devices]
  text = "\n".join(
    [
      "# Context-parallel attention on fake CPU devices",
      "",
      f"Machine: {benchutil.machine()}; {jax.device_count()} fake CPU devices sharing those "
      f"cores. Run: `python bench/context_parallel_cpu.py` (defaults). Batch 1, {HEADS} query "
      f"heads / {KV_HEADS} kv heads of {HEAD_DIM}, float32, tiles {BLOCK}; MoBA chunk "
      f"{_CHUNK.value}, top {_TOPK.value}. n = devices on the context axis (n = 1: the "
      "unsharded op). Forward + backward of one attention layer.",
      "",
      "## Per-device peak memory (XLA memory analysis: arguments + outputs + temporaries)",
      "",
      benchutil.format_table(head, mem_rows),
      "",
      "## Time per step, seconds (all devices share the same CPU cores: total work, not speed-up)",
      "",
      benchutil.format_table(head, time_rows),
      "",
      "## Ring steps skipped ((step, device) pairs with no kept tile, of n x n)",
      "",
      benchutil.format_table(head, skip_rows),
      "",
    ]
  )
  benchutil.write_result("context_parallel", text, _OUT.value)


if __name__ == "__main__":
  app.run(main)

"""Long generation with bounded cost (issue 16): quality and cost of the decode policies.

The model: `configs/lm_text_long.py` (byte LM trained on 1024-byte sequences of the
standard library's sources). Train it first (a quarter of an hour on 2 busy cores):

  python -m sparse_attention.train.main --config=lm_text_long --workdir=/tmp/lm_long
  PYTHONPATH=.:bench python bench/long_generation_cpu.py --workdir=/tmp/lm_long

1. Quality: next-byte loss on held-out sequences of `--length` bytes (the test split,
   never trained on), teacher-forced through each policy's cache (the same logits as
   generating with the true bytes fed back):
   * full: the exact cache over the whole sequence (the model rebuilt with max_len =
     length: RoPE has no table, so positions past the trained 1024 are extrapolated),
     run as the full forward (equal to cached decoding up to round-off, tests/test_lm.py);
   * sinks: StreamingLLM, `anchors` + the most recent `window` tokens, layout positions;
   * hierarchical: anchors + `compressed_blocks` mean-pooled blocks + window;
   * topk k: Kinetics block top-k over the full cache (blocks of 64, k blocks incl. the
     first and the own one), steps of 16 tokens; true positions (past 1024 as full).
   Bounded policies get the same cache budget (`--rows` rows, <= 1024: RoPE positions
   stay in the trained range).
2. Cost: one decode step (batch 1, one new token, jitted) with the cache filled to L
   tokens, for L up to `--length`: ms / token and the cache's bytes.

Writes bench/results/long_generation_cpu<tag>_<date>.md, .png (loss vs position) and
.json (the mean loss at every position per policy).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention import train
from sparse_attention.models import kv_memory, lm
from sparse_attention.train import data

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def policies(rows: int, block: int, slots: int, ablation: bool) -> dict[str, lm.DecodePolicy]:
  anchors = 4
  window = rows - anchors - slots - block + 1  # hierarchical's
  extra = {}
  if ablation:  # what the compressed memory adds: same exact window; the log-size bias
    extra = {
      "sinks, same window": lm.DecodePolicy("sinks", anchors=anchors, window=window),
      "hierarchical + log-size bias": lm.DecodePolicy(
        "hierarchical",
        anchors=anchors,
        compressed_blocks=slots,
        block_size=block,
        window=window,
        pooled_bias=True,
      ),  # fmt: skip
    }
  return {
    "full": lm.DecodePolicy(),
    "sinks": lm.DecodePolicy("sinks", anchors=anchors, window=rows - anchors),
    "hierarchical": lm.DecodePolicy(
      "hierarchical",
      anchors=anchors,
      compressed_blocks=slots,
      block_size=block,
      window=window,
    ),  # fmt: skip
    **extra,
    **{f"topk {k}": lm.DecodePolicy("topk_blocks", block_size=64, topk=k) for k in (4, 8, 16)},
  }


def held_out(config, length: int, count: int) -> np.ndarray:
  """int32 [count, length + 1]: consecutive pieces of the test split's byte stream."""
  datasets = data.make_datasets(config)
  stream = np.asarray(datasets.test.tokens, np.int32)
  count = min(count, (len(stream) - 1) // length)
  return np.stack([stream[i * length : i * length + length + 1] for i in range(count)])


@jax.jit
def _forward_loss(graphdef, state, inputs, targets):
  logits = nnx.merge(graphdef, state)(inputs)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def _decode_loss_fn(chunk: int):
  @jax.jit
  def run(graphdef, state, cache, inputs, targets):
    """Per-token losses [B, L] of teacher-forcing `inputs` in chunks of `chunk` tokens."""
    model = nnx.merge(graphdef, state)
    b, l = inputs.shape

    def step(cache, xs):
      x, y = xs  # [B, chunk]
      logits, cache = model.decode(x, cache)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
      return cache, nll

    split = lambda a: a.reshape(b, l // chunk, chunk).transpose(1, 0, 2)
    cache, nll = jax.lax.scan(step, cache, (split(inputs), split(targets)))
    return nll.transpose(1, 0, 2).reshape(b, l)

  return run


def losses(model: lm.LM, policy: lm.DecodePolicy, seqs: np.ndarray) -> tuple[np.ndarray, float]:
  """(per-token losses [B, L], seconds)."""
  inputs, targets = jnp.asarray(seqs[:, :-1]), jnp.asarray(seqs[:, 1:])
  b, length = inputs.shape
  graphdef, state = nnx.split(model)
  start = time.perf_counter()
  if policy.kind == "exact":
    out = _forward_loss(graphdef, state, inputs, targets)
  else:
    chunk = lm.DECODE_MAX_NEW if policy.kind == "topk_blocks" else 512
    cache = model.init_cache(b, length, policy=policy)
    out = _decode_loss_fn(chunk)(graphdef, state, cache, inputs, targets)
  out = np.asarray(out)
  return out, time.perf_counter() - start


def step_cost(model: lm.LM, policy: lm.DecodePolicy, length: int, repeats: int = 20):
  """(ms per one-token decode step with `length` tokens in the cache, cache bytes)."""
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1, length + 1, policy=policy)
  fill = dict(length=jnp.int32(length))
  if policy.kind == "hierarchical":  # every compressed slot taken (the steady state)
    layers = tuple(
      dataclasses.replace(x, counts=jnp.full_like(x.counts, policy.block_size))
      for x in cache.layers
    )
    fill["layers"] = layers
  cache = dataclasses.replace(cache, **fill)
  token = jnp.zeros((1, 1), jnp.int32)

  @jax.jit
  def step(state, cache):
    logits, new = nnx.merge(graphdef, state).decode(token, cache)
    return logits, new.length

  jax.block_until_ready(step(state, cache))
  best = np.inf
  for _ in range(3):
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(step(state, cache))
      times.append(time.perf_counter() - t)
    best = min(best, float(np.median(times)))
  return 1e3 * best, kv_memory.cache_bytes(cache)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/lm_long")
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--sequences", type=int, default=4)
  parser.add_argument("--rows", type=int, default=512, help="bounded policies' cache rows")
  parser.add_argument("--block", type=int, default=16, help="hierarchical: tokens per block")
  parser.add_argument("--slots", type=int, default=32, help="hierarchical: compressed blocks")
  parser.add_argument("--skip", default="", help="comma-separated policies to leave out")
  parser.add_argument(
    "--ablation",
    action="store_true",
    help="also sinks with hierarchical's window and hierarchical with the log-size bias",
  )
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--tag", default="", help="suffix of the result files' name")
  args = parser.parse_args()

  trained, config = train.load(args.workdir)
  trained_len = trained.config.max_len
  # RoPE has no table: a larger max_len only lifts the limit (for the full cache).
  model = lm.LM(dataclasses.replace(trained.config, max_len=args.length + 1), rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(trained))
  seqs = held_out(config, args.length, args.sequences)
  pols = {k: v for k, v in policies(args.rows, args.block, args.slots, args.ablation).items()
          if k not in args.skip.split(",")}  # fmt: skip
  print(f"{len(seqs)} held-out sequences of {args.length} bytes; trained length {trained_len}")

  curves, seconds = {}, {}
  for name, policy in pols.items():
    curves[name], seconds[name] = losses(model, policy, seqs)
    print(f"{name:14s} loss {curves[name].mean():.4f}  ({seconds[name]:.0f} s)", flush=True)

  lengths = [n for n in (1024, 2048, 4096, 8192, 16384) if n <= args.length]
  costs = {}
  for name, policy in pols.items():
    for n in lengths:
      costs[name, n] = step_cost(model, policy, n - 1)
      print(f"{name:14s} L={n:6d} {costs[name, n][0]:.2f} ms  {costs[name, n][1]:,} B", flush=True)

  write(args, pols, curves, seconds, costs, lengths, trained_len, config, len(seqs))


def _bins(length: int, trained: int) -> list[tuple[int, int]]:
  edges = [0, trained // 2, trained] + [e for e in (2048, 4096, 8192, 16384) if e < length]
  return list(zip(edges, edges[1:] + [length], strict=True))


def write(args, pols, curves, seconds, costs, lengths, trained_len, config, count):
  date = datetime.date.today().isoformat()
  try:
    with open(os.path.join(args.workdir, "final_metrics.json")) as f:
      test_loss = f"{json.load(f)['test']['loss']:.3f} nats"
  except (OSError, KeyError, ValueError):
    test_loss = "see the run's final_metrics.json"
  base = os.path.join(args.out, f"long_generation_cpu{args.tag}_{date}")
  cpu = platform.processor() or platform.machine()
  load = os.getloadavg()[0]
  describe = {
    "full": "exact cache, true positions (extrapolated past 1024)",
    "sinks": "{anchors} anchors + window {window}",
    "sinks, same window": "{anchors} anchors + window {window}",
    "hierarchical + log-size bias": "as hierarchical, + log(tokens) on pooled slots",
    "hierarchical": "{anchors} anchors + {compressed_blocks} x {block_size}-token blocks + "
    "window {window}",
  }
  lines = [
    f"# Long generation, bounded caches vs full cache, CPU ({date})",
    "",
    f"`PYTHONPATH=.:bench python bench/long_generation_cpu.py --length={args.length} "
    f"--rows={args.rows} --block={args.block} --slots={args.slots}"
    f"{' --ablation' if args.ablation else ''}"
    f"{f' --skip={args.skip!r}' if args.skip else ''}{f' --tag={args.tag}' if args.tag else ''}`. "
    "Model: "
    f"configs/lm_text_long.py (lm_tiny shapes: dim 128, 2 blocks, 4 q / 2 kv heads of 32, "
    f"dense, RoPE), trained on {trained_len}-byte sequences for {config.steps} steps "
    f"(test loss on 1024-byte sequences: {test_loss}). Data: "
    f"{count} held-out sequences of {args.length} bytes from the test split (stdlib sources, "
    f"never trained on), teacher-forced through each policy's cache. Machine: {cpu}, "
    f"{os.cpu_count()} cores shared with other jobs (load {load:.1f}); jax {jax.__version__}.",
    "",
    f"Bounded policies: {args.rows} cache rows (RoPE positions < {args.rows}, inside the "
    "trained range). topk: Kinetics block top-k over the full cache (blocks of 64 tokens, "
    "k blocks with the first and the own one), true positions.",
    "",
    "## Next-byte loss (nats) by position",
    "",
  ]
  bins = _bins(args.length, trained_len)
  head = "| policy | cache | " + " | ".join(f"{a}-{b}" for a, b in bins) + " | all |"
  lines += [head, "|" + "---|" * (len(bins) + 3)]
  for name, policy in pols.items():
    fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    what = describe.get(name, "block top-k, {topk} x 64").format(**fields)
    cells = [f"{curves[name][:, a:b].mean():.3f}" for a, b in bins]
    lines.append(f"| {name} | {what} | " + " | ".join(cells) + f" | {curves[name].mean():.3f} |")
  lines += [
    "",
    "## Decode step cost vs cache length (batch 1, one new token, jitted; best of 3 medians)",
    "",
    "| policy | "
    + " | ".join(f"L={n} ms" for n in lengths)
    + " | "
    + " | ".join(f"L={n} cache KiB" for n in lengths)
    + " |",
    "|" + "---|" * (2 * len(lengths) + 1),
  ]
  for name in pols:
    ms = [f"{costs[name, n][0]:.2f}" for n in lengths]
    kib = [f"{costs[name, n][1] / 1024:,.0f}" for n in lengths]
    lines.append(f"| {name} | " + " | ".join(ms) + " | " + " | ".join(kib) + " |")
  lines += [
    "",
    "Teacher-forcing wall time (s, all sequences): "
    + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    + " (full: one forward; topk: steps of 16; bounded: 512-token decode calls, one token at a"
    " time inside).",
  ]
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  means = {k: v.mean(0) for k, v in curves.items()}
  save_curves(means, base + ".json")
  plot(means, trained_len, args.rows, base + ".png")
  print("wrote", base + ".md")


BIN = 64  # positions per point of the saved curves


def save_curves(means: dict[str, np.ndarray], path: str) -> None:
  """The mean loss over the sequences per policy, averaged over bins of BIN positions."""
  binned = {k: np.round(v[: len(v) // BIN * BIN].reshape(-1, BIN).mean(1), 4).tolist()
            for k, v in means.items()}  # fmt: skip
  with open(path, "w") as f:
    json.dump({"bin": BIN, "loss": binned}, f)


def plot(means: dict, trained_len: int, rows: int, path: str, unit: int = 1) -> None:
  """Loss vs position in bins of 256 bytes, one line per policy; means[name][i] is the
  mean loss of positions i * unit .. (i + 1) * unit - 1 (unit = BIN for saved curves)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 4.8))
  width = 256
  styles = {"sinks": ":", "sinks, same window": "-.", "hierarchical + log-size bias": "--"}
  for name, per in means.items():
    per, step = np.asarray(per), width // unit
    binned = per[: len(per) // step * step].reshape(-1, step).mean(1)
    ax.plot((np.arange(len(binned)) + 0.5) * width, binned, styles.get(name, "-"), label=name)
  ax.axvline(trained_len, color="gray", ls=":", lw=1)
  ax.text(trained_len, ax.get_ylim()[1], " trained length", va="top", fontsize=8, color="gray")
  ax.set_xlabel("position (bytes)")
  ax.set_ylabel(f"next-byte loss (nats, {width}-byte bins)")
  ax.set_title(f"Held-out loss vs position: {rows}-row bounded caches vs full cache / block top-k")
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()

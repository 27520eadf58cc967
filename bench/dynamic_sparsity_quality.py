r"""Dynamic sparsity on real attention: recall and output error vs density, per mask method.

Issue 15, item 4. Two models trained here, their real q, k, v captured on held-out
inputs, and four ways of choosing what each query attends to, each swept over its knob:

  window      a fixed local window. LM: the causal sliding window, keys i - w .. i
              (`masks.sliding_window(causal=True)`). DiT: a 2-D local window on the
              16 x 16 token grid, keys within Chebyshev distance r of the query's patch
              (the image analogue of a band; a 1-D band over row-major tokens is worse).
  top-k       per q tile the k best kv tiles by `estimate_tile_scores` (mean-pooled q . k
              + log |tile|), `masks.topk_blocks(keep_diagonal=True)` (LM: causal=True).
  top-p       ZipVL: per q tile the fewest kv tiles whose softmax mass of the same
              estimate reaches p, `masks.topp_blocks(keep_diagonal=True)`.
  permuted    SVG2-style semantic clusters, `ops.permuted_layout`: per head k-means of
              the queries (Cq clusters) and of the keys (Ck clusters), top-p over the
              centroid scores; the mask is "query i sees key j iff (cluster(i),
              cluster(j)) is kept", mapped back to the original token order (exact, not
              tile-rounded). The op is bidirectional; for the causal LM the cluster mask
              is INTERSECTED with the causal mask here (the clusters and the top-p are
              chosen from all keys, future ones included, so part of the mass the
              selection aimed at is then cut away).
  oracle      (reference line) top-p over the TRUE per-tile attention mass: the best a
              tile mask of that density can do; the gap to top-p is the estimate's error.

Per layer, per input, per head, against the dense attention of the model (the LM's
causal attention, the DiT's full attention):

  density   kept visible pairs / visible pairs (LM: the causal pairs; DiT: all pairs)
  recall    the dense softmax probability inside the mask, averaged over query rows
  error     ||O_mask - O_dense|| / ||O_dense|| per (input, head), O_mask the exact
            attention under the mask (`reference_attention` with the dense bool mask)

and each (method, knob) point is the mean over layers, heads and inputs (density and
recall/error averaged separately). The "at equal density" table interpolates each
method's (density, recall) curve linearly at fixed densities.

Models (trained by `trainer.train_and_evaluate` from the packaged configs with the
overrides below, or loaded with --lm_workdir / --dit_workdir if those hold a run):

  LM   configs/lm_text.py, lm_tiny (2 blocks, 4 query / 2 kv heads of 32, RoPE), byte-level
       on the stdlib sources at seq_len 1024 (batch 8, --lm_steps steps); q/k are post-RoPE,
       captured by running the embedding and blocks by hand and calling `attn._qkv`
  DiT  configs/dit_digits.py, dit_tiny (4 blocks, 4 heads of 24) on the digits at
       image_size 32, patch 2: 256 tokens (batch 32, --dit_steps steps); q/k/v of each
       block at t = --dit_time on noised held-out test digits, labels given

  cd sparse_attention && PYTHONPATH=<dir holding sparse_attention>:bench \
    python bench/dynamic_sparsity_quality.py --workdir=/tmp/dsq

(trains into /tmp/dsq/lm and /tmp/dsq/dit, or reuses the runs there). The same runs with
train/main.py: `--config=lm_text --config.data.seq_len=1024 --config.batch_size=8
--config.eval_batch_size=8 --config.steps=200 --config.optimizer.warmup_steps=20` and
`--config=dit_digits --config.data.image_size=32 --config.batch_size=32 --config.steps=400
--config.optimizer.warmup_steps=40`.

Writes bench/results/dynamic_sparsity_quality_<device>_<date>.md and .png.
"""

from __future__ import annotations

import functools
import json
import os
import time

import benchutil
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparse_attention.configs import dit_digits, lm_text  # noqa: E402
from sparse_attention.models import dit, lm  # noqa: E402
from sparse_attention.ops import (  # noqa: E402
  estimate_tile_scores,
  masks,
  permuted_layout,
  reference_attention,
)
from sparse_attention.train import data, trainer  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dynamic_sparsity_quality", "Runs go here.")
_LM_WORKDIR = flags.DEFINE_string("lm_workdir", "", "The LM run (default <workdir>/lm).")
_DIT_WORKDIR = flags.DEFINE_string("dit_workdir", "", "The DiT run (default <workdir>/dit).")
_LM_STEPS = flags.DEFINE_integer("lm_steps", 200, "LM training steps (if trained here).")
_DIT_STEPS = flags.DEFINE_integer("dit_steps", 400, "DiT training steps (if trained here).")
_LM_INPUTS = flags.DEFINE_integer("lm_inputs", 4, "Held-out 1024-byte windows.")
_DIT_INPUTS = flags.DEFINE_integer("dit_inputs", 16, "Held-out test digits.")
_DIT_TIME = flags.DEFINE_float("dit_time", 0.5, "Diffusion time of the DiT's inputs.")
_LM_BLOCK = flags.DEFINE_integer("lm_block", 32, "LM tile size (block_q = block_kv).")
_DIT_BLOCK = flags.DEFINE_integer("dit_block", 16, "DiT tile size (block_q = block_kv).")
_ITERATIONS = flags.DEFINE_integer("kmeans_iterations", 10, "Lloyd iterations (permuted).")
_MODELS = flags.DEFINE_list("models", ["lm", "dit"], "Which models to study.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write (default bench/results).")

TOP_P = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
AT_DENSITY = (0.05, 0.1, 0.2, 0.3, 0.5)
COLORS = {"window": "C0", "top-k": "C1", "top-p": "C2", "permuted": "C3", "oracle": "0.55"}


# ------------------------------------------------------------------------------ training


def _config(model: str, steps: int):
  if model == "lm":
    config = lm_text.get_config()
    config.data.seq_len = 1024
    config.batch_size = 8
    config.eval_batch_size = 8
    config.optimizer.warmup_steps = 20
    config.log_every = 20
    config.eval_every = config.checkpoint_every = max(1, steps // 2)
  else:
    config = dit_digits.get_config()
    config.data.image_size = 32  # patch 2: 16 x 16 = 256 tokens
    config.batch_size = 32
    config.optimizer.warmup_steps = 40
    config.log_every = 50
    config.eval_every = config.checkpoint_every = steps
  config.steps = steps
  return config


def trained(model: str, workdir: str, steps: int):
  """(model, config, seconds spent training here) from `workdir`, training it first if it
  holds no checkpoint."""
  seconds = 0.0
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    t0 = time.perf_counter()
    trainer.train_and_evaluate(_config(model, steps), workdir)
    seconds = time.perf_counter() - t0
  net, config = trainer.load(workdir)
  return net, config, seconds


def provenance(workdir: str, seconds: float) -> str:
  if seconds:
    return f"trained by this run into {workdir}"
  return f"loaded from {workdir}"


def training_log(workdir: str) -> str:
  """'train loss a (step s0) -> b (step s1); eval ..., test ...' from metrics.jsonl."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
  except OSError:
    return "no metrics.jsonl"
  train = [r for r in records if r.get("split") == "train" and "loss" in r]
  parts = []
  if train:
    parts.append(
      f"train loss {train[0]['loss']:.3f} (mean of steps 1-{train[0]['step']}) -> "
      f"{train[-1]['loss']:.3f} (steps to {train[-1]['step']})"
    )
    secs, last = 0.0, 0
    for r in train:
      if r.get("steps_per_s"):
        secs += (r["step"] - last) / r["steps_per_s"]
      last = r["step"]
    parts.append(f"{secs / 60:.1f} min of training steps")
  for split in ("eval", "test"):
    rows = [r for r in records if r.get("split") == split and "loss" in r]
    if rows:
      parts.append(f"{split} loss {rows[-1]['loss']:.3f} at step {rows[-1]['step']}")
  return "; ".join(parts)


# ------------------------------------------------------------------------------- capture


def lm_qkv(model: lm.LM, tokens: jax.Array) -> list[tuple[jax.Array, ...]]:
  """Post-RoPE q [B, L, Hq, D], k, v [B, L, Hkv, D] of every block."""
  positions = lm.segment_positions(None, tokens.shape[1])
  x = model.embed(tokens)
  out = []
  for block in model.blocks:
    q, k, v = block.attn._qkv(block.norm1(x), positions)
    out.append((q, k, v))
    x = block(x, positions, None)
  return out


def dit_qkv(model: dit.DiT, x: jax.Array, t: jax.Array, y: jax.Array):
  """q, k, v [B, N, H, Dh] of every block (as `dit.Attention` computes them)."""
  c = model.config
  h = model.x_embedder(model.patchify(x))
  h = h + jnp.asarray(dit.sincos_pos_embed_2d(c.hidden_size, c.grid_size), h.dtype)
  cond = model.t_embedder(t, h.dtype) + model.y_embedder(y).astype(h.dtype)
  out = []
  for block in model.blocks:
    shift, scale = jnp.split(block.adaLN_modulation(jax.nn.silu(cond)), 6, axis=-1)[:2]
    xin = dit.modulate(block.norm1(h), shift, scale)
    b, n, _ = xin.shape
    qkv = block.attn.qkv(xin).reshape(b, n, 3, block.attn.num_heads, block.attn.head_dim)
    out.append((qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))
    h, _ = block(h, cond)
  return out


# ------------------------------------------------------------------------------- metrics


def dense_probs(q, k, base):
  """Dense softmax probabilities f32 [B, Hq, S, S] under `base` (bool [S, S] or None)."""
  group = q.shape[2] // k.shape[2]
  kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision="highest")
  s = s * q.shape[-1] ** -0.5
  if base is not None:
    s = jnp.where(base, s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1)


@jax.jit
def measure(q, k, v, probs, o_dense, keep, base):
  """(density, recall, error), each f32 [B, Hq], of the bool mask `keep` [B|1, Hq|1, S, S]
  (already inside `base`, the visible pairs of the dense baseline, [S, S])."""
  keep = jnp.broadcast_to(keep, probs.shape)
  density = keep.sum((-2, -1)) / base.sum()
  recall = jnp.where(keep, probs, 0.0).sum(-1).mean(-1)
  o = reference_attention(q, k, v, mask=keep).astype(jnp.float32)
  num = jnp.sqrt(jnp.sum((o - o_dense) ** 2, axis=(1, 3)))  # [B, Hq]
  den = jnp.sqrt(jnp.sum(o_dense**2, axis=(1, 3)))
  return density, recall, num / den


def permuted_dense(layout) -> jax.Array:
  """bool [B, Hq, Sq, Sk] of a PermutedLayout in the ORIGINAL token order."""
  b, hq, sq = layout.q_order.shape
  group = hq // layout.kv_order.shape[1]
  kv_order = jnp.repeat(layout.kv_order, group, axis=1)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hq)[None, :, None]
  qc = jnp.zeros_like(layout.q_cluster).at[bi, hi, layout.q_order].set(layout.q_cluster)
  kc = jnp.zeros_like(layout.kv_cluster).at[bi, hi, kv_order].set(layout.kv_cluster)
  return layout.keep[bi[..., None], hi[..., None], qc[..., :, None], kc[..., None, :]]


_GEOMETRY = ("block_q", "block_kv", "q_len", "kv_len")


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=_GEOMETRY)
def _topk_dense(scores, k, causal, **geometry):
  return masks.topk_blocks(scores, k, keep_diagonal=True, causal=causal, **geometry).to_dense()


@functools.partial(jax.jit, static_argnums=(2,), static_argnames=_GEOMETRY)
def _topp_dense(scores, p, causal, **geometry):
  return masks.topp_blocks(scores, p, keep_diagonal=True, causal=causal, **geometry).to_dense()


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _permuted_dense(q, k, p, cq, ck, iterations, block):
  layout = permuted_layout(
    q, k, num_q_clusters=cq, num_kv_clusters=ck, top_p=p, iterations=iterations,
    block_q=block, block_kv=block,
  )  # fmt: skip
  return permuted_dense(layout)


def oracle_scores(probs, block: int) -> jax.Array:
  """log of the true attention mass per (q tile, kv tile), [B, Hq, Qb, Kb]."""
  b, h, s, _ = probs.shape
  nb = s // block
  mass = probs.reshape(b, h, nb, block, nb, block).sum((3, 5))
  return jnp.log(mass)  # causal future tiles: -inf, never kept


def grid_window(grid: int, radius: int) -> np.ndarray:
  """bool [N, N]: key within Chebyshev distance `radius` of the query on the token grid."""
  r, c = np.divmod(np.arange(grid * grid), grid)
  return (np.abs(r[:, None] - r[None]) <= radius) & (np.abs(c[:, None] - c[None]) <= radius)


def sweep(layers, *, causal: bool, block: int, windows, topk, clusters, grid: int = 0):
  """{(method, knob label): [(density, recall, error) per layer]} (each mean over B, H)."""
  results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
  for li, (q, k, v) in enumerate(layers):
    t0 = time.perf_counter()
    s = q.shape[1]
    base = jnp.asarray(np.tril(np.ones((s, s), bool)) if causal else np.ones((s, s), bool))
    probs = dense_probs(q, k, base)
    o_dense = reference_attention(q, k, v, mask=base[None, None]).astype(jnp.float32)
    geometry = dict(block_q=block, block_kv=block, q_len=s, kv_len=s)
    scores = estimate_tile_scores(q, k, block_q=block, block_kv=block)

    def record(method, knob, keep, layer=(q, k, v, probs, o_dense, base)):
      d, r, e = measure(*layer[:5], keep & layer[5], layer[5])
      results.setdefault((method, knob), []).append(
        (float(d.mean()), float(r.mean()), float(e.mean()))
      )

    for w in windows:
      if causal:
        keep = masks.sliding_window(s, s, window=w, causal=True, block_q=block, block_kv=block)
        record("window", f"w={w}", keep.to_dense())
      else:
        record("window", f"r={w}", jnp.asarray(grid_window(grid, w))[None, None])
    for kk in topk:
      record("top-k", f"k={kk}", _topk_dense(scores, kk, causal, **geometry))
    oracle = oracle_scores(probs, block)
    for p in TOP_P:
      record("top-p", f"p={p}", _topp_dense(scores, p, causal, **geometry))
      record("oracle", f"p={p}", _topp_dense(oracle, p, causal, **geometry))
    for cq, ck in clusters:
      for p in TOP_P:
        keep = _permuted_dense(q, k, p, cq, ck, _ITERATIONS.value, block)
        record(f"permuted {cq}/{ck}", f"p={p}", keep)
    print(f"  layer {li}: {time.perf_counter() - t0:.0f} s", flush=True)
  return results


def diagnostics(layers, *, causal: bool, block: int, clusters, grid: int = 0) -> list[str]:
  """Per layer: how spread the dense attention is, and (LM) how much of the permuted
  selection the causal mask throws away."""
  lines = []
  for li, (q, k, _v) in enumerate(layers):
    s = q.shape[1]
    base = jnp.asarray(np.tril(np.ones((s, s), bool)) if causal else np.ones((s, s), bool))
    probs = dense_probs(q, k, base)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
    keys = np.asarray(jnp.exp(entropy).mean((0, 2)))  # effective keys per query, per head
    if causal:
      i = np.arange(s)
      near, what = jnp.asarray(i[:, None] - i[None] <= block), f"keys within {block} back"
    else:
      near, what = jnp.asarray(grid_window(grid, 1)), "the 3 x 3 patch neighbourhood"
    local = np.asarray(jnp.where(near, probs, 0.0).sum(-1).mean((0, 2)))
    line = (
      f"- layer {li}: effective keys per query exp(entropy) per head "
      f"{', '.join(f'{x:.0f}' for x in keys)}; mass on {what} "
      f"{', '.join(f'{x:.2f}' for x in local)}"
    )
    if causal:
      cq, ck = clusters[-1]
      keep = _permuted_dense(q, k, 0.9, cq, ck, _ITERATIONS.value, block)
      share = float((keep & base).sum() / keep.sum())
      line += (
        f"; permuted {cq}/{ck} at p=0.9 keeps {float(keep.mean()):.2f} of ALL pairs, of "
        f"which {share:.2f} are causal (the rest, selected, is cut by the causal mask)"
      )
    lines.append(line)
  return lines


def summarise(results, layer: int | None = None):
  """[(method, knob, density, recall, error)] averaged over layers (or of one layer), in
  sweep order."""
  pick = lambda v: np.mean(np.asarray(v), axis=0) if layer is None else np.asarray(v[layer])
  return [(m, kn, *pick(v)) for (m, kn), v in results.items()]


def at_density(rows, method: str, target: float) -> tuple[float, float]:
  """(recall, error) of `method` linearly interpolated at `target` density (nan outside)."""
  pts = sorted((d, r, e) for m, _, d, r, e in rows if m == method)
  d = np.array([p[0] for p in pts])
  if not len(d) or target < d[0] - 1e-9 or target > d[-1] + 1e-9:
    return float("nan"), float("nan")
  r = np.interp(target, d, [p[1] for p in pts])
  e = np.exp(np.interp(target, d, np.log([max(p[2], 1e-12) for p in pts])))
  return float(r), float(e)


def methods_of(rows) -> list[str]:
  seen: list[str] = []
  for m, *_ in rows:
    if m not in seen:
      seen.append(m)
  return seen


def color(method: str) -> str:
  return COLORS.get(method.split()[0], "k")


def plot(panels, path: str) -> None:
  """panels: [(title, rows)]; recall (top) and error (bottom) vs density, one column each."""
  fig, axes = plt.subplots(2, len(panels), figsize=(6.2 * len(panels), 8.5), squeeze=False)
  styles = ["-", "--", ":", "-."]
  for col, (title, rows) in enumerate(panels):
    perm = 0
    for method in methods_of(rows):
      pts = sorted((d, r, e) for m, _, d, r, e in rows if m == method)
      d, r, e = (np.array(x) for x in zip(*pts, strict=True))
      if method.startswith("permuted"):
        ls, perm = styles[perm % len(styles)], perm + 1
      else:
        ls = "--" if method == "oracle" else "-"
      label = "oracle tiles (true mass)" if method == "oracle" else method
      kw = dict(color=color(method), linestyle=ls, marker="o", markersize=3.5, label=label)
      axes[0, col].plot(d, r, **kw)
      axes[1, col].plot(d, e, **kw)
    axes[0, col].set_title(title, fontsize=10)
    axes[0, col].set_ylabel("attention-mass recall")
    axes[1, col].set_ylabel("relative output error ||O_mask - O|| / ||O||")
    axes[1, col].set_yscale("log")
    for ax in axes[:, col]:
      ax.set_xscale("log")
      ax.set_xlabel("density (kept / visible pairs)")
      ax.grid(True, which="both", alpha=0.3)
    axes[0, col].legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(rows) -> str:
  header = ["method", "knob", "density", "recall", "rel. error"]
  body = [[m, kn, f"{d:.3f}", f"{r:.3f}", f"{e:.3f}"] for m, kn, d, r, e in rows]
  return benchutil.format_table(header, body)


def per_layer_table(results, targets=(0.1, 0.3)) -> str:
  """Recall per layer at equal density (each layer's own curve interpolated)."""
  layers = len(next(iter(results.values())))
  per = [summarise(results, li) for li in range(layers)]
  header = ["method"] + [f"L{li} @ {t:g}" for t in targets for li in range(layers)]
  body = []
  for method in methods_of(per[0]):
    cells = [at_density(per[li], method, t)[0] for t in targets for li in range(layers)]
    body.append([method] + ["-" if np.isnan(x) else f"{x:.3f}" for x in cells])
  return benchutil.format_table(header, body)


def ranking(rows, targets=(0.1, 0.2, 0.3, 0.5)) -> list[str]:
  """Per target density: the methods by interpolated recall (the best permuted setting
  stands for permuted; the oracle in brackets)."""
  lines = []
  for t in targets:
    recall = {m: at_density(rows, m, t)[0] for m in methods_of(rows)}
    perm = [m for m in recall if m.startswith("permuted") and not np.isnan(recall[m])]
    keep = [m for m in ("window", "top-k", "top-p") if not np.isnan(recall[m])]
    if perm:
      keep.append(max(perm, key=recall.get))
    if len(keep) < 2:
      continue
    order = " > ".join(f"{m} {recall[m]:.3f}" for m in sorted(keep, key=recall.get, reverse=True))
    oracle = "" if np.isnan(recall["oracle"]) else f" (oracle tiles {recall['oracle']:.3f})"
    lines.append(f"- density {t:g}: {order}{oracle}")
  return lines


def equal_density_table(rows) -> str:
  header = (
    ["method"] + [f"recall @ {t:g}" for t in AT_DENSITY] + [f"error @ {t:g}" for t in AT_DENSITY]
  )
  body = []
  for method in methods_of(rows):
    vals = [at_density(rows, method, t) for t in AT_DENSITY]
    fmt = lambda x: "-" if np.isnan(x) else f"{x:.3f}"
    body.append([method] + [fmt(r) for r, _ in vals] + [fmt(e) for _, e in vals])
  return benchutil.format_table(header, body)


# ---------------------------------------------------------------------------------- main


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  print(benchutil.machine(), flush=True)
  lm_dir = _LM_WORKDIR.value or os.path.join(_WORKDIR.value, "lm")
  dit_dir = _DIT_WORKDIR.value or os.path.join(_WORKDIR.value, "dit")
  sections, panels, trained_s = [], [], 0.0

  # ---- the LM
  if "lm" in _MODELS.value:
    model, config, lm_trained_s = trained("lm", lm_dir, _LM_STEPS.value)
    trained_s += lm_trained_s
    seq = config.data.seq_len
    cfg = model.config
    datasets = data.make_datasets(config)
    n = min(_LM_INPUTS.value, len(datasets.test))
    tokens = jnp.asarray(np.stack([datasets.test[i]["inputs"] for i in range(n)]))
    layers = lm_qkv(model, tokens)
    # The captured q/k/v reproduce the model: its logits from them equal model(tokens).
    want = model(tokens)
    got = _lm_logits_from(model, tokens, layers)
    check = float(jnp.max(jnp.abs(got - want)))
    print(f"LM: {seq} tokens, {n} held-out windows; capture check {check:.1e}", flush=True)
    block = _LM_BLOCK.value
    results = sweep(
      layers, causal=True, block=block, windows=(8, 16, 32, 64, 128, 256, 512),
      topk=(1, 2, 3, 4, 6, 8, 12, 16), clusters=((16, 32), (32, 64), (64, 128)),
    )  # fmt: skip
    rows = summarise(results)
    notes = diagnostics(layers, causal=True, block=block, clusters=((64, 128),))
    title = (
      f"LM (lm_tiny, bytes, {seq} tokens, causal):\n{cfg.depth} layers x {cfg.num_heads} heads "
      f"x {n} inputs; tile {block}"
    )
    panels.append((title, rows))
    sections.append(
      (
        "LM",
        f"configs/lm_text.py, `{config.model.name}` ({cfg.depth} blocks, dim {cfg.dim}, "
        f"{cfg.num_heads} query / {cfg.num_kv_heads} kv heads of {cfg.head_dim}, RoPE), "
        f"seq_len {seq}, batch {config.batch_size}, trained {config.restored_step} steps "
        f"({training_log(lm_dir)}; {provenance(lm_dir, lm_trained_s)}). "
        f"Inputs: the first {n} {seq}-byte windows of the test "
        f"split (held out). Dense baseline: causal attention; tile {block} "
        f"({seq // block} x {seq // block} tiles). The captured post-RoPE q/k/v, attended "
        f"densely and fed on through the blocks, reproduce the model's logits to {check:.1e}.",
        results,
        notes,
      )
    )

  # ---- the DiT
  if "dit" in _MODELS.value:
    model, config, dit_trained_s = trained("dit", dit_dir, _DIT_STEPS.value)
    trained_s += dit_trained_s
    cfg = model.config
    datasets = data.make_datasets(config)
    test = data.load_split(datasets, "test")
    n = min(_DIT_INPUTS.value, len(test["label"]))
    x0 = jnp.asarray(test["image"][:n])  # normalised as in training
    y = jnp.asarray(test["label"][:n], jnp.int32)
    t = jnp.full((n,), _DIT_TIME.value, jnp.float32)
    noise = jax.random.normal(jax.random.key(0), x0.shape, jnp.float32)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    layers = dit_qkv(model, xt, t, y)
    want = model(xt, t, y)
    got = _dit_out_from(model, xt, t, y, layers)
    check = float(jnp.max(jnp.abs(got - want)))
    tokens_n = cfg.num_tokens
    print(f"DiT: {tokens_n} tokens, {n} held-out digits; capture check {check:.1e}", flush=True)
    block = _DIT_BLOCK.value
    results = sweep(
      layers, causal=False, block=block, windows=(1, 2, 3, 4, 5, 6, 8),
      topk=(1, 2, 3, 4, 6, 8, 12), clusters=((8, 16), (16, 32), (32, 64)),
      grid=cfg.grid_size,
    )  # fmt: skip
    rows = summarise(results)
    notes = diagnostics(layers, causal=False, block=block, clusters=(), grid=cfg.grid_size)
    title = (
      f"DiT (dit_tiny, digits {cfg.image_size}px patch {cfg.patch_size}: {tokens_n} tokens, "
      f"t={_DIT_TIME.value:g}):\n{cfg.depth} layers x {cfg.num_heads} heads x {n} inputs; "
      f"tile {block}"
    )
    panels.append((title, rows))
    sections.append(
      (
        "DiT",
        f"configs/dit_digits.py, `{config.model.name}` ({cfg.depth} blocks, width "
        f"{cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}), digits at "
        f"{cfg.image_size} px, patch {cfg.patch_size}: {tokens_n} tokens "
        f"({cfg.grid_size} x {cfg.grid_size}), batch {config.batch_size}, trained "
        f"{config.restored_step} steps ({training_log(dit_dir)}; "
        f"{provenance(dit_dir, dit_trained_s)}). Inputs: the first {n} test "
        f"digits (held out), noised to t = {_DIT_TIME.value:g} (x_t = (1 - t) x_0 + t e), "
        f"their own labels. Dense baseline: full attention; tile {block} (one tile = one "
        f"row of the token grid, {tokens_n // block} x {tokens_n // block} tiles). "
        f"The captured q/k/v reproduce the model's output to {check:.1e}.",
        results,
        notes,
      )
    )

  # ---- write
  device = jax.devices()[0]
  where = "cpu" if device.platform == "cpu" else device.device_kind.replace(" ", "_")
  out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  stem = f"dynamic_sparsity_quality_{where}_{benchutil.today()}"
  plot(panels, os.path.join(out_dir, f"{stem}.png"))
  lines = [
    "# Dynamic sparsity on real attention: recall and output error vs density",
    "",
    f"{benchutil.machine()}; {benchutil.today()}. Script: bench/dynamic_sparsity_quality.py "
    f"(its docstring defines the methods and metrics). Plot: `{stem}.png`.",
    "",
    "What is measured: for every attention layer of two small models trained here, on "
    "held-out inputs, the exact attention under each method's mask against the model's "
    "dense attention: density (kept / visible pairs), attention-mass recall (the dense "
    "softmax probability inside the mask, mean over query rows) and relative output error "
    "||O_mask - O_dense|| / ||O_dense|| per (input, head); each point is the mean over "
    "layers, heads and inputs. Masks: window (LM: causal sliding window w; DiT: 2-D local "
    "window of Chebyshev radius r on the token grid), top-k / top-p tiles "
    "(`estimate_tile_scores` + `topk_blocks` / `topp_blocks`, diagonal tile always kept, "
    "LM causal), permuted clusters (`permuted_layout`, SVG2-style, Cq/Ck query/key "
    f"clusters, {_ITERATIONS.value} Lloyd iterations, top-p over centroid scores; the "
    "LM's cluster mask intersected with the causal mask, after a selection made over all "
    "keys), and an oracle (top-p over the true per-tile mass, for reference). These are "
    "masks applied to attention the models were trained DENSE with; nothing was trained "
    "sparse. The models are tiny (0.5M parameters) and briefly trained: their attention "
    "is what a few hundred steps learn, not a production model's.",
    "",
  ]
  for name, text, results, notes in sections:
    rows = summarise(results)
    lines += [
      f"## {name}",
      "",
      text,
      "",
      "The dense attention, per layer (means over inputs and query rows):",
      "",
      *notes,
      "",
      "Recall at equal density, best first (interpolated; methods whose sweep does not "
      "reach a density are left out):",
      "",
      *ranking(rows),
      "",
      "Recall and error interpolated at equal density (linear in density between the "
      "sweep's points; '-' outside a method's range):",
      "",
      equal_density_table(rows),
      "",
      "Recall per layer (L0 = the first block) at equal density, each layer's own curve:",
      "",
      per_layer_table(results),
      "",
      "All points (mean over layers, heads, inputs):",
      "",
      table(rows),
      "",
    ]
  lines += [
    f"Run time {time.perf_counter() - start:.0f} s"
    + (
      f" ({trained_s:.0f} s of it training)."
      if trained_s
      else " (analysis only: the models were loaded; their training is described above)."
    ),
  ]
  text = "\n".join(lines) + "\n"
  path = os.path.join(out_dir, f"{stem}.md")
  with open(path, "w") as f:
    f.write(text)
  print("\n" + text + f"\nwritten to {path}", flush=True)


def _lm_logits_from(model: lm.LM, tokens, layers) -> jax.Array:
  """The LM's logits with each block's attention recomputed from the captured q/k/v."""
  x = model.embed(tokens)
  b, s = tokens.shape
  causal = jnp.tril(jnp.ones((s, s), bool))[None, None]
  for block, (q, k, v) in zip(model.blocks, layers, strict=True):
    o = reference_attention(q, k, v, mask=causal)
    x = x + block.attn.wo(o.reshape(b, s, -1))
    x = x + block.mlp(block.norm2(x))
  return model._logits(x)


def _dit_out_from(model: dit.DiT, x, t, y, layers) -> jax.Array:
  """The DiT's output with each block's attention recomputed from the captured q/k/v."""
  c = model.config
  h = model.x_embedder(model.patchify(x))
  h = h + jnp.asarray(dit.sincos_pos_embed_2d(c.hidden_size, c.grid_size), h.dtype)
  cond = model.t_embedder(t, h.dtype) + model.y_embedder(y).astype(h.dtype)
  for block, (q, k, v) in zip(model.blocks, layers, strict=True):
    mod = block.adaLN_modulation(jax.nn.silu(cond))
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    b, n, d = h.shape
    o = block.attn.proj(reference_attention(q, k, v).reshape(b, n, d))
    h = h + gate_msa[:, None] * o
    h = h + gate_mlp[:, None] * block.mlp(dit.modulate(block.norm2(h), shift_mlp, scale_mlp))
  return model.unpatchify(model.final_layer(h, cond))


if __name__ == "__main__":
  app.run(main)

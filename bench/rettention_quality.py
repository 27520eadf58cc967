r"""Re-ttention's sample quality on the digits DiT: dense vs plain block-sparse vs Re-ttention.

From ONE trained DiT (configs/dit_digits.py) and ONE trained LITv2 digits classifier
(configs/litv2_digits.py), both trained with train/main.py:

  python -m sparse_attention.train.main --config=dit_digits --workdir=/tmp/dit
  python -m sparse_attention.train.main --config=litv2_digits --workdir=/tmp/litv2
  python bench/rettention_quality.py --dit_workdir=/tmp/dit --classifier_workdir=/tmp/litv2

(both models come back with `train.load(workdir)`, configs included), samples `--num_samples`
images from the SAME noise and labels (labels cycling 0..9) with the flow-matching Euler
sampler of train/diffusion.py in each attention mode:

  dense              every step dense: the reference
  sparse             every step block-sparse over the local-window mask (the issue's (a))
  dense_then_sparse  the control: dense on the same steps Re-ttention runs dense
                     (warm-up and calibration), plain sparse on the others
  rettention         Re-ttention (the issue's (b)): dense warm-up, calibration every k
                     steps (r and Delta cached per layer), r * O^M + Delta on the others,
                     r += r_increment after every sparse step; also with r_increment 0
  ratio_only         the control isolating the reshape: Re-ttention's schedule and r
                     (with r_increment), no residual: r * O^M on the sparse steps
  cache_only         the control isolating plain reuse: Re-ttention's schedule, and every
                     sparse step reuses the last calibration step's attention output as is

and reports, per mode, the MSE and PSNR of the samples against the dense samples (pixels
mapped back to [0, 1] with the data's mean/std and clipped; PSNR = 10 log10(1 / MSE) of
the whole set's MSE) and the class accuracy of the samples as judged by the classifier
(the label each sample was conditioned on is the target).

Masks (`dit.local_window_mask`), per `--granularities`: "tiles", a one-tile window (the
kernel-friendly variant), and "tokens", the authors' token band |i - j| <= int(density
N) // 2 at the same nominal density. 16x16 digits at patch 2 are 64 tokens, so a density
of 1/32 needs attention tiles of 2 tokens (32 kv tiles; the tile window is the query's
own tile: its patch and its row neighbour; the band keeps |i - j| <= 1, 3 keys).
`--blocks=2,4,8` sweeps densities 1/32, 1/16 and 1/8 (tiles of 2, 4 and 8 tokens). The
tiles are small for a kernel (the GPU benchmark uses 128), but the mask's arithmetic is
the same. The table gives both the share of keys each query keeps and the share of
tiles the kernel visits.

Writes `rettention_quality_cpu_<date>[_<suffix>].md` (or `_<device>_`) and a PNG of
sample grids under --out_dir (default bench/results); the header gives the machine's load
average (the run is single-process; the load only changes how long it takes).
"""

from __future__ import annotations

import json
import os
import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from sparse_attention.models import dit
from sparse_attention.train import data, diffusion, trainer

_DIT_WORKDIR = flags.DEFINE_string("dit_workdir", None, "The DiT run's --workdir.")
_CLS_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "The LITv2 run's --workdir.")
_NUM = flags.DEFINE_integer("num_samples", 500, "Samples per mode (labels cycle 0..9).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the shared initial noise.")
_STEPS = flags.DEFINE_integer("steps", 0, "Euler steps (0: config.sampling.steps).")
_CFG = flags.DEFINE_float("cfg_scale", -1.0, "CFG scale (< 0: config.sampling.cfg_scale).")
_BLOCKS = flags.DEFINE_list(
  "blocks", ["2", "4", "8"], "Tile sizes; each gives a one-tile window (density block / N)."
)
_ANCHORS = flags.DEFINE_integer("num_anchors", -1, "Anchor tiles (< 0: config.sampling's).")
_GRANULARITIES = flags.DEFINE_list(
  "granularities", ["tiles", "tokens"], "Mask granularities (dit.local_window_mask)."
)
_VARIANTS = flags.DEFINE_list(
  "variants",
  ["sparse", "dense_then_sparse", "rettention", "rettention0", "ratio_only", "cache_only"],
  "Sampling variants per mask (rettention0: Re-ttention with r_increment 0).",
)
_SUFFIX = flags.DEFINE_string("suffix", "", "Appended to the output file names (e.g. cfg1).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write (default bench/results).")
flags.mark_flags_as_required(["dit_workdir", "classifier_workdir"])


def training_summary(workdir: str) -> str:
  """'test <metrics>, <seconds> s of training steps' from a run's logs (or '')."""
  parts = []
  try:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      test = json.load(f)["test"]
    parts.append("test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
  except (OSError, KeyError, ValueError):
    pass
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r.get("split") == "train" and r.get("steps_per_s")]
    seconds, last = 0.0, 0
    for r in train:  # each record covers the steps since the previous one
      seconds += (r["step"] - last) / r["steps_per_s"]
      last = r["step"]
    if train:
      parts.append(
        f"{seconds / 60:.1f} min in the training steps (compilation and evals not counted)"
      )
  except (OSError, KeyError, ValueError):
    pass
  return "; ".join(parts)


_CACHED = ("any", "any", "cache_only")  # results' key of the mask-independent control


def parameters(workdir: str) -> str:
  """'<n> parameters' from a run's final_metrics.json (or 'parameters: no record')."""
  try:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      return f"{json.load(f)['parameters']['total']:,} parameters"
  except (OSError, KeyError, ValueError):
    return "parameters: no record"


def psnr(mse: float) -> float:
  return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def grid(rows: list[np.ndarray], zoom: int = 4, pad: int = 4) -> np.ndarray:
  """uint8 [H', W']: one row of images per entry of `rows` (each [n, H, W] in [0, 1])."""
  n, h, w = rows[0].shape
  out = np.full((len(rows) * (h * zoom + pad) + pad, n * (w * zoom + pad) + pad), 128, np.uint8)
  for r, images in enumerate(rows):
    for c, img in enumerate(images):
      big = np.kron(img, np.ones((zoom, zoom)))
      y, x = pad + r * (h * zoom + pad), pad + c * (w * zoom + pad)
      out[y : y + h * zoom, x : x + w * zoom] = np.round(255 * (1 - big)).astype(np.uint8)
  return out


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  start = time.perf_counter()
  model, dcfg = trainer.load(_DIT_WORKDIR.value)
  classifier, ccfg = trainer.load(_CLS_WORKDIR.value)
  dit_step, cls_step = dcfg.restored_step, ccfg.restored_step
  s = dcfg.sampling
  steps = _STEPS.value or s.steps
  cfg_scale = s.cfg_scale if _CFG.value < 0 else _CFG.value
  anchors = s.num_anchors if _ANCHORS.value < 0 else _ANCHORS.value
  dit_data, cls_data = dcfg.dataset, data.make_datasets(ccfg)  # real test digits
  dit_shape = tuple(dit_data.image_shape)
  if dit_shape != cls_data.image_shape:
    raise ValueError(
      f"The DiT's images {dit_shape} and the classifier's {cls_data.image_shape} "
      "differ: train both at the same config.data.image_size."
    )
  n_tokens = model.config.num_tokens
  print(benchutil.machine(), flush=True)
  print(f"DiT step {dit_step}, {n_tokens} tokens; classifier step {cls_step}", flush=True)

  classify = jax.jit(lambda x: jnp.argmax(classifier(x), -1))

  def to_pixels(x: np.ndarray) -> np.ndarray:  # DiT-normalised -> [0, 1], clipped
    return np.clip(np.asarray(x) * np.asarray(dit_data.std) + np.asarray(dit_data.mean), 0.0, 1.0)

  def accuracy(pixels: np.ndarray, labels: np.ndarray) -> float:
    pred = np.concatenate(
      [
        np.asarray(classify(cls_data.normalize(pixels[i : i + 250])))
        for i in range(0, len(pixels), 250)
      ]
    )
    return float(np.mean(pred == labels))

  test = data.load_split(cls_data, "test")
  real_acc = accuracy(np.clip(test["image"] * cls_data.std + cls_data.mean, 0, 1), test["label"])

  num = _NUM.value
  labels = np.arange(num, dtype=np.int32) % model.config.num_classes
  shape = (num, *dit_shape)
  noise = jax.random.normal(jax.random.key(_SEED.value), shape, jnp.float32)
  kw = dict(
    steps=steps,
    noise=noise,
    dense_steps=s.dense_steps,
    recalibrate_every=s.recalibrate_every,
    cfg_scale=cfg_scale,
  )

  def run(attention: str, mask=None, r_increment: float = 0.0) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    x = diffusion.sample(
      model, labels, attention=attention, mask=mask, r_increment=r_increment, **kw
    )
    return to_pixels(jax.device_get(x)), time.perf_counter() - t0

  load_start = os.getloadavg()
  dense_px, dense_s = run("dense")
  dense_acc = accuracy(dense_px, labels)
  print(f"dense: accuracy {dense_acc:.3f} ({dense_s:.0f} s)", flush=True)
  modes = diffusion.step_modes(
    steps, "rettention", dense_steps=s.dense_steps, recalibrate_every=s.recalibrate_every
  )
  n_dense = sum(m in ("dense", "calibrate") for m in modes)
  # name -> (sampler attention, r_increment, dense steps, row label)
  variants = {
    "sparse": ("sparse", 0.0, 0, "sparse"),
    "dense_then_sparse": ("dense_then_sparse", 0.0, n_dense, "dense_then_sparse"),
    "rettention": ("rettention", s.r_increment, n_dense, f"rettention ({s.r_increment:g})"),
    "rettention0": ("rettention", 0.0, n_dense, "rettention, r_increment 0"),
    "ratio_only": ("ratio_only", s.r_increment, n_dense, f"ratio_only ({s.r_increment:g})"),
    "cache_only": ("cache_only", 0.0, n_dense, "cache_only"),
  }
  unknown = set(_VARIANTS.value) - set(variants)
  if unknown:
    raise ValueError(f"--variants: unknown {sorted(unknown)}; known {list(variants)}.")
  header = [
    "tile",
    "mask",
    "keys kept",
    "tiles visited",
    "sampling",
    "dense steps",
    "MSE vs dense",
    "PSNR vs dense (dB)",
    "accuracy",
    "acc - dense (pts)",
  ]
  dense_row = ["-", "dense", "1", "1", "dense", f"{steps}/{steps}", "0", "inf"]
  rows = [dense_row + [f"{dense_acc:.3f}", "0.0"]]
  results: dict[tuple[int | str, str, str], tuple[float, float]] = {}
  pictures = {"dense": dense_px}
  first = int(_BLOCKS.value[0])
  for block in (int(b) for b in _BLOCKS.value):
    if n_tokens % block:
      print(f"skipping tile {block}: {n_tokens} tokens are not a multiple", flush=True)
      continue
    kb = n_tokens // block
    for granularity in _GRANULARITIES.value:
      mask = dit.local_window_mask(
        n_tokens, density=1 / kb, block=block, num_anchors=anchors, granularity=granularity
      )
      keys = float(jnp.mean(mask.to_dense()))  # the share of keys each query keeps
      tiles = float(jnp.mean(mask.block_layout()[0]))  # the share of tiles visited
      for name in _VARIANTS.value:
        if name == "cache_only" and results.get(_CACHED):
          continue  # r = 0: the mask's output is multiplied by 0, so one run serves all
        attention, inc, dense_steps, label = variants[name]
        px, secs = run(attention, mask, inc)
        mse = float(np.mean((px - dense_px) ** 2))
        acc = accuracy(px, labels)
        results[_CACHED if name == "cache_only" else (block, granularity, name)] = (psnr(mse), acc)
        if block == first and name in ("sparse", "rettention", "ratio_only", "cache_only"):
          if granularity == "tiles" or name == "rettention":
            pictures[f"{name} ({granularity}, tile {block})"] = px
        mask_cells = [str(block), granularity, f"{keys:.4f}", f"{tiles:.4f}"]
        if name == "cache_only":  # the same samples under any mask
          mask_cells = ["any", "any", "-", "-"]
        rows.append(
          [
            *mask_cells,
            label,
            f"{dense_steps}/{steps}",
            f"{mse:.5f}",
            f"{psnr(mse):.2f}",
            f"{acc:.3f}",
            f"{100 * (acc - dense_acc):+.1f}",
          ]
        )
        print(" | ".join(rows[-1]), f"({secs:.0f} s)", flush=True)
  load_end = os.getloadavg()

  checks = []
  for granularity in _GRANULARITIES.value:
    got = lambda name, g=granularity: results.get(
      _CACHED if name == "cache_only" else (first, g, name)
    )
    where = f"{granularity}, tile {first} (density 1/{n_tokens // first})"
    if got("sparse") and got("rettention"):
      (p_sp, _), (p_re, a_re) = got("sparse"), got("rettention")
      checks += [
        f"- {where}: Re-ttention's PSNR vs dense is clearly above plain sparse's: "
        f"{p_re:.2f} dB vs {p_sp:.2f} dB ({p_re - p_sp:+.2f} dB): "
        f"{'met' if p_re - p_sp >= 3 else 'NOT met'} (we ask >= 3 dB).",
        f"- {where}: Re-ttention's class accuracy within 2 points of dense: "
        f"{100 * a_re:.1f}% vs {100 * dense_acc:.1f}% ({100 * (a_re - dense_acc):+.1f} pts): "
        f"{'met' if abs(a_re - dense_acc) <= 0.02 else 'NOT met'}.",
      ]
    for control in ("ratio_only", "cache_only"):
      if got(control) and got("rettention"):
        (p_c, a_c), (p_re, _) = got(control), got("rettention")
        checks.append(
          f"- {where}: Re-ttention vs the {control} control: {p_re:.2f} vs {p_c:.2f} dB "
          f"({p_re - p_c:+.2f} dB), accuracy {100 * a_c:.1f}% for the control."
        )
  device = jax.devices()[0]
  where = "cpu" if device.platform == "cpu" else device.device_kind.replace(" ", "_")
  out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  stem = f"rettention_quality_{where}_{benchutil.today()}"
  stem += f"_{_SUFFIX.value}" if _SUFFIX.value else ""
  picture_names = list(pictures)
  png = grid([pictures[k][:20, ..., 0] for k in picture_names])
  Image.fromarray(png).save(os.path.join(out_dir, f"{stem}.png"))
  loads = lambda la: "/".join(f"{v:.1f}" for v in la)
  lines = [
    "# Re-ttention sample quality: digits DiT, dense vs block-sparse vs Re-ttention",
    "",
    f"{benchutil.machine()}; {benchutil.today()}; load average (1/5/15 min) "
    f"{loads(load_start)} at the start, {loads(load_end)} at the end (shared machine; "
    "the numbers below do not depend on it, only the run time).",
    "",
    f"DiT: configs/dit_digits.py (`{dcfg.model.name}`, {parameters(_DIT_WORKDIR.value)}, "
    f"{dit_shape[0]}x{dit_shape[1]}x{dit_shape[2]}, patch {model.config.patch_size}: "
    f"{n_tokens} tokens, width {model.config.hidden_size}, depth {model.config.depth}, "
    f"{model.config.num_heads} heads), trained {dit_step} steps "
    f"({training_summary(_DIT_WORKDIR.value) or 'no logs'}). Classifier: "
    f"configs/litv2_digits.py (`{ccfg.model.name}`), trained {cls_step} steps "
    f"({training_summary(_CLS_WORKDIR.value) or 'no logs'}); "
    f"{100 * real_acc:.1f}% on the {len(cls_data.test)} real test digits.",
    "",
    "Reproduce: `python -m sparse_attention.train.main --config=dit_digits "
    "--workdir=DIT`, `python -m sparse_attention.train.main "
    "--config=litv2_digits --workdir=CLS`, `python bench/rettention_quality.py "
    f"--dit_workdir=DIT --classifier_workdir=CLS --num_samples={num}"
    + (f" --cfg_scale={cfg_scale:g}" if _CFG.value >= 0 else "")
    + (f" --suffix={_SUFFIX.value}" if _SUFFIX.value else "")
    + "`.",
    "",
    f"{num} samples per row"
    + (
      f" (fewer than the default {_NUM.default}, to fit the run on 2 shared cores)"
      if num < _NUM.default
      else ""
    )
    + f" from the same noise (seed {_SEED.value}) and labels (i mod 10), "
    f"flow-matching Euler, {steps} steps, CFG scale {cfg_scale:g}. Re-ttention schedule: "
    f"steps 0-{s.dense_steps - 1} dense, calibration every {s.recalibrate_every} "
    f"({', '.join(str(i) for i, m in enumerate(modes) if m == 'calibrate')}), the other "
    f"{modes.count('rettention')} steps sparse with r and Delta; r += r_increment after "
    "every sparse step. dense_then_sparse: the same steps dense, plain sparse on the others "
    "(no r, no Delta). ratio_only: Re-ttention without Delta (r * O^M, r += r_increment). "
    "cache_only: every sparse step reuses the last calibration step's attention output "
    "(r = 0, Delta = W_o O; it does not depend on the mask: one row). Masks "
    "(`dit.local_window_mask` at density 1/Kb, Kb = "
    f"{n_tokens} / tile, {anchors} anchors): tiles = one tile per query tile (the "
    "kernel-friendly variant), tokens = the authors' band |i - j| <= int(N / Kb) // 2. "
    "keys kept: the share of (query, key) pairs the mask keeps; tiles visited: the "
    "share of tiles the kernel runs. MSE/PSNR: pixels in [0, 1] (clipped), against the "
    "dense samples; PSNR = 10 log10(1 / MSE) over the whole set. Accuracy: the "
    "classifier's argmax equals the conditioning label.",
    "",
    benchutil.format_table(header, rows),
    "",
    "Targets (issue 5) and the controls:",
    "",
    *checks,
    "",
    f"Samples (first 20; rows: {', '.join(picture_names)}): `{stem}.png`.",
    "",
    f"Run time {time.perf_counter() - start:.0f} s.",
  ]
  text = "\n".join(lines) + "\n"
  path = os.path.join(out_dir, f"{stem}.md")
  with open(path, "w") as f:
    f.write(text)
  print("\n" + text + f"\nwritten to {path}", flush=True)


if __name__ == "__main__":
  app.run(main)

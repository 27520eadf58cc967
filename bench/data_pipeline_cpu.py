r"""Is the input pipeline the bottleneck? Its images/s alone against the train step's.

The pipeline: `data.train_batches` over an image folder of JPEGs (256x256 by default,
generated here unless --folder is given), as configs/litv2_imagenet.py reads them:
decode, bicubic random-resized-crop to 224, flip, normalise, batch; with 0 worker
processes (threads of this process), then 1, 2, ... (--workers). The first batch
(worker start-up) is not timed.

The train step: one jitted LITv2 training step (`trainer.Steps.train_step`: forward,
backward, AdamW update) on a fixed batch of the same shape, compiled first, in
float32 (bfloat16 matmuls are slower than float32 on CPUs).

  python bench/data_pipeline_cpu.py [--images=2000 --workers=0,1,2 --model=litv2_s]

Writes `data_pipeline_cpu_<date>.md` under --out_dir (default bench/results).
"""

from __future__ import annotations

import os
import tempfile
import time
import types
from importlib import metadata

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from sparse_attention.configs import litv2_imagenet
from sparse_attention.train import data, optim, tasks, trainer

_FOLDER = flags.DEFINE_string("folder", "", "An image folder (default: generate one).")
_IMAGES = flags.DEFINE_integer("images", 2000, "JPEGs to generate (10 classes).")
_SIZE = flags.DEFINE_integer("size", 256, "Side of the generated JPEGs.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "The model's input side.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Pipeline batch size.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed pipeline batches per worker count.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to time.")
_MODEL = flags.DEFINE_string("model", "litv2_s", "LITv2 preset of the train step.")
_STEP_BATCH = flags.DEFINE_integer("step_batch_size", 16, "Train step batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after one untimed).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write (default bench/results).")


def write_jpegs(root: str, count: int, size: int) -> None:
  """`count` JPEGs (quality 90) in 10 class folders: smooth colour fields plus noise,
  so they compress like photographs rather than like flat colour."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size] / size  # [S, S]
  for i in range(count):
    folder = os.path.join(root, f"class_{i % 10}")
    os.makedirs(folder, exist_ok=True)
    phase = rng.uniform(0, 2 * np.pi, (3, 1, 1))
    freq = rng.uniform(1, 6, (3, 1, 1))
    field = 0.5 + 0.4 * np.sin(freq * (x + y)[None] * np.pi + phase)  # [3, S, S]
    pixels = np.clip(field.transpose(1, 2, 0) * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def pipeline_rate(folder: str, workers: int) -> float:
  """Images/s of `data.train_batches` with `workers` processes, first batch untimed."""
  config = litv2_imagenet.get_config()
  config.data.path, config.data.image_size = folder, _IMAGE_SIZE.value
  config.data.worker_count, config.data.test_fraction = workers, 0.0
  datasets = data.make_datasets(config)
  batches = data.train_batches(datasets, _BATCH.value, seed=0)
  try:
    next(batches)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(batches)
    return _BATCHES.value * _BATCH.value / (time.perf_counter() - start)
  finally:
    batches.close()


def step_rate() -> tuple[float, int]:
  """(images/s, parameters) of one jitted LITv2 training step, float32."""
  config = litv2_imagenet.get_config()
  config.model.name = _MODEL.value
  size, b = _IMAGE_SIZE.value, _STEP_BATCH.value
  facts = types.SimpleNamespace(image_shape=(size, size, 3), num_classes=1000)
  task = tasks.get("classification")
  model = task.build_model(config, facts, nnx.Rngs(params=0, dropout=1))
  tx, _ = optim.make(config.optimizer, config.steps)
  steps = trainer.Steps(model, task, tx, jnp.float32)
  state = dict(steps.initial, opt_state=tx.init(steps.initial["params"]))
  batch = {
    "image": jnp.asarray(np.random.default_rng(0).normal(size=(b, size, size, 3)), jnp.float32),
    "label": jnp.arange(b, dtype=jnp.int32) % 1000,
  }
  step = jax.jit(steps.train_step, donate_argnums=0)
  state, _ = jax.block_until_ready(step(state, batch))  # compile + one step
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return _STEPS.value * b / (time.perf_counter() - start), params


def main(argv):
  del argv
  print(benchutil.machine(), flush=True)
  load = os.getloadavg()[0]  # other jobs on the machine share its cores
  with tempfile.TemporaryDirectory() as tmp:
    folder = _FOLDER.value
    if not folder:
      folder = os.path.join(tmp, "images")
      tic = time.perf_counter()
      write_jpegs(folder, _IMAGES.value, _SIZE.value)
      print(f"wrote {_IMAGES.value} JPEGs in {time.perf_counter() - tic:.1f} s", flush=True)
    rows = []
    for workers in (int(w) for w in _WORKERS.value):
      rate = pipeline_rate(folder, workers)
      print(f"pipeline, {workers} workers: {rate:,.0f} images/s", flush=True)
      rows.append([f"input pipeline, {workers} worker processes", f"{rate:,.0f}"])
  step, params = step_rate()
  print(f"train step: {step:,.2f} images/s", flush=True)
  rows.append([f"train step, {_MODEL.value} ({params / 1e6:.1f}M parameters)", f"{step:,.2f}"])
  best = max(float(r[1].replace(",", "")) for r in rows[:-1])
  verdict = "is not" if best >= step else "IS"
  table = benchutil.format_table(["", "images/s"], rows)
  config_prefetch = litv2_imagenet.get_config().data.prefetch
  text = f"""# Input pipeline vs train step, CPU ({benchutil.today()})

{benchutil.machine()}; grain {metadata.version("grain")}, Pillow {Image.__version__};
load average {load:.1f} at the start (other jobs share the cores).

`python bench/data_pipeline_cpu.py` ({_IMAGES.value} generated {_SIZE.value}x{_SIZE.value}
JPEGs, quality 90, unless --folder): the pipeline of configs/litv2_imagenet.py (decode,
bicubic random-resized-crop to {_IMAGE_SIZE.value}, flip, normalise) in batches of
{_BATCH.value}, {_BATCHES.value} batches timed after the first; the train step is one jitted
LITv2 step (forward, backward, AdamW) at batch {_STEP_BATCH.value}, float32, after compilation.

{table}

On this machine the input pipeline {verdict} the bottleneck: its best rate is
{best / step:,.1f}x the train step's. With 0 workers the pipeline already decodes in
{config_prefetch} threads (Pillow releases the GIL); worker processes add throughput only
where cores are free. On an accelerator the step is far faster: compare the step rate of
the progress line (images/s) with this pipeline rate to choose config.data.worker_count.
"""
  out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(__file__), "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"data_pipeline_cpu_{benchutil.today()}.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)

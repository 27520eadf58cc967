r"""LITv2-tiny (HiLo attention) on scikit-learn's bundled handwritten digits.

The README's main job: a short run that reaches >= 90% eval accuracy in a few
minutes on 2 CPU cores, offline.

  python -m sparse_attention.train.main --config=litv2_digits --workdir=/tmp/digits

Overrides: `--config.steps=800 --config.batch_size=128 --config.model.name=litv2_s`,
your own images: `--config.data.kind=images --config.data.path=/data/my_images`.
"""

import ml_collections

from sparse_attention.train import data, optim


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classification"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "litv2_tiny"  # litv2_tiny | litv2_s | litv2_m | litv2_b
  config.model.attention = "hilo"
  config.model.alpha = 0.9  # fraction of Lo-Fi heads
  config.model.drop_path_rate = 0.0
  config.model.implementation = ""  # "" = best available; "xla", "pallas", "reference"
  config.label_smoothing = 0.0  # of the training targets (the reported loss is plain)

  config.data = data.default_config()
  config.data.kind = "digits"  # digits | images | npz
  config.data.image_size = 16  # the 8x8 digits, upsampled
  config.data.channels = 1

  config.batch_size = 64
  config.eval_batch_size = 128
  config.steps = 600
  config.compute_dtype = "float32"  # or "bfloat16" (mixed precision, float32 params)
  config.nonfinite = "stop"  # a non-finite loss / gradient: "stop" the run, or "skip" the step

  config.optimizer = optim.default_config()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.05

  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 3

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "model": 1})
  config.sharding_rules = [(".*", "fsdp")]
  config.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 0})
  return config

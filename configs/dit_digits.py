r"""A tiny class-conditional DiT (flow matching) on scikit-learn's bundled digits.

16x16x1 digits (the 8x8 originals upsampled, as configs/litv2_digits.py, so the LITv2
digits classifier judges the samples in the same normalised space), patch 2: 64 tokens.
Learns to draw recognisable digits in about 5 minutes on 2 CPU cores, offline.

  python -m sparse_attention.train.main --config=dit_digits --workdir=/tmp/dit

(`config.task = "diffusion"`: train/diffusion.py's TASK, registered in train/tasks.py.)
Then `python bench/rettention_quality.py --dit_workdir=/tmp/dit --classifier_workdir=...`
samples it with dense, block-sparse and Re-ttention attention. `config.sampling` holds
the sampler's defaults: with 64 tokens, attention tiles of 2 tokens give 32 kv tiles per
query tile, so Re-ttention's 1/32 local window is exactly one tile (each query sees 2
of the 64 tokens: its own patch and its row neighbour).
"""

import ml_collections

from sparse_attention.train import data, optim


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "diffusion"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "dit_tiny"  # dit_tiny | dit_xl_2
  config.model.patch_size = 2  # 0: the preset's
  config.model.hidden_size = 0  # 0: the preset's (dit_tiny: 96)
  config.model.depth = 0  # 0: the preset's (dit_tiny: 4)
  config.model.num_heads = 0  # 0: the preset's (dit_tiny: 4)
  config.model.class_dropout_prob = 0.1  # labels dropped to the null class (CFG)
  config.model.learn_sigma = False
  config.model.implementation = ""  # "" = best available; "xla", "pallas", "reference"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.time_sampling = "logit_normal"  # uniform | logit_normal
  config.diffusion.logit_mean = 0.0
  config.diffusion.logit_std = 1.0

  config.data = data.default_config()
  config.data.kind = "digits"
  config.data.image_size = 16  # the 8x8 digits, upsampled
  config.data.channels = 1

  config.batch_size = 64
  config.eval_batch_size = 128
  config.steps = 1200
  config.compute_dtype = "float32"
  config.nonfinite = "stop"  # a non-finite loss / gradient: "stop" the run, or "skip" the step

  config.optimizer = optim.default_config()
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.0
  config.optimizer.min_lr_ratio = 0.05

  config.log_every = 100
  config.eval_every = 400
  config.checkpoint_every = 400
  config.keep_checkpoints = 2

  # What bench/rettention_quality.py samples with (train/diffusion.py `sample`).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.steps = 20
  config.sampling.cfg_scale = 2.0  # classifier-free guidance (1: none)
  config.sampling.block = 2  # attention tile (block_q = block_kv): 32 tiles of 64 tokens
  config.sampling.density = 1 / 32  # local window: 1 of 32 kv tiles
  config.sampling.num_anchors = 0
  config.sampling.dense_steps = 5  # steps 0-4 dense
  config.sampling.recalibrate_every = 5  # calibrate at 5, 10, 15
  config.sampling.r_increment = 0.04

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "model": 1})
  config.sharding_rules = [(".*", "fsdp")]
  config.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 0})
  return config

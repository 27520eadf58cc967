r"""LITv2-S on an ImageNet-style folder, with the recipe of LITv2's own classification code.

Point it at a folder of class subfolders of images (ImageNet-1k's train/ after the usual
valprep layout, or your own), optionally at a second folder of the same classes for
evaluation (ImageNet's val/):

  python -m sparse_attention.train.main --config=litv2_imagenet --workdir=/tmp/litv2_s \
      --config.data.path=/data/imagenet/train --config.data.eval_path=/data/imagenet/val

The recipe (LITv2's classification/config.py and configs/litv2-small.yaml, a Swin-style
schedule over timm's ImageNet pipeline):
- AdamW (b1 0.9, b2 0.999, eps 1e-8), weight decay 0.05 on matrices and kernels only,
  gradient clipping at global norm 5;
- learning rate 5e-4 per 512 images: 1e-3 at the global batch of 1024 (8 x 128), linear
  warmup over 20 epochs, cosine decay to 1e-5 (min_lr_ratio 0.01) at 300 epochs: the
  steps below assume ImageNet-1k's 1,281,167 training images (1,251 steps per epoch);
  for another folder or batch size set --config.steps, --config.optimizer.warmup_steps
  and --config.optimizer.learning_rate (= 5e-4 * batch_size / 512) to match;
- label smoothing 0.1, stochastic depth 0.2, HiLo alpha 0.9, bfloat16 compute;
- training images: random-resized-crop (8%-100% of the area, aspect 3/4-4/3) to 224,
  bicubic, random horizontal flip; evaluation images: the centred 87.5% square (timm's
  resize to 256 and centre crop to 224), bicubic; ImageNet's mean and std.
Left out of the recipe (README, Training): RandAugment (m9), random erasing (0.25),
mixup (0.8) / cutmix (1.0), and the 0.01 learning-rate multiplier of the deformable
offsets.
"""

import ml_collections

from sparse_attention.train import data, optim

TRAIN_IMAGES = 1_281_167  # ImageNet-1k
BATCH_SIZE = 1024
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH_SIZE  # 1251


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classification"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "litv2_s"
  config.model.attention = "hilo"
  config.model.alpha = 0.9
  config.model.drop_path_rate = 0.2
  config.model.implementation = ""  # "" = best available; "xla", "pallas", "reference"
  config.label_smoothing = 0.1

  config.data = data.default_config()
  config.data.kind = "images"  # or "array_record" (data.write_array_record converts)
  config.data.image_size = 224
  config.data.channels = 3
  config.data.eval_fraction = 0.0  # the eval split is config.data.eval_path ...
  config.data.test_fraction = 0.01  # ... and 1% of the training folder is held out
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.data.random_resized_crop = True
  config.data.flip = True
  config.data.crop_fraction = 0.875
  config.data.interpolation = "bicubic"
  config.data.worker_count = 8  # may change on resume; the batches stay the same
  config.data.prefetch = 2

  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 1024
  config.steps = 300 * STEPS_PER_EPOCH
  config.compute_dtype = "bfloat16"
  config.nonfinite = "stop"

  config.optimizer = optim.default_config()
  config.optimizer.learning_rate = 5e-4 * BATCH_SIZE / 512
  config.optimizer.warmup_steps = 20 * STEPS_PER_EPOCH
  config.optimizer.min_lr_ratio = 0.01
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip = 5.0

  config.log_every = 100
  config.eval_every = 5 * STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  config.keep_checkpoints = 3

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.sharding_rules = [(".*", "fsdp")]
  config.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 0})
  return config

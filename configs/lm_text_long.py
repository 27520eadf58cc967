r"""The byte-level LM of the long-generation study (issue 16, bench/long_generation_cpu.py).

`lm_text` trained on sequences of 1024 bytes instead of 256 (lm_tiny's shapes: dim 128,
2 blocks, 4 heads / 2 kv heads of 32, dense attention, RoPE), so that bounded cache
policies have a trained range to keep RoPE positions in (anchors + compressed blocks +
window <= 1024) while they read held-out sources of 4k-16k bytes. A larger test split
(5% of 2 MiB = ~100k bytes) holds six 16k-byte sequences. A few minutes on 2 CPU cores:

  python -m sparse_attention.train.main --config=lm_text_long --workdir=/tmp/lm_long
"""

import ml_collections

from sparse_attention.configs import lm_text


def get_config() -> ml_collections.ConfigDict:
  config = lm_text.get_config()
  config.data.seq_len = 1024
  config.data.test_fraction = 0.05
  config.batch_size = 8
  config.eval_batch_size = 8
  config.steps = 400
  config.optimizer.warmup_steps = 40
  config.eval_every = 200
  config.checkpoint_every = 200
  return config

r"""A tiny byte-level language model on the Python standard library's own sources.

Offline, a few minutes on 2 CPU cores; the loss falls from ln(256) = 5.5 to about
2 nats per byte in the default 300 steps:

  python -m sparse_attention.train.main --config=lm_text --workdir=/tmp/lm

Attention: `--config.model.attention=dense|sliding|moba|nsa` with its fields below
(`--config.model.moba_chunk=64 --config.model.moba_topk=2`, ...); scores:
`--config.model.score_mod=t5 --config.model.rope=False` (a learned T5 bias instead of
RoPE), `alibi` or `softcap`. Your own text:
`--config.data.path=/data/corpus.txt` (a file, or a folder read recursively). The 1B
shapes: `--config.model.name=lm_1b` (not for a CPU).

Long sequences (64k tokens and more) across devices: `--config.mesh.context=N` splits
every sequence over N devices (context parallelism, ops/context_parallel.py): each holds
seq_len / N tokens and attention runs as a ring over them, so activation memory per
device falls ~1/N. 64k tokens of MoBA on one 8-GPU host:

  python -m sparse_attention.train.main --config=lm_text --workdir=/tmp/lm64k \
    --config.model.name=lm_1b --config.model.attention=moba \
    --config.model.moba_chunk=2048 --config.model.moba_topk=4 \
    --config.data.seq_len=65536 --config.data.path=/data/corpus --config.data.max_bytes=1000000000 \
    --config.mesh.data=1 --config.mesh.context=8 --config.batch_size=1 \
    --config.compute_dtype=bfloat16

seq_len must be a multiple of 2 x context (zig-zag: two slices per device); NSA also
needs seq_len / (2 x context) to be a multiple of nsa_stride; batch_size a multiple of
data x fsdp. With more devices than the sequence needs, put the rest on data
(`--config.mesh.data=-1`): the ring moves every key/value shard past every device, so a
sparse attention (MoBA, NSA) turns communication-bound as context grows (the arithmetic
is in docs/context_parallel.md); keep context within a host. Several hosts: README,
"Multi-host training". The 2 MiB default text is ~30 sequences of 64k: point
data.path at more.
"""

import ml_collections

from sparse_attention.train import data, optim


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "lm"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "lm_tiny"  # lm_tiny | lm_1b (the preset's shapes)
  config.model.attention = "dense"  # dense | sliding | moba | nsa
  config.model.implementation = ""  # "" = best available; "xla", "reference", "pallas"
  config.model.window = 64  # sliding: query i sees keys i - window .. i
  config.model.moba_chunk = 32  # MoBA: keys per chunk
  config.model.moba_topk = 3  # MoBA: chunks per query, its own included
  config.model.nsa_block_len = 16  # NSA: compressed blocks [c*stride, c*stride + block_len)
  config.model.nsa_stride = 8
  config.model.nsa_select_len = 32  # NSA: selection block length
  config.model.nsa_num_select = 4  # NSA: selected blocks per query (initial + 2 local forced)
  config.model.nsa_window = 64  # NSA: sliding-window branch
  config.model.nsa_compress = "mlp"  # NSA phi: "mlp" (learned) | "mean"
  # Scores (dense / sliding): "" | "softcap" | "alibi" (learned slopes) | "t5" (learned
  # relative-position bias table); rope=False leaves positions to the score_mod.
  config.model.score_mod = ""
  config.model.softcap = 30.0
  config.model.t5_buckets = 32
  config.model.t5_max_distance = 128
  config.model.rope = True

  config.data = data.default_config()
  config.data.kind = "text"  # the standard library's .py sources, byte level
  config.data.seq_len = 256
  config.data.max_bytes = 2 * 2**20  # 2 MiB is plenty for a few hundred steps
  config.data.eval_fraction = 0.02
  config.data.test_fraction = 0.02

  config.batch_size = 16
  config.eval_batch_size = 32
  config.steps = 300
  config.compute_dtype = "float32"  # or "bfloat16" (mixed precision, float32 params)
  config.nonfinite = "stop"  # a non-finite loss / gradient: "stop" the run, or "skip" the step

  config.optimizer = optim.default_config()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.1
  config.optimizer.b2 = 0.95

  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  config.keep_checkpoints = 2

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "model": 1})
  config.sharding_rules = [(".*", "fsdp")]
  config.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 0})
  return config

"""The decoder-only LM: cached decoding equals the full forward for every attention kind,
generation, packed sequences, training through the trainer, config errors, lm_1b's size."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from flax import nnx

from sparse_attention import train
from sparse_attention.models import lm
from sparse_attention.train import trainer

# Tiny shapes where blocks complete while decoding 40 tokens: MoBA 5 chunks of 8 (top 2),
# NSA compressed blocks 8/4 (a new one every 4 tokens), 5 selection blocks of 8 (top 3:
# the top-n choice matters from position 24 on), windows of 6 and 8 keys.
SMALL = lm.LMConfig(
  vocab_size=64,
  dim=32,
  depth=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_hidden=64,
  max_len=40,
  window=6,
  moba_chunk=8,
  moba_topk=2,
  nsa_block_len=8,
  nsa_stride=4,
  nsa_select_len=8,
  nsa_num_select=3,
  nsa_window=8,
  nsa_compress_hidden=16,
  block_size=16,
)
KINDS = ("dense", "sliding", "moba", "nsa")


def _model(**overrides) -> lm.LM:
  return lm.LM(dataclasses.replace(SMALL, **overrides), rngs=nnx.Rngs(0))


@jax.jit
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=4)
def _prefill_then_steps(graphdef, state, prompt, rest, policy=None):
  """Logits of the prompt (one decode call) then of each of `rest`'s tokens, one by one."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + rest.shape[1], policy=policy)
  first, cache = model.decode(prompt, cache)

  def step(cache, token):
    logits, cache = model.decode(token[:, None], cache)
    return cache, logits[:, 0]

  cache, logits = jax.lax.scan(step, cache, rest.T)  # [n, B, V]
  return jnp.concatenate([first, logits.transpose(1, 0, 2)], axis=1), cache.length


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt", [5, lm.DECODE_MAX_NEW + 4])  # decode op / full op prefill
def test_cached_decoding_equals_the_full_forward(kind, prompt):
  model = _model(attention=kind)
  tokens = jax.random.randint(jax.random.key(1), (2, SMALL.max_len), 0, SMALL.vocab_size)
  graphdef, state = nnx.split(model)
  full = _forward(graphdef, state, tokens)  # [B, L, V]
  cached, length = _prefill_then_steps(graphdef, state, tokens[:, :prompt], tokens[:, prompt:])
  assert full.dtype == cached.dtype == jnp.float32 and int(length) == SMALL.max_len
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)
  if kind in ("sliding", "moba"):  # same parameters as dense: late positions must differ
    dense = _forward(*nnx.split(_model(attention="dense")), tokens)
    np.testing.assert_allclose(dense[:, :6], full[:, :6], atol=2e-5, rtol=2e-5)
    assert not np.allclose(dense[:, -8:], full[:, -8:], atol=1e-3)


@pytest.mark.parametrize(
  "attention, score_mod, rope",
  [("dense", "softcap", True), ("sliding", "alibi", True), ("dense", "t5", False)],
)
def test_score_mods_decode_as_they_train(attention, score_mod, rope):
  """Cached decoding (decode_attention with the score_mod at absolute positions) equals
  the full forward (block_sparse_attention with it), and the mod changes the model."""
  model = _model(attention=attention, score_mod=score_mod, rope=rope, softcap=0.5)
  params = model.blocks[0].attn.score_params
  if params is not None:  # learned: make the layers differ from the initialisation
    for block in model.blocks:
      p = block.attn.score_params
      p[...] = p[...] + jax.random.uniform(jax.random.key(3), p.shape)
  tokens = jax.random.randint(jax.random.key(1), (2, SMALL.max_len), 0, SMALL.vocab_size)
  graphdef, state = nnx.split(model)
  full = _forward(graphdef, state, tokens)
  cached, _ = _prefill_then_steps(graphdef, state, tokens[:, :5], tokens[:, 5:])
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)
  plain = _forward(*nnx.split(_model(attention=attention, rope=rope)), tokens)
  assert not np.allclose(plain, full, atol=1e-3)


def test_block_topk_decoding_is_exact_with_every_block_and_bounded_without():
  model = _model(attention="dense")
  tokens = jax.random.randint(jax.random.key(1), (2, SMALL.max_len), 0, SMALL.vocab_size)
  graphdef, state = nnx.split(model)
  full = _forward(graphdef, state, tokens)
  every = lm.DecodePolicy("topk_blocks", block_size=8, topk=5)  # 40 positions: 5 blocks
  cached, _ = _prefill_then_steps(graphdef, state, tokens[:, :5], tokens[:, 5:], every)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)
  few = lm.DecodePolicy("topk_blocks", block_size=8, topk=2)  # own + first block only
  cached, _ = _prefill_then_steps(graphdef, state, tokens[:, :5], tokens[:, 5:], few)
  np.testing.assert_allclose(cached[:, :16], full[:, :16], atol=2e-5, rtol=2e-5)
  assert np.all(np.isfinite(cached)) and not np.allclose(cached[:, 24:], full[:, 24:], atol=1e-3)
  out = model.generate(tokens[:, :4], 8, rng=jax.random.key(0), temperature=0.0, policy=few)
  assert out.shape == (2, 12)


def test_decode_policy_errors_name_the_field():
  with pytest.raises(ValueError, match="DecodePolicy.kind='topk_blocks' needs attention='dense'"):
    _model(attention="moba").init_cache(1, 8, policy=lm.DecodePolicy("topk_blocks"))
  with pytest.raises(ValueError, match="DecodePolicy.topk must be an int >= 1"):
    _model().generate(jnp.zeros((1, 2), jnp.int32), 2, rng=jax.random.key(0),
                      policy=lm.DecodePolicy("topk_blocks", topk=0))  # fmt: skip


def test_decode_checks_the_cache_room():
  model = _model()
  cache = dataclasses.replace(model.init_cache(1, 8), length=jnp.int32(5))
  with pytest.raises(ValueError, match="do not fit the cache"):
    model.decode(jnp.zeros((1, 4), jnp.int32), cache)


@pytest.mark.parametrize("bad", [SMALL.vocab_size, -1, 999])
def test_token_ids_out_of_the_vocabulary_raise(bad):
  """Eagerly, before any compute (an id past the table gave NaN logits, -1 the last
  row's); under jit nothing is checked (the data pipeline checks on the host)."""
  model = _model(depth=1)
  tokens = jnp.array([[1, 2, bad, 3]], jnp.int32)
  match = rf"LM: tokens must lie in \[0, {SMALL.vocab_size}\).*got {bad} at index \(0, 2\)"
  with pytest.raises(ValueError, match=match):
    model(tokens)
  with pytest.raises(ValueError, match=match):
    model.decode(tokens, model.init_cache(1, 8))
  with pytest.raises(ValueError, match=r"LM: prompt must lie in \[0, "):
    model.generate(tokens, 2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"LM: segment_ids must lie in \[0, inf\)"):
    model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.array([[0, 0, -1, -1]]))
  # The edges of the vocabulary are valid ids, and traced ids are not inspected.
  edges = jnp.array([[0, SMALL.vocab_size - 1]], jnp.int32)
  assert np.isfinite(np.asarray(model(edges))).all()
  assert _forward(*nnx.split(model), tokens).shape == (1, 4, SMALL.vocab_size)


def test_decode_checks_its_cache_and_batch():
  model = _model(depth=1)
  with pytest.raises(ValueError, match="LM.init_cache: batch must be an int >= 1"):
    model.init_cache(0, 8)
  with pytest.raises(ValueError, match="LM.decode: tokens has batch 2, the cache 1"):
    model.decode(jnp.zeros((2, 1), jnp.int32), model.init_cache(1, 8))
  cache = dataclasses.replace(model.init_cache(1, 8), length=jnp.int32(-1))
  with pytest.raises(ValueError, match=r"LM.decode: cache.length must be >= 0, got -1"):
    model.decode(jnp.zeros((1, 1), jnp.int32), cache)


def test_generate_greedy_follows_the_argmax():
  model = _model(attention="moba", depth=1)
  prompt = jax.random.randint(jax.random.key(2), (2, 6), 0, SMALL.vocab_size)
  out = model.generate(prompt, 12, rng=jax.random.key(0), temperature=0.0)
  assert out.shape == (2, 18) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :6], prompt)
  # Teacher forcing on the generated sequence: each new token is the argmax there.
  logits = _forward(*nnx.split(model), out[:, :-1])
  np.testing.assert_array_equal(out[:, 6:], jnp.argmax(logits[:, 5:], axis=-1))


def test_sampling_keeps_the_top_k():
  model = _model(depth=1)
  prompt = jnp.zeros((64, 1), jnp.int32)
  out = model.generate(prompt, 1, rng=jax.random.key(3), temperature=2.0, top_k=3)
  top3 = jax.lax.top_k(_forward(*nnx.split(model), prompt)[:, 0], 3)[1]  # [64, 3]
  assert bool(jnp.all(jnp.any(out[:, 1:] == top3, axis=-1)))
  assert len(set(np.asarray(out[:, 1]).tolist())) > 1  # it samples


@pytest.mark.parametrize(
  "kind, overrides",
  [("dense", {}), ("moba", {}), ("nsa", {}), ("nsa", {"nsa_compress": "mean"})],
)
def test_packed_segments_are_independent_sequences(kind, overrides):
  """Each packed segment gives the logits it gives alone. Starts 13 and 40 lie on no
  block grid (MoBA chunks 8; NSA stride 4, selection blocks 8): the grids restart at
  each segment start. The 27-token segment has 4 NSA selection blocks (a real top-3).
  The last segment reuses the first one's id: a segment is a maximal run of equal ids."""
  graphdef, state = nnx.split(_model(attention=kind, depth=1, max_len=64, **overrides))
  lengths = (13, 27, 20)
  tokens = jax.random.randint(jax.random.key(4), (1, sum(lengths)), 0, SMALL.vocab_size)
  segments = jnp.asarray([np.repeat([3, 5, 3], lengths)], jnp.int32)
  packed = _forward_segments(graphdef, state, tokens, segments)
  for start, n in zip(np.cumsum((0,) + lengths[:-1]), lengths, strict=True):
    alone = _forward(graphdef, state, tokens[:, start : start + n])  # [1, n, V]
    np.testing.assert_allclose(packed[:, start : start + n], alone, atol=2e-5, rtol=2e-5)


@jax.jit
def _forward_segments(graphdef, state, tokens, segments):
  return nnx.merge(graphdef, state)(tokens, segments)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"attention": "flash"}, "attention"),
    ({"moba_topk": 0}, "moba_topk"),
    ({"nsa_stride": 32}, "nsa_stride"),
    ({"nsa_num_select": 2}, "nsa_num_select"),
    ({"window": 0}, "window"),
    ({"implementation": "cudnn", "attention": "moba"}, "implementation"),
    ({"dtype": "int8"}, "dtype"),
    ({"score_mod": "rel"}, "score_mod"),
    ({"score_mod": "alibi", "attention": "moba"}, "score_mod"),
    ({"softcap": 0.0}, "softcap"),
    ({"t5_buckets": 2}, "t5_buckets"),
    ({"t5_max_distance": 16}, "t5_max_distance"),
  ],
)
def test_lm_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"LMConfig\.{field} "):
    lm.lm_tiny(**overrides)


def load_config(*overrides: str):
  return testutil.load_config("lm_text", *overrides)


@pytest.mark.parametrize(
  "override, match",
  [
    ("--config.model.name=lm_7b", "config.model.name"),
    ("--config.model.attention=hilo", "config.model.attention"),
    ("--config.model.moba_topk=0", "config.model.moba_topk"),
    ("--config.model.nsa_stride=64", "config.model.nsa_stride"),
    ("--config.model.implementation=triton", "config.model.implementation"),
    ("--config.data.kind=digits", "config.data.kind"),
    ("--config.model.score_mod=bias", "config.model.score_mod"),
  ],
)
def test_lm_task_config_errors_name_the_field(override, match):
  trainer.check_config(load_config())
  with pytest.raises(ValueError, match=match):
    trainer.check_config(load_config(override))


def test_lm_1b_parameter_count_without_compute():
  config = lm.lm_1b()
  model = nnx.eval_shape(lambda: lm.LM(config, rngs=nnx.Rngs(0)))
  c = config
  attn = c.dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  per_block = attn + 3 * c.dim * c.mlp_hidden + 2 * c.dim
  expected = c.depth * per_block + 2 * c.vocab_size * c.dim + c.dim
  assert lm.num_parameters(model) == expected
  assert 1.0e9 < expected < 1.2e9
  assert (c.num_heads, c.num_kv_heads, c.max_len) == (16, 8, 8192)
  nsa = nnx.eval_shape(lambda: lm.LM(lm.lm_1b(attention="nsa"), rngs=nnx.Rngs(0)))
  assert 0 < lm.num_parameters(nsa) - expected < 0.06 * expected  # phi MLPs and gates


# ----------------------------------------------------------------------------- training

FAST = [
  "--config.data.seq_len=64",
  "--config.data.max_bytes=65536",
  "--config.data.eval_fraction=0.05",
  "--config.data.test_fraction=0.05",
  "--config.batch_size=8",
  "--config.eval_batch_size=64",
  "--config.steps=8",
  "--config.log_every=1",
  "--config.eval_every=100",
  "--config.checkpoint_every=100",
  "--config.optimizer.warmup_steps=2",
  "--config.optimizer.learning_rate=5e-3",
  # Sizes for 64-token windows: blocks are selected, not all kept.
  "--config.model.window=16",
  "--config.model.moba_chunk=8",
  "--config.model.moba_topk=3",
  "--config.model.nsa_block_len=8",
  "--config.model.nsa_stride=4",
  "--config.model.nsa_select_len=8",
  "--config.model.nsa_num_select=3",
  "--config.model.nsa_window=16",
]


@pytest.mark.parametrize("kind", KINDS + ("dense+t5",))
def test_training_lowers_the_loss(tmp_path, kind):
  attention, _, score_mod = kind.partition("+")
  mods = [f"--config.model.score_mod={score_mod}", "--config.model.rope=False"] if score_mod else []
  config = load_config(*FAST, f"--config.model.attention={attention}", *mods)
  final = trainer.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 1.0, losses
  for split in ("eval", "test"):
    assert final[split]["loss"] < losses[0]
    np.testing.assert_allclose(final[split]["perplexity"], np.exp(final[split]["loss"]), rtol=1e-6)
  if score_mod:  # the bias table (zeros at initialisation) was learned
    model, _ = train.load(str(tmp_path))
    table = np.asarray(model.blocks[0].attn.score_params[...])
    assert table.shape == (32, 4) and np.abs(table).max() > 1e-3, table

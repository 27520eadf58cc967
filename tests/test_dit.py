"""The DiT (models/dit.py), its Re-ttention modes and the diffusion task and sampler
(train/diffusion.py): shapes, adaLN-Zero identity at init, the attention modes against
dense, the sampler's schedule and determinism, and a short training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil
from flax import nnx

from sparse_attention.models import dit
from sparse_attention.ops import masks
from sparse_attention.train import checkpoint, diffusion, trainer

# 16x16 images, patch 2: 64 tokens; tiles of 8 -> 8 kv tiles, a 1-tile window is 1/8.
SMALL = dict(image_size=16, hidden_size=32, depth=2, num_heads=2, freq_dim=32)
N = 64
WINDOW = dit.local_window_mask(N, density=1 / 8, block=8)


def small_model(seed: int = 0, perturb: float = 0.0, **overrides) -> dit.DiT:
  """A small DiT; `perturb` > 0 adds that much Gaussian noise to every parameter, so the
  zero-initialised gates and output layer let attention change the output."""
  model = dit.DiT(dit.dit_tiny(**{**SMALL, **overrides}), rngs=nnx.Rngs(seed))
  if perturb:
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


def inputs(b: int = 2, seed: int = 0, size: int = 16):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, size, size, 1))
  t = jax.random.uniform(kt, (b,), minval=0.2, maxval=0.9)
  return x, t, jnp.arange(b, dtype=jnp.int32) % 10


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# ---------------------------------------------------------------------------- the model


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_shapes_and_patchify_roundtrip(learn_sigma):
  model = small_model(learn_sigma=learn_sigma)
  x, t, y = inputs(3)
  out = model(x, t, y)
  assert out.shape == (3, 16, 16, 2 if learn_sigma else 1) and out.dtype == jnp.float32
  tokens = model.patchify(x)  # [B, N, p*p*C]
  assert tokens.shape == (3, N, 4)
  # A patch holds a 2x2 square of pixels: token (row 1, col 2) = pixels rows 2-3, cols 4-5.
  np.testing.assert_array_equal(tokens[0, 1 * 8 + 2], x[0, 2:4, 4:6, 0].ravel())
  if not learn_sigma:
    np.testing.assert_array_equal(model.unpatchify(tokens), x)
  # The null class exists only with label dropout.
  assert small_model().null_class == 10
  with pytest.raises(ValueError, match="null class"):
    _ = small_model(class_dropout_prob=0.0).null_class


@pytest.mark.parametrize(
  "changes, match",
  [
    # Labels: 0..9 are classes, 10 the null class (a label 11 gave NaN images, -1 the
    # null class's sample).
    (
      dict(y=[3, 11]),
      r"DiT: y must lie in \[0, 11\) \(num_classes=10 is the null class\); "
      r"got 11 at index \(1,\)",
    ),
    (dict(y=[-1, 0]), r"DiT: y must lie in \[0, 11\).*got -1 at index \(0,\)"),
    (dict(y=[0.0, 1.0]), r"DiT: y must be an int array \[batch\] = \(2,\)"),
    (dict(y=[0, 1, 2]), r"DiT: y must be an int array \[batch\] = \(2,\)"),
    (dict(t=[0.5, 1.5]), r"DiT: t must lie in \[0.0, 1.0\]; got 1.5 at index \(1,\)"),
    (dict(t=[float("nan"), 0.5]), r"DiT: t must lie in \[0.0, 1.0\]; got nan"),
    (dict(t=[0.5]), r"DiT: t must be a float array \[batch\] = \(2,\)"),
    (dict(x=np.zeros((2, 16, 16, 3))), r"DiT: x must be \[batch, 16, 16, 1\] \(NHWC\)"),
    (dict(x=np.zeros((16, 16, 1))), r"DiT: x must be \[batch, 16, 16, 1\]"),
    (dict(x=np.zeros((2, 16, 16, 1), np.int32)), r"DiT: x must be a float array"),
  ],
)
def test_bad_inputs_raise_naming_the_argument(changes, match):
  model = small_model()
  x, t, y = inputs(2)
  args = dict(x=x, t=t, y=y)
  args.update({k: jnp.asarray(v) for k, v in changes.items()})
  with pytest.raises(ValueError, match=match):
    model(args["x"], args["t"], args["y"])


def test_labels_cover_the_classes_and_the_null_class_only_if_it_exists():
  x, t, _ = inputs(2)
  edges = jnp.array([0, 10], jnp.int32)  # the first class and the null class
  assert np.isfinite(np.asarray(small_model(perturb=0.1)(x, t, edges))).all()
  with pytest.raises(ValueError, match=r"DiT: y must lie in \[0, 10\).*no null class"):
    small_model(class_dropout_prob=0.0)(x, t, edges)
  # Traced inputs are not inspected: the jitted training step checks nothing on values.
  model = small_model()
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, y: nnx.merge(graphdef, s)(x, t, y))(state, jnp.array([11, 0]))
  assert out.shape == x.shape


def test_dit_xl_2_shapes_by_eval_shape():
  config = dit.dit_xl_2()
  model = nnx.eval_shape(lambda: dit.DiT(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(params))
  d, p = 1152, 2
  block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * (4 * d * d) + 4 * d + d + (d * 6 * d + 6 * d)
  expected = (
    (p * p * 4 * d + d)  # x_embedder
    + (256 * d + d + d * d + d)  # t_embedder
    + 1001 * d  # y_embedder (with the null class)
    + 28 * block
    + (d * 2 * d + 2 * d)
    + (d * p * p * 8 + p * p * 8)  # final layer
  )
  assert count == expected == 674_834_720
  assert config.num_tokens == 256 and config.head_dim == 72 and len(model.blocks) == 28
  out = jax.eval_shape(
    lambda x, t, y: dit.DiT(config, rngs=nnx.Rngs(0))(x, t, y),
    jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32),
    jax.ShapeDtypeStruct((2,), jnp.float32),
    jax.ShapeDtypeStruct((2,), jnp.int32),
  )
  assert out.shape == (2, 32, 32, 8)


def test_adaln_zero_blocks_start_as_identity():
  model = small_model()
  x, t, y = inputs(2)
  h = jax.random.normal(jax.random.key(3), (2, N, 32))
  c = jax.random.normal(jax.random.key(4), (2, 32))
  for block in model.blocks:
    out, _ = block(h, c)
    np.testing.assert_array_equal(out, h)
    np.testing.assert_array_equal(block.adaLN_modulation.kernel[...], 0)
  np.testing.assert_array_equal(model(x, t, y), 0)  # the final layer starts at zero


def test_pos_embed_is_2d_sincos():
  emb = dit.sincos_pos_embed_2d(32, 8)  # [64, 32]
  assert emb.shape == (64, 32)
  # Tokens in the same row share the first half; the same column shares the second.
  np.testing.assert_array_equal(emb[8 * 3 + 1, :16], emb[8 * 3 + 5, :16])
  np.testing.assert_array_equal(emb[8 * 1 + 6, 16:], emb[8 * 7 + 6, 16:])
  assert len({tuple(np.round(r, 6)) for r in emb}) == 64


def test_local_window_mask_density():
  m = dit.local_window_mask(256, density=1 / 32, block=8)
  visited, full = m.block_layout()
  assert visited.shape == (1, 1, 32, 32) and float(visited.mean()) == 1 / 32
  assert bool(jnp.all(visited[0, 0] == jnp.eye(32, dtype=bool))) and m.max_kv_blocks == 1
  m3 = dit.local_window_mask(256, density=3 / 32, block=8, num_anchors=2, anchor_offset=1)
  counts = m3.block_layout()[0].sum(-1)
  assert int(counts.min()) >= 3 and int(counts.max()) <= 5 and m3.max_kv_blocks == 5
  band = dit.local_window_mask(256, density=1 / 32, granularity="tokens")
  dense = np.asarray(band.to_dense())[0, 0]
  assert dense[100, 96] and dense[100, 104] and not dense[100, 105]  # |i - j| <= 4
  with pytest.raises(ValueError, match="granularity"):
    dit.local_window_mask(256, granularity="token")
  with pytest.raises(ValueError, match="density"):
    dit.local_window_mask(256, density=0.0, granularity="tokens")


def numpy_token_band(n: int, density: float, block: int, anchors: tuple[int, ...] = ()):
  """bool [n, n]: the authors' window, brute force. Their code keeps, for a window of
  int(n * density) tokens, the keys j with i - half <= j <= i + half, half = window // 2;
  anchor kv tiles are kept whole for every query."""
  half = int(n * density) // 2
  i, j = np.arange(n)[:, None], np.arange(n)[None]
  keep = np.abs(i - j) <= half
  for a in anchors:
    keep[:, a * block : (a + 1) * block] = True
  return keep


@pytest.mark.parametrize(
  "n, density, block",
  [
    (64, 1 / 32, 2),  # the digits DiT: |i - j| <= 1
    (256, 1 / 32, 8),  # |i - j| <= 4 inside 8-token tiles: partial tiles on both sides
    (200, 1 / 16, 16),  # n not a multiple of the tile: a ragged last tile
    (4096, 1 / 32, 128),  # the GPU bench's tile at 4k tokens: |i - j| <= 64
    (96, 0.3, 32),  # a band wider than a tile
  ],
)
def test_token_band_is_the_authors_window(n, density, block):
  band = dit.local_window_mask(n, density=density, block=block, granularity="tokens")
  np.testing.assert_array_equal(
    np.asarray(band.to_dense())[0, 0], numpy_token_band(n, density, block)
  )
  assert dit.band_half_width(n, density) == int(n * density) // 2
  # The tiles it visits cover the band, and no tile is visited without a kept key.
  visited = np.asarray(band.block_layout()[0])[0, 0]
  kb = -(-n // block)
  want = numpy_token_band(n, density, block)
  tiles = np.pad(want, ((0, kb * block - n),) * 2).reshape(kb, block, kb, block).any((1, 3))
  np.testing.assert_array_equal(visited, tiles)
  tiled = dit.local_window_mask(n, density=density, block=block)
  assert np.asarray(tiled.block_layout()[0]).sum() <= visited.sum()


def test_token_band_with_anchors_is_the_band_plus_anchor_tiles():
  band = dit.local_window_mask(
    128, density=1 / 16, block=8, granularity="tokens", num_anchors=2, anchor_offset=3
  )
  anchors = tuple(int(a) for a in masks.anchor_blocks(16, 2, 3))  # tiles 3 and 11
  assert anchors == (3, 11)
  np.testing.assert_array_equal(
    np.asarray(band.to_dense())[0, 0], numpy_token_band(128, 1 / 16, 8, anchors)
  )


def test_token_band_costs_2_9x_the_tiles_at_128_token_tiles():
  # The count: at N = 4096 and 128-token tiles the band |i - j| <= 64 visits 94
  # of the 1024 tiles (3 per query tile, 2 at the ends), the tile window 32.
  band = dit.local_window_mask(4096, density=1 / 32, block=128, granularity="tokens")
  tiled = dit.local_window_mask(4096, density=1 / 32, block=128)
  assert int(band.block_layout()[0].sum()) == 94
  assert int(tiled.block_layout()[0].sum()) == 32


# ---------------------------------------------------------------------------- attention modes


def test_all_kept_mask_makes_every_mode_dense():
  model = small_model(perturb=0.2)
  x, t, y = inputs(2)
  full = masks.dense(N, N, block_q=8, block_kv=8)
  dense, _ = model.forward(x, t, y, mode="dense")
  sparse, _ = model.forward(x, t, y, mode="sparse", mask=full)
  calibrated, cache = model.forward(x, t, y, mode="calibrate", mask=full)
  for layer in cache:
    np.testing.assert_allclose(layer.ratio, 1.0, rtol=1e-5)
    np.testing.assert_allclose(layer.residual, 0.0, atol=1e-5)
  x2, t2, _ = inputs(2, seed=1)  # another step: r = 1 and Delta = 0 still make it dense
  dense2, _ = model.forward(x2, t2, y, mode="dense")
  rett, _ = model.forward(x2, t2, y, mode="rettention", mask=full, cache=cache)
  for got, want in ((sparse, dense), (calibrated, dense), (rett, dense2)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_layer_calibration_is_dense_and_next_step_beats_sparse():
  attn = dit.Attention(32, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, N, 32))
  x_next = x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)  # the next step's input
  dense, _ = attn(x, mode="dense")
  calibrated, cache = attn(x, mode="calibrate", mask=WINDOW)
  np.testing.assert_allclose(calibrated, dense, rtol=1e-5, atol=1e-6)
  # Delta = W_o (O - r O^M): the row-scaled sparse output plus Delta is dense again.
  again, _ = attn(x, mode="rettention", mask=WINDOW, cache=cache)
  np.testing.assert_allclose(again, dense, rtol=1e-5, atol=1e-5)
  want, _ = attn(x_next, mode="dense")
  sparse, _ = attn(x_next, mode="sparse", mask=WINDOW)
  rett, _ = attn(x_next, mode="rettention", mask=WINDOW, cache=cache)
  assert rel_err(rett, want) < 0.5 * rel_err(sparse, want)


def test_model_calibration_is_dense_and_next_step_beats_sparse():
  # perturb 0.1: with much larger random weights the network is chaotic in t (embedded as
  # sinusoids of 1000 t), so no cache survives even a step of 0.005.
  model = small_model(perturb=0.1)
  x, t, y = inputs(2)
  dense, _ = model.forward(x, t, y, mode="dense")
  calibrated, cache = model.forward(x, t, y, mode="calibrate", mask=WINDOW)
  np.testing.assert_allclose(calibrated, dense, rtol=1e-5, atol=1e-5)
  assert len(cache) == 2 and cache[0].ratio.shape == (2, 2, N)
  assert cache[0].residual.shape == (2, N, 32)
  r = np.asarray(cache[0].ratio)
  assert (r > 0).all() and (r < 1).all()
  # One Euler step of 1/20 later.
  v = model(x, t, y)
  x_next, t_next = x - 0.05 * v, t - 0.05
  want, _ = model.forward(x_next, t_next, y, mode="dense")
  sparse, _ = model.forward(x_next, t_next, y, mode="sparse", mask=WINDOW)
  rett, kept = model.forward(x_next, t_next, y, mode="rettention", mask=WINDOW, cache=cache)
  assert rel_err(rett, want) < 0.5 * rel_err(sparse, want)
  assert kept is not cache and jax.tree.all(jax.tree.map(jnp.array_equal, kept, cache))
  bumped = dit.bump_ratio(cache, 0.04)
  np.testing.assert_allclose(bumped[1].ratio, cache[1].ratio + 0.04)
  with pytest.raises(ValueError, match="calibrate"):
    model.forward(x, t, y, mode="rettention", mask=WINDOW)
  with pytest.raises(ValueError, match="mode"):
    model(x, t, y, mode="calibrate")


def test_controls_cache_the_dense_output_or_the_ratio_alone():
  attn = dit.Attention(32, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, N, 32))
  x_next = x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)
  dense, _ = attn(x, mode="dense")
  _, full = attn(x, mode="calibrate", mask=WINDOW)
  # cache_only: every later sparse step returns the calibration step's output as is.
  out, cache = attn(x, mode="calibrate", mask=WINDOW, calibration="cache_only")
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache.ratio, 0.0)
  reused, _ = attn(x_next, mode="rettention", mask=WINDOW, cache=cache)
  np.testing.assert_allclose(reused, dense, rtol=1e-5, atol=1e-5)
  # ratio_only: Re-ttention's r, no residual: W_o (r O^M) + b at the new step.
  out, cache = attn(x, mode="calibrate", mask=WINDOW, calibration="ratio_only")
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache.ratio, full.ratio)
  np.testing.assert_array_equal(cache.residual, 0.0)
  got, _ = attn(x_next, mode="rettention", mask=WINDOW, cache=cache)
  rett, _ = attn(x_next, mode="rettention", mask=WINDOW, cache=full)
  np.testing.assert_allclose(got, rett - full.residual, rtol=1e-5, atol=1e-5)
  assert rel_err(got, rett) > 1e-3  # Delta is not negligible here, so the rows differ
  with pytest.raises(ValueError, match="calibration"):
    attn(x, mode="calibrate", mask=WINDOW, calibration="residual_only")


# ---------------------------------------------------------------------------- the sampler


def test_step_modes_follow_the_paper_schedule():
  modes = diffusion.step_modes(20, "rettention", dense_steps=5, recalibrate_every=5)
  assert modes[:5] == ["dense"] * 5
  assert [i for i, m in enumerate(modes) if m == "calibrate"] == [5, 10, 15]
  assert modes.count("rettention") == 12
  assert diffusion.step_modes(3, "sparse") == ["sparse"] * 3
  assert (
    diffusion.step_modes(4, "rettention", dense_steps=0, recalibrate_every=2)
    == [
      "calibrate",
      "rettention",
    ]
    * 2
  )
  control = diffusion.step_modes(20, "dense_then_sparse", dense_steps=5, recalibrate_every=5)
  assert control == ["sparse" if m == "rettention" else "dense" for m in modes]
  for attention in ("ratio_only", "cache_only"):  # Re-ttention's schedule
    assert diffusion.step_modes(20, attention, dense_steps=5, recalibrate_every=5) == modes
  with pytest.raises(ValueError, match="attention"):
    diffusion.step_modes(3, "calibrate")


def test_sampler_is_deterministic_and_modes_compare():
  model = small_model(perturb=0.2)
  labels = jnp.array([0, 3, 7])
  noise = jax.random.normal(jax.random.key(5), (3, 16, 16, 1))
  kw = dict(steps=8, noise=noise, mask=WINDOW, dense_steps=2, recalibrate_every=3, cfg_scale=1.5)
  dense = diffusion.sample(model, labels, attention="dense", **kw)
  np.testing.assert_array_equal(diffusion.sample(model, labels, attention="dense", **kw), dense)
  assert dense.shape == (3, 16, 16, 1) and np.isfinite(np.asarray(dense)).all()
  rett = diffusion.sample(model, labels, attention="rettention", r_increment=0.0, **kw)
  np.testing.assert_array_equal(
    diffusion.sample(model, labels, attention="rettention", r_increment=0.0, **kw), rett
  )
  sparse = diffusion.sample(model, labels, attention="sparse", **kw)
  assert rel_err(rett, dense) < rel_err(sparse, dense)
  # The all-kept mask: Re-ttention (r = 1, Delta = 0, no increment) samples as dense.
  full = masks.dense(N, N, block_q=8, block_kv=8)
  kw["mask"] = full
  same = diffusion.sample(model, labels, attention="rettention", r_increment=0.0, **kw)
  np.testing.assert_allclose(same, dense, rtol=1e-4, atol=1e-4)
  # The controls: cache_only keeps r = 0 (no increment), so it differs from
  # ratio_only and Re-ttention; ratio_only with an all-kept mask (r = 1) is dense too.
  kw["mask"] = WINDOW
  cache_only = diffusion.sample(model, labels, attention="cache_only", **kw)
  ratio_only = diffusion.sample(model, labels, attention="ratio_only", **kw)
  for other in (cache_only, ratio_only):
    assert np.isfinite(np.asarray(other)).all() and rel_err(other, rett) > 1e-4
  assert rel_err(cache_only, ratio_only) > 1e-4
  np.testing.assert_array_equal(
    diffusion.sample(model, labels, attention="cache_only", r_increment=0.5, **kw), cache_only
  )
  kw["mask"] = full
  same = diffusion.sample(model, labels, attention="ratio_only", r_increment=0.0, **kw)
  np.testing.assert_allclose(same, dense, rtol=1e-4, atol=1e-4)
  # rng instead of noise: the same key gives the same noise.
  a = diffusion.sample(model, labels, steps=2, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, diffusion.sample(model, labels, steps=2, rng=jax.random.key(1)))


def test_sampler_runs_rettention_over_the_token_band():
  model = small_model(perturb=0.2)
  labels = jnp.array([1, 4])
  noise = jax.random.normal(jax.random.key(6), (2, 16, 16, 1))
  kw = dict(steps=6, noise=noise, dense_steps=1, recalibrate_every=3, attention="rettention")
  # The default mask at 64 tokens: tiles of 2, density 1/32 (|i - j| <= 1 for "tokens").
  tokens = diffusion.sample(model, labels, granularity="tokens", **kw)
  band = dit.local_window_mask(N, density=1 / 32, block=2, granularity="tokens")
  np.testing.assert_array_equal(diffusion.sample(model, labels, mask=band, **kw), tokens)
  tiles = diffusion.sample(model, labels, **kw)
  assert np.isfinite(np.asarray(tokens)).all() and rel_err(tokens, tiles) > 1e-5
  dense = diffusion.sample(model, labels, **{**kw, "attention": "dense"})
  sparse = diffusion.sample(model, labels, granularity="tokens", **{**kw, "attention": "sparse"})
  assert rel_err(tokens, dense) < rel_err(sparse, dense)
  with pytest.raises(ValueError, match="granularity"):
    diffusion.sample(model, labels, granularity="pixels", **kw)


# ---------------------------------------------------------------------------- training


def load_config(*overrides: str):
  return testutil.load_config("dit_digits", *overrides)


FAST = [
  "--config.data.image_size=16",
  "--config.model.hidden_size=32",
  "--config.model.depth=2",
  "--config.model.num_heads=2",
  "--config.batch_size=32",
  "--config.eval_batch_size=128",
  "--config.optimizer.learning_rate=3e-3",
  "--config.optimizer.warmup_steps=3",
  "--config.diffusion.time_sampling=uniform",
  "--config.log_every=1",
  "--config.eval_every=1000",
  "--config.checkpoint_every=1000",
]


def test_config_checks_name_the_field():
  config = load_config(*FAST)
  assert config.task == "diffusion"
  trainer.check_config(config)
  for override, match in (
    ("--config.model.name=dit_huge", "config.model.name"),
    ("--config.data.image_size=15", "config.data.image_size"),
    ("--config.diffusion.time_sampling=cosine", "config.diffusion.time_sampling"),
    ("--config.model.class_dropout_prob=1.0", "config.model.class_dropout_prob"),
  ):
    with pytest.raises(ValueError, match=match):
      trainer.check_config(load_config(*FAST, override))


def test_diffusion_task_trains_and_samples(tmp_path):
  steps = 40
  config = load_config(*FAST, f"--config.steps={steps}")
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["test"]["loss"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) == steps
  # Zero output at init: loss = E|noise - x0|^2 ~ 2; it falls as the model learns.
  assert losses[0] > 1.5 and np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
  # The noise stream is model state: saved, one draw per step.
  state, _ = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2).read(steps)
  assert int(state["rest"]["rngs"]["diffusion"]["count"]["value"]) == steps
  # A tiny sample from the restored model, in each attention mode.
  model, loaded = trainer.load(str(tmp_path))
  assert loaded.restored_step == steps and int(model.rngs.diffusion.count[...]) == steps
  assert loaded.model.to_dict() == config.model.to_dict() and loaded.dataset.num_classes == 10
  datasets_shape = (16, 16, 1)
  labels = jnp.arange(4)
  noise = jax.random.normal(jax.random.key(0), (4, *datasets_shape))
  for attention in diffusion.ATTENTION_MODES:
    images = diffusion.sample(
      model,
      labels,
      steps=6,
      noise=noise,
      attention=attention,
      mask=WINDOW,
      dense_steps=2,
      recalibrate_every=2,
      cfg_scale=2.0,
    )
    assert images.shape == (4, 16, 16, 1) and np.isfinite(np.asarray(images)).all()

"""LITv2 in NNX against NumPy re-implementations of LITv2's PyTorch code (float64).

The oracles below are written from LITv2's PyTorch modules (ziplab/LITv2:
classification/models/{attentions,blocks,patch_embed,litv2}.py, the padding of
detection/mmdet/models/backbones/litv2.py, and the DCN CUDA im2col kernel for the
deformable conv), with the same reshapes and permutes, `nn.Linear` as
x @ W.T + b, and torch's (out, in, kh, kw) conv weights. They take state dicts
with LITv2's names, which the NNX modules load.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention.models import layers, litv2
from sparse_attention.models.litv2 import DTM, ConvFFNBlock, HiLo, LITv2

# ------------------------------------------------------------------ numpy oracles

_erf = np.vectorize(math.erf)


def gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def linear(x, sd, name):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def layer_norm(x, sd, name, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def conv2d(x, weight, bias, stride, padding, groups=1):
  """NCHW conv, torch weight (out, in/groups, kh, kw), explicit loops over taps."""
  b, c, h, w = x.shape
  o, cg, kh, kw = weight.shape
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  ho = (h + 2 * padding - kh) // stride + 1
  wo = (w + 2 * padding - kw) // stride + 1
  out = np.zeros((b, o, ho, wo))
  og = o // groups
  for g in range(groups):
    xs = x[:, g * cg : (g + 1) * cg]
    ws_ = weight[g * og : (g + 1) * og]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
        out[:, g * og : (g + 1) * og] += np.einsum("bchw,oc->bohw", patch, ws_[:, :, i, j])
  return out + bias[None, :, None, None]


def hilo_oracle(x, H, W, sd, *, dim, num_heads, window_size, alpha):
  """LITv2's HiLo.forward(x, H, W) with the detection backbone's padding, in NumPy."""
  head_dim = int(dim / num_heads)
  l_heads = int(num_heads * alpha)
  l_dim = l_heads * head_dim
  h_heads = num_heads - l_heads
  h_dim = h_heads * head_dim
  ws = window_size
  if ws == 1:
    h_heads, h_dim, l_heads, l_dim = 0, 0, num_heads, dim
  scale = head_dim**-0.5

  def hifi(x):
    B, H, W, C = x.shape
    h_group, w_group = H // ws, W // ws
    total_groups = h_group * w_group
    x = x.reshape(B, h_group, ws, w_group, ws, C).swapaxes(2, 3)
    qkv = linear(x, sd, "h_qkv").reshape(B, total_groups, -1, 3, h_heads, h_dim // h_heads)
    qkv = qkv.transpose(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]  # B, hw, n_head, ws*ws, head_dim
    attn = softmax((q @ k.swapaxes(-2, -1)) * scale)
    attn = (attn @ v).swapaxes(2, 3).reshape(B, h_group, w_group, ws, ws, h_dim)
    x = attn.swapaxes(2, 3).reshape(B, h_group * ws, w_group * ws, h_dim)
    return linear(x, sd, "h_proj")

  def lofi(x):
    B, H, W, C = x.shape
    q = linear(x, sd, "l_q").reshape(B, H * W, l_heads, l_dim // l_heads).transpose(0, 2, 1, 3)
    if ws > 1:
      x_ = x.transpose(0, 3, 1, 2)  # nn.AvgPool2d(ws, ws) on NCHW:
      x_ = x_.reshape(B, C, H // ws, ws, W // ws, ws).mean(axis=(3, 5))
      x_ = x_.reshape(B, C, -1).transpose(0, 2, 1)
      kv = linear(x_, sd, "l_kv").reshape(B, -1, 2, l_heads, l_dim // l_heads)
    else:
      kv = linear(x, sd, "l_kv").reshape(B, -1, 2, l_heads, l_dim // l_heads)
    kv = kv.transpose(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = softmax((q @ k.swapaxes(-2, -1)) * scale)
    x = (attn @ v).swapaxes(1, 2).reshape(B, H, W, l_dim)
    return linear(x, sd, "l_proj")

  B, N, C = x.shape
  x = x.reshape(B, H, W, C)
  pad_r = (ws - W % ws) % ws
  pad_b = (ws - H % ws) % ws
  x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
  if h_heads == 0:
    return lofi(x)[:, :H, :W, :].reshape(B, N, C)
  if l_heads == 0:
    return hifi(x)[:, :H, :W, :].reshape(B, N, C)
  out = np.concatenate((hifi(x)[:, :H, :W, :], lofi(x)[:, :H, :W, :]), axis=-1)
  return out.reshape(B, N, C)


def dwmlp_oracle(x, H, W, sd, p):
  """DWMlp: fc1 -> DWConv (NCHW, groups = channels) -> GELU -> fc2."""
  x = linear(x, sd, p + "fc1")
  B, N, C = x.shape
  x = x.swapaxes(1, 2).reshape(B, C, H, W)
  x = conv2d(x, sd[p + "dwconv.dwconv.weight"], sd[p + "dwconv.dwconv.bias"], 1, 1, groups=C)
  x = x.reshape(B, C, N).swapaxes(1, 2)
  return linear(gelu(x), sd, p + "fc2")


def convffn_oracle(x, H, W, sd, p=""):
  return x + dwmlp_oracle(layer_norm(x, sd, p + "norm2"), H, W, sd, p + "mlp.")


def block_oracle(x, H, W, sd, p, **hilo_kwargs):
  attn_sd = {k[len(p + "attn.") :]: v for k, v in sd.items() if k.startswith(p + "attn.")}
  x = x + hilo_oracle(layer_norm(x, sd, p + "norm1"), H, W, attn_sd, **hilo_kwargs)
  return x + dwmlp_oracle(layer_norm(x, sd, p + "norm2"), H, W, sd, p + "mlp.")


def deform_conv_oracle(x, offset, weight, bias, stride):
  """DCNv1 as the CUDA im2col kernel computes it (padding 0, dilation 1, 1 group).

  Returns the output and how many samples fell (partly) outside the image.
  """
  B, C, H, W = x.shape
  O, _, kh, kw = weight.shape
  _, _, Ho, Wo = offset.shape
  cols = np.zeros((B, C, kh, kw, Ho, Wo))
  outside = 0
  for b in range(B):
    for h_col in range(Ho):
      for w_col in range(Wo):
        for i in range(kh):
          for j in range(kw):
            off_h = offset[b, 2 * (i * kw + j), h_col, w_col]
            off_w = offset[b, 2 * (i * kw + j) + 1, h_col, w_col]
            h_im = h_col * stride + i + off_h
            w_im = w_col * stride + j + off_w
            val = np.zeros(C)
            if h_im > -1 and w_im > -1 and h_im < H and w_im < W:
              h_low, w_low = math.floor(h_im), math.floor(w_im)
              h_high, w_high = h_low + 1, w_low + 1
              lh, lw = h_im - h_low, w_im - w_low
              hh, hw = 1 - lh, 1 - lw
              im, zero = x[b], np.zeros(C)
              v1 = im[:, h_low, w_low] if h_low >= 0 and w_low >= 0 else zero
              v2 = im[:, h_low, w_high] if h_low >= 0 and w_high <= W - 1 else zero
              v3 = im[:, h_high, w_low] if h_high <= H - 1 and w_low >= 0 else zero
              v4 = im[:, h_high, w_high] if h_high <= H - 1 and w_high <= W - 1 else zero
              val = hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4
              outside += not (0 <= h_low and h_high <= H - 1 and 0 <= w_low and w_high <= W - 1)
            else:
              outside += 1
            cols[b, :, i, j, h_col, w_col] = val
  out = np.einsum("bcijhw,ocij->bohw", cols, weight) + bias[None, :, None, None]
  return out, outside


def batch_norm(y, sd, p, train, eps=1e-5):
  if train:
    mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
  else:
    mean, var = sd[p + "running_mean"], sd[p + "running_var"]
  r = lambda a: a[None, :, None, None]
  return (y - r(mean)) / np.sqrt(r(var) + eps) * r(sd[p + "weight"]) + r(sd[p + "bias"])


def dtm_oracle(x, H, W, sd, p="", train=False):
  """DTM: DeformConv2dPack(C, 2C, 2, 2, 0) -> BatchNorm2d -> GELU."""
  B, L, C = x.shape
  x = x.reshape(B, H, W, C).transpose(0, 3, 1, 2)
  offset = conv2d(x, sd[p + "dconv.conv_offset.weight"], sd[p + "dconv.conv_offset.bias"], 2, 0)
  y, outside = deform_conv_oracle(x, offset, sd[p + "dconv.weight"], sd[p + "dconv.bias"], 2)
  y = gelu(batch_norm(y, sd, p + "norm_layer.", train))
  return y.reshape(B, 2 * C, -1).swapaxes(1, 2), outside


def litv2_oracle(images, sd, config):
  """LITv2.forward (eval mode) on NHWC images."""
  x = images.transpose(0, 3, 1, 2)
  x = conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], config.patch_size, 0)
  B, C, H, W = x.shape
  x = layer_norm(x.reshape(B, C, H * W).swapaxes(1, 2), sd, "patch_embed.norm")
  for n, depth in enumerate(config.depths):
    dim = config.embed_dim * 2**n
    for m in range(depth):
      p = f"layers.{n}.blocks.{m}."
      if config.has_msa[n]:
        kw = dict(dim=dim, num_heads=config.num_heads[n], alpha=config.alpha)
        x = block_oracle(x, H, W, sd, p, window_size=config.local_ws[n], **kw)
      else:
        x = convffn_oracle(x, H, W, sd, p)
    if n < len(config.depths) - 1:
      x, _ = dtm_oracle(x, H, W, sd, f"layers.{n}.downsample.")
      H, W = H // 2, W // 2
  x = layer_norm(x, sd, "norm").mean(axis=1)
  return linear(x, sd, "head")


# ----------------------------------------------------------- random LITv2 state dicts


def hilo_state_dict(rng, dim, num_heads, window_size, alpha, qkv_bias, prefix=""):
  """Random weights with the names and torch shapes of LITv2's HiLo.__init__."""
  head_dim = dim // num_heads
  l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
  h_heads = num_heads - l_heads
  h_dim, l_dim = h_heads * head_dim, l_heads * head_dim
  sd = {}

  def lin(name, d_in, d_out, bias):
    sd[prefix + name + ".weight"] = rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)
    if bias:
      sd[prefix + name + ".bias"] = 0.3 * rng.standard_normal(d_out)

  if l_heads:
    lin("l_q", dim, l_dim, qkv_bias)
    lin("l_kv", dim, 2 * l_dim, qkv_bias)
    lin("l_proj", l_dim, l_dim, True)
  if h_heads:
    lin("h_qkv", dim, 3 * h_dim, qkv_bias)
    lin("h_proj", h_dim, h_dim, True)
  return sd


def randomized(sd, rng):
  """Same names and shapes, random values (variances positive)."""
  out = {}
  for name, value in sd.items():
    if name.endswith("num_batches_tracked"):
      out[name] = np.asarray(7, np.int64)
    elif name.endswith("running_var"):
      out[name] = rng.uniform(0.5, 2.0, value.shape)
    elif name.endswith("conv_offset.weight"):
      out[name] = 0.5 * rng.standard_normal(value.shape)  # offsets of a pixel or more
    else:
      fan_in = np.prod(value.shape[1:]) if value.ndim > 1 else 1
      out[name] = rng.standard_normal(value.shape) / math.sqrt(max(1, fan_in) / 2)
  return out


def assert_close(actual, expected, tol=2e-5):
  actual = np.asarray(actual, np.float64)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=0)


def rand(rng, *shape):
  return rng.standard_normal(shape)


# ------------------------------------------------------------------------------ HiLo

HILO_CASES = [  # dim, heads, ws, alpha, qkv_bias, H, W
  (32, 4, 2, 0.5, True, 8, 8),
  (40, 10, 2, 0.9, True, 7, 9),  # padded, 9 Lo-Fi + 1 Hi-Fi heads
  (32, 4, 1, 0.9, True, 5, 6),  # ws 1: plain MSA
  (32, 4, 2, 1.0, False, 6, 6),  # Lo-Fi only, no qkv bias
  (24, 3, 4, 0.0, True, 6, 10),  # Hi-Fi only, padded
  (48, 6, 3, 0.5, False, 7, 5),  # ws 3, padded
]


@pytest.mark.parametrize("dim, heads, ws, alpha, qkv_bias, H, W", HILO_CASES)
def test_hilo_matches_litv2_oracle(dim, heads, ws, alpha, qkv_bias, H, W):
  rng = np.random.default_rng(dim + H * W)
  sd = hilo_state_dict(rng, dim, heads, ws, alpha, qkv_bias)
  x = rand(rng, 2, H * W, dim)
  expected = hilo_oracle(x, H, W, sd, dim=dim, num_heads=heads, window_size=ws, alpha=alpha)
  # The reference implementation on two cases (padded; ws 1), xla on all.
  for impl in ("xla", "reference") if (H * W) % 2 or ws == 1 else ("xla",):
    layer = HiLo.from_torch_state_dict(
      sd,
      dim=dim,
      num_heads=heads,
      window_size=ws,
      alpha=alpha,
      qkv_bias=qkv_bias,
      implementation=impl,
    )
    out = nnx.jit(lambda m, x: m(x, H, W))(layer, jnp.asarray(x, jnp.float32))
    assert_close(out, expected)
    if impl == "xla":
      exported = layer.to_torch_state_dict()
      assert exported.keys() == sd.keys()
      for k, v in sd.items():
        np.testing.assert_allclose(exported[k], v, rtol=1e-6, atol=1e-7)


def test_hilo_head_split_and_parameters_follow_litv2():
  layer = nnx.eval_shape(lambda: HiLo(384, 12, window_size=2, alpha=0.9, rngs=nnx.Rngs(0)))
  assert (layer.h_heads, layer.l_heads, layer.h_dim, layer.l_dim) == (2, 10, 64, 320)
  layer = HiLo(32, 4, window_size=1, alpha=0.5, qkv_bias=False, rngs=nnx.Rngs(0))
  assert (layer.h_heads, layer.h_qkv, layer.h_proj) == (0, None, None)
  assert layer.l_q.bias is None and layer.l_proj.bias is not None
  assert sorted(layer.to_torch_state_dict()) == [
    "l_kv.weight",
    "l_proj.bias",
    "l_proj.weight",
    "l_q.weight",
  ]


def test_hilo_loader_errors():
  rng = np.random.default_rng(0)
  kw = dict(dim=32, num_heads=4, window_size=2, alpha=0.5, qkv_bias=True)
  sd = hilo_state_dict(rng, **kw)
  missing = dict(sd)
  del missing["l_kv.bias"]
  with pytest.raises(ValueError, match=r"missing keys \(1\): l_kv\.bias"):
    HiLo.from_torch_state_dict(missing, **kw)
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): h_kv\.weight"):
    HiLo.from_torch_state_dict({**sd, "h_kv.weight": sd["l_kv.weight"]}, **kw)
  with pytest.raises(ValueError, match=r"h_qkv\.weight: got shape \(40, 32\), expected \(48, 32\)"):
    HiLo.from_torch_state_dict({**sd, "h_qkv.weight": np.zeros((40, 32))}, **kw)


# --------------------------------------------------------------------- ConvFFN, DTM


def test_convffn_block_matches_litv2_oracle():
  rng = np.random.default_rng(1)
  block = ConvFFNBlock(16, mlp_ratio=4.0, rngs=nnx.Rngs(0))
  sd = randomized(layers.export_torch_params(block.torch_params("")), rng)
  layers.load_torch_params(block.torch_params(""), sd, what="test")
  x = rand(rng, 2, 6 * 5, 16)
  out = nnx.jit(lambda m, x: m(x, 6, 5))(block, jnp.asarray(x, jnp.float32))
  assert_close(out, convffn_oracle(x, 6, 5, sd))


@pytest.mark.parametrize("train", [False, True])
def test_dtm_matches_litv2_oracle_with_nonzero_offsets(train):
  rng = np.random.default_rng(2)
  dtm = DTM(6, rngs=nnx.Rngs(0))
  params = dtm.torch_params("")
  assert "dconv.conv_offset.weight" in {p.name for p in params}
  assert not np.any(np.asarray(dtm.dconv.conv_offset.kernel[...]))  # zero-initialised offsets
  sd = randomized(layers.export_torch_params(params), rng)
  assert sd["dconv.weight"].shape == (12, 6, 2, 2) and sd["dconv.conv_offset.weight"].shape == (
    8,
    6,
    2,
    2,
  )
  layers.load_torch_params(params, sd, what="test")
  dtm.train() if train else dtm.eval()
  x = rand(rng, 2, 8 * 6, 6)
  expected, outside = dtm_oracle(x, 8, 6, sd, train=train)
  assert outside > 4  # some samples leave the image: the zero padding is exercised
  out = nnx.jit(lambda m, x: m(x, 8, 6))(dtm, jnp.asarray(x, jnp.float32))
  assert out.shape == (2, 4 * 3, 12)
  assert_close(out, expected, tol=5e-5)
  if train:  # running stats move by torch's momentum 0.1 towards the batch mean
    y = deform_conv_oracle(
      x.reshape(2, 8, 6, 6).transpose(0, 3, 1, 2),
      conv2d(
        x.reshape(2, 8, 6, 6).transpose(0, 3, 1, 2),
        sd["dconv.conv_offset.weight"],
        sd["dconv.conv_offset.bias"],
        2,
        0,
      ),
      sd["dconv.weight"],
      sd["dconv.bias"],
      2,
    )[0]
    mean = 0.9 * sd["norm_layer.running_mean"] + 0.1 * y.mean(axis=(0, 2, 3))
    assert_close(dtm.norm_layer.mean[...], mean, tol=5e-5)


def test_deform_conv_gradients_are_finite_and_reach_offsets():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rand(rng, 1, 6, 6, 3), jnp.float32)
  off = jnp.asarray(0.7 * rand(rng, 1, 3, 3, 8), jnp.float32)
  kernel = jnp.asarray(rand(rng, 2, 2, 3, 5), jnp.float32)
  loss = lambda x, off: jnp.sum(layers.deform_conv2d(x, off, kernel, None, stride=2) ** 2)
  gx, goff = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, off)
  assert np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(goff)).max() > 0
  # Finite differences on one offset (interior of a bilinear cell).
  eps = 1e-2
  e = jnp.zeros_like(off).at[0, 1, 1, 3].set(eps)
  fd = (loss(x, off + e) - loss(x, off - e)) / (2 * eps)
  np.testing.assert_allclose(float(goff[0, 1, 1, 3]), float(fd), rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def tiny():
  """litv2_tiny on 16x16 RGB images (token grids 8, 4, 2, 1) with random LITv2 weights."""
  config = litv2.litv2_tiny(image_size=16, num_classes=7, in_chans=3)
  names = LITv2(config, rngs=nnx.Rngs(0)).to_torch_state_dict()
  sd = randomized(names, np.random.default_rng(4))
  return config, sd


def test_tiny_litv2_matches_oracle(tiny):
  config, sd = tiny
  model = LITv2.from_torch_state_dict(sd, config)
  images = rand(np.random.default_rng(5), 2, 16, 16, 3)
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images, jnp.float32))
  assert logits.shape == (2, 7)
  assert_close(logits, litv2_oracle(images, sd, config), tol=2e-4)


def test_state_dict_round_trip_gives_identical_logits(tiny):
  config, sd = tiny
  model = LITv2.from_torch_state_dict({"model": sd}, config)  # a checkpoint dict unwraps
  exported = model.to_torch_state_dict()
  assert exported.keys() == sd.keys()
  fresh = LITv2.from_torch_state_dict(exported, config)
  images = jnp.asarray(rand(np.random.default_rng(6), 3, 16, 16, 3), jnp.float32)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(np.asarray(forward(model, images)), forward(fresh, images))
  for name, value in exported.items():
    np.testing.assert_array_equal(value, fresh.to_torch_state_dict()[name])


def test_loader_reports_missing_unexpected_and_misshaped_keys(tiny):
  config, sd = tiny
  bad = dict(sd)
  del bad["layers.2.blocks.1.attn.l_q.weight"]
  with pytest.raises(
    ValueError, match=r"missing keys \(1\): layers\.2\.blocks\.1\.attn\.l_q\.weight"
  ):
    LITv2.from_torch_state_dict(bad, config)
  bad = {**sd, "layers.0.downsample.dconv.weight": np.zeros((32, 16, 3, 3))}
  with pytest.raises(
    ValueError, match=r"layers\.0\.downsample\.dconv\.weight: got shape \(32, 16, 3, 3\), expected"
  ):
    LITv2.from_torch_state_dict(bad, config)
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): layers\.3\.downsample\.dconv"):
    LITv2.from_torch_state_dict({**sd, "layers.3.downsample.dconv.weight": 0}, config)
  without_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  LITv2.from_torch_state_dict(without_counter, config)  # optional, like torch's


def test_train_and_eval_modes(tiny):
  config, sd = tiny
  model = LITv2.from_torch_state_dict(sd, config)
  images = jnp.asarray(rand(np.random.default_rng(7), 4, 16, 16, 3), jnp.float32)
  forward = nnx.jit(lambda m, x: m(x))
  before = np.asarray(model.layers[0].downsample.norm_layer.mean[...])
  eval_logits = forward(model, images)
  model.train()
  train_logits = forward(model, images)  # batch statistics; running stats move
  assert not np.allclose(eval_logits, train_logits)
  assert not np.allclose(before, model.layers[0].downsample.norm_layer.mean[...])
  model.eval()
  assert model.layers[0].downsample.norm_layer.use_running_average


def test_tiny_model_trains_a_step_with_stochastic_depth(tiny):
  config = dataclasses.replace(tiny[0], drop_path_rate=0.2)
  model = LITv2(config, rngs=nnx.Rngs(0))
  assert model.layers[3].blocks[0].drop_path.rate == pytest.approx(0.2)
  images = jnp.asarray(rand(np.random.default_rng(8), 4, 16, 16, 3), jnp.float32)
  labels = jnp.arange(4)

  @nnx.jit
  def loss_and_grads(model, images):
    def loss(model):
      logits = model(images)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    return nnx.value_and_grad(loss)(model)

  value, grads = loss_and_grads(model, images)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  offsets = grads["layers"][0]["downsample"]["dconv"]["conv_offset"]["kernel"][...]
  assert np.abs(np.asarray(offsets)).max() > 0  # offsets learn from the start


def test_litv2_s_shapes_and_parameter_count():
  config = litv2.litv2_s()
  model = nnx.eval_shape(lambda: LITv2(config, rngs=nnx.Rngs(0)))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(params / 28e6 - 1) < 0.02, params  # LITv2-S: 28M (paper, Table 1)
  logits = nnx.eval_shape(
    lambda: LITv2(config, rngs=nnx.Rngs(0))(jnp.zeros((2, 224, 224, 3), jnp.float32))
  )
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  feats = nnx.eval_shape(
    lambda: LITv2(config, rngs=nnx.Rngs(0)).features(jnp.zeros((1, 224, 224, 3)))
  )
  assert feats.shape == (1, 768)
  blocks = model.layers[2].blocks
  assert len(blocks) == 6 and blocks[0].attn.window_size == 2 and blocks[0].attn.h_heads == 2
  assert model.layers[3].blocks[0].attn.h_heads == 0 and model.layers[3].downsample is None
  assert not hasattr(model.layers[0].blocks[0], "attn")


@pytest.mark.parametrize(
  "preset, heads, depth3",
  [(litv2.litv2_m, (3, 6, 12, 24), 18), (litv2.litv2_b, (4, 8, 16, 32), 18)],
)
def test_presets(preset, heads, depth3):
  config = preset(num_classes=10)
  assert config.num_heads == heads and config.depths[2] == depth3 and config.alpha == 0.9
  assert config.local_ws == (0, 0, 2, 1) and config.num_classes == 10 and config.qkv_bias


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(depths=(2, 2)), "num_heads has 4 entries"),
    (dict(image_size=100), "multiple of patch_size"),
    (dict(num_heads=(3, 6, 10, 24)), "not a multiple of num_heads"),
    (dict(implementation="cuda"), "implementation"),
  ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    litv2.litv2_s(**kwargs)


@pytest.mark.parametrize(
  "images, match",
  [
    (np.zeros((2, 8, 8, 3)), r"LITv2: images has 3 channels \(dim 3\); the model takes in_chans=1"),
    (np.zeros((1, 1, 8, 8)), r"in_chans=1 \(NCHW\? the model takes NHWC\)"),
    (np.zeros((8, 8, 1)), r"LITv2: images must have rank 4, \[batch, H, W, in_chans=1\]"),
    (
      np.zeros((2, 9, 8, 1)),
      r"LITv2: images height and width \(9, 8\) must be positive "
      r"multiples of patch_size \* 2\*\*\(stages-1\) = 8",
    ),
    (np.zeros((2, 8, 0, 1)), r"height and width \(8, 0\) must be positive"),
    (np.zeros((0, 8, 8, 1)), r"LITv2: images has an empty batch"),
    (np.zeros((2, 8, 8, 1), np.uint8), r"LITv2: images must be a float array.*uint8"),
    (np.zeros((2, 8, 8, 1)).tolist(), r"LITv2: images must be an array"),
  ],
)
def test_model_rejects_bad_images_naming_the_mismatch(images, match):
  model = LITv2(litv2.litv2_tiny(image_size=8, in_chans=1), rngs=nnx.Rngs(0))
  images = images if isinstance(images, list) else jnp.asarray(images)
  with pytest.raises(ValueError, match=match):
    model(images)


def test_model_takes_other_multiples_of_the_stage_stride():
  """8x8 is the config's size; 16x8 (any multiple of patch_size * 2**3) runs as well."""
  model = LITv2(litv2.litv2_tiny(image_size=8, in_chans=1), rngs=nnx.Rngs(0))
  for shape in ((2, 8, 8, 1), (2, 16, 8, 1)):
    logits = model(jnp.ones(shape))
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()

"""A class-conditional Diffusion Transformer (DiT) in Flax NNX, with Re-ttention sampling.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023). Structure:

```
DiT(x [B, H, W, C] NHWC, t [B] in [0, 1], y int [B])
  x_embedder   patchify: p x p patches -> Linear(p*p*C, D)       -> [B, N, D], N = (H/p)(W/p)
  + pos_embed  fixed 2-D sin-cos (rows in the first D/2 channels, columns in the rest)
  c = t_embedder(t) + y_embedder(y)                              -> [B, D]
      t_embedder: sinusoidal(time_scale * t, freq_dim) -> Linear -> SiLU -> Linear
      y_embedder: Embed(num_classes + 1, D); row num_classes is the null class that
                  classifier-free guidance drops labels to (absent if class_dropout_prob=0)
  blocks.i     adaLN-Zero DiTBlock, i = 0..depth-1:
                 shift, scale, gate (x2) = Linear(SiLU(c)) -> 6 x [B, D] (zero-initialised)
                 x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
                 x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
  final_layer  modulate(norm(x)) with Linear(SiLU(c)) -> 2 x [B, D], then
               Linear(D, p*p*C_out) (both zero-initialised)               -> [B, N, p*p*C_out]
  unpatchify                                                      -> [B, H, W, C_out]
```
C_out = 2C with `learn_sigma` (DiT's learned-variance channels; the flow-matching loss
of train/diffusion.py reads only the first C), else C. With the zero-initialised gates
every block starts as the identity and the model's output starts at 0.

Attention mode, chosen per call at SAMPLING time (the same weights serve them all):

  "dense"       plain attention, `jax.nn.dot_product_attention` (cuDNN on GPU when it
                takes the call, XLA otherwise)
  "sparse"      `block_sparse_attention` over the BlockMask `mask` only
  "calibrate"   Re-ttention's calibration step: dense attention through
                `calibrate_attention`, which also measures, per (batch, head, query row),
                r = exp(lse_masked - lse), the share of the softmax mass inside the mask.
                The layer returns the dense output W_o O + b, and the new cache holds r
                and the residual Delta = W_o (O - r O^M) (W_o without its bias)
  "rettention"  Re-ttention's sparse step: O = r * O^M from the block-sparse kernel with
                `row_scale=r` (the cached r), and the layer returns W_o O + b + Delta;
                the block then adds it to its input x (through adaLN-Zero's gate_msa,
                as every attention output), which is the issue's Y = W_o O + b + x + Delta

Two controls change only what "calibrate" caches (`calibration=`, the sparse step is the
same "rettention" mode): "ratio_only" caches r and Delta = 0 (the reshape r * O^M alone),
"cache_only" caches r = 0 and Delta = W_o O (the calibration step's dense output, reused
as is at every sparse step; the kernel still runs, with row_scale 0).

`DiT.forward(x, t, y, mode=..., mask=..., cache=...) -> (out, cache)` runs one mode; the
cache is an explicit pytree (`RettentionCache`: one `LayerCache(ratio, residual)` per
block) that "calibrate" creates, "rettention" reads, and the caller passes from step to
step. Nothing about it lives in the module, so a sampler is a pure function of (weights,
noise, labels, schedule). `bump_ratio(cache, inc)` adds the authors' per-step increment
to r; the schedule (dense warm-up, recalibration every k steps) is the sampler's
(train/diffusion.py `sample`). `local_window_mask` builds the local-window mask: the
authors' token band |i - j| <= int(density N) // 2 (granularity="tokens"), or its
kernel-friendly variant, a window of whole tiles at exactly that tile density
(granularity="tiles", the default).

Presets: `dit_tiny` (trains on the 16x16 digits of configs/dit_digits.py on a CPU in
minutes) and `dit_xl_2` (DiT-XL/2:
28 blocks, width 1152, 16 heads, patch 2, 256x256 images as 32x32x4 latents, 1000
classes, learned sigma; 674.8M parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention.ops import (
  BlockMask,
  block_sparse_attention,
  calibrate_attention,
  check_values_in_range,
  masks,
)

MODES = ("dense", "sparse", "calibrate", "rettention")
# What a "calibrate" step caches: Re-ttention's (r, Delta), or one of its two controls.
CALIBRATIONS = ("rettention", "ratio_only", "cache_only")
GRANULARITIES = ("tiles", "tokens")
_LN_EPS = 1e-6  # DiT's LayerNorm epsilon
_xavier = nnx.initializers.xavier_uniform()
_normal = nnx.initializers.normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Shapes and options of a DiT.

  Attributes:
    image_size: H = W of the (latent) images.
    patch_size: p; image_size must be a multiple.
    in_channels: C of the input images.
    hidden_size: D, the token width; a multiple of num_heads.
    depth: number of DiT blocks.
    num_heads: attention heads (head_dim = D / num_heads).
    mlp_ratio: MLP hidden width / D.
    num_classes: class labels 0 .. num_classes - 1; label num_classes is the null
      (unconditional) class of classifier-free guidance, present if class_dropout_prob > 0.
    class_dropout_prob: the rate at which training drops labels to the null class (for
      classifier-free guidance); > 0 gives the label table its null row.
    learn_sigma: output 2C channels (DiT's learned variance) instead of C.
    freq_dim: width of the sinusoidal timestep features.
    time_scale: t in [0, 1] is embedded as sinusoids of time_scale * t (1000: DiT's range).
    implementation: `implementation` of the block-sparse and calibration ops (None: the
      best for the platform).
    dense_implementation: `implementation` of `jax.nn.dot_product_attention` in the
      "dense" mode (None: cuDNN when it takes the call, else XLA).
  """

  image_size: int = 32
  patch_size: int = 2
  in_channels: int = 1
  hidden_size: int = 96
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 10
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  freq_dim: int = 128
  time_scale: float = 1000.0
  implementation: str | None = None
  dense_implementation: str | None = None

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def dit_tiny(**overrides: Any) -> DiTConfig:
  """A DiT that learns the bundled digits on a CPU: width 96, 4 blocks, 4 heads of 24,
  patch 2 (configs/dit_digits.py: 16x16x1 images, 64 tokens; the default 32x32: 256)."""
  return dataclasses.replace(DiTConfig(), **overrides)


def dit_xl_2(**overrides: Any) -> DiTConfig:
  """DiT-XL/2: 28 blocks, width 1152, 16 heads (72 wide), patch 2 on 32x32x4 latents
  (256x256 images through the SD VAE), 1000 classes, learned sigma."""
  base = DiTConfig(
    image_size=32,
    patch_size=2,
    in_channels=4,
    hidden_size=1152,
    depth=28,
    num_heads=16,
    num_classes=1000,
    class_dropout_prob=0.1,
    learn_sigma=True,
    freq_dim=256,
  )
  return dataclasses.replace(base, **overrides)


PRESETS = {"dit_tiny": dit_tiny, "dit_xl_2": dit_xl_2}


def check_config(c: DiTConfig) -> None:
  """Raises ValueError naming the first inconsistent field."""
  for name in ("image_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}.")
  if c.image_size % c.patch_size:
    raise ValueError(
      f"DiTConfig: image_size ({c.image_size}) must be a multiple of patch_size ({c.patch_size})."
    )
  if c.hidden_size % c.num_heads:
    raise ValueError(
      f"DiTConfig: hidden_size ({c.hidden_size}) must be a multiple of num_heads ({c.num_heads})."
    )
  if c.hidden_size % 4:
    raise ValueError(
      f"DiTConfig: hidden_size ({c.hidden_size}) must be a multiple of 4 (2-D sin-cos "
      "position embedding)."
    )
  if c.freq_dim < 2 or c.freq_dim % 2:
    raise ValueError(f"DiTConfig.freq_dim must be an even int >= 2, got {c.freq_dim!r}.")
  if not 0.0 <= c.class_dropout_prob < 1.0:
    raise ValueError(
      f"DiTConfig.class_dropout_prob must lie in [0, 1), got {c.class_dropout_prob!r}."
    )
  if c.num_classes < 1 or c.mlp_ratio <= 0:
    raise ValueError(
      f"DiTConfig: num_classes must be >= 1 and mlp_ratio > 0, got {c.num_classes!r}, "
      f"{c.mlp_ratio!r}."
    )


# ---------------------------------------------------------------------------- Re-ttention cache


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["ratio", "residual"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """What one attention layer keeps between a calibration step and the sparse steps."""

  ratio: jax.Array  # f32 [B, heads, N]: r = exp(lse_masked - lse) (+ the increments since)
  residual: jax.Array  # [B, N, D]: Delta = W_o (O - r O^M), W_o without its bias


RettentionCache = tuple[LayerCache, ...]  # one LayerCache per DiT block, in order


def bump_ratio(cache: RettentionCache, increment: float) -> RettentionCache:
  """r += increment in every layer (the authors add 0.04 after every sparse step)."""
  return tuple(dataclasses.replace(c, ratio=c.ratio + increment) for c in cache)


# ---------------------------------------------------------------------------- masks


def band_half_width(num_tokens: int, density: float) -> int:
  """w of the authors' token band |i - j| <= w: int(density * N) // 2 (their code builds
  a window of int(N * sparsity) tokens centred on the query; N / 64 at density 1/32)."""
  return int(density * num_tokens) // 2


def local_window_mask(
  num_tokens: int,
  *,
  density: float = 1 / 32,
  block: int = 8,
  num_anchors: int = 0,
  anchor_offset: Any = 0,
  granularity: str = "tiles",
) -> BlockMask:
  """Re-ttention's local-window mask over `num_tokens` tokens (row-major patches).

  Args:
    num_tokens: the sequence length N.
    density: the fraction of keys each query keeps (the authors' default is 1/32).
    block: the mask's tile size (block_q = block_kv).
    num_anchors: kv tiles every query also sees, spread evenly and rotated by
      `anchor_offset` (`masks.window_with_anchors`' LVSA pattern).
    anchor_offset: int or traced int32 scalar (e.g. the step index).
    granularity: "tokens": the authors' token band, query i sees keys j with
      |i - j| <= w, w = `band_half_width(N, density)` (N / 64 at 1/32), a
      `masks.sliding_window` (element mask on the partial tiles; with anchors
      `masks.window_with_anchors`); its tiles cover more than the density (at 128-token
      tiles and N = 4096: 94 of 1024 tiles, 2.9x the 32 of "tiles"). "tiles" (default):
      a kernel-friendly variant of that band, each query tile keeps the n = max(1,
      round(density * Kb)) kv tiles around its own, so the kernel's work is exactly that
      density (1/32 of 32 tiles: the diagonal tile).

  Returns:
    A BlockMask [1, 1] over (num_tokens, num_tokens), tiles block x block.

  Raises:
    ValueError: on a density outside (0, 1] or an unknown granularity.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must lie in (0, 1], got {density!r}.")
  kb = -(-num_tokens // block)
  if granularity == "tokens":
    half = band_half_width(num_tokens, density)
    if num_anchors:
      return masks.window_with_anchors(
        num_tokens,
        num_tokens,
        window=half,
        num_anchors=num_anchors,
        offset=anchor_offset,
        block_q=block,
        block_kv=block,
      )
    return masks.sliding_window(num_tokens, num_tokens, window=half, block_q=block, block_kv=block)
  width = min(kb, max(1, round(density * kb)))
  lo = np.clip(np.arange(kb) - width // 2, 0, kb - width)  # a full window at the edges
  cols = np.arange(kb)
  layout = jnp.asarray((cols[None] >= lo[:, None]) & (cols[None] < lo[:, None] + width))
  if num_anchors:
    anchors = masks.anchor_blocks(kb, num_anchors, anchor_offset)
    layout = layout | jnp.zeros((kb,), bool).at[anchors].set(True)[None]
  return masks.from_layout(
    layout[None, None],
    block_q=block,
    block_kv=block,
    q_len=num_tokens,
    kv_len=num_tokens,
    max_kv_blocks=min(kb, width + num_anchors),
  )


# ---------------------------------------------------------------------------- embeddings


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
  """float32 [grid*grid, dim]: row r's sin-cos code in channels [0, dim/2), column c's in
  [dim/2, dim), for tokens in row-major order (token r * grid + c)."""

  def one_axis(pos: np.ndarray, d: int) -> np.ndarray:  # [P] -> [P, d]
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
    out = pos[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  emb = np.concatenate([one_axis(rows.ravel(), dim // 2), one_axis(cols.ravel(), dim // 2)], 1)
  return emb.astype(np.float32)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """DiT's sinusoidal timestep features: f32 [B, dim] = [cos(t w), sin(t w)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


def _linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, init=_xavier) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=init, bias_init=_zeros, rngs=rngs)


def _norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # No affine parameters: adaLN supplies the shift and scale.
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_scale=False, use_bias=False, rngs=rngs)


class TimestepEmbedder(nnx.Module):
  """t [B] -> [B, D]: sinusoids of time_scale * t, then Linear -> SiLU -> Linear."""

  def __init__(self, dim: int, freq_dim: int, time_scale: float, *, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.time_scale = time_scale
    self.fc1 = _linear(freq_dim, dim, rngs=rngs, init=_normal)
    self.fc2 = _linear(dim, dim, rngs=rngs, init=_normal)

  def __call__(self, t: jax.Array, dtype: Any) -> jax.Array:
    feats = timestep_features(self.time_scale * t, self.freq_dim).astype(dtype)
    return self.fc2(jax.nn.silu(self.fc1(feats)))


class Attention(nnx.Module):
  """Multi-head self-attention with DiT's layout (qkv Linear, proj Linear) and the four
  sampling modes of the module docstring.

  Called as `attn(x, mode=..., mask=..., cache=...)` with x `[B, N, D]`; returns
  (`[B, N, D]`, the layer's `LayerCache` or None).
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    implementation: str | None = None,
    dense_implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.implementation = implementation
    self.dense_implementation = dense_implementation
    self.qkv = _linear(dim, 3 * dim, rngs=rngs)
    self.proj = _linear(dim, dim, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,  # [B, N, D]
    *,
    mode: str = "dense",
    mask: BlockMask | None = None,
    cache: LayerCache | None = None,
    calibration: str = "rettention",
  ) -> tuple[jax.Array, LayerCache | None]:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
    if mode == "dense":
      o = jax.nn.dot_product_attention(q, k, v, implementation=self.dense_implementation)
      return self.proj(o.reshape(b, n, d)), cache
    if mask is None:
      raise ValueError(f"Attention: mode {mode!r} needs a BlockMask `mask`.")
    if mode == "sparse":
      o = block_sparse_attention(q, k, v, mask, implementation=self.implementation)
      return self.proj(o.reshape(b, n, d)), cache
    if mode == "calibrate":
      if calibration not in CALIBRATIONS:
        raise ValueError(
          f"Attention: calibration must be one of {CALIBRATIONS}, got {calibration!r}."
        )
      cal = calibrate_attention(q, k, v, mask, implementation=self.implementation)
      ratio = cal.mass_ratio  # f32 [B, H, N]
      out = self.proj(cal.out.reshape(b, n, d))  # [B, N, D]: the dense output
      if calibration == "ratio_only":  # the reshape r * O^M alone
        return out, LayerCache(ratio, jnp.zeros_like(x))
      kernel = self.proj.kernel[...].astype(jnp.float32)  # [D, D]
      if calibration == "cache_only":  # r = 0: W_o O (no bias) stands in for every step
        kept = cal.out.astype(jnp.float32).reshape(b, n, d) @ kernel
        return out, LayerCache(jnp.zeros_like(ratio), kept.astype(x.dtype))
      r_rows = jnp.swapaxes(ratio, 1, 2)[..., None]  # [B, N, H, 1]
      missing = cal.out.astype(jnp.float32) - r_rows * cal.out_masked.astype(jnp.float32)
      residual = (missing.reshape(b, n, d) @ kernel).astype(x.dtype)  # W_o (O - r O^M)
      return out, LayerCache(ratio, residual)
    if mode == "rettention":
      if cache is None:
        raise ValueError("Attention: mode 'rettention' needs the cache of a calibration step.")
      o = block_sparse_attention(
        q, k, v, mask, implementation=self.implementation, row_scale=cache.ratio
      )
      return self.proj(o.reshape(b, n, d)) + cache.residual.astype(x.dtype), cache
    raise ValueError(f"Attention: mode must be one of {MODES}, got {mode!r}.")


class Mlp(nnx.Module):
  """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, rngs=rngs)
    self.fc2 = _linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero transformer block: the conditioning c gives shift/scale/gate for the
  attention and the MLP branches; the gates start at zero (the block is the identity)."""

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
    dim = config.hidden_size
    self.norm1 = _norm(dim, rngs)
    self.attn = Attention(
      dim,
      config.num_heads,
      implementation=config.implementation,
      dense_implementation=config.dense_implementation,
      rngs=rngs,
    )
    self.norm2 = _norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * config.mlp_ratio), rngs=rngs)
    self.adaLN_modulation = _linear(dim, 6 * dim, rngs=rngs, init=_zeros)

  def __call__(
    self,
    x: jax.Array,  # [B, N, D]
    c: jax.Array,  # [B, D]
    *,
    mode: str = "dense",
    mask: BlockMask | None = None,
    cache: LayerCache | None = None,
    calibration: str = "rettention",
  ) -> tuple[jax.Array, LayerCache | None]:
    mod = self.adaLN_modulation(jax.nn.silu(c))  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h, cache = self.attn(
      modulate(self.norm1(x), shift_msa, scale_msa),
      mode=mode,
      mask=mask,
      cache=cache,
      calibration=calibration,
    )
    x = x + gate_msa[:, None] * h
    x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x, cache


class FinalLayer(nnx.Module):
  """adaLN-modulated LayerNorm and a zero-initialised Linear to p*p*C_out per token."""

  def __init__(self, dim: int, patch_out: int, *, rngs: nnx.Rngs):
    self.norm_final = _norm(dim, rngs)
    self.adaLN_modulation = _linear(dim, 2 * dim, rngs=rngs, init=_zeros)
    self.linear = _linear(dim, patch_out, rngs=rngs, init=_zeros)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------- the model


class DiT(nnx.Module):
  """The class-conditional DiT of the module docstring.

  `model(x, t, y)` predicts the flow-matching velocity (or, in general, the network's
  output) `[B, H, W, C_out]` for images x `[B, H, W, C]` at times t `[B]` in [0, 1] with
  labels y int `[B]` in [0, num_classes], where num_classes is the null (unconditional)
  class that classifier-free guidance uses (`null_class`; only with class_dropout_prob
  > 0, else labels are in [0, num_classes)). Concrete inputs are checked (shapes, and t
  and y in range) before anything is computed; traced ones (under jit) only for shapes.
  `model.forward(..., mode, mask, cache)` picks the attention mode and threads the
  Re-ttention cache.

  `noise_rngs` (default: a stream `diffusion` seeded from `rngs`) is held by the model as
  `model.rngs`: the training loss draws its noise and times from `model.rngs.diffusion()`,
  so they are part of the model's state, saved with checkpoints, and resume exactly.
  """

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, noise_rngs: nnx.Rngs | None = None):
    check_config(config)
    self.config = config
    c = config
    dim = c.hidden_size
    self.x_embedder = _linear(c.patch_size**2 * c.in_channels, dim, rngs=rngs)
    self.t_embedder = TimestepEmbedder(dim, c.freq_dim, c.time_scale, rngs=rngs)
    num_embeddings = c.num_classes + (1 if c.class_dropout_prob > 0 else 0)
    self.y_embedder = nnx.Embed(num_embeddings, dim, embedding_init=_normal, rngs=rngs)
    self.blocks = nnx.List([DiTBlock(c, rngs=rngs) for _ in range(c.depth)])
    self.final_layer = FinalLayer(dim, c.patch_size**2 * c.out_channels, rngs=rngs)
    if noise_rngs is None:
      noise_rngs = nnx.Rngs(diffusion=jax.random.fold_in(rngs.params(), 0x5EED))
    self.rngs = noise_rngs

  @property
  def null_class(self) -> int:
    """The label of the unconditional (dropped) class."""
    if self.config.class_dropout_prob <= 0:
      raise ValueError("DiT: class_dropout_prob is 0, so the model has no null class.")
    return self.config.num_classes

  def _check_inputs(self, x: Any, t: Any, y: Any) -> None:
    c = self.config
    image = (c.image_size, c.image_size, c.in_channels)
    if not hasattr(x, "shape") or len(x.shape) != 4 or tuple(x.shape[1:]) != image:
      raise ValueError(
        f"DiT: x must be [batch, {', '.join(map(str, image))}] (NHWC), got shape "
        f"{getattr(x, 'shape', type(x).__name__)}."
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"DiT: x must be a float array, got dtype {x.dtype}.")
    b = x.shape[0]
    for name, value, kind, dtype in (
      ("t", t, "a float", jnp.floating),
      ("y", y, "an int", jnp.integer),
    ):
      if getattr(value, "shape", None) != (b,) or not jnp.issubdtype(value.dtype, dtype):
        raise ValueError(
          f"DiT: {name} must be {kind} array [batch] = ({b},) (x's batch), got "
          f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}."
        )
    check_values_in_range(t, "DiT: t", 0.0, 1.0, closed=True)
    if c.class_dropout_prob > 0:  # label num_classes is the null class
      labels, note = c.num_classes + 1, f" (num_classes={c.num_classes} is the null class)"
    else:
      labels, note = c.num_classes, " (no null class: class_dropout_prob is 0)"
    check_values_in_range(y, "DiT: y", 0, labels, note=note)

  def patchify(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, N, p*p*C], tokens row-major, each patch (row, col, channel)."""
    b, h, w, ch = x.shape
    p = self.config.patch_size
    x = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * ch)

  def unpatchify(self, x: jax.Array) -> jax.Array:
    """[B, N, p*p*C_out] -> [B, H, W, C_out] (inverse of `patchify`)."""
    c, p, g = self.config.out_channels, self.config.patch_size, self.config.grid_size
    b = x.shape[0]
    x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, c)

  def forward(
    self,
    x: jax.Array,  # [B, H, W, C]
    t: jax.Array,  # [B] in [0, 1]
    y: jax.Array,  # int [B]
    *,
    mode: str = "dense",
    mask: BlockMask | None = None,
    cache: RettentionCache | None = None,
    calibration: str = "rettention",
  ) -> tuple[jax.Array, RettentionCache | None]:
    """The output [B, H, W, C_out] and the Re-ttention cache after this call.

    x: float images `[B, image_size, image_size, in_channels]`; t: float times `[B]` in
    [0, 1]; y: int labels `[B]` in [0, num_classes], num_classes being the null class
    (see the class docstring). mode "dense" / "sparse" pass `cache` through untouched;
    "calibrate" returns a fresh cache (one LayerCache per block); "rettention" needs the
    cache and returns it as is (the sampler bumps r with `bump_ratio`). `calibration`
    ("rettention", or the controls "ratio_only" / "cache_only" of the module docstring)
    picks what "calibrate" caches.

    Raises:
      ValueError: naming the argument, on a bad shape or dtype, or (concrete inputs
        only) a time outside [0, 1] or a label outside the table.
    """
    c = self.config
    if mode not in MODES:
      raise ValueError(f"DiT: mode must be one of {MODES}, got {mode!r}.")
    if calibration not in CALIBRATIONS:
      raise ValueError(f"DiT: calibration must be one of {CALIBRATIONS}, got {calibration!r}.")
    self._check_inputs(x, t, y)
    if mode == "rettention" and (cache is None or len(cache) != c.depth):
      raise ValueError("DiT: mode 'rettention' needs the cache of a 'calibrate' step.")
    h = self.x_embedder(self.patchify(x))  # [B, N, D]
    h = h + jnp.asarray(sincos_pos_embed_2d(c.hidden_size, c.grid_size), h.dtype)
    cond = self.t_embedder(t, h.dtype) + self.y_embedder(y).astype(h.dtype)  # [B, D]
    new_cache = []
    for i, block in enumerate(self.blocks):
      layer_cache = cache[i] if mode == "rettention" else None
      h, layer_cache = block(
        h, cond, mode=mode, mask=mask, cache=layer_cache, calibration=calibration
      )
      new_cache.append(layer_cache)
    out = self.unpatchify(self.final_layer(h, cond))
    if mode in ("calibrate", "rettention"):
      return out, tuple(new_cache)
    return out, cache

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    mode: str = "dense",
    mask: BlockMask | None = None,
  ) -> jax.Array:
    """`forward` without the cache: "dense" (training) or "sparse"."""
    if mode not in ("dense", "sparse"):
      raise ValueError(
        f"DiT.__call__: mode must be 'dense' or 'sparse' (use forward for "
        f"the Re-ttention modes), got {mode!r}."
      )
    return self.forward(x, t, y, mode=mode, mask=mask)[0]

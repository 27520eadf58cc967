"""LITv2 (HiLo vision transformer) in Flax NNX, loadable from LITv2's PyTorch checkpoints.

Pan et al., "Fast Vision Transformers with HiLo Attention" (NeurIPS 2022),
github.com/ziplab/LITv2. Structure (module and attribute names follow LITv2's
classification code, so state-dict keys map one to one):

```
LITv2(images [B, H, W, in_chans], NHWC)
  patch_embed.proj   Conv p x p, stride p          -> [B, H/p * W/p, C]
  patch_embed.norm   LayerNorm
  layers.N           one stage, N = 0..3; dim C * 2**N
    blocks.M         stages without attention (has_msa False, LITv2's 1-2): ConvFFNBlock
                       x = x + mlp(norm2(x))
                     stages with attention: Block
                       x = x + attn(norm1(x), H, W)        HiLo(window_size=local_ws[N])
                       x = x + mlp(norm2(x))
                     mlp = DWMlp: fc1 -> dwconv.dwconv (3x3 depthwise) -> GELU -> fc2
    downsample       DTM between stages: deformable 2x2/stride-2 conv `dconv` (its
                     offsets from `dconv.conv_offset`, a zero-initialised 2x2/stride-2
                     conv), BatchNorm `norm_layer`, GELU; halves H, W, doubles C
  norm               LayerNorm
  (mean over tokens)
  head               Linear -> logits [B, num_classes]
```

State-dict keys (PyTorch layouts, see `models.layers`): `patch_embed.proj.{weight,bias}`,
`patch_embed.norm.*`, `layers.N.blocks.M.{norm1,norm2}.*`,
`layers.N.blocks.M.attn.{h_qkv,h_proj,l_q,l_kv,l_proj}.*`,
`layers.N.blocks.M.mlp.{fc1,fc2}.*`, `layers.N.blocks.M.mlp.dwconv.dwconv.*`,
`layers.N.downsample.dconv.{weight,bias}`, `layers.N.downsample.dconv.conv_offset.*`,
`layers.N.downsample.norm_layer.{weight,bias,running_mean,running_var,num_batches_tracked}`,
`norm.*`, `head.*`.

Numerics follow PyTorch: LayerNorm/BatchNorm epsilon 1e-5, exact (erf) GELU,
BatchNorm momentum 0.1 in PyTorch's convention (NNX momentum 0.9). Train/eval mode is
NNX's: `model.train()` (batch statistics, stochastic depth on) / `model.eval()`
(running statistics, deterministic). A new model starts in train mode. One known
difference in training: NNX updates the running variance with the biased batch
variance, PyTorch with the unbiased one (factor n / (n - 1), n = B * H * W).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention.models import layers
from sparse_attention.models.layers import TorchParam
from sparse_attention.ops import HILO_IMPLEMENTATIONS as IMPLEMENTATIONS
from sparse_attention.ops import hilo_attention, padded_grid

_LN_EPS = 1e-5  # torch.nn.LayerNorm / BatchNorm2d default
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)  # LITv2's Linear init
# torch's default conv init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU()


def _linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=_trunc_normal, rngs=rngs)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)


# ---------------------------------------------------------------------------- HiLo


class HiLo(nnx.Module):
  """LITv2's HiLo attention layer: Hi-Fi window heads and Lo-Fi pooled-key heads.

  `head_dim = dim // num_heads`; Lo-Fi heads `int(num_heads * alpha)`, Hi-Fi heads
  the rest; `window_size == 1` makes every head Lo-Fi without pooling (plain
  multi-head self-attention). One scale, `head_dim ** -0.5`. Parameters, as LITv2
  names them: `h_qkv` (dim -> 3*h_dim, [q/k/v, head, d]), `h_proj` (h_dim -> h_dim),
  `l_q` (dim -> l_dim), `l_kv` (dim -> 2*l_dim, [k/v, head, d]), `l_proj`
  (l_dim -> l_dim); `qkv_bias` applies to h_qkv, l_q, l_kv, the projections always
  have biases. A branch with no heads has no parameters (its attributes are None).

  Called as `hilo(x, H, W)` with x `[B, H*W, dim]` (row-major tokens); returns
  `[B, H*W, dim]`, the Hi-Fi channels first. H or W not divisible by the window size:
  x is zero-padded at the bottom/right before any projection (no mask: padded
  tokens join their windows and the pooled means) and the output cropped back, as
  LITv2's detection/segmentation backbones do.

  `implementation` and `interpret` go to `ops.hilo_attention` (None: the Pallas
  kernels on GPU/TPU, the xla path on CPU; interpret=True runs kernels interpreted).
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    window_size: int = 2,
    alpha: float = 0.9,
    qkv_bias: bool = True,
    implementation: str | None = None,
    interpret: bool = False,
    rngs: nnx.Rngs,
  ):
    if dim < 1 or num_heads < 1 or dim % num_heads:
      raise ValueError(f"HiLo: dim ({dim}) must be a positive multiple of num_heads ({num_heads}).")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
      raise ValueError(f"HiLo: window_size must be a positive int, got {window_size!r}.")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"HiLo: alpha must lie in [0, 1], got {alpha!r}.")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"HiLo: implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}."
      )
    self.dim = dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.head_dim = dim // num_heads
    self.l_heads = int(num_heads * alpha)  # Python truncation, as LITv2
    if window_size == 1:
      self.l_heads = num_heads
    self.h_heads = num_heads - self.l_heads
    self.h_dim = self.h_heads * self.head_dim
    self.l_dim = self.l_heads * self.head_dim
    self.scale = self.head_dim**-0.5
    self.implementation = implementation
    self.interpret = interpret
    lin = functools.partial(_linear, rngs=rngs)
    self.h_qkv = lin(dim, 3 * self.h_dim, use_bias=qkv_bias) if self.h_heads else None
    self.h_proj = lin(self.h_dim, self.h_dim) if self.h_heads else None
    self.l_q = lin(dim, self.l_dim, use_bias=qkv_bias) if self.l_heads else None
    self.l_kv = lin(dim, 2 * self.l_dim, use_bias=qkv_bias) if self.l_heads else None
    self.l_proj = lin(self.l_dim, self.l_dim) if self.l_heads else None

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    """x `[B, H*W, dim]` (row-major tokens) -> `[B, H*W, dim]`."""
    if x.ndim != 3 or x.shape[1] != height * width or x.shape[2] != self.dim:
      raise ValueError(
        f"HiLo: x must be [batch, H*W = {height * width}, dim = {self.dim}], got {tuple(x.shape)}."
      )
    b, n, c = x.shape
    ws, hd = self.window_size, self.head_dim
    hp, wp = padded_grid(height, width, ws)
    x = x.reshape(b, height, width, c)
    if (hp, wp) != (height, width):
      x = jnp.pad(x, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))  # [B, Hp, Wp, C]
    hi = lo = (None, None, None)
    if self.h_heads:
      qkv = self.h_qkv(x).reshape(b, hp * wp, 3, self.h_heads, hd)
      hi = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # each [B, Np, h_heads, hd]
    if self.l_heads:
      q = self.l_q(x).reshape(b, hp * wp, self.l_heads, hd)  # [B, Np, l_heads, hd]
      pooled = x
      if ws > 1:  # AvgPool2d(ws, stride ws) on the padded grid
        pooled = x.reshape(b, hp // ws, ws, wp // ws, ws, c).mean(axis=(2, 4))
      kv = self.l_kv(pooled).reshape(b, -1, 2, self.l_heads, hd)  # [B, M, 2, l_heads, hd]
      lo = (q, kv[:, :, 0], kv[:, :, 1])
    hi_out, lo_out = hilo_attention(
      *hi,
      *lo,
      grid=(hp, wp),
      window_size=ws,
      scale=self.scale,
      implementation=self.implementation,
      interpret=self.interpret,
    )
    outs = []
    for out, proj, d in ((hi_out, self.h_proj, self.h_dim), (lo_out, self.l_proj, self.l_dim)):
      if out is not None:
        out = out.reshape(b, hp, wp, d)[:, :height, :width]  # crop before the projection
        outs.append(proj(out))
    return jnp.concatenate(outs, axis=-1).reshape(b, n, c)

  def torch_params(self, prefix: str = "") -> list[TorchParam]:
    """The LITv2 state-dict entries of this layer (names under `prefix`)."""
    return [
      p
      for name in ("h_qkv", "h_proj", "l_q", "l_kv", "l_proj")
      for p in layers.linear_params(prefix + name, getattr(self, name))
    ]

  @classmethod
  def from_torch_state_dict(
    cls,
    state_dict: Mapping[str, Any],
    *,
    dim: int,
    num_heads: int,
    window_size: int,
    alpha: float,
    qkv_bias: bool,
    implementation: str | None = None,
  ) -> HiLo:
    """A HiLo layer holding the weights of LITv2's `HiLo` module.

    Args:
      state_dict: `h_qkv.weight`, `h_qkv.bias`, ..., `l_proj.bias` (the keys of
        LITv2's `HiLo.state_dict()`), numpy arrays in PyTorch layout.
      dim, num_heads, window_size, alpha, qkv_bias: as LITv2's constructor.
      implementation: passed to `hilo_attention`.

    Raises:
      ValueError: on missing, unexpected or mis-shaped keys.
    """
    layer = cls(
      dim,
      num_heads,
      window_size=window_size,
      alpha=alpha,
      qkv_bias=qkv_bias,
      implementation=implementation,
      rngs=nnx.Rngs(0),
    )
    layers.load_torch_params(layer.torch_params(), state_dict, what="HiLo.from_torch_state_dict")
    return layer

  def to_torch_state_dict(self) -> dict[str, np.ndarray]:
    """LITv2 `HiLo.state_dict()` names and layouts, as numpy arrays."""
    return layers.export_torch_params(self.torch_params())


# ------------------------------------------------------------------- ConvFFN, blocks


class DWConv(nnx.Module):
  """LITv2's DWConv: a 3x3 depthwise conv (padding 1, bias) on the token grid."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    # LITv2 (DWMlp._init_weights): normal(0, sqrt(2 / fan_out)), fan_out = 3*3*dim/dim.
    self.dwconv = nnx.Conv(
      dim,
      dim,
      (3, 3),
      padding=((1, 1), (1, 1)),
      feature_group_count=dim,
      kernel_init=nnx.initializers.normal(stddev=(2.0 / 9) ** 0.5),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    b, n, c = x.shape  # [B, H*W, C]
    return self.dwconv(x.reshape(b, height, width, c)).reshape(b, n, c)


class DWMlp(nnx.Module):
  """fc1 -> depthwise 3x3 conv -> GELU -> fc2 (LITv2's DWMlp; no dropout)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, rngs=rngs)
    self.dwconv = DWConv(hidden, rngs=rngs)
    self.fc2 = _linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    return self.fc2(_gelu(self.dwconv(self.fc1(x), height, width)))

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return (
      layers.linear_params(prefix + "fc1", self.fc1)
      + layers.conv_params(prefix + "dwconv.dwconv", self.dwconv.dwconv)
      + layers.linear_params(prefix + "fc2", self.fc2)
    )


def _drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
  """Stochastic depth on [B, N, C]: one keep/drop per sample (timm's DropPath)."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs) if rate > 0 else None


def _residual(x: jax.Array, y: jax.Array, drop: nnx.Dropout | None) -> jax.Array:
  return x + (y if drop is None else drop(y))


class ConvFFNBlock(nnx.Module):
  """LITv2's ConvFFNBlock (stages without attention): x + mlp(norm2(x))."""

  def __init__(self, dim: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0, rngs: nnx.Rngs):
    self.norm2 = _layer_norm(dim, rngs)
    self.mlp = DWMlp(dim, int(dim * mlp_ratio), rngs=rngs)
    self.drop_path = _drop_path(drop_path, rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    return _residual(x, self.mlp(self.norm2(x), height, width), self.drop_path)

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return layers.layer_norm_params(prefix + "norm2", self.norm2) + self.mlp.torch_params(
      prefix + "mlp."
    )


class Block(nnx.Module):
  """LITv2's Block: x + attn(norm1(x)), then x + mlp(norm2(x)); attn is HiLo."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    window_size: int,
    alpha: float,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path: float = 0.0,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.norm1 = _layer_norm(dim, rngs)
    self.attn = HiLo(
      dim,
      num_heads,
      window_size=window_size,
      alpha=alpha,
      qkv_bias=qkv_bias,
      implementation=implementation,
      rngs=rngs,
    )
    self.norm2 = _layer_norm(dim, rngs)
    self.mlp = DWMlp(dim, int(dim * mlp_ratio), rngs=rngs)
    self.drop_path = _drop_path(drop_path, rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    x = _residual(x, self.attn(self.norm1(x), height, width), self.drop_path)
    return _residual(x, self.mlp(self.norm2(x), height, width), self.drop_path)

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return (
      layers.layer_norm_params(prefix + "norm1", self.norm1)
      + self.attn.torch_params(prefix + "attn.")
      + layers.layer_norm_params(prefix + "norm2", self.norm2)
      + self.mlp.torch_params(prefix + "mlp.")
    )


# -------------------------------------------------------------------------------- DTM


class DeformConv2dPack(nnx.Module):
  """DCN's DeformConv2dPack: offsets from a zero-initialised conv, then deform_conv2d.

  Parameters as PyTorch names them: `weight` (NNX kernel [k, k, C_in, C_out]), `bias`,
  `conv_offset` (a k x k conv with the same stride to 2*k*k offset channels,
  (dy, dx) per tap, zeros at init so the layer starts as a plain conv).
  """

  def __init__(
    self, d_in: int, d_out: int, *, kernel_size: int, stride: int, padding: int, rngs: nnx.Rngs
  ):
    k = kernel_size
    self.stride, self.padding = stride, padding
    self.weight = nnx.Param(_torch_conv_init(rngs.params(), (k, k, d_in, d_out), jnp.float32))
    bound = 1.0 / (d_in * k * k) ** 0.5
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (d_out,), jnp.float32, -bound, bound))
    self.conv_offset = nnx.Conv(
      d_in,
      2 * k * k,
      (k, k),
      strides=stride,
      padding=((padding, padding), (padding, padding)),
      kernel_init=nnx.initializers.zeros,
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C_in] -> [B, Ho, Wo, C_out]
    offset = self.conv_offset(x)  # [B, Ho, Wo, 2*k*k]
    return layers.deform_conv2d(
      x,
      offset,
      self.weight[...].astype(x.dtype),
      self.bias[...].astype(x.dtype),
      stride=self.stride,
      padding=self.padding,
    )

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return [
      TorchParam(prefix + "weight", self.weight, "conv"),
      TorchParam(prefix + "bias", self.bias),
    ] + layers.conv_params(prefix + "conv_offset", self.conv_offset)


class DTM(nnx.Module):
  """Deformable Token Merging: [B, H*W, C] -> [B, H/2*W/2, 2C] (H, W even)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.dconv = DeformConv2dPack(dim, 2 * dim, kernel_size=2, stride=2, padding=0, rngs=rngs)
    # torch BatchNorm2d(momentum=0.1) == NNX momentum 0.9.
    self.norm_layer = nnx.BatchNorm(2 * dim, momentum=0.9, epsilon=_LN_EPS, rngs=rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    b, n, c = x.shape
    if n != height * width or height % 2 or width % 2:
      raise ValueError(
        f"DTM: x must be [batch, H*W, C] with H, W even; got {tuple(x.shape)}, H={height}, "
        f"W={width}."
      )
    y = self.dconv(x.reshape(b, height, width, c))  # [B, H/2, W/2, 2C]
    y = _gelu(self.norm_layer(y))
    return y.reshape(b, n // 4, 2 * c)

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return self.dconv.torch_params(prefix + "dconv.") + layers.batch_norm_params(
      prefix + "norm_layer", self.norm_layer
    )


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class LITv2Config:
  """Hyper-parameters of a LITv2 classifier (LITv2's `MODEL.LIT.*` config).

  Attributes:
    image_size: input height = width (pixels).
    patch_size: side of the patch-embedding conv (and its stride).
    in_chans: input channels.
    num_classes: logits; 0 makes the model return the pooled features.
    embed_dim: channels of stage 0; stage N has embed_dim * 2**N.
    depths: blocks per stage.
    num_heads: attention heads per stage (unused where has_msa is False).
    has_msa: per stage, True for HiLo blocks, False for ConvFFN-only blocks.
    local_ws: per stage, HiLo's window size (1 = plain MSA; ignored without msa).
    alpha: fraction of Lo-Fi heads.
    mlp_ratio: hidden width of the ConvFFN / MLP, relative to the stage's dim.
    qkv_bias: biases on HiLo's q/k/v projections.
    drop_path_rate: stochastic depth, rising linearly over the blocks from 0.
    implementation: passed to `hilo_attention` (None = best available).
  """

  image_size: int = 224
  patch_size: int = 4
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  has_msa: tuple[bool, ...] = (False, False, True, True)
  local_ws: tuple[int, ...] = (0, 0, 2, 1)
  alpha: float = 0.9
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  implementation: str | None = None

  def __post_init__(self):
    n = len(self.depths)
    for name in ("num_heads", "has_msa", "local_ws"):
      if len(getattr(self, name)) != n:
        raise ValueError(
          f"LITv2Config: {name} has {len(getattr(self, name))} entries; expected one per "
          f"stage ({n}, as depths)."
        )
    for i in range(n):
      if self.has_msa[i]:
        dim = self.embed_dim * 2**i
        if dim % self.num_heads[i]:
          raise ValueError(
            f"LITv2Config: stage {i} has dim {dim}, not a multiple of num_heads[{i}] = "
            f"{self.num_heads[i]}."
          )
        if self.local_ws[i] < 1:
          raise ValueError(f"LITv2Config: local_ws[{i}] must be >= 1 in an attention stage.")
    side = self.patch_size * 2 ** (n - 1)
    if self.image_size % side:
      raise ValueError(
        f"LITv2Config: image_size {self.image_size} must be a multiple of patch_size * "
        f"2**(stages-1) = {side} (every token merging halves an even grid)."
      )
    if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"LITv2Config: implementation must be None or one of {IMPLEMENTATIONS}, "
        f"got {self.implementation!r}."
      )

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)


def litv2_s(**overrides: Any) -> LITv2Config:
  """LITv2-S: 28M parameters, 3.7 GFLOPs at 224 (LITv2 paper, Table 1)."""
  return dataclasses.replace(LITv2Config(drop_path_rate=0.2), **overrides)


def litv2_m(**overrides: Any) -> LITv2Config:
  """LITv2-M: 49M parameters."""
  return dataclasses.replace(LITv2Config(depths=(2, 2, 18, 2), drop_path_rate=0.3), **overrides)


def litv2_b(**overrides: Any) -> LITv2Config:
  """LITv2-B: 87M parameters."""
  return dataclasses.replace(
    LITv2Config(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    **overrides,
  )


def litv2_tiny(
  image_size: int = 32, num_classes: int = 10, in_chans: int = 3, **overrides: Any
) -> LITv2Config:
  """A small LITv2 (0.36M parameters) for 8x8 or 32x32 images, trainable on a CPU.

  The patch size makes a 16x16 token grid from 32x32 images (8x8 from 8x8
  images), so stage 2 (HiLo, ws 2) sees 4x4 (2x2) tokens and stage 3 (ws 1) 2x2 (1x1).
  """
  config = dict(
    image_size=image_size,
    patch_size=max(1, image_size // 16),
    in_chans=in_chans,
    num_classes=num_classes,
    embed_dim=16,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
  )
  config.update(overrides)
  return LITv2Config(**config)


class PatchEmbed(nnx.Module):
  """Conv p x p / stride p, then LayerNorm over channels (LITv2's PatchEmbed)."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Conv(
      in_chans,
      embed_dim,
      (patch_size, patch_size),
      strides=patch_size,
      padding="VALID",
      kernel_init=_torch_conv_init,
      rngs=rngs,
    )
    self.norm = _layer_norm(embed_dim, rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, int, int]:
    x = self.proj(images)  # [B, H/p, W/p, C]
    b, h, w, c = x.shape
    return self.norm(x.reshape(b, h * w, c)), h, w

  def torch_params(self, prefix: str) -> list[TorchParam]:
    return layers.conv_params(prefix + "proj", self.proj) + layers.layer_norm_params(
      prefix + "norm", self.norm
    )


class LITLayer(nnx.Module):
  """One stage: blocks (ConvFFNBlock or Block), then DTM unless it is the last."""

  def __init__(self, config: LITv2Config, stage: int, drop_path: list[float], *, rngs: nnx.Rngs):
    dim = config.embed_dim * 2**stage
    if config.has_msa[stage]:
      make = lambda rate: Block(
        dim,
        config.num_heads[stage],
        window_size=config.local_ws[stage],
        alpha=config.alpha,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path=rate,
        implementation=config.implementation,
        rngs=rngs,
      )
    else:
      make = lambda rate: ConvFFNBlock(dim, mlp_ratio=config.mlp_ratio, drop_path=rate, rngs=rngs)
    self.blocks = nnx.List([make(rate) for rate in drop_path])
    last = stage == len(config.depths) - 1
    self.downsample = None if last else DTM(dim, rngs=rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> tuple[jax.Array, int, int]:
    for block in self.blocks:
      x = block(x, height, width)
    if self.downsample is not None:
      x = self.downsample(x, height, width)
      height, width = height // 2, width // 2
    return x, height, width

  def torch_params(self, prefix: str) -> list[TorchParam]:
    out = []
    for m, block in enumerate(self.blocks):
      out += block.torch_params(f"{prefix}blocks.{m}.")
    if self.downsample is not None:
      out += self.downsample.torch_params(prefix + "downsample.")
    return out


class LITv2(nnx.Module):
  """The LITv2 image classifier: images `[B, H, W, in_chans]` (NHWC) -> logits.

  Example:
    model = LITv2(litv2_tiny(image_size=8, num_classes=10, in_chans=1), rngs=nnx.Rngs(0))
    logits = model(images)  # [B, 10]
    model.eval()            # BatchNorm running stats, no stochastic depth
  """

  def __init__(self, config: LITv2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, rngs=rngs)
    total = sum(config.depths)
    dpr = [float(r) for r in np.linspace(0.0, config.drop_path_rate, total)] if total else []
    starts = np.cumsum((0,) + tuple(config.depths))
    self.layers = nnx.List(
      [
        LITLayer(config, i, dpr[starts[i] : starts[i + 1]], rngs=rngs)
        for i in range(len(config.depths))
      ]
    )
    self.norm = _layer_norm(config.num_features, rngs)
    self.head = (
      _linear(config.num_features, config.num_classes, rngs=rngs) if config.num_classes else None
    )

  def _check_images(self, images: Any) -> None:
    c = self.config
    side = c.patch_size * 2 ** (len(c.depths) - 1)
    layout = f"[batch, H, W, in_chans={c.in_chans}] (NHWC)"
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
      raise ValueError(f"LITv2: images must be an array {layout}, got {type(images).__name__}.")
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(f"LITv2: images must have rank 4, {layout}, got shape {shape}.")
    if shape[3] != c.in_chans:
      hint = " (NCHW? the model takes NHWC)" if shape[1] == c.in_chans else ""
      raise ValueError(
        f"LITv2: images has {shape[3]} channels (dim 3); the model takes in_chans="
        f"{c.in_chans}{hint}: {layout}, got shape {shape}."
      )
    if shape[1] % side or shape[2] % side or min(shape[1:3]) == 0:
      raise ValueError(
        f"LITv2: images height and width ({shape[1]}, {shape[2]}) must be positive "
        f"multiples of patch_size * 2**(stages-1) = {side} (image_size={c.image_size} is one)."
      )
    if shape[0] == 0:
      raise ValueError(f"LITv2: images has an empty batch, shape {shape}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
        f"LITv2: images must be a float array (normalised pixels), got dtype {images.dtype}."
      )

  def features(self, images: jax.Array) -> jax.Array:
    """Pooled features `[B, num_features]` (LITv2's forward_features).

    images: float `[B, H, W, in_chans]` (NHWC). H and W are multiples of patch_size *
    2**(stages-1), typically config.image_size; other sizes run too (the model has no
    position embedding), as LITv2's backbone does.

    Raises:
      ValueError: naming the mismatch (rank, channels, height/width, empty batch,
        dtype) before anything is computed.
    """
    self._check_images(images)
    x, h, w = self.patch_embed(images)
    for layer in self.layers:
      x, h, w = layer(x, h, w)
    return jnp.mean(self.norm(x), axis=1)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images `[B, H, W, in_chans]` -> logits `[B, num_classes]` (features if 0 classes)."""
    x = self.features(images)
    return x if self.head is None else self.head(x)

  def torch_params(self) -> list[TorchParam]:
    out = self.patch_embed.torch_params("patch_embed.")
    for i, layer in enumerate(self.layers):
      out += layer.torch_params(f"layers.{i}.")
    out += layers.layer_norm_params("norm", self.norm)
    return out + layers.linear_params("head", self.head)

  @classmethod
  def from_torch_state_dict(cls, state_dict: Mapping[str, Any], config: LITv2Config) -> LITv2:
    """A model holding the weights of LITv2's PyTorch classifier.

    Args:
      state_dict: `model.state_dict()` of LITv2's `LITv2` (numpy arrays or CPU
        tensors). A checkpoint dict with the weights under "model" (as LITv2's
        training script saves them) is unwrapped.
      config: the matching configuration, e.g. `litv2_s()`.

    Returns:
      The model, in eval mode (running BatchNorm statistics).

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped key.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
      state_dict = state_dict["model"]
    model = cls(config, rngs=nnx.Rngs(0))
    layers.load_torch_params(model.torch_params(), state_dict, what="LITv2.from_torch_state_dict")
    model.eval()
    return model

  def to_torch_state_dict(self) -> dict[str, np.ndarray]:
    """LITv2's state-dict names and PyTorch layouts, as numpy arrays."""
    return layers.export_torch_params(self.torch_params())

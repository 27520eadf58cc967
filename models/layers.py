"""Building blocks shared by the vision models: PyTorch state-dict mapping, deformable conv.

* `TorchParam` ties one PyTorch state-dict key to one NNX variable and says how
  the layouts differ; `load_torch_params` / `export_torch_params` move a whole
  list of them in or out at once, checking every name and shape first.
  PyTorch layouts: `nn.Linear.weight` is (out, in) (NNX kernel (in, out));
  `nn.Conv2d.weight` is (out, in/groups, kh, kw) (NNX kernel (kh, kw, in/groups,
  out)); norms' `weight` is NNX's `scale`.
* `deform_conv2d`: a deformable convolution (DCNv1, deformable_groups=1) in
  plain JAX, NHWC, with the sampling rule of the CUDA kernels LITv2 uses
  (bilinear, zero outside the image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYOUTS = ("same", "linear", "conv")


@dataclasses.dataclass(frozen=True)
class TorchParam:
  """One PyTorch state-dict entry and the NNX variable that holds it.

  Attributes:
    name: the state-dict key, e.g. "layers.2.blocks.0.attn.l_q.weight".
    variable: the NNX variable (Param or BatchStat).
    layout: "same" (no change), "linear" (torch (out, in) <-> kernel (in, out))
      or "conv" (torch (O, I, kh, kw) <-> kernel (kh, kw, I, O)).
  """

  name: str
  variable: nnx.Variable
  layout: str = "same"


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.transpose(3, 2, 0, 1)
  return value


def _from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.transpose(2, 3, 1, 0)
  return value


def torch_shape(param: TorchParam) -> tuple[int, ...]:
  """The shape PyTorch stores `param` with."""
  shape = tuple(param.variable[...].shape)
  if param.layout == "linear":
    return shape[::-1]
  if param.layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def linear_params(prefix: str, layer: nnx.Linear | None) -> list[TorchParam]:
  """`{prefix}.weight` (out, in) and `{prefix}.bias` of an `nnx.Linear` (none if None)."""
  if layer is None:
    return []
  out = [TorchParam(f"{prefix}.weight", layer.kernel, "linear")]
  if layer.bias is not None:
    out.append(TorchParam(f"{prefix}.bias", layer.bias))
  return out


def conv_params(prefix: str, layer: nnx.Conv) -> list[TorchParam]:
  """`{prefix}.weight` (O, I/groups, kh, kw) and `{prefix}.bias` of an `nnx.Conv`."""
  out = [TorchParam(f"{prefix}.weight", layer.kernel, "conv")]
  if layer.bias is not None:
    out.append(TorchParam(f"{prefix}.bias", layer.bias))
  return out


def layer_norm_params(prefix: str, layer: nnx.LayerNorm) -> list[TorchParam]:
  """`{prefix}.weight` / `.bias` of an `nn.LayerNorm` (NNX scale / bias)."""
  return [TorchParam(f"{prefix}.weight", layer.scale), TorchParam(f"{prefix}.bias", layer.bias)]


def batch_norm_params(prefix: str, layer: nnx.BatchNorm) -> list[TorchParam]:
  """An `nn.BatchNorm2d`: weight, bias, running_mean, running_var.

  `{prefix}.num_batches_tracked` is accepted on load and written as 0 on export
  (NNX does not count batches; it only matters to torch's momentum=None mode).
  """
  return [
    TorchParam(f"{prefix}.weight", layer.scale),
    TorchParam(f"{prefix}.bias", layer.bias),
    TorchParam(f"{prefix}.running_mean", layer.mean),
    TorchParam(f"{prefix}.running_var", layer.var),
  ]


def _ignorable(name: str, expected: Mapping[str, TorchParam]) -> bool:
  """BatchNorm's `num_batches_tracked` counter of a norm we do load."""
  suffix = ".num_batches_tracked"
  return name.endswith(suffix) and name[: -len(suffix)] + ".running_mean" in expected


def load_torch_params(
  params: Iterable[TorchParam], state_dict: Mapping[str, Any], *, what: str
) -> None:
  """Copies a PyTorch state dict into the NNX variables of `params`.

  Every key is checked before anything is written: all missing keys,
  unexpected keys and shape mismatches are reported in one ValueError, and on
  error no variable changes.

  Args:
    params: the expected entries (names unique).
    state_dict: name -> array-like (numpy arrays, or anything `np.asarray`
      takes, e.g. CPU torch tensors), PyTorch layouts.
    what: the caller, for the error message (e.g. "HiLo.from_torch_state_dict").

  Raises:
    ValueError: on missing, unexpected or mis-shaped keys.
  """
  expected: dict[str, TorchParam] = {}
  for p in params:
    if p.name in expected:
      raise ValueError(f"{what}: internal error, duplicate parameter name {p.name!r}.")
    expected[p.name] = p
  missing = [n for n in expected if n not in state_dict]
  unexpected = [n for n in state_dict if n not in expected and not _ignorable(n, expected)]
  values: dict[str, np.ndarray] = {}
  bad_shapes = []
  for name, p in expected.items():
    if name not in state_dict:
      continue
    value = np.asarray(state_dict[name])
    want = torch_shape(p)
    if value.shape != want:
      bad_shapes.append(f"{name}: got shape {value.shape}, expected {want}")
    else:
      values[name] = value
  if missing or unexpected or bad_shapes:
    lines = [f"{what}: the state dict does not match the model."]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shapes:
      lines.append(f"  wrong shapes ({len(bad_shapes)}): {'; '.join(bad_shapes)}")
    raise ValueError("\n".join(lines))
  for name, p in expected.items():
    dtype = p.variable[...].dtype
    p.variable[...] = jnp.asarray(_from_torch_layout(values[name], p.layout), dtype=dtype)


def export_torch_params(params: Iterable[TorchParam]) -> dict[str, np.ndarray]:
  """The PyTorch state dict (numpy arrays, torch layouts) of `params`.

  BatchNorm entries get a `num_batches_tracked` of 0, so the dict also loads
  into the PyTorch model with `strict=True`.
  """
  out: dict[str, np.ndarray] = {}
  for p in params:
    out[p.name] = np.ascontiguousarray(_to_torch_layout(np.asarray(p.variable[...]), p.layout))
    if p.name.endswith(".running_var"):
      out[p.name[: -len(".running_var")] + ".num_batches_tracked"] = np.zeros((), np.int64)
  return out


def bilinear_sample(
  x: jax.Array,  # [B, H, W, C]
  y: jax.Array,  # [B, P] row coordinates (pixels)
  x_pos: jax.Array,  # [B, P] column coordinates (pixels)
) -> jax.Array:  # [B, P, C]
  """Bilinear samples of x at real-valued pixel positions, zero outside the image.

  Each of the four neighbouring pixels contributes only if it lies inside the
  image (as DCN's `dmcn_2d_im2col_bilinear`: a position in (-1, H) x (-1, W)
  blends its in-image corners, anything further out gives 0).
  """
  b, h, w, c = x.shape
  flat = x.reshape(b, h * w, c)
  y0 = jnp.floor(y)
  x0 = jnp.floor(x_pos)
  ly, lx = y - y0, x_pos - x0  # in [0, 1): gradients flow to the positions through these
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = jnp.zeros((b, y.shape[1], c), jnp.promote_types(x.dtype, y.dtype))
  for dy, dx, weight in (
    (0, 0, (1 - ly) * (1 - lx)),
    (0, 1, (1 - ly) * lx),
    (1, 0, ly * (1 - lx)),
    (1, 1, ly * lx),
  ):
    yi, xi = y0 + dy, x0 + dx
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    index = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)  # [B, P]
    value = jnp.take_along_axis(flat, index[..., None], axis=1)  # [B, P, C]
    out = out + jnp.where(inside, weight, 0.0)[..., None] * value
  return out


def deform_conv2d(
  x: jax.Array,  # [B, H, W, C]
  offset: jax.Array,  # [B, Ho, Wo, 2*kh*kw]: (dy, dx) per kernel tap i*kw + j
  kernel: jax.Array,  # [kh, kw, C, O]
  bias: jax.Array | None,  # [O]
  *,
  stride: int,
  padding: int = 0,
) -> jax.Array:  # [B, Ho, Wo, O]
  """A deformable 2-D convolution (DCNv1: one deformable group, no groups, no dilation).

  Output pixel (oy, ox), tap (i, j) reads x bilinearly at
  (oy*stride - padding + i + dy, ox*stride - padding + j + dx) with
  (dy, dx) = offset[b, oy, ox, 2*(i*kw + j) : 2*(i*kw + j) + 2], zero outside
  the image: the channel order and sampling of the DCN CUDA kernels (and of
  torchvision.ops.deform_conv2d) moved to NHWC.
  """
  b, h, w, c = x.shape
  kh, kw, kc, o = kernel.shape
  _, ho, wo, noff = offset.shape
  if kc != c or noff != 2 * kh * kw:
    raise ValueError(
      f"deform_conv2d: kernel {kernel.shape} / offset {offset.shape} do not fit x {x.shape}: "
      f"kernel must be [kh, kw, {c}, out] and offset [B, Ho, Wo, 2*kh*kw]."
    )
  off = offset.reshape(b, ho, wo, kh * kw, 2).astype(jnp.float32)
  base_y = (jnp.arange(ho) * stride - padding)[:, None, None] + jnp.repeat(jnp.arange(kh), kw)
  base_x = (jnp.arange(wo) * stride - padding)[None, :, None] + jnp.tile(jnp.arange(kw), kh)
  pos_y = (base_y + off[..., 0]).reshape(b, -1)  # [B, Ho*Wo*kh*kw]
  pos_x = (base_x + off[..., 1]).reshape(b, -1)
  cols = bilinear_sample(x, pos_y, pos_x).astype(x.dtype)  # [B, Ho*Wo*kh*kw, C]
  cols = cols.reshape(b, ho, wo, kh * kw, c)
  out = jnp.einsum(
    "bhwkc,kco->bhwo", cols, kernel.reshape(kh * kw, c, o), preferred_element_type=jnp.float32
  )
  if bias is not None:
    out = out + bias
  return out.astype(x.dtype)

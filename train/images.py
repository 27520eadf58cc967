"""One example's image, from a file or an array to the model's input, with Pillow.

`ImageTransform` turns an image record into float32 [size, size, channels]:

1. Decode (files: any format Pillow reads: JPEG, PNG, WebP, GIF, BMP, TIFF, PGM/PPM, ...)
   and convert the channels: alpha is dropped, palettes expanded, 16-bit gray keeps its
   top 8 bits, gray is repeated to RGB, RGB becomes luma (ITU-R 601, Pillow's "L") for
   one channel. Arrays (uint8 0..255 or float in [0, 1], [H, W, C] with C in 1..4) are
   converted the same way, in float32.
2. Crop and resize in one resampling step (`Image.resize(box=...)`: bilinear or bicubic,
   antialiased when shrinking; on float arrays bilinear equals `jax.image.resize`):
   - training with `random_resized_crop`: a random box of 8%-100% of the image's area and
     aspect ratio 3/4..4/3 (log-uniform), as Inception's / torchvision's
     RandomResizedCrop, falling back to the central crop after 10 draws;
   - otherwise: the whole image (`crop_fraction` 1, the aspect ratio is not kept), or its
     centred square of `crop_fraction` x the shorter side (timm's evaluation: resize the
     shorter side to size / crop_fraction, then crop the centre; 0.875 gives 224 of 256).
3. Training with `flip`: a horizontal flip with probability 1/2.
4. Scale to [0, 1] and normalise per channel: (x - mean) / std.

The random draws come from the `np.random.Generator` grain hands each example (seeded
from the pipeline seed and the example's position in the stream), so augmentation is
deterministic and differs between epochs.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as Pillow's "L"
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def decode(data: bytes | str, name: str, channels: int) -> Image.Image:
  """An encoded image (bytes, or a file path) as a uint8 "L" (1 channel) or "RGB" image.

  Raises:
    ValueError: naming `name`, if the file cannot be read or decoded.
  """
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
      if image.mode.startswith("I"):  # 16- or 32-bit gray: keep the top 8 bits of 16
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
      elif image.mode == "P":  # a palette, maybe with a transparent entry
        image = image.convert("RGBA")
      return image.convert("L" if channels == 1 else "RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read {name!r} as an image ({type(e).__name__}: {e}).") from None


def array_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (0..255) or float ([0, 1]) [H, W, C], C in 1..4 -> float32 [H, W, channels]."""
  x = image.astype(np.float32)
  if np.issubdtype(image.dtype, np.integer):
    x /= 255.0
  c = x.shape[-1]
  if c in (2, 4):
    x, c = x[..., : c - 1], c - 1  # drop alpha
  if c == channels:
    return x
  if c == 1:
    return np.repeat(x, 3, axis=-1)
  return (x @ LUMA)[..., None]


def crop_resize(
  image: Image.Image | np.ndarray, box: Box, size: int, interpolation: str
) -> np.ndarray:
  """The `box` of a uint8 image or a float32 [H, W, C] array, resampled to float32
  [size, size, C] in [0, 1]."""
  resample = INTERPOLATIONS[interpolation]
  if isinstance(image, np.ndarray):
    h, w, c = image.shape
    if box == (0, 0, w, h) and (h, w) == (size, size):
      return image
    planes = [Image.fromarray(np.ascontiguousarray(image[..., i])) for i in range(c)]  # "F"
    out = [np.asarray(p.resize((size, size), resample, box=box)) for p in planes]
    return np.stack(out, axis=-1)  # [S, S, C]
  if box != (0, 0, *image.size) or image.size != (size, size):
    image = image.resize((size, size), resample, box=box)
  x = np.asarray(image, np.float32) / 255.0
  return x[..., None] if x.ndim == 2 else x  # [S, S, C]


def center_box(height: int, width: int, fraction: float) -> Box:
  """The whole image (fraction >= 1), else its centred square of fraction x the shorter side."""
  if fraction >= 1.0:
    return (0, 0, width, height)
  side = fraction * min(height, width)
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
  """torchvision's RandomResizedCrop.get_params: a box of `scale` of the area and aspect
  `ratio` (log-uniform), at a uniform position; the central crop after 10 misses."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  aspect = width / height
  w, h = width, height
  if aspect < ratio[0]:
    h = round(w / ratio[0])
  elif aspect > ratio[1]:
    w = round(h * ratio[1])
  left, top = (width - w) // 2, (height - h) // 2
  return (left, top, left + w, top + h)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Image record -> {"image": float32 [size, size, channels], "label": int32} (see the
  module docstring). A record is {"label": int} with one of "image" (an array),
  "file" (a path) or "encoded" (the file's bytes; "file" then names it in errors).

  Picklable: grain sends it to its worker processes.
  """

  size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_fraction: float = 1.0
  interpolation: str = "bilinear"
  random_resized_crop: bool = False
  flip: bool = False

  def train(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training example: random crop and flip where enabled (grain's `random_map`)."""
    return self._apply(record, rng)

  def eval(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An evaluation example: the centre box, no flip (grain's `map`)."""
    return self._apply(record, None)

  def image(self, record: Mapping[str, Any]) -> Image.Image | np.ndarray:
    """The record's image, decoded and converted to `channels`."""
    if "image" in record:
      return array_channels(np.asarray(record["image"]), self.channels)
    return decode(record.get("encoded", record["file"]), record["file"], self.channels)

  def _apply(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict:
    image = self.image(record)
    h, w = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    if rng is not None and self.random_resized_crop:
      box = random_resized_crop_box(h, w, rng)
    else:
      box = center_box(h, w, self.crop_fraction)
    x = crop_resize(image, box, self.size, self.interpolation)  # [S, S, C]
    if rng is not None and self.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return {"image": np.ascontiguousarray(x, np.float32), "label": np.int32(record["label"])}

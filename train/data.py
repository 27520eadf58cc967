"""Datasets for training: offline, deterministic, resumable, all in NumPy.

`make_datasets(config)` loads a whole dataset into memory once and splits it into train,
eval and test `ArraySource`s:

- "digits": scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download.
- "text": a byte-level corpus (vocabulary 256): by default the Python standard library's
  own `.py` sources (see `stdlib_source_files`); or a user text file, or a folder of files
  read recursively as bytes in sorted relative-path order. Files are joined with
  DOCUMENT_SEPARATOR.
- "images": a user folder with one subfolder per class, of PNG / PGM / PPM files (any
  format when Pillow is installed; see `image_io`).
- "npz": a user `.npz` file: images `x` [N, H, W(, C)] + labels `y` [N] (or `images` /
  `labels`), or a 1-D token stream `tokens` (or a 1-D integer `x`).

Image examples are resized once at load time (bilinear, antialiased when shrinking, the
same weights as `jax.image.resize(..., "bilinear")`), scaled to [0, 1] and normalised per
channel with the TRAIN split's mean and std (`Datasets.mean` / `Datasets.std`).
Text example i of a split is the window of seq_len + 1 bytes starting at i * seq_len
(inputs = window[:-1], targets = window[1:]); the splits are contiguous ranges of the byte
stream (train, then eval, then test), so no window crosses two splits.

`BatchIterator` draws fixed-size training batches, epoch after epoch, each epoch a
permutation seeded by (seed, epoch); `state()` / `restore()` make it resume exactly.
`eval_batches` visits every example once, padding the last batch and marking real
examples in "mask".

Config fields (under `config.data`; `default_config()` gives them all; `make_datasets` takes
the training config or its data block, and missing fields take these defaults):

  kind           "digits"   "digits" | "text" | "images" | "npz"
  path           None       None (embedded data) or a file / folder, per kind
  image_size     32         images are resized to image_size x image_size
  channels       3          1 or 3 (grayscale repeated to 3; RGB to luma for 1)
  seq_len        256        text: tokens per example
  eval_fraction  0.1        of the examples (images) or of the bytes (text)
  test_fraction  0.1
  seed           0          the image split permutation
  max_bytes      None       text: cap on the byte stream; None = 8 MiB for the default
                            corpus and no cap for a user path
  normalize      True       images: normalise with the train split's per-channel mean/std
"""

from __future__ import annotations

import dataclasses
import math
import os
import sysconfig
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sparse_attention.train import image_io

KINDS = ("digits", "text", "images", "npz")
# Files of an image folder read as images; others (notes, archives, ...) are skipped.
IMAGE_SUFFIXES = frozenset(
  {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm"}
)
DEFAULT_MAX_BYTES = 8 * 2**20
# Between two documents of a text corpus: the ASCII "file separator" control byte.
DOCUMENT_SEPARATOR = b"\n\x1c\n"
TEXT_VOCAB_SIZE = 256

# Folders of the standard library that are not its own source: tests, tools, installed
# packages, byte code, build configuration.
_STDLIB_SKIP_DIRS = frozenset(
  {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "lib-dynload",
    "__pycache__",
    "pydoc_data",
  }
)


def default_config() -> ml_collections.ConfigDict:
  """The data fields with their defaults (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.kind = "digits"
  c.path = ml_collections.config_dict.placeholder(str)
  c.image_size = 32
  c.channels = 3
  c.seq_len = 256
  c.eval_fraction = 0.1
  c.test_fraction = 0.1
  c.seed = 0
  c.max_bytes = ml_collections.config_dict.placeholder(int)
  c.normalize = True
  return c


# ---------------------------------------------------------------------------------------
# Sources


class ArraySource:
  """A split held in memory: `len(source)` examples, `source.get(indices)` a batch."""

  def __len__(self) -> int:
    raise NotImplementedError

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` (int [B], each in [0, len)), as a dict of arrays [B, ...]."""
    raise NotImplementedError

  def _check_indices(self, indices: Any) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(
        f"{type(self).__name__}.get: indices must be a 1-D integer array, got dtype "
        f"{indices.dtype} shape {indices.shape}."
      )
    indices = indices.astype(np.int64)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise ValueError(
        f"{type(self).__name__}.get: indices must lie in [0, {n}), got "
        f"[{indices.min()}, {indices.max()}]."
      )
    return indices


class ImageSource(ArraySource):
  """Images float32 [N, H, W, C] and labels int32 [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or labels.shape != images.shape[:1]:
      raise ValueError(
        f"ImageSource: images must be [N, H, W, C] and labels [N], got {images.shape} and "
        f"{labels.shape}."
      )
    self.images = np.ascontiguousarray(images, np.float32)  # [N, H, W, C]
    self.labels = np.ascontiguousarray(labels, np.int32)  # [N]

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{"image": float32 [B, H, W, C], "label": int32 [B]}."""
    indices = self._check_indices(indices)
    return {"image": self.images[indices], "label": self.labels[indices]}


class TextSource(ArraySource):
  """Non-overlapping windows of seq_len + 1 tokens over one contiguous token stream.

  Attributes:
    tokens: this split's token stream, uint8 (bytes) or int32 [T].
    seq_len: tokens per example.
    start: offset of `tokens` in the whole corpus stream (train 0, then eval, then test).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, start: int = 0):
    if tokens.ndim != 1:
      raise ValueError(f"TextSource: tokens must be 1-D, got shape {tokens.shape}.")
    self.tokens = tokens  # [T]
    self.seq_len = int(seq_len)
    self.start = int(start)
    self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)  # [L + 1]

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{"inputs": int32 [B, seq_len], "targets": int32 [B, seq_len]} (targets shifted by 1)."""
    indices = self._check_indices(indices)
    windows = self.tokens[indices[:, None] * self.seq_len + self._offsets].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}  # [B, L] each


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
  """The three splits of one dataset and what a model needs to know about it.

  Attributes:
    train, eval, test: the splits (eval / test may be empty when their fraction is 0).
    kind: "image" or "text".
    num_classes: number of labels (images), else None.
    vocab_size: 256 for byte text (more for an .npz token stream), else None.
    image_shape: (H, W, C) of the examples (images), else None.
    seq_len: tokens per example (text), else None.
    mean, std: float32 [C], the per-channel statistics of the TRAIN split's [0, 1]
      images that every split was normalised with (0 and 1 when config.data.normalize is
      False); None for text. `normalize(x)` applies them.
    class_names: the class folder names of an image folder (label i is class_names[i]);
      the digit strings for digits; None otherwise.
  """

  train: ArraySource
  eval: ArraySource
  test: ArraySource
  kind: str
  num_classes: int | None = None
  vocab_size: int | None = None
  image_shape: tuple[int, int, int] | None = None
  seq_len: int | None = None
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  class_names: tuple[str, ...] | None = None

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """(images - mean) / std for images [..., C] scaled to [0, 1], as float32."""
    if self.mean is None:
      raise ValueError("Datasets.normalize: this is a text dataset; it has no image statistics.")
    return ((np.asarray(images, np.float32) - self.mean) / self.std).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class _Fields:
  kind: str
  path: str | None
  image_size: int
  channels: int
  seq_len: int
  eval_fraction: float
  test_fraction: float
  seed: int
  max_bytes: int | None
  normalize: bool


def check_config(config: Any) -> None:
  """Raises ValueError naming the first bad `config.data` field; reads no data."""
  _read_config(config)


def _read_config(config: Any) -> _Fields:
  if not isinstance(config, (ml_collections.ConfigDict, Mapping)):
    raise ValueError(
      f"make_datasets: config must be an ml_collections.ConfigDict, got {type(config).__name__}."
    )
  if "data" in config:  # a whole training config: read its `data` block
    config = config["data"]
    if not isinstance(config, (ml_collections.ConfigDict, Mapping)):
      raise ValueError(f"config.data must be a ConfigDict, got {type(config).__name__}.")
  elif "kind" not in config:  # not a data block either: do not read unrelated fields
    raise ValueError(
      "make_datasets: config has no `data` block (config.data.kind, config.data.path, ...); "
      "pass the training config or its data block."
    )
  defaults = default_config()

  def get(name):
    return config.get(name, defaults.get(name))

  kind = get("kind")
  if kind not in KINDS:
    raise ValueError(f"config.data.kind must be one of {', '.join(KINDS)}; got {kind!r}.")
  path = get("path")
  if path is not None:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
      raise ValueError(f"config.data.path must be None or a non-empty path, got {path!r}.")
    path = os.fspath(path)
  if kind == "digits" and path is not None:
    raise ValueError(
      f"config.data.path must be None for kind 'digits' (scikit-learn's bundled digits), "
      f"got {path!r}; use kind 'images' or 'npz' for your own images."
    )
  if kind in ("images", "npz") and path is None:
    raise ValueError(f"config.data.path is required for kind {kind!r} (got None).")

  def integer(name, minimum):
    v = get(name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
      raise ValueError(f"config.data.{name} must be an integer >= {minimum}, got {v!r}.")
    return int(v)

  def fraction(name):
    v = get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise ValueError(f"config.data.{name} must be a float in [0, 1), got {v!r}.")
    if not 0.0 <= float(v) < 1.0:
      raise ValueError(f"config.data.{name} must be in [0, 1), got {v!r}.")
    return float(v)

  image_size = integer("image_size", 1)
  channels = integer("channels", 1)
  if channels not in (1, 3):
    raise ValueError(f"config.data.channels must be 1 or 3, got {channels}.")
  seq_len = integer("seq_len", 1)
  eval_fraction = fraction("eval_fraction")
  test_fraction = fraction("test_fraction")
  if eval_fraction + test_fraction >= 1.0:
    raise ValueError(
      f"config.data.eval_fraction + config.data.test_fraction must be < 1 (the train split "
      f"needs examples), got {eval_fraction} + {test_fraction}."
    )
  seed = integer("seed", 0)
  max_bytes = get("max_bytes")
  if max_bytes is not None:
    max_bytes = integer("max_bytes", 1)
  normalize = get("normalize")
  if not isinstance(normalize, (bool, np.bool_)):
    raise ValueError(f"config.data.normalize must be True or False, got {normalize!r}.")
  return _Fields(
    kind,
    path,
    image_size,
    channels,
    seq_len,
    eval_fraction,
    test_fraction,
    seed,
    max_bytes,
    bool(normalize),
  )


# ---------------------------------------------------------------------------------------
# Entry point


def make_datasets(config: ml_collections.ConfigDict) -> Datasets:
  """Loads and splits the dataset `config.data` describes.

  Args:
    config: a training config with a `data` block, or the data block itself; fields and
      defaults as in `default_config()` (missing fields take the defaults).

  Returns:
    Datasets with the train / eval / test splits.

  Raises:
    ValueError: naming the config field or the path at fault, before loading anything
      expensive where the config alone shows the problem.
  """
  f = _read_config(config)
  if f.kind == "digits":
    images, labels = _load_digits()  # [N, 8, 8, 1] in [0, 1], [N]
    return _image_datasets(images, labels, 10, tuple(str(i) for i in range(10)), f)
  if f.kind == "images":
    images, labels, names = _load_image_folder(f.path, f.image_size, f.channels)
    return _image_datasets(images, labels, len(names), names, f)
  if f.kind == "text":
    stream = np.frombuffer(_load_text(f.path, f.max_bytes), np.uint8)
    return _text_datasets(stream, TEXT_VOCAB_SIZE, f, f.path or "the standard library sources")
  return _load_npz(f)


# ---------------------------------------------------------------------------------------
# Images


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # ~1 s to import: only when asked for

  digits = load_digits()
  images = (digits.images.astype(np.float32) / 16.0)[..., None]  # [1797, 8, 8, 1]
  return images, digits.target.astype(np.int32)


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """Bilinear resampling weights [out_size, in_size], as `jax.image.resize` computes them.

  A triangle filter at half-pixel centres, widened by in_size / out_size when shrinking
  (antialiasing); rows sum to 1 (edges renormalised).
  """
  inv_scale = in_size / out_size
  kernel_scale = max(inv_scale, 1.0)
  sample = (np.arange(out_size, dtype=np.float64) + 0.5) * inv_scale - 0.5  # [out]
  x = np.abs(sample[:, None] - np.arange(in_size, dtype=np.float64)[None, :]) / kernel_scale
  w = np.maximum(0.0, 1.0 - x)  # [out, in]
  total = w.sum(axis=1, keepdims=True)
  w = np.where(total > 1000 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0)
  valid = (sample >= -0.5) & (sample <= in_size - 0.5)
  return np.where(valid[:, None], w, 0.0)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of float images [N, H, W, C] to [N, size, size, C] (float32)."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images.astype(np.float32, copy=False)
  wy = resize_weights(h, size).astype(np.float32)  # [S, H]
  wx = resize_weights(w, size).astype(np.float32)  # [S, W]
  x = np.matmul(wy, images.astype(np.float32, copy=False).transpose(0, 3, 1, 2))  # [N, C, S, W]
  x = np.matmul(x, wx.T)  # [N, C, S, S]
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # [N, S, S, C]


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """[N, H, W, C] with C in 1..4 -> [N, H, W, channels]: alpha dropped, gray <-> RGB."""
  c = images.shape[-1]
  if c in (2, 4):
    images = images[..., : c - 1]  # drop alpha
    c -= 1
  if c == channels:
    return images
  if c == 1:
    return np.repeat(images, 3, axis=-1)
  luma = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as Pillow's "L"
  return (images.astype(np.float32) @ luma)[..., None]


def _prepare(images: np.ndarray, size: int, channels: int) -> np.ndarray:
  """[N, H, W, C] in [0, 1], C in 1..4 -> float32 [N, size, size, channels]."""
  # Resizing and the channel mix are both linear: resize whichever has fewer channels.
  if images.shape[-1] in (2, 4):
    images = images[..., :-1]  # drop alpha
  if images.shape[-1] < channels:
    return _to_channels(resize_images(images, size), channels)
  return resize_images(_to_channels(images, channels), size)


def preprocess_images(images: Any, config: Any) -> np.ndarray:
  """New images as a model trained on `config` saw its training images.

  Args:
    images: uint8 [N, H, W] or [N, H, W, C] (0..255), or float in [0, 1]; C in 1..4
      (alpha is dropped); any size.
    config: the run's config as `train.load` returns it: config.data.image_size and
      config.data.channels give the size and channels, config.dataset.mean / std the
      normalisation (the train split's statistics, recorded by the run).

  Returns:
    float32 [N, image_size, image_size, channels], resized (bilinear, as at training),
    converted to the channels and normalised.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4) or not x.size:
    raise ValueError(
      f"preprocess_images: images must be [N, H, W] or [N, H, W, C] with C in 1..4, got "
      f"shape {x.shape}."
    )
  if np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32) / 255.0
  elif not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"preprocess_images: images must be uint8 or float, got {x.dtype}.")
  x = _prepare(x.astype(np.float32), config.data.image_size, config.data.channels)
  mean = np.asarray(config.dataset.mean, np.float32)
  std = np.asarray(config.dataset.std, np.float32)
  return ((x - mean) / std).astype(np.float32)


def _load_image_folder(path: str, size: int, channels: int):
  root = Path(path)
  if not root.exists():
    raise ValueError(f"config.data.path {path!r} does not exist.")
  if not root.is_dir():
    raise ValueError(
      f"config.data.path {path!r} is not a folder; kind 'images' expects a folder with one "
      "subfolder of images per class (use kind 'npz' for an .npz file)."
    )
  try:
    entries = sorted(root.iterdir(), key=lambda p: p.name)
  except OSError as e:
    raise ValueError(f"config.data.path {path!r} cannot be listed: {e.strerror or e}.") from e
  classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
  if not classes:
    files = [p for p in entries if not p.name.startswith(".")]
    found = f"only {len(files)} files" if files else "it is empty"
    raise ValueError(
      f"config.data.path {path!r} has no class subfolders ({found}); kind 'images' expects "
      "one subfolder per class, e.g. path/cat/*.png, path/dog/*.png."
    )
  images, labels, skipped = [], [], []
  for label, folder in enumerate(classes):
    files = _files_under(folder)
    skipped += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
      raise ValueError(f"config.data.path: class folder {str(folder)!r} holds no image files.")
    for file in files:
      img = image_io.read_image(file)  # uint8 [h, w, c]; ValueError names the file
      img = img[None].astype(np.float32) / 255.0  # [1, h, w, c]
      images.append(_prepare(img, size, channels)[0])  # [S, S, channels]
      labels.append(label)
  if skipped:
    logging.warning(
      "config.data.path %r: skipped %d files that are not images (by their extension), e.g. %r.",
      path,
      len(skipped),
      str(skipped[0].relative_to(root)),
    )
  return np.stack(images), np.asarray(labels, np.int32), tuple(p.name for p in classes)


def _image_datasets(images, labels, num_classes, class_names, f: _Fields) -> Datasets:
  """images float [N, H, W, C] in [0, 1] (before resizing), labels [N]."""
  n = len(labels)
  sizes = _split_sizes(n, f, "examples")
  images = _prepare(images, f.image_size, f.channels)  # [N, S, S, C]
  order = np.random.default_rng(f.seed).permutation(n)
  bounds = np.cumsum([0, *sizes])
  splits = [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
  if f.normalize:
    train = images[splits[0]].astype(np.float64)
    mean = train.mean(axis=(0, 1, 2))  # [C]
    std = train.std(axis=(0, 1, 2))  # [C]
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel stays centred, not blown up
  else:
    mean = np.zeros(f.channels)
    std = np.ones(f.channels)
  mean = mean.astype(np.float32)
  std = std.astype(np.float32)
  sources = [ImageSource((images[idx] - mean) / std, labels[idx]) for idx in splits]
  return Datasets(
    *sources,
    kind="image",
    num_classes=int(num_classes),
    image_shape=(f.image_size, f.image_size, f.channels),
    mean=mean,
    std=std,
    class_names=class_names,
  )


def _split_sizes(n: int, f: _Fields, unit: str) -> tuple[int, int, int]:
  """(train, eval, test) sizes; a nonzero fraction gets at least one."""
  n_eval = max(round(n * f.eval_fraction), 1 if f.eval_fraction > 0 else 0)
  n_test = max(round(n * f.test_fraction), 1 if f.test_fraction > 0 else 0)
  n_train = n - n_eval - n_test
  if n_train < 1:
    raise ValueError(
      f"config.data: {n} {unit} are too few for eval_fraction={f.eval_fraction} and "
      f"test_fraction={f.test_fraction} (train would get {n_train})."
    )
  return n_train, n_eval, n_test


# ---------------------------------------------------------------------------------------
# Text


def stdlib_source_files() -> list[tuple[str, Path]]:
  """(relative posix path, path) of the standard library's own .py sources, sorted.

  The folder is `sysconfig.get_paths()["stdlib"]`, without site-packages, test suites,
  idlelib, lib2to3, turtledemo, pydoc_data, byte code, and the build's `_sysconfigdata`.
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [
      d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
    ]
    for name in filenames:
      if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata", ".")):
        p = Path(dirpath, name)
        out.append((p.relative_to(root).as_posix(), p))
  out.sort(key=lambda item: item[0])
  return out


def _files_under(folder: Path) -> list[Path]:
  """Regular files under `folder`, recursively, hidden ones skipped, by relative path."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise_walk_error):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    out += [Path(dirpath, n) for n in filenames if not n.startswith(".")]
  return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _raise_walk_error(e: OSError):
  raise ValueError(f"config.data.path: cannot list {e.filename!r}: {e.strerror or e}.") from e


def _read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise ValueError(f"config.data.path: cannot read {str(path)!r}: {e.strerror or e}.") from e


def _join_capped(paths: list[Path], cap: int | None) -> bytes:
  """The files' bytes joined by DOCUMENT_SEPARATOR, reading no more than needed for `cap`."""
  chunks, total = [], 0
  for p in paths:
    if cap is not None and total >= cap:
      break
    if chunks:
      chunks.append(DOCUMENT_SEPARATOR)
      total += len(DOCUMENT_SEPARATOR)
    data = _read_bytes(p)
    chunks.append(data)
    total += len(data)
  out = b"".join(chunks)
  return out if cap is None else out[:cap]


def _load_text(path: str | None, max_bytes: int | None) -> bytes:
  if path is None:
    data = _join_capped([p for _, p in stdlib_source_files()], max_bytes or DEFAULT_MAX_BYTES)
    if not data:
      raise ValueError(
        f"config.data.path is None but no standard library sources were found under "
        f"{sysconfig.get_paths()['stdlib']!r}; set config.data.path to a text file or folder."
      )
    return data
  p = Path(path)
  if not p.exists():
    raise ValueError(f"config.data.path {path!r} does not exist.")
  if p.is_dir():
    files = _files_under(p)
    if not files:
      raise ValueError(f"config.data.path {path!r} is an empty folder (no text files).")
  else:
    files = [p]
  data = _join_capped(files, max_bytes)
  if not data:
    raise ValueError(f"config.data.path {path!r} holds no text (0 bytes).")
  return data


def _text_datasets(stream: np.ndarray, vocab_size: int, f: _Fields, where: str) -> Datasets:
  """stream: int [T]; contiguous train / eval / test ranges of it."""
  n = len(stream)
  sizes = _split_sizes(n, f, "tokens")
  names = ("train", "eval", "test")
  fractions = (None, f.eval_fraction, f.test_fraction)
  sources, start = [], 0
  for name, size, frac in zip(names, sizes, fractions, strict=True):
    src = TextSource(stream[start : start + size], f.seq_len, start)
    if size and len(src) == 0:
      what = "the train split" if frac is None else f"the {name} split ({name}_fraction={frac})"
      raise ValueError(
        f"config.data.seq_len={f.seq_len} is too long for {where!r}: its {n} tokens give "
        f"{what} {size} tokens, fewer than seq_len + 1 = {f.seq_len + 1}."
      )
    sources.append(src)
    start += size
  return Datasets(*sources, kind="text", vocab_size=int(vocab_size), seq_len=f.seq_len)


# ---------------------------------------------------------------------------------------
# .npz


def _load_npz(f: _Fields) -> Datasets:
  path = f.path
  if not os.path.exists(path):
    raise ValueError(f"config.data.path {path!r} does not exist.")
  if os.path.isdir(path):
    raise ValueError(f"config.data.path {path!r} is a folder; kind 'npz' expects an .npz file.")
  try:
    with open(path, "rb") as fh:
      magic = fh.read(6)
  except OSError as e:
    raise ValueError(f"config.data.path {path!r} cannot be read: {e.strerror or e}.") from e
  if not magic.startswith(b"PK"):
    what = "a .npy array" if magic == b"\x93NUMPY" else "not a zip archive"
    raise ValueError(
      f"config.data.path {path!r} is not a readable .npz file ({what}); save one with "
      "np.savez(path, x=images, y=labels) or np.savez(path, tokens=tokens)."
    )
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"config.data.path {path!r} is not a readable .npz file ({e}).") from e

  if "tokens" in arrays or ("x" in arrays and arrays["x"].ndim == 1 and "y" not in arrays):
    key = "tokens" if "tokens" in arrays else "x"
    tokens = arrays[key]
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
      raise ValueError(
        f"config.data.path {path!r}: `{key}` must be a non-empty 1-D integer token stream, "
        f"got dtype {tokens.dtype} shape {tokens.shape}."
      )
    if tokens.min() < 0:
      raise ValueError(f"config.data.path {path!r}: `{key}` holds negative token ids.")
    top = int(tokens.max())
    if "vocab_size" in arrays:
      vocab_size = int(arrays["vocab_size"])
      if vocab_size <= top:
        raise ValueError(
          f"config.data.path {path!r}: vocab_size {vocab_size} but a token id is {top}."
        )
    else:
      vocab_size = max(TEXT_VOCAB_SIZE, top + 1)
    tokens = tokens.astype(np.uint8 if vocab_size <= 256 else np.int32)
    return _text_datasets(tokens, vocab_size, f, path)

  x_key = "x" if "x" in arrays else "images" if "images" in arrays else None
  y_key = "y" if "y" in arrays else "labels" if "labels" in arrays else None
  if x_key is None or y_key is None:
    raise ValueError(
      f"config.data.path {path!r} holds arrays {sorted(arrays)}; expected images `x` and "
      "labels `y` (or `images` and `labels`), or a 1-D token stream `tokens`."
    )
  x, y = arrays[x_key], arrays[y_key]
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4) or len(x) == 0:
    raise ValueError(
      f"config.data.path {path!r}: `{x_key}` must be images [N, H, W] or [N, H, W, C] with C "
      f"in 1..4 (channels last), got shape {x.shape}."
    )
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(
      f"config.data.path {path!r}: `{y_key}` must be non-negative integer labels [{len(x)}], "
      f"got dtype {y.dtype} shape {y.shape}."
    )
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    if x.min() < 0 or x.max() > 255:
      raise ValueError(
        f"config.data.path {path!r}: integer images must hold 0..255, got [{x.min()}, {x.max()}]."
      )
    x = x.astype(np.float32) / 255.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
      raise ValueError(
        f"config.data.path {path!r}: `{x_key}` holds {int(np.size(x) - np.isfinite(x).sum())} "
        "non-finite values (NaN or inf)."
      )
  else:
    raise ValueError(f"config.data.path {path!r}: `{x_key}` has unsupported dtype {x.dtype}.")
  num_classes = int(y.max()) + 1
  return _image_datasets(x, y.astype(np.int32), num_classes, None, f)


# ---------------------------------------------------------------------------------------
# Iteration


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_shard(shard_index: Any, num_shards: Any, batch_size: int, where: str):
  num_shards = _check_int(f"{where}: num_shards", num_shards, 1)
  shard_index = _check_int(f"{where}: shard_index", shard_index, 0)
  if shard_index >= num_shards:
    raise ValueError(f"{where}: shard_index must be < num_shards={num_shards}, got {shard_index}.")
  if batch_size % num_shards:
    raise ValueError(
      f"{where}: batch_size ({batch_size}) must be a multiple of num_shards ({num_shards})."
    )
  return shard_index, num_shards


class BatchIterator:
  """Infinite training batches: epoch after epoch, each a fresh seeded permutation.

  Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(n)`
  (`range(n)` when shuffle is False), in batches of exactly batch_size; the last incomplete
  batch of an epoch is dropped. `state()` is the position (JSON-serialisable ints);
  `restore(state)` on any iterator over the same source and seed continues with exactly
  the batches an uninterrupted iterator would give.

  Multi-process: batch_size is the GLOBAL batch; with num_shards = jax.process_count() and
  shard_index = jax.process_index() each process gets its slice of every global batch
  (batch_size // num_shards examples), and all processes stay at the same position.
  """

  def __init__(
    self,
    source: ArraySource,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
  ):
    self.source = source
    self.batch_size = _check_int("BatchIterator: batch_size", batch_size, 1)
    self.seed = _check_int("BatchIterator: seed", seed, 0)
    self.shuffle = bool(shuffle)
    self.shard_index, self.num_shards = _check_shard(
      shard_index, num_shards, self.batch_size, "BatchIterator"
    )
    self.num_examples = len(source)
    if self.batch_size > self.num_examples:
      raise ValueError(
        f"BatchIterator: batch_size ({self.batch_size}) is larger than the split "
        f"({self.num_examples} examples)."
      )
    self._epoch = 0
    self._index = 0  # examples of this epoch's order already served
    self._order_epoch = -1
    self._order = np.arange(self.num_examples)

  @property
  def batches_per_epoch(self) -> int:
    """Full batches per epoch (the last incomplete one is dropped)."""
    return self.num_examples // self.batch_size

  def order(self, epoch: int) -> np.ndarray:
    """The example order of `epoch`: int64 [num_examples]."""
    if epoch != self._order_epoch:
      if self.shuffle:
        self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        self._order = np.arange(self.num_examples)
      self._order_epoch = epoch
    return self._order

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.batch_size
    if self._index + b > self.num_examples:  # only after restoring a foreign position
      self._epoch, self._index = self._epoch + 1, 0
    indices = self.order(self._epoch)[self._index : self._index + b]  # [B]
    self._index += b
    if self._index + b > self.num_examples:  # so state() names the batch that comes next
      self._epoch, self._index = self._epoch + 1, 0
    if self.num_shards > 1:
      per = b // self.num_shards
      indices = indices[self.shard_index * per : (self.shard_index + 1) * per]
    return self.source.get(indices)

  def state(self) -> dict[str, int]:
    """The position: {"epoch", "index" (examples served in the epoch), "seed", "num_examples"}."""
    return {
      "epoch": self._epoch,
      "index": self._index,
      "seed": self.seed,
      "num_examples": self.num_examples,
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Moves to a position from `state()`.

    Raises:
      ValueError: if the state is malformed, or was saved with another seed or from a split
        of another size (then the batches could not match).
    """
    if not isinstance(state, Mapping) or not {"epoch", "index"} <= set(state):
      raise ValueError(
        f"BatchIterator.restore: state must be a dict with 'epoch' and 'index', got {state!r}."
      )
    values = {}
    for key in ("epoch", "index", "seed", "num_examples"):
      if key in state:
        v = state[key]
        if isinstance(v, np.ndarray) and v.shape == () and np.issubdtype(v.dtype, np.integer):
          v = int(v)  # a checkpoint may hand back 0-d arrays
        values[key] = _check_int(f"BatchIterator.restore: state[{key!r}]", v, 0)
    if values.get("seed", self.seed) != self.seed:
      raise ValueError(
        f"BatchIterator.restore: state['seed'] is {values['seed']} but this iterator's seed "
        f"is {self.seed}."
      )
    if values.get("num_examples", self.num_examples) != self.num_examples:
      raise ValueError(
        f"BatchIterator.restore: state['num_examples'] is {values['num_examples']} but the "
        f"source has {self.num_examples} examples (the data changed)."
      )
    if values["index"] > self.num_examples:
      raise ValueError(
        f"BatchIterator.restore: state['index'] must be <= {self.num_examples}, got "
        f"{values['index']}."
      )
    self._epoch, self._index = values["epoch"], values["index"]


def eval_batches(
  source: ArraySource,
  batch_size: int,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `source` exactly once, in order, in batches of exactly batch_size.

  The last batch is padded with zeros; each batch carries "mask": bool [B], False on
  padding, so metrics count each example once and shapes never change. With num_shards
  > 1, batch_size is the global batch and each process gets its slice (as BatchIterator).

  Raises:
    ValueError: at the call (not at the first batch) for a bad batch_size or shard.
  """
  batch_size = _check_int("eval_batches: batch_size", batch_size, 1)
  shard_index, num_shards = _check_shard(shard_index, num_shards, batch_size, "eval_batches")
  n = len(source)
  per = batch_size // num_shards
  lo, hi = shard_index * per, (shard_index + 1) * per

  def generate():
    for start in range(0, n, batch_size):
      indices = np.arange(start, start + batch_size)  # [B]
      mask = indices < n  # [B]
      batch = source.get(np.where(mask, indices, 0)[lo:hi])
      mask = mask[lo:hi]
      for value in batch.values():
        value[~mask] = 0
      batch["mask"] = mask
      yield batch

  return generate()


def num_eval_batches(source: ArraySource, batch_size: int) -> int:
  """How many batches eval_batches(source, batch_size) yields: ceil(len / batch_size)."""
  return math.ceil(len(source) / batch_size)

"""Datasets and their input pipelines: grain random-access sources, offline defaults.

`make_datasets(config)` lists (or, for the small embedded sets, loads) a dataset and
splits it into train, eval and test sources that grain reads by index:

- "digits": scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download; in
  memory.
- "images": a folder with one subfolder per class (label i = the i-th folder name in
  sorted order), of any image format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF,
  PGM/PPM, ...; RGB, gray, RGBA, palette; any sizes), read recursively. Files whose
  extension is not an image's are skipped and counted. Only the file names are held in
  memory; each image is read and decoded when a batch needs it.
- "array_record": a folder of `*.array_record` files (read in sorted order) and
  `classes.txt` (one class name per line), each record an encoded image preceded by its
  label as a 4-byte little-endian int (`write_array_record` makes one from an image
  folder): for sets too large for a folder of small files.
- "npz": a `.npz` file (in memory): images `x` [N, H, W(, C)] + labels `y` [N] (or
  `images` / `labels`), or a 1-D token stream `tokens` (or a 1-D integer `x`).
- "text": a byte-level corpus (vocabulary 256), in memory: by default the Python standard
  library's own `.py` sources (see `stdlib_source_files`); or a text file, or a folder of
  files read recursively as bytes in sorted relative-path order, joined with
  DOCUMENT_SEPARATOR.

Image splits are a seeded permutation of the examples (config.data.seed); each example
goes through `images.ImageTransform` (decode, channels, crop + resize, flip, normalise)
in the pipeline. Normalisation uses config.data.mean / std when given, else the train
split's per-channel statistics, measured at load time over the train split's images
(at most STATS_EXAMPLES of them, a seeded sample), as the evaluation transform makes
them. Text example i of a split is the window of seq_len + 1 tokens starting at
i * seq_len (inputs = window[:-1], targets = window[1:]); the splits are contiguous
ranges of the stream (train, then eval, then test), so no window crosses two splits.

Pipelines (grain): `train_batches` gives endless training batches: each epoch a fresh
seeded shuffle of the train split (`MapDataset.shuffle` + `repeat`), augmentation seeded
per example, global batches of `batch_size` examples of which each process reads and
decodes only its own share (examples p, p + P, ... of each global batch). Decoding and
augmentation run in `config.data.worker_count` processes (0: threads of the training
process), `config.data.prefetch` batches ahead. Its state is the global position in the
example stream, so the batches do not depend on the worker count, and a checkpointed
iterator (grain's orbax `CheckpointHandler`) resumes with the identical next batch.
`eval_batches` visits every example once, padding the last batch and marking real
examples in "mask".

Config fields (under `config.data`; `default_config()` gives them all; `make_datasets`
takes the training config or its data block, and missing fields take these defaults):

  kind                "digits"   digits | images | array_record | npz | text
  path                None       None (embedded data) or a file / folder, per kind
  eval_path           None       images / array_record: a second folder (same classes)
                                 that is the eval split (e.g. ImageNet's val/); then
                                 eval_fraction must be 0
  image_size          32         images are made image_size x image_size
  channels            3          1 or 3 (gray repeated to 3; RGB to luma for 1)
  seq_len             256        text: tokens per example
  eval_fraction       0.1        of the examples (images) or of the tokens (text)
  test_fraction       0.1
  seed                0          the image split permutation
  max_bytes           None       text: cap on the byte stream; None = 8 MiB for the
                                 default corpus and no cap for a user path
  normalize           True       images: normalise with mean / std
  mean, std           None       per-channel lists (e.g. ImageNet's); None = measured
  random_resized_crop False      training images: random crop (8%-100% of the area)
  flip                False      training images: random horizontal flip
  crop_fraction       1.0        other images: 1 = the whole image resized; < 1 = the
                                 centred square of this fraction of the shorter side
  interpolation       "bilinear" or "bicubic"
  worker_count        0          decoding processes (0: in the training process)
  prefetch            2          batches prepared ahead (and reading threads) per process
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sysconfig
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from sparse_attention.train import images

KINDS = ("digits", "images", "array_record", "npz", "text")
# Files of an image folder read as images; others (notes, archives, ...) are skipped.
IMAGE_SUFFIXES = frozenset(
  {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm"}
)
DEFAULT_MAX_BYTES = 8 * 2**20
# Between two documents of a text corpus: the ASCII "file separator" control byte.
DOCUMENT_SEPARATOR = b"\n\x1c\n"
TEXT_VOCAB_SIZE = 256
# At most this many train images (a seeded sample) measure the normalisation statistics.
STATS_EXAMPLES = 2000
CLASSES_FILE = "classes.txt"

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
  c.eval_path = ml_collections.config_dict.placeholder(str)
  c.image_size = 32
  c.channels = 3
  c.seq_len = 256
  c.eval_fraction = 0.1
  c.test_fraction = 0.1
  c.seed = 0
  c.max_bytes = ml_collections.config_dict.placeholder(int)
  c.normalize = True
  c.mean = ml_collections.config_dict.placeholder(tuple)
  c.std = ml_collections.config_dict.placeholder(tuple)
  c.random_resized_crop = False
  c.flip = False
  c.crop_fraction = 1.0
  c.interpolation = "bilinear"
  c.worker_count = 0
  c.prefetch = 2
  return c


# ---------------------------------------------------------------------------------------
# Sources: `len(source)` examples, `source[i]` the record of example i (grain's
# RandomAccessDataSource protocol). Image records go through images.ImageTransform.


class ArrayImages:
  """Images in memory: uint8 or float [N, H, W, C] and int labels [N]."""

  def __init__(self, images_: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images_, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}


class ImageFiles:
  """The files of an image folder and their labels. The relative paths are stored in one
  byte buffer, not as a million Python strings: grain copies the source to each worker."""

  def __init__(self, root: str, relative: Sequence[str], labels: np.ndarray):
    encoded = [p.encode() for p in relative]
    self.root = root
    self.labels = np.asarray(labels, np.int32)  # [N]
    self._chars = np.frombuffer(b"".join(encoded), np.uint8)
    self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)  # [N]

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, i: int) -> str:
    start = self._ends[i - 1] if i else 0
    return os.path.join(self.root, self._chars[start : self._ends[i]].tobytes().decode())

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"file": self.path(i), "label": int(self.labels[i])}


class ArrayRecordImages:
  """Records of ArrayRecord files: a 4-byte little-endian label, then an encoded image."""

  def __init__(self, folder: str, files: Sequence[str]):
    self.folder = folder
    self._records = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = self._records[i]
    label = int.from_bytes(record[:4], "little", signed=True)
    return {"encoded": record[4:], "file": f"{self.folder} record {i}", "label": label}


class Split:
  """The examples `indices` of an image source."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.indices[i])]


class TextSource:
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

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    """{"inputs": int32 [seq_len], "targets": int32 [seq_len]} (targets shifted by 1)."""
    if not 0 <= i < len(self):
      raise IndexError(f"TextSource: example {i} is outside [0, {len(self)}).")
    window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}  # [L] each


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
  """The three splits of one dataset, what a model needs to know about it, and how to
  turn its examples into batches.

  Attributes:
    train, eval, test: the splits (eval / test may be empty when their fraction is 0).
    kind: "image" or "text".
    num_classes: number of labels (images), else None.
    vocab_size: 256 for byte text (more for an .npz token stream), else None.
    image_shape: (H, W, C) of the examples (images), else None.
    seq_len: tokens per example (text), else None.
    mean, std: float32 [C], the per-channel statistics every image is normalised with
      (0 and 1 when config.data.normalize is False); None for text. `normalize(x)`
      applies them.
    class_names: the class names of an image folder / ArrayRecord set (label i is
      class_names[i]); the digit strings for digits; None otherwise.
    transform: the per-example image transform (None for text).
    worker_count, prefetch: the pipelines' processes and read-ahead (config.data).
  """

  train: Any
  eval: Any
  test: Any
  kind: str
  num_classes: int | None = None
  vocab_size: int | None = None
  image_shape: tuple[int, int, int] | None = None
  seq_len: int | None = None
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  class_names: tuple[str, ...] | None = None
  transform: images.ImageTransform | None = None
  worker_count: int = 0
  prefetch: int = 2

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """(x - mean) / std for images [..., C] scaled to [0, 1], as float32."""
    if self.mean is None:
      raise ValueError("Datasets.normalize: this is a text dataset; it has no image statistics.")
    return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class _Fields:
  kind: str
  path: str | None
  eval_path: str | None
  image_size: int
  channels: int
  seq_len: int
  eval_fraction: float
  test_fraction: float
  seed: int
  max_bytes: int | None
  normalize: bool
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  random_resized_crop: bool
  flip: bool
  crop_fraction: float
  interpolation: str
  worker_count: int
  prefetch: int


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
  if kind in ("images", "array_record", "npz") and path is None:
    raise ValueError(f"config.data.path is required for kind {kind!r} (got None).")
  eval_path = get("eval_path")
  if eval_path is not None:
    if kind not in ("images", "array_record") or not os.fspath(eval_path):
      raise ValueError(
        f"config.data.eval_path must be None, or a folder for kind 'images' / 'array_record' "
        f"(kind {kind!r}), got {eval_path!r}."
      )
    if get("eval_fraction"):
      raise ValueError(
        f"config.data.eval_fraction must be 0 when config.data.eval_path gives the eval split, "
        f"got {get('eval_fraction')!r}."
      )
    eval_path = os.fspath(eval_path)

  def integer(name, minimum):
    v = get(name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
      raise ValueError(f"config.data.{name} must be an integer >= {minimum}, got {v!r}.")
    return int(v)

  def number(name, lo, hi, what):
    v = get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise ValueError(f"config.data.{name} must be a float in {what}, got {v!r}.")
    if not lo <= float(v) < hi:
      raise ValueError(f"config.data.{name} must be in {what}, got {v!r}.")
    return float(v)

  def boolean(name):
    v = get(name)
    if not isinstance(v, (bool, np.bool_)):
      raise ValueError(f"config.data.{name} must be True or False, got {v!r}.")
    return bool(v)

  channels = integer("channels", 1)
  if channels not in (1, 3):
    raise ValueError(f"config.data.channels must be 1 or 3, got {channels}.")
  eval_fraction = number("eval_fraction", 0.0, 1.0, "[0, 1)")
  test_fraction = number("test_fraction", 0.0, 1.0, "[0, 1)")
  if eval_fraction + test_fraction >= 1.0:
    raise ValueError(
      f"config.data.eval_fraction + config.data.test_fraction must be < 1 (the train split "
      f"needs examples), got {eval_fraction} + {test_fraction}."
    )
  max_bytes = None if get("max_bytes") is None else integer("max_bytes", 1)
  crop_fraction = number("crop_fraction", 1e-6, 1.0 + 1e-9, "(0, 1]")
  interpolation = get("interpolation")
  if interpolation not in images.INTERPOLATIONS:
    raise ValueError(
      f"config.data.interpolation must be one of {sorted(images.INTERPOLATIONS)}, got "
      f"{interpolation!r}."
    )
  stats = {name: _channel_values(name, get(name), channels) for name in ("mean", "std")}
  if (stats["mean"] is None) != (stats["std"] is None):
    raise ValueError("config.data.mean and config.data.std must be given together (or neither).")
  if stats["std"] is not None and min(stats["std"]) <= 0:
    raise ValueError(f"config.data.std must be > 0 per channel, got {stats['std']}.")
  return _Fields(
    kind=kind,
    path=path,
    eval_path=eval_path,
    image_size=integer("image_size", 1),
    channels=channels,
    seq_len=integer("seq_len", 1),
    eval_fraction=eval_fraction,
    test_fraction=test_fraction,
    seed=integer("seed", 0),
    max_bytes=max_bytes,
    normalize=boolean("normalize"),
    mean=stats["mean"],
    std=stats["std"],
    random_resized_crop=boolean("random_resized_crop"),
    flip=boolean("flip"),
    crop_fraction=crop_fraction,
    interpolation=interpolation,
    worker_count=integer("worker_count", 0),
    prefetch=integer("prefetch", 1),
  )


def _channel_values(name: str, value: Any, channels: int) -> tuple[float, ...] | None:
  if value is None:
    return None
  try:
    values = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    values = ()
  if len(values) != channels or not all(math.isfinite(v) for v in values):
    raise ValueError(
      f"config.data.{name} must be None or {channels} finite numbers (one per channel, "
      f"config.data.channels={channels}), got {value!r}."
    )
  return values


# ---------------------------------------------------------------------------------------
# Entry point


def make_datasets(config: ml_collections.ConfigDict) -> Datasets:
  """Lists (or loads, for the in-memory kinds) and splits the dataset `config.data`
  describes.

  Args:
    config: a training config with a `data` block, or the data block itself; fields and
      defaults as in `default_config()` (missing fields take the defaults).

  Returns:
    Datasets with the train / eval / test splits.

  Raises:
    ValueError: naming the config field or the path at fault, before reading anything
      expensive where the config alone shows the problem.
  """
  f = _read_config(config)
  if f.kind == "text":
    stream = np.frombuffer(_load_text(f.path, f.max_bytes), np.uint8)
    return _text_datasets(stream, TEXT_VOCAB_SIZE, f, f.path or "the standard library sources")
  if f.kind == "npz":
    return _load_npz(f)
  if f.kind == "digits":
    return _image_datasets(_load_digits(), tuple(str(i) for i in range(10)), f)
  listing = _list_image_folder if f.kind == "images" else _list_array_record
  source, names = listing(f.path)
  eval_source = None
  if f.eval_path is not None:
    eval_source, eval_names = listing(f.eval_path, "eval_path")
    if eval_names != names:
      raise ValueError(
        f"config.data.eval_path {f.eval_path!r} holds the classes {list(eval_names)[:5]}... "
        f"({len(eval_names)}), config.data.path {f.path!r} {list(names)[:5]}... "
        f"({len(names)}): both need the same class names."
      )
  return _image_datasets(source, names, f, eval_source)


# ---------------------------------------------------------------------------------------
# Images


def _load_digits() -> ArrayImages:
  from sklearn.datasets import load_digits  # ~1 s to import: only when asked for

  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]  # [1797, 8, 8, 1] in [0, 1]
  return ArrayImages(x, digits.target.astype(np.int32))


def _list_image_folder(path: str, field: str = "path") -> tuple[ImageFiles, tuple[str, ...]]:
  where = f"config.data.{field}"
  root = Path(path)
  if not root.exists():
    raise ValueError(f"{where} {path!r} does not exist.")
  if not root.is_dir():
    raise ValueError(
      f"{where} {path!r} is not a folder; kind 'images' expects a folder with one "
      "subfolder of images per class (use kind 'npz' for an .npz file)."
    )
  try:
    entries = sorted(root.iterdir(), key=lambda p: p.name)
  except OSError as e:
    raise ValueError(f"{where} {path!r} cannot be listed: {e.strerror or e}.") from e
  classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
  if not classes:
    files = [p for p in entries if not p.name.startswith(".")]
    found = f"only {len(files)} files" if files else "it is empty"
    raise ValueError(
      f"{where} {path!r} has no class subfolders ({found}); kind 'images' expects "
      "one subfolder per class, e.g. path/cat/*.jpg, path/dog/*.jpg."
    )
  relative, labels, skipped = [], [], []
  for label, folder in enumerate(classes):
    files = _files_under(folder)
    skipped += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
      raise ValueError(f"{where}: class folder {str(folder)!r} holds no image files.")
    relative += [str(f.relative_to(root)) for f in files]
    labels += [label] * len(files)
  if skipped:
    logging.warning(
      "%s %r: skipped %d files that are not images (by their extension), e.g. %r.",
      where,
      path,
      len(skipped),
      str(skipped[0].relative_to(root)),
    )
  return ImageFiles(str(root), relative, np.asarray(labels)), tuple(p.name for p in classes)


def _list_array_record(path: str, field: str = "path") -> tuple[ArrayRecordImages, tuple[str, ...]]:
  where = f"config.data.{field}"
  folder = Path(path)
  if not folder.is_dir():
    what = "does not exist" if not folder.exists() else "is not a folder"
    raise ValueError(
      f"{where} {path!r} {what}; kind 'array_record' expects a folder of "
      f"*.array_record files and {CLASSES_FILE} (see data.write_array_record)."
    )
  files = sorted(str(p) for p in folder.glob("*.array_record"))
  if not files:
    raise ValueError(f"{where} {path!r} holds no *.array_record files.")
  try:
    names = tuple(n for n in (folder / CLASSES_FILE).read_text().splitlines() if n)
  except OSError as e:
    raise ValueError(
      f"{where} {path!r}: cannot read {CLASSES_FILE} (one class name per line): {e.strerror or e}."
    ) from e
  return ArrayRecordImages(path, files), names


def write_array_record(image_folder: str, out_folder: str, *, shards: int = 1) -> int:
  """Writes an image folder (kind "images") as kind "array_record": `shards` files of
  records (label as 4-byte little-endian int, then the image file's bytes, undecoded)
  and classes.txt. Returns the number of records written."""
  from array_record.python.array_record_module import ArrayRecordWriter

  files, names = _list_image_folder(image_folder)
  os.makedirs(out_folder, exist_ok=True)
  Path(out_folder, CLASSES_FILE).write_text("".join(n + "\n" for n in names))
  bounds = np.linspace(0, len(files), shards + 1).astype(int)
  for shard in range(shards):
    name = os.path.join(out_folder, f"data-{shard:05d}-of-{shards:05d}.array_record")
    writer = ArrayRecordWriter(name, "group_size:1")  # random access to every record
    for i in range(bounds[shard], bounds[shard + 1]):
      label = int(files.labels[i]).to_bytes(4, "little", signed=True)
      writer.write(label + _read_bytes(Path(files.path(i))))
    writer.close()
  return len(files)


def _image_datasets(source: Any, class_names, f: _Fields, eval_source: Any = None) -> Datasets:
  """Splits `source` by a seeded permutation; `eval_source`, if given, is the eval split."""
  n = len(source)
  sizes = _split_sizes(n, f, "examples")
  order = np.random.default_rng(f.seed).permutation(n)
  ends = np.cumsum(sizes)
  splits = [Split(source, np.sort(order[e - s : e])) for s, e in zip(sizes, ends, strict=True)]
  if eval_source is not None:
    splits[1] = Split(eval_source, np.arange(len(eval_source)))
  mean, std = (0.0,) * f.channels, (1.0,) * f.channels
  if f.normalize and f.mean is not None:
    mean, std = f.mean, f.std
  elif f.normalize:
    mean, std = _measure_stats(splits[0], _image_transform(f, mean, std), f)
  return Datasets(
    *splits,
    kind="image",
    num_classes=len(class_names),
    image_shape=(f.image_size, f.image_size, f.channels),
    mean=np.asarray(mean, np.float32),
    std=np.asarray(std, np.float32),
    class_names=class_names,
    transform=_image_transform(f, mean, std),
    worker_count=f.worker_count,
    prefetch=f.prefetch,
  )


def _image_transform(f: _Fields, mean: Sequence[float], std: Sequence[float]):
  return images.ImageTransform(
    size=f.image_size,
    channels=f.channels,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    crop_fraction=f.crop_fraction,
    interpolation=f.interpolation,
    random_resized_crop=f.random_resized_crop,
    flip=f.flip,
  )


def _measure_stats(train: Split, transform: images.ImageTransform, f: _Fields):
  """Per-channel mean and std of the train split's images (a seeded sample of at most
  STATS_EXAMPLES), as the evaluation transform makes them, accumulated in float64."""
  ds = grain.MapDataset.source(train).shuffle(seed=f.seed)[:STATS_EXAMPLES]
  ds = ds.map(transform.eval).batch(64)
  total = np.zeros((2, f.channels))  # sum, sum of squares
  count = 0
  iterator = _iterator(ds, f.worker_count, f.prefetch)
  try:
    for batch in iterator:
      x = batch["image"].astype(np.float64).reshape(-1, f.channels)  # [pixels, C]
      total += [x.sum(axis=0), np.square(x).sum(axis=0)]
      count += len(x)
  finally:
    iterator.close()
  mean = total[0] / count
  std = np.sqrt(np.maximum(total[1] / count - np.square(mean), 0.0))
  std = np.where(std > 1e-6, std, 1.0)  # a constant channel stays centred, not blown up
  return mean.astype(np.float32), std.astype(np.float32)


def preprocess_images(x: Any, config: Any) -> np.ndarray:
  """New images as a model trained on `config` saw its evaluation images.

  Args:
    x: uint8 [N, H, W] or [N, H, W, C] (0..255), or float in [0, 1]; C in 1..4
      (alpha is dropped); any size.
    config: the run's config as `train.load` returns it: config.data gives the size,
      channels, crop and interpolation, config.dataset.mean / std the normalisation
      (recorded by the run).

  Returns:
    float32 [N, image_size, image_size, channels]: `images.ImageTransform.eval` of each.
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4) or not x.size:
    raise ValueError(
      f"preprocess_images: images must be [N, H, W] or [N, H, W, C] with C in 1..4, got "
      f"shape {x.shape}."
    )
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"preprocess_images: images must be uint8 or float, got {x.dtype}.")
  transform = _image_transform(_read_config(config), config.dataset.mean, config.dataset.std)
  return np.stack([transform.eval({"image": image, "label": 0})["image"] for image in x])


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
  return Datasets(
    *sources,
    kind="text",
    vocab_size=int(vocab_size),
    seq_len=f.seq_len,
    worker_count=f.worker_count,
    prefetch=f.prefetch,
  )


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
    x = x.astype(np.uint8)
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
      raise ValueError(
        f"config.data.path {path!r}: `{x_key}` holds {int(np.size(x) - np.isfinite(x).sum())} "
        "non-finite values (NaN or inf)."
      )
  else:
    raise ValueError(f"config.data.path {path!r}: `{x_key}` has unsupported dtype {x.dtype}.")
  datasets = _image_datasets(ArrayImages(x, y.astype(np.int32)), range(int(y.max()) + 1), f)
  return dataclasses.replace(datasets, class_names=None)


# ---------------------------------------------------------------------------------------
# Pipelines


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Worker processes leave Ctrl-C / SIGTERM to the training process, which saves a
  checkpoint and then closes them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _iterator(ds: grain.MapDataset, worker_count: int, prefetch: int) -> grain.DatasetIterator:
  """Iterates `ds` with `prefetch` reading threads (and elements buffered) per process,
  in `worker_count` processes (0: this one)."""
  read = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
  out = ds.to_iter_dataset(read)
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (library use)
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=1)
    out = out.mp_prefetch(options, worker_init_fn=_ignore_stop_signals)
  return iter(out)


class Batches(grain.DatasetIterator):
  """Global batches of `examples`, of which this process reads only its share.

  Global batch k holds examples [k B, (k + 1) B) of the stream; process p of P gets
  those at p, p + P, ... (B / P of them). The state is the global position
  ({"next_index": examples served}), the same on every process and for any worker
  count, as in grain's `experimental.ElasticIterator` (which this adds the workers'
  signal handling to); grain's orbax CheckpointHandler saves and restores it.
  """

  def __init__(
    self,
    examples: grain.MapDataset,
    batch_size: int,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    worker_count: int = 0,
    prefetch: int = 2,
  ):
    super().__init__()
    self._it: grain.DatasetIterator | None = None
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self.num_shards = _check_int("num_shards", num_shards, 1)
    self.shard_index = _check_int("shard_index", shard_index, 0)
    if self.shard_index >= self.num_shards:
      raise ValueError(f"shard_index must be < num_shards={num_shards}, got {shard_index}.")
    if self.batch_size % self.num_shards:
      raise ValueError(
        f"batch_size ({batch_size}) must be a multiple of num_shards ({num_shards})."
      )
    self._examples, self._workers, self._prefetch = examples, worker_count, prefetch
    self._next_index = 0

  def _iterator(self) -> grain.DatasetIterator:
    if self._it is None:
      shard = self._examples[self._next_index + self.shard_index :: self.num_shards]
      batches = shard.batch(self.batch_size // self.num_shards, drop_remainder=True)
      self._it = _iterator(batches, self._workers, self._prefetch)
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator())
    self._next_index += self.batch_size
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_index": self._next_index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._stop()
    self._next_index = _check_int("state['next_index']", state["next_index"], 0)

  def start_prefetch(self) -> None:
    self._iterator().start_prefetch()

  def close(self) -> None:
    self._stop()
    super().close()

  def _stop(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def train_batches(
  datasets: Datasets, batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1
) -> Batches:
  """Endless training batches of the train split: epoch e is a permutation seeded by
  (seed, e), augmentation seeded by (seed, position); batch_size is the global batch
  (each of num_shards processes gets batch_size / num_shards examples of it).

  Returns:
    a checkpointable grain iterator of {"image": float32 [b, H, W, C], "label": int32
    [b]} or {"inputs", "targets": int32 [b, seq_len]}, b = batch_size / num_shards.

  Raises:
    ValueError: at the call, for a bad batch size or shard, or a batch larger than the
      train split.
  """
  if _check_int("batch_size", batch_size, 1) > len(datasets.train):
    raise ValueError(
      f"batch_size ({batch_size}) is larger than the train split ({len(datasets.train)} examples)."
    )
  examples = grain.MapDataset.source(datasets.train).seed(seed).shuffle().repeat()
  if datasets.transform is not None:
    examples = examples.random_map(datasets.transform.train)
  return Batches(
    examples,
    batch_size,
    shard_index=shard_index,
    num_shards=num_shards,
    worker_count=datasets.worker_count,
    prefetch=datasets.prefetch,
  )


def _mark_real(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return dict(example, mask=np.True_)


def eval_batches(
  datasets: Datasets,
  split: str,
  batch_size: int,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `datasets.<split>` exactly once, in order, in global batches of
  exactly batch_size (this process's share of each, as `train_batches`).

  The last batch is padded with zeros; each batch carries "mask": bool [b], False on
  padding, so metrics count each example once and shapes never change.

  Raises:
    ValueError: at the call (not at the first batch) for a bad batch_size or shard.
  """
  source = getattr(datasets, split)
  examples = grain.MapDataset.source(source)
  if datasets.transform is not None:
    examples = examples.map(datasets.transform.eval)
  examples = examples.map(_mark_real)
  padding = -len(source) % batch_size
  if padding:
    pad = grain.MapDataset.source([_blank_example(datasets)] * padding)
    examples = grain.MapDataset.concatenate([examples, pad])
  batches = Batches(
    examples,
    batch_size,
    shard_index=shard_index,
    num_shards=num_shards,
    worker_count=datasets.worker_count,
    prefetch=datasets.prefetch,
  )

  def generate():
    try:
      yield from batches
    finally:
      batches.close()

  return generate()


def _blank_example(datasets: Datasets) -> dict[str, np.ndarray]:
  if datasets.kind == "text":
    tokens = np.zeros(datasets.seq_len, np.int32)
    return {"inputs": tokens, "targets": tokens, "mask": np.False_}
  return {
    "image": np.zeros(datasets.image_shape, np.float32),
    "label": np.int32(0),
    "mask": np.False_,
  }


def num_eval_batches(datasets: Datasets, split: str, batch_size: int) -> int:
  """How many batches eval_batches(datasets, split, batch_size) yields."""
  return math.ceil(len(getattr(datasets, split)) / batch_size)


def load_split(datasets: Datasets, split: str, batch_size: int = 256) -> dict[str, np.ndarray]:
  """A whole split as evaluation examples in memory, in order (for small splits: tests,
  benchmarks, inspection): {"image": [n, H, W, C], "label": [n]} or text's arrays."""
  parts = [
    {k: v[b["mask"]] for k, v in b.items() if k != "mask"}
    for b in eval_batches(datasets, split, batch_size)
  ]
  if not parts:
    return {k: v[:0] for k, v in _blank_example(datasets).items() if k != "mask"}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

"""train/data.py and train/image_io.py: loading, splits, batches, resuming, image files."""

from __future__ import annotations

import json
import struct
import zlib

import ml_collections
import numpy as np
import pytest

from sparse_attention.train import data, image_io

# ---------------------------------------------------------------------------------------
# Helpers: a small PNG encoder (every filter type), PGM/PPM writers, configs.


def _paeth(a: int, b: int, c: int) -> int:
  p = a + b - c
  pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
  if pa <= pb and pa <= pc:
    return a
  return b if pb <= pc else c


def _filter_row(kind: int, row: bytes, prior: bytes, bpp: int) -> bytes:
  out = bytearray()
  for i, x in enumerate(row):
    a = row[i - bpp] if i >= bpp else 0
    b = prior[i]
    c = prior[i - bpp] if i >= bpp else 0
    pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
    out.append((x - pred) & 0xFF)
  return bytes(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(
  samples: np.ndarray,
  color_type: int,
  depth: int = 8,
  filters=(0, 1, 2, 3, 4),
  palette: np.ndarray | None = None,
  trns: bytes | None = None,
  interlace: int = 0,
) -> bytes:
  """samples: uint8 [H, W, samples per pixel] (values < 2**depth); rows cycle `filters`."""
  h, w, spp = samples.shape
  rows = []
  for y in range(h):
    if depth == 8:
      rows.append(samples[y].astype(np.uint8).tobytes())
    else:  # pack MSB first
      bits = ((samples[y, :, 0, None] >> np.arange(depth - 1, -1, -1)) & 1).astype(np.uint8)
      rows.append(np.packbits(bits.reshape(-1)).tobytes())
  bpp = max(1, depth * spp // 8)
  prior = bytes(len(rows[0]))
  raw = bytearray()
  for y, row in enumerate(rows):
    kind = filters[y % len(filters)]
    raw.append(kind)
    raw += _filter_row(kind, row, prior, bpp)
    prior = row
  z = zlib.compress(bytes(raw))
  out = image_io.PNG_SIGNATURE + _chunk(
    b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, interlace)
  )
  if palette is not None:
    out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
  if trns is not None:
    out += _chunk(b"tRNS", trns)
  half = len(z) // 2  # two IDAT chunks: the decoder must join them
  return out + _chunk(b"IDAT", z[:half]) + _chunk(b"IDAT", z[half:]) + _chunk(b"IEND", b"")


def encode_pnm(pixels: np.ndarray, ascii_: bool, maxval: int = 255) -> bytes:
  """pixels uint [H, W, 1|3] -> P2/P5 (gray) or P3/P6 (color), with a comment."""
  h, w, c = pixels.shape
  magic = {(1, True): b"P2", (3, True): b"P3", (1, False): b"P5", (3, False): b"P6"}[c, ascii_]
  header = magic + b"\n# a comment\n" + f"{w} {h}\n# another\n{maxval}\n".encode()
  if ascii_:
    return header + b"\n".join(b" ".join(b"%d" % v for v in row) for row in pixels.reshape(h, -1))
  return header + pixels.astype(np.uint8).tobytes()


def cfg(**fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = data.default_config()
  config.data.update(fields)
  return config


def identity_source(n: int) -> data.ImageSource:
  """Example i has label i and image value i: batches show which examples they hold."""
  images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
  return data.ImageSource(images, np.arange(n))


# ---------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits() -> data.Datasets:
  return data.make_datasets(cfg())


def test_digits_shapes_and_dtypes(digits):
  assert digits.kind == "image"
  assert digits.num_classes == 10 and digits.vocab_size is None and digits.seq_len is None
  assert digits.image_shape == (32, 32, 3)
  assert digits.class_names == tuple("0123456789")
  batch = digits.train.get(np.arange(5))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32


def test_digits_splits_and_labels(digits):
  sizes = [len(digits.train), len(digits.eval), len(digits.test)]
  assert sum(sizes) == 1797
  assert sizes[1] == sizes[2] == round(1797 * 0.1)
  labels = np.concatenate([s.labels for s in (digits.train, digits.eval, digits.test)])
  assert labels.min() == 0 and labels.max() == 9
  from sklearn.datasets import load_digits

  np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits().target))


def test_digits_deterministic(digits):
  again = data.make_datasets(cfg())
  for a, b in zip(
    (digits.train, digits.eval, digits.test), (again.train, again.eval, again.test), strict=True
  ):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  other = data.make_datasets(cfg(seed=1))
  assert not np.array_equal(other.eval.labels, digits.eval.labels)


def test_digits_normalised_with_train_statistics(digits):
  raw = data.make_datasets(cfg(normalize=False))
  np.testing.assert_array_equal(raw.mean, np.zeros(3, np.float32))
  train = raw.train.images.astype(np.float64)
  np.testing.assert_allclose(digits.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(digits.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
  # Every split is normalised with the train statistics (not its own).
  for split, raw_split in ((digits.train, raw.train), (digits.eval, raw.eval)):
    np.testing.assert_allclose(split.images, digits.normalize(raw_split.images), atol=1e-5)
  np.testing.assert_allclose(
    digits.train.images.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-4
  )
  np.testing.assert_allclose(
    digits.train.images.std(axis=(0, 1, 2), dtype=np.float64), 1, atol=1e-4
  )
  assert abs(float(digits.eval.images.mean())) > 1e-4  # eval's own mean is not forced to 0


def test_digits_native_size_one_channel_is_the_sklearn_data():
  from sklearn.datasets import load_digits

  d = data.make_datasets(cfg(image_size=8, channels=1, normalize=False, eval_fraction=0.0))
  assert len(d.eval) == 0 and d.image_shape == (8, 8, 1)
  ref = load_digits()
  # With eval empty, train and test hold all 1797; match them to the original order.
  images = np.concatenate([d.train.images, d.test.images])[..., 0] * 16
  labels = np.concatenate([d.train.labels, d.test.labels])
  order = np.lexsort(images.reshape(len(images), -1).T)
  ref_order = np.lexsort(ref.images.reshape(len(images), -1).T)
  np.testing.assert_allclose(images[order], ref.images[ref_order], atol=1e-5)
  assert sorted(labels) == sorted(ref.target)


def test_resize_matches_jax_image_resize():
  import jax

  x = np.random.default_rng(0).random((2, 11, 7, 3)).astype(np.float32)  # [N, H, W, C]
  for size in (3, 7, 11, 32):  # shrink (antialiased), both, identity-ish, grow
    ref = np.asarray(jax.image.resize(x, (2, size, size, 3), "bilinear"))
    np.testing.assert_allclose(data.resize_images(x, size), ref, atol=2e-6)
  np.testing.assert_allclose(data.resize_weights(5, 9).sum(axis=1), 1.0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize(
  "fields, field",
  [
    ({"kind": "jpeg"}, "config.data.kind"),
    ({"path": "/tmp"}, "config.data.path"),  # digits take no path
    ({"kind": "images"}, "config.data.path"),  # images need one
    ({"kind": "npz"}, "config.data.path"),
    ({"path": ""}, "config.data.path"),
    ({"image_size": 0}, "config.data.image_size"),
    ({"channels": 2}, "config.data.channels"),
    ({"seq_len": 0}, "config.data.seq_len"),
    ({"eval_fraction": 1.5}, "config.data.eval_fraction"),
    ({"test_fraction": -0.1}, "config.data.test_fraction"),
    ({"eval_fraction": 0.5, "test_fraction": 0.5}, "config.data.eval_fraction"),
    ({"seed": -1}, "config.data.seed"),
    ({"max_bytes": 0}, "config.data.max_bytes"),
    ({"normalize": 1}, "config.data.normalize"),
  ],
)
def test_config_errors_name_the_field(fields, field):
  config = data.default_config().to_dict()  # a plain dict: any type may be set
  config.update(fields)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    data.make_datasets(config)


def test_config_may_be_the_data_block_or_a_plain_dict():
  d = data.make_datasets({"kind": "digits", "image_size": 8, "channels": 1})
  assert d.image_shape == (8, 8, 1)
  d = data.make_datasets(cfg(image_size=8).data)
  assert d.image_shape == (8, 8, 3)
  with pytest.raises(ValueError, match="no `data` block"):
    data.make_datasets(ml_collections.ConfigDict({"seed": 3}))


# ---------------------------------------------------------------------------------------
# Text


def test_stdlib_file_list_skips_tests_and_tools():
  files = data.stdlib_source_files()
  names = [rel for rel, _ in files]
  assert names == sorted(names)
  assert "os.py" in names and "json/__init__.py" in names
  for rel in names:
    parts = rel.split("/")
    assert not set(parts[:-1]) & {"test", "tests", "idlelib", "lib2to3", "site-packages"}, rel
    assert not parts[-1].startswith("test_"), rel


def test_text_default_windows_and_contiguous_splits():
  d = data.make_datasets(cfg(kind="text", seq_len=64, max_bytes=300_000))
  assert d.kind == "text" and d.vocab_size == 256 and d.seq_len == 64
  assert d.num_classes is None and d.image_shape is None and d.mean is None
  stream = np.frombuffer(data._load_text(None, 300_000), np.uint8)
  assert len(stream) == 300_000
  # Contiguous ranges: train, then eval, then test, covering the stream.
  splits = (d.train, d.eval, d.test)
  assert [s.start for s in splits] == [
    0,
    len(d.train.tokens),
    len(d.train.tokens) + len(d.eval.tokens),
  ]
  np.testing.assert_array_equal(np.concatenate([s.tokens for s in splits]), stream)
  assert len(d.eval.tokens) == len(d.test.tokens) == 30_000
  for s in splits:
    assert len(s) == (len(s.tokens) - 1) // 64
    idx = np.array([0, 3, len(s) - 1])
    b = s.get(idx)
    assert b["inputs"].shape == b["targets"].shape == (3, 64)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for row, i in enumerate(idx):  # window i starts at i * seq_len of this split's range
      window = stream[s.start + i * 64 : s.start + i * 64 + 65]
      np.testing.assert_array_equal(b["inputs"][row], window[:-1])
      np.testing.assert_array_equal(b["targets"][row], window[1:])
    # The last window ends inside the split: no window crosses into the next one.
    assert (len(s) - 1) * 64 + 65 <= len(s.tokens)


def test_text_default_cap_and_determinism():
  d1 = data.make_datasets(cfg(kind="text"))
  d2 = data.make_datasets(cfg(kind="text"))
  total = sum(len(s.tokens) for s in (d1.train, d1.eval, d1.test))
  assert 0 < total <= data.DEFAULT_MAX_BYTES
  np.testing.assert_array_equal(d1.train.tokens, d2.train.tokens)
  np.testing.assert_array_equal(d1.test.tokens, d2.test.tokens)


def test_text_file_and_folder(tmp_path):
  folder = tmp_path / "corpus"
  (folder / "sub").mkdir(parents=True)
  docs = {"b.txt": b"beta " * 50, "a.txt": b"\xff\xfe not utf-8 \x00" * 40, "sub/c.md": b"c" * 99}
  for name, content in docs.items():
    (folder / name).write_bytes(content)
  (folder / ".hidden").write_bytes(b"never read")
  d = data.make_datasets(cfg(kind="text", path=str(folder), seq_len=16))
  expected = data.DOCUMENT_SEPARATOR.join(docs[n] for n in ("a.txt", "b.txt", "sub/c.md"))
  got = np.concatenate([s.tokens for s in (d.train, d.eval, d.test)]).tobytes()
  assert got == expected
  one = data.make_datasets(cfg(kind="text", path=str(folder / "b.txt"), seq_len=8))
  assert (
    np.concatenate([one.train.tokens, one.eval.tokens, one.test.tokens]).tobytes() == docs["b.txt"]
  )
  capped = data.make_datasets(cfg(kind="text", path=str(folder), seq_len=8, max_bytes=200))
  assert sum(len(s.tokens) for s in (capped.train, capped.eval, capped.test)) == 200


def test_text_errors_name_the_path(tmp_path):
  missing = tmp_path / "nope.txt"
  with pytest.raises(ValueError, match="nope.txt.*does not exist"):
    data.make_datasets(cfg(kind="text", path=str(missing)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty.*empty folder"):
    data.make_datasets(cfg(kind="text", path=str(tmp_path / "empty")))
  (tmp_path / "zero.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="zero.txt"):
    data.make_datasets(cfg(kind="text", path=str(tmp_path / "zero.txt")))
  (tmp_path / "short.txt").write_bytes(b"x" * 100)
  with pytest.raises(ValueError, match="seq_len=64.*short.txt"):
    data.make_datasets(cfg(kind="text", path=str(tmp_path / "short.txt"), seq_len=64))


# ---------------------------------------------------------------------------------------
# Image folders


def _solid(color, h=6, w=5) -> np.ndarray:
  return np.broadcast_to(np.asarray(color, np.uint8), (h, w, len(color))).copy()


def test_image_folder_labels_and_pixels(tmp_path):
  root = tmp_path / "imgs"
  # Class ids follow the sorted folder names: a_dog -> 0, b_cat -> 1.
  files = {
    "b_cat/1.png": ("png", (200, 10, 30)),
    "b_cat/2.ppm": ("ppm", (1, 2, 3)),
    "b_cat/nested/3.png": ("png-gray", (77,)),
    "a_dog/x.pgm": ("pgm", (128,)),
    "a_dog/y.png": ("png-rgba", (9, 99, 199, 50)),
  }
  for name, (fmt, color) in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = _solid(color, 9, 7)
    if fmt.startswith("png"):
      blob = encode_png(pixels, {1: 0, 3: 2, 4: 6}[len(color)])
    else:
      blob = encode_pnm(pixels, ascii_=fmt == "ppm")
    path.write_bytes(blob)
  (root / "README.txt").write_bytes(b"top-level files are ignored")
  (root / "b_cat" / ".DS_Store").write_bytes(b"hidden files are skipped")
  d = data.make_datasets(cfg(kind="images", path=str(root), image_size=4, test_fraction=0.2))
  assert d.class_names == ("a_dog", "b_cat") and d.num_classes == 2
  assert (len(d.train), len(d.eval), len(d.test)) == (3, 1, 1)
  images = np.concatenate([s.images for s in (d.train, d.eval, d.test)])
  labels = np.concatenate([s.labels for s in (d.train, d.eval, d.test)])
  assert images.shape == (5, 4, 4, 3)
  # Solid colours stay solid through resizing: undo the normalisation, read the colour.
  colors = np.round((images * d.std + d.mean) * 255)[:, 0, 0]  # [5, 3]
  assert np.ptp(images, axis=(1, 2)).max() < 1e-5
  expected = {
    (128, 128, 128): 0,  # gray PGM repeated to 3 channels
    (9, 99, 199): 0,  # alpha dropped
    (200, 10, 30): 1,
    (1, 2, 3): 1,
    (77, 77, 77): 1,
  }
  assert {tuple(int(v) for v in c): int(y) for c, y in zip(colors, labels, strict=True)} == expected


def test_image_folder_to_one_channel(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.png").write_bytes(encode_png(_solid((255, 0, 0)), 2))
  (tmp_path / "c" / "b.pgm").write_bytes(encode_pnm(_solid((51,)), ascii_=False))
  config = cfg(kind="images", path=str(tmp_path), channels=1, image_size=3, normalize=False)
  config.data.eval_fraction = config.data.test_fraction = 0.0
  d = data.make_datasets(config)
  assert d.image_shape == (3, 3, 1)
  np.testing.assert_allclose(sorted(d.train.images[:, 0, 0, 0]), [0.2, 0.299], atol=1e-6)


def test_image_folder_errors_name_the_path(tmp_path):
  def load(path):
    return data.make_datasets(cfg(kind="images", path=str(path)))

  with pytest.raises(ValueError, match="missing.*does not exist"):
    load(tmp_path / "missing")
  (tmp_path / "file.png").write_bytes(encode_png(_solid((1,)), 0))
  with pytest.raises(ValueError, match="file.png.*not a folder"):
    load(tmp_path / "file.png")
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "a.png").write_bytes(encode_png(_solid((1,)), 0))
  with pytest.raises(ValueError, match="flat.*no class subfolders"):
    load(tmp_path / "flat")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty.*no class subfolders"):
    load(tmp_path / "empty")
  (tmp_path / "one" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="cls.*holds no image files"):
    load(tmp_path / "one")
  bad = tmp_path / "bad" / "cls"
  bad.mkdir(parents=True)
  (bad / "ok.png").write_bytes(encode_png(_solid((1,)), 0))
  (bad / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    load(tmp_path / "bad")


def test_image_folder_skips_files_that_are_not_images(tmp_path, caplog):
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    (tmp_path / cls / "1.png").write_bytes(encode_png(_solid((9,)), 0))
  (tmp_path / "a" / "notes.txt").write_bytes(b"a stray file")
  (tmp_path / "b" / "labels.csv").write_bytes(b"x,y")
  config = cfg(kind="images", path=str(tmp_path), image_size=2, channels=1)
  config.data.eval_fraction = config.data.test_fraction = 0.0
  with caplog.at_level("WARNING"):
    d = data.make_datasets(config)
  assert len(d.train) == 2 and d.num_classes == 2
  assert "skipped 2 files that are not images" in caplog.text and "notes.txt" in caplog.text


def test_npz_with_non_finite_images_is_refused(tmp_path):
  x = np.zeros((10, 4, 4), np.float32)
  x[3, 1, 1] = np.nan
  np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
  with pytest.raises(ValueError, match="d.npz.*1 non-finite"):
    data.make_datasets(cfg(kind="npz", path=str(tmp_path / "d.npz"), image_size=4))


# ---------------------------------------------------------------------------------------
# .npz


def test_npz_images_split_by_seeded_permutation(tmp_path):
  n = 200
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 4, 4)).copy()  # [N, 4, 4]
  np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 7)
  config = cfg(kind="npz", path=str(tmp_path / "d.npz"), image_size=4, channels=1)
  config.data.normalize = False
  d = data.make_datasets(config)
  assert d.kind == "image" and d.num_classes == 7 and d.class_names is None
  ids = [np.round(s.images[:, 0, 0, 0] * 255).astype(int) for s in (d.train, d.eval, d.test)]
  assert [len(i) for i in ids] == [160, 20, 20]
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))  # disjoint, all
  for i, s in zip(ids, (d.train, d.eval, d.test), strict=True):
    np.testing.assert_array_equal(s.labels, i % 7)  # labels travel with their images
  again = data.make_datasets(config)
  np.testing.assert_array_equal(again.eval.images, d.eval.images)
  config.data.seed = 5
  other = data.make_datasets(config)
  assert not np.array_equal(other.eval.images, d.eval.images)


def test_npz_alternative_keys_and_tokens(tmp_path):
  np.savez(tmp_path / "i.npz", images=np.zeros((10, 5, 5, 3), np.float32), labels=np.ones(10, int))
  d = data.make_datasets(cfg(kind="npz", path=str(tmp_path / "i.npz"), image_size=5))
  assert d.image_shape == (5, 5, 3) and d.num_classes == 2
  tokens = np.arange(5000) % 1000
  np.savez(tmp_path / "t.npz", tokens=tokens)
  t = data.make_datasets(cfg(kind="npz", path=str(tmp_path / "t.npz"), seq_len=10))
  assert t.kind == "text" and t.vocab_size == 1000 and t.seq_len == 10
  np.testing.assert_array_equal(t.train.get(np.array([1]))["inputs"][0], tokens[10:20])
  np.savez(tmp_path / "b.npz", x=np.frombuffer(b"hello world " * 20, np.uint8))
  b = data.make_datasets(cfg(kind="npz", path=str(tmp_path / "b.npz"), seq_len=4))
  assert b.vocab_size == 256 and b.train.tokens.tobytes().startswith(b"hello world")


def test_npz_errors_name_the_path(tmp_path):
  def load(path):
    return data.make_datasets(cfg(kind="npz", path=str(path)))

  with pytest.raises(ValueError, match="gone.npz.*does not exist"):
    load(tmp_path / "gone.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
    load(tmp_path / "junk.npz")
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(ValueError, match="single.npy.*not a readable .npz file \\(a .npy array"):
    load(tmp_path / "single.npy")
  np.savez(tmp_path / "keys.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="keys.npz.*expected images `x`"):
    load(tmp_path / "keys.npz")
  np.savez(tmp_path / "labels.npz", x=np.zeros((4, 2, 2)), y=np.zeros(3, int))
  with pytest.raises(ValueError, match="labels.npz.*`y` must be"):
    load(tmp_path / "labels.npz")


# ---------------------------------------------------------------------------------------
# BatchIterator and eval_batches


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_batch_iterator_epochs_are_permutations():
  it = data.BatchIterator(identity_source(10), 3, seed=0)
  assert it.batches_per_epoch == 3
  for epoch in range(3):
    labels = np.concatenate([b["label"] for b in _take(it, 3)])
    assert len(set(labels.tolist())) == 9  # 9 distinct examples, the 10th dropped
    np.testing.assert_array_equal(labels, it.order(epoch)[:9])
  assert not np.array_equal(it.order(0), it.order(1))
  plain = data.BatchIterator(identity_source(10), 4, seed=0, shuffle=False)
  np.testing.assert_array_equal(
    np.concatenate([b["label"] for b in _take(plain, 3)]), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
  )


def test_batch_iterator_restore_reproduces_the_stream():
  source = identity_source(11)
  reference = data.BatchIterator(source, 4, seed=3)
  expected = [b["label"] for b in _take(reference, 12)]  # 4.5 epochs of 2 batches
  for k in range(0, 9):  # including positions at and across epoch boundaries
    it = data.BatchIterator(source, 4, seed=3)
    _take(it, k)
    state = json.loads(json.dumps(it.state()))  # JSON-serialisable ints
    fresh = data.BatchIterator(source, 4, seed=3)
    fresh.restore(state)
    for j, batch in enumerate(_take(fresh, 4)):
      np.testing.assert_array_equal(batch["label"], expected[k + j])
      assert batch["image"].shape == (4, 1, 1, 1)


def test_batch_iterator_state_at_epoch_boundary():
  it = data.BatchIterator(identity_source(10), 5, seed=0)
  assert it.state() == {"epoch": 0, "index": 0, "seed": 0, "num_examples": 10}
  next(it)
  assert it.state()["epoch"] == 0 and it.state()["index"] == 5
  next(it)
  assert it.state()["epoch"] == 1 and it.state()["index"] == 0
  state = {k: np.asarray(v) for k, v in it.state().items()}  # as a checkpoint may return it
  other = data.BatchIterator(identity_source(10), 5, seed=0)
  other.restore(state)
  np.testing.assert_array_equal(next(other)["label"], next(it)["label"])


def test_batch_iterator_seeds_differ_and_text_batches():
  source = identity_source(50)
  a = [b["label"] for b in _take(data.BatchIterator(source, 8, seed=0), 3)]
  b = [b["label"] for b in _take(data.BatchIterator(source, 8, seed=0), 3)]
  c = [b["label"] for b in _take(data.BatchIterator(source, 8, seed=1), 3)]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  text = data.TextSource(np.frombuffer(bytes(range(256)) * 4, np.uint8), 8)
  batch = next(data.BatchIterator(text, 16, seed=0))
  assert batch["inputs"].shape == (16, 8) and batch["inputs"].dtype == np.int32


def test_batch_iterator_shards_split_the_global_batch():
  source = identity_source(40)
  whole = _take(data.BatchIterator(source, 8, seed=2), 6)
  shards = [
    _take(data.BatchIterator(source, 8, seed=2, shard_index=i, num_shards=4), 6) for i in range(4)
  ]
  for step in range(6):
    parts = [s[step]["label"] for s in shards]
    assert all(p.shape == (2,) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole[step]["label"])


def test_batch_iterator_errors():
  source = identity_source(10)
  with pytest.raises(ValueError, match="batch_size \\(11\\) is larger than the split"):
    data.BatchIterator(source, 11, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchIterator(source, 0, seed=0)
  with pytest.raises(ValueError, match="seed"):
    data.BatchIterator(source, 2, seed=-1)
  with pytest.raises(ValueError, match="num_shards"):
    data.BatchIterator(source, 3, seed=0, num_shards=2)
  it = data.BatchIterator(source, 2, seed=0)
  with pytest.raises(ValueError, match="seed"):
    it.restore({"epoch": 0, "index": 0, "seed": 1})
  with pytest.raises(ValueError, match="num_examples"):
    it.restore({"epoch": 0, "index": 0, "num_examples": 12})
  with pytest.raises(ValueError, match="'epoch' and 'index'"):
    it.restore({"step": 3})
  with pytest.raises(ValueError, match="index"):
    it.restore({"epoch": 0, "index": 99})
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
    source.get(np.array([10]))
  with pytest.raises(ValueError, match="indices must lie"):
    source.get(np.array([-1]))


def test_eval_batches_cover_every_example_once():
  source = identity_source(10)
  batches = list(data.eval_batches(source, 4))
  assert len(batches) == 3 == data.num_eval_batches(source, 4)
  for b in batches:
    assert b["label"].shape == b["mask"].shape == (4,) and b["mask"].dtype == np.bool_
    assert b["image"].shape == (4, 1, 1, 1)
  np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
  np.testing.assert_array_equal(batches[-1]["image"][2:], 0)  # padding is zeros
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(10))  # each once, in order
  exact = list(data.eval_batches(source, 5))
  assert len(exact) == 2 and all(b["mask"].all() for b in exact)
  assert list(data.eval_batches(identity_source(0), 4)) == []
  shards = [list(data.eval_batches(source, 4, shard_index=i, num_shards=2)) for i in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
      np.concatenate([shards[0][step]["mask"], shards[1][step]["mask"]]), batches[step]["mask"]
    )
  with pytest.raises(ValueError, match="batch_size"):
    data.eval_batches(source, 0)  # raised at the call, not at the first batch


def test_eval_batches_text():
  text = data.TextSource(np.arange(100, dtype=np.uint8), 10)  # 9 windows
  batches = list(data.eval_batches(text, 4))
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 1]
  np.testing.assert_array_equal(batches[2]["inputs"][0], np.arange(80, 90))
  np.testing.assert_array_equal(batches[2]["targets"][1:], 0)


# ---------------------------------------------------------------------------------------
# image_io


def _roundtrip(tmp_path, blob: bytes, name="x.png") -> np.ndarray:
  path = tmp_path / name
  path.write_bytes(blob)
  decoded = image_io.decode_image(blob, str(path))  # the built-in decoder, always
  np.testing.assert_array_equal(image_io.read_image(path), decoded)  # Pillow, if present, agrees
  assert decoded.dtype == np.uint8
  return decoded


@pytest.mark.parametrize("color_type, spp", [(0, 1), (2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)])
def test_png_roundtrip_every_filter(tmp_path, color_type, spp, filters):
  rng = np.random.default_rng(color_type * 10 + len(filters))
  pixels = rng.integers(0, 256, (7, 5, spp), dtype=np.uint8)  # odd sizes
  pixels[0, 0] = 255  # wrap-around cases for the modular filters
  got = _roundtrip(tmp_path, encode_png(pixels, color_type, filters=filters))
  np.testing.assert_array_equal(got, pixels)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_png_low_bit_gray_is_scaled(tmp_path, depth):
  rng = np.random.default_rng(depth)
  values = rng.integers(0, 2**depth, (5, 11, 1), dtype=np.uint8)  # width not byte-aligned
  got = _roundtrip(tmp_path, encode_png(values, 0, depth))
  np.testing.assert_array_equal(got, values * (255 // (2**depth - 1)))


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_png_palette(tmp_path, depth):
  rng = np.random.default_rng(depth)
  colors = 2**depth if depth < 8 else 20
  palette = rng.integers(0, 256, (colors, 3), dtype=np.uint8)
  index = rng.integers(0, colors, (6, 9, 1), dtype=np.uint8)
  got = _roundtrip(tmp_path, encode_png(index, 3, depth, palette=palette))
  np.testing.assert_array_equal(got, palette[index[..., 0]])
  alpha = bytes([0, 128])  # shorter than the palette: the rest opaque
  got = _roundtrip(tmp_path, encode_png(index, 3, depth, palette=palette, trns=alpha))
  rgba = np.concatenate([palette, np.full((colors, 1), 255, np.uint8)], axis=1)
  rgba[:2, 3] = [0, 128]
  np.testing.assert_array_equal(got, rgba[index[..., 0]])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ascii_", [True, False])
def test_pnm_roundtrip(tmp_path, channels, ascii_):
  pixels = np.random.default_rng(channels).integers(0, 256, (4, 6, channels), dtype=np.uint8)
  got = _roundtrip(tmp_path, encode_pnm(pixels, ascii_), "x.pnm")
  np.testing.assert_array_equal(got, pixels)
  small = pixels // 17  # maxval 15 -> scaled to 0..255
  got = _roundtrip(tmp_path, encode_pnm(small, ascii_, maxval=15), "y.pnm")
  np.testing.assert_array_equal(got, small.astype(int) * 17)


def test_unsupported_images_raise_naming_the_file(tmp_path):
  def fails(blob: bytes, match: str):
    with pytest.raises(ValueError, match=match):
      image_io.decode_image(blob, str(tmp_path / "photo.img"))

  gray = np.zeros((2, 2, 1), np.uint8)
  interlaced = encode_png(gray, 0, interlace=1)
  fails(interlaced, "photo.img.*interlaced.*Pillow")
  sixteen = bytearray(encode_png(gray, 0))
  ihdr = struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0)
  sixteen[8:33] = _chunk(b"IHDR", ihdr)
  fails(bytes(sixteen), "photo.img.*16-bit.*Pillow")
  fails(b"\xff\xd8\xff\xe0\x00\x10JFIF", "photo.img.*JPEG.*Pillow")
  fails(b"GIF89a....", "photo.img.*GIF.*Pillow")
  fails(b"P5\n2 2\n65535\n" + bytes(8), "photo.img.*16-bit.*Pillow")
  fails(b"hello, world", "photo.img.*not a PNG, PGM or PPM")
  good = bytearray(encode_png(gray, 0))
  good[-20] ^= 0xFF  # inside the last IDAT chunk
  fails(bytes(good), "photo.img.*CRC")
  fails(encode_png(gray, 0)[:30], "photo.img.*truncated")
  with pytest.raises(ValueError, match="absent.png"):
    image_io.read_image(tmp_path / "absent.png")

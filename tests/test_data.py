"""train/data.py and train/images.py: sources, splits, the grain pipelines (order,
resuming, shards, workers), image decoding, resizing and augmentation."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest
import testutil

from sparse_attention.train import data, images


def cfg(**fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = data.default_config()
  config.data.update(fields)
  return config


def labelled(tmp_path, n: int, **fields) -> data.Datasets:
  """Example i has label i (1x1 zero images, all in the train split): batches show which
  examples they hold."""
  path = tmp_path / "labelled.npz"
  np.savez(path, x=np.zeros((n, 1, 1), np.uint8), y=np.arange(n))
  fields = dict(image_size=1, channels=1, normalize=False, eval_fraction=0.0, test_fraction=0.0)
  return data.make_datasets(cfg(kind="npz", path=str(path), **fields))


def take(iterator, k: int) -> list[np.ndarray]:
  return [next(iterator)["label"] for _ in range(k)]


# ---------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits() -> data.Datasets:
  return data.make_datasets(cfg())


def test_digits_shapes_splits_and_labels(digits):
  assert digits.kind == "image" and digits.num_classes == 10 and digits.vocab_size is None
  assert digits.image_shape == (32, 32, 3) and digits.class_names == tuple("0123456789")
  assert [len(digits.train), len(digits.eval), len(digits.test)] == [1437, 180, 180]
  splits = [data.load_split(digits, s) for s in ("train", "eval", "test")]
  for split in splits:
    assert split["image"].dtype == np.float32 and split["image"].shape[1:] == (32, 32, 3)
    assert split["label"].dtype == np.int32
  from sklearn.datasets import load_digits

  labels = np.concatenate([s["label"] for s in splits])
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits().target))
  other = data.make_datasets(cfg(seed=1))  # another split permutation
  assert not np.array_equal(other.eval.indices, digits.eval.indices)
  np.testing.assert_array_equal(data.make_datasets(cfg()).eval.indices, digits.eval.indices)


def test_digits_normalised_with_train_statistics(digits):
  raw = data.make_datasets(cfg(normalize=False))
  np.testing.assert_array_equal(raw.mean, np.zeros(3, np.float32))
  train = data.load_split(raw, "train")["image"].astype(np.float64)
  np.testing.assert_allclose(digits.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(digits.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
  for split in ("train", "eval"):  # every split is normalised with the train statistics
    np.testing.assert_allclose(
      data.load_split(digits, split)["image"],
      digits.normalize(data.load_split(raw, split)["image"]),
      atol=1e-5,
    )
  given = data.make_datasets(cfg(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
  np.testing.assert_array_equal(given.mean, np.full(3, 0.5, np.float32))


def test_digits_native_size_one_channel_is_the_sklearn_data():
  from sklearn.datasets import load_digits

  d = data.make_datasets(cfg(image_size=8, channels=1, normalize=False, eval_fraction=0.0))
  assert len(d.eval) == 0 and d.image_shape == (8, 8, 1)
  train, test = data.load_split(d, "train"), data.load_split(d, "test")
  indices = np.concatenate([d.train.indices, d.test.indices])
  ref = load_digits()
  np.testing.assert_array_equal(
    np.concatenate([train["image"], test["image"]])[..., 0] * 16, ref.images[indices]
  )
  np.testing.assert_array_equal(
    np.concatenate([train["label"], test["label"]]), ref.target[indices]
  )


# ---------------------------------------------------------------------------------------
# Images: decoding, resizing, augmentation


def test_float_resize_is_jax_image_resize():
  x = np.random.default_rng(0).random((11, 7, 3)).astype(np.float32)  # [H, W, C]
  for size in (3, 7, 11, 32):  # shrink (antialiased), both, identity-ish, grow
    ref = np.asarray(jax.image.resize(x, (size, size, 3), "bilinear"))
    got = images.crop_resize(x, (0, 0, 7, 11), size, "bilinear")
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_image_folder_mixed_formats_labels_and_pixels(tmp_path, caplog):
  files = testutil.write_image_folder(tmp_path)  # JPEG / PNG / WebP, RGB .. 16-bit gray
  config = cfg(kind="images", path=str(tmp_path), image_size=5, normalize=False)
  config.data.eval_fraction = config.data.test_fraction = 0.25
  with caplog.at_level("WARNING"):
    d = data.make_datasets(config)
  assert "skipped 1 files that are not images" in caplog.text and "notes.txt" in caplog.text
  assert d.class_names == ("cat", "dog") and d.num_classes == 2
  assert (len(d.train), len(d.eval), len(d.test)) == (8, 4, 4)
  colors = {}
  for split in ("train", "eval", "test"):
    batch = data.load_split(d, split)
    assert batch["image"].shape[1:] == (5, 5, 3)
    assert np.ptp(batch["image"], axis=(1, 2)).max() < 2 / 255  # solid stays solid
    for i, image, label in zip(
      getattr(d, split).indices, batch["image"], batch["label"], strict=True
    ):
      colors[d.train.source.path(i)] = (int(label), image[0, 0] * 255)
  assert len(colors) == len(files)
  for path, (label, color) in files.items():
    got_label, got = colors[str(tmp_path / path)]
    assert got_label == label, path
    np.testing.assert_allclose(got, color, atol=3, err_msg=path)  # JPEG is lossy
  gray = data.make_datasets(cfg(kind="images", path=str(tmp_path), channels=1, image_size=4))
  assert data.load_split(gray, "test")["image"].shape[1:] == (4, 4, 1)


def test_image_folder_errors_name_the_path(tmp_path):
  def load(path, **fields):
    return data.make_datasets(cfg(kind="images", path=str(path), **fields))

  with pytest.raises(ValueError, match="missing.*does not exist"):
    load(tmp_path / "missing")
  (tmp_path / "file.png").write_bytes(b"")
  with pytest.raises(ValueError, match="file.png.*not a folder"):
    load(tmp_path / "file.png")
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match="flat.*no class subfolders"):
    load(tmp_path / "flat")
  (tmp_path / "one" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="cls.*holds no image files"):
    load(tmp_path / "one")
  testutil.write_image_folder(tmp_path / "bad", per_class=2, stray=False)
  (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png.*as an image"):  # measuring the stats
    load(tmp_path / "bad", eval_fraction=0.0, test_fraction=0.0)


def test_random_resized_crop_and_flip():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = images.random_resized_crop_box(30, 50, rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
    assert 0.08 * 1500 * 0.8 <= w * h <= 1500 and 0.7 <= w / h <= 1.45
  assert images.random_resized_crop_box(1, 100, rng) == (49, 0, 50, 1)  # the fallback
  assert images.center_box(256, 320, 0.875) == (48.0, 16.0, 272.0, 240.0)
  ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32)[None, :, None], (8, 1, 1))  # [8, 8, 1]
  transform = images.ImageTransform(8, 1, (0.0,), (1.0,), flip=True)
  record = {"image": ramp, "label": 3}
  flips = [transform.train(record, np.random.default_rng(s))["image"] for s in range(20)]
  assert {bool(np.array_equal(f, ramp[:, ::-1])) for f in flips} == {True, False}
  np.testing.assert_array_equal(transform.eval(record)["image"], ramp)


def test_array_record_holds_the_same_examples(tmp_path):
  testutil.write_image_folder(tmp_path / "folder", per_class=4)
  assert data.write_array_record(str(tmp_path / "folder"), str(tmp_path / "ar"), shards=2) == 8
  fields = dict(image_size=6, eval_fraction=0.25, test_fraction=0.0)
  folder = data.make_datasets(cfg(kind="images", path=str(tmp_path / "folder"), **fields))
  records = data.make_datasets(cfg(kind="array_record", path=str(tmp_path / "ar"), **fields))
  assert records.class_names == folder.class_names and records.num_classes == 2
  np.testing.assert_array_equal(records.mean, folder.mean)
  for split in ("train", "eval"):
    a, b = data.load_split(folder, split), data.load_split(records, split)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  with pytest.raises(ValueError, match="holds no \\*.array_record"):
    data.make_datasets(cfg(kind="array_record", path=str(tmp_path / "folder")))


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
    ({"mean": (0.5, 0.5)}, "config.data.mean"),
    ({"mean": (0.5,) * 3}, "config.data.mean and config.data.std"),
    ({"mean": (0.5,) * 3, "std": (1, 0, 1)}, "config.data.std"),
    ({"flip": "yes"}, "config.data.flip"),
    ({"crop_fraction": 0.0}, "config.data.crop_fraction"),
    ({"interpolation": "nearest"}, "config.data.interpolation"),
    ({"worker_count": -1}, "config.data.worker_count"),
    ({"prefetch": 0}, "config.data.prefetch"),
    ({"eval_path": "/tmp"}, "config.data.eval_path"),  # not for digits
    ({"kind": "images", "path": "/a", "eval_path": "/b"}, "config.data.eval_fraction must be 0"),
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
    for i in (0, 3, len(s) - 1):  # window i starts at i * seq_len of this split's range
      example = s[i]
      assert example["inputs"].dtype == example["targets"].dtype == np.int32
      window = stream[s.start + i * 64 : s.start + i * 64 + 65]
      np.testing.assert_array_equal(example["inputs"], window[:-1])
      np.testing.assert_array_equal(example["targets"], window[1:])
    # The last window ends inside the split: no window crosses into the next one.
    assert (len(s) - 1) * 64 + 65 <= len(s.tokens)
  with pytest.raises(IndexError):
    d.eval[len(d.eval)]


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
# .npz


def test_npz_images_split_by_seeded_permutation(tmp_path):
  n = 200
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 4, 4)).copy()  # [N, 4, 4]
  np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 7)
  config = cfg(kind="npz", path=str(tmp_path / "d.npz"), image_size=4, channels=1)
  config.data.normalize = False
  d = data.make_datasets(config)
  assert d.kind == "image" and d.num_classes == 7 and d.class_names is None
  splits = [data.load_split(d, s) for s in ("train", "eval", "test")]
  ids = [np.round(s["image"][:, 0, 0, 0] * 255).astype(int) for s in splits]
  assert [len(i) for i in ids] == [160, 20, 20]
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))  # disjoint, all
  for i, s in zip(ids, splits, strict=True):
    np.testing.assert_array_equal(s["label"], i % 7)  # labels travel with their images
  config.data.seed = 5
  assert not np.array_equal(data.make_datasets(config).eval.indices, d.eval.indices)


def test_npz_alternative_keys_and_tokens(tmp_path):
  np.savez(tmp_path / "i.npz", images=np.zeros((10, 5, 5, 3), np.float32), labels=np.ones(10, int))
  d = data.make_datasets(cfg(kind="npz", path=str(tmp_path / "i.npz"), image_size=5))
  assert d.image_shape == (5, 5, 3) and d.num_classes == 2
  tokens = np.arange(5000) % 1000
  np.savez(tmp_path / "t.npz", tokens=tokens)
  t = data.make_datasets(cfg(kind="npz", path=str(tmp_path / "t.npz"), seq_len=10))
  assert t.kind == "text" and t.vocab_size == 1000 and t.seq_len == 10
  np.testing.assert_array_equal(t.train[1]["inputs"], tokens[10:20])
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
  x = np.zeros((10, 4, 4), np.float32)
  x[3, 1, 1] = np.nan
  np.savez(tmp_path / "nan.npz", x=x, y=np.arange(10) % 2)
  with pytest.raises(ValueError, match="nan.npz.*1 non-finite"):
    load(tmp_path / "nan.npz")


# ---------------------------------------------------------------------------------------
# Pipelines


def test_train_batches_epochs_are_seeded_permutations(tmp_path):
  d = labelled(tmp_path, 12)
  stream = np.concatenate(take(data.train_batches(d, 4, seed=0), 9))  # 3 epochs
  epochs = stream.reshape(3, 12)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(12))
  assert len({tuple(e) for e in epochs}) == 3  # each epoch its own order
  again = np.concatenate(take(data.train_batches(d, 4, seed=0), 9))
  other = np.concatenate(take(data.train_batches(d, 4, seed=1), 9))
  np.testing.assert_array_equal(again, stream)
  assert not np.array_equal(other, stream)


def test_train_batches_resume_and_shards(tmp_path):
  d = labelled(tmp_path, 11)
  expected = take(data.train_batches(d, 4, seed=3), 10)
  for k in (0, 2, 3, 5):  # including positions across epoch boundaries
    iterator = data.train_batches(d, 4, seed=3)
    take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))  # as grain's checkpoint stores it
    assert state == {"next_index": 4 * k}
    fresh = data.train_batches(d, 4, seed=3)
    fresh.set_state(state)
    for j, labels in enumerate(take(fresh, 3)):
      np.testing.assert_array_equal(labels, expected[k + j])
  for p in range(2):  # each process reads examples p, p + 2, ... of every global batch
    shard = data.train_batches(d, 4, seed=3, shard_index=p, num_shards=2)
    for step, labels in enumerate(take(shard, 4)):
      np.testing.assert_array_equal(labels, expected[step][p::2])
    assert shard.get_state() == {"next_index": 16}  # the global position, on every process


def test_worker_processes_give_the_same_batches(tmp_path):
  testutil.write_image_folder(tmp_path, per_class=6)
  fields = dict(kind="images", path=str(tmp_path), image_size=8, random_resized_crop=True)
  fields.update(flip=True, eval_fraction=0.0, test_fraction=0.0)
  inline = data.make_datasets(cfg(**fields))
  reference = data.train_batches(inline, 4, seed=0)
  expected = [next(reference)["image"] for _ in range(4)]
  workers = data.make_datasets(cfg(**fields, worker_count=2))
  np.testing.assert_array_equal(workers.mean, inline.mean)
  iterator = data.train_batches(workers, 4, seed=0)
  got = [next(iterator)["image"], next(iterator)["image"]]
  state = iterator.get_state()
  iterator.close()
  resumed = data.train_batches(inline, 4, seed=0)  # resumed without workers
  resumed.set_state(state)
  got += [next(resumed)["image"], next(resumed)["image"]]
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_array_equal(a, b)


def test_pipeline_errors(tmp_path):
  d = labelled(tmp_path, 10)
  with pytest.raises(ValueError, match="batch_size \\(11\\) is larger than the train split"):
    data.train_batches(d, 11, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    data.train_batches(d, 0, seed=0)
  with pytest.raises(ValueError, match="num_shards"):
    data.train_batches(d, 3, seed=0, num_shards=2)
  with pytest.raises(ValueError, match="shard_index"):
    data.eval_batches(d, "train", 4, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="next_index"):
    data.train_batches(d, 2, seed=0).set_state({"next_index": -1})


def test_eval_batches_cover_every_example_once(tmp_path):
  d = labelled(tmp_path, 10)
  batches = list(data.eval_batches(d, "train", 4))
  assert len(batches) == 3 == data.num_eval_batches(d, "train", 4)
  for b in batches:
    assert b["label"].shape == b["mask"].shape == (4,) and b["mask"].dtype == np.bool_
    assert b["image"].shape == (4, 1, 1, 1)
  np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
  np.testing.assert_array_equal(batches[-1]["label"][2:], 0)  # padding is zeros
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(10))  # each once, in order
  assert all(b["mask"].all() for b in data.eval_batches(d, "train", 5))
  assert list(data.eval_batches(d, "eval", 4)) == []
  shards = [list(data.eval_batches(d, "train", 4, shard_index=i, num_shards=2)) for i in (0, 1)]
  for step in range(3):
    for p in (0, 1):
      np.testing.assert_array_equal(shards[p][step]["mask"], batches[step]["mask"][p::2])


def test_eval_batches_text():
  text = data.make_datasets(cfg(kind="text", seq_len=10, max_bytes=1000, test_fraction=0.0))
  batches = list(data.eval_batches(text, "eval", 4))  # 100 bytes: 9 windows
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 1]
  np.testing.assert_array_equal(batches[2]["inputs"][0], text.eval[8]["inputs"])
  np.testing.assert_array_equal(batches[2]["targets"][1:], 0)

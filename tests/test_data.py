"""Tests of fastadv_jax.data: sources, batching, augmentation, ImageNet pieces.

TFDS is exercised two ways, neither needing TensorFlow: `tfds.testing.mock_data`
and tiny datasets really prepared in ArrayRecord format in a temp folder (a
builder subclass fed pre-encoded PNG/JPEG bytes), read back by the registered
`cifar10` / `imagenet2012` builders through `tfds.data_source`.
"""

import io
import os
import shutil
import sys
import tarfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds

from fastadv_jax import data
from fastadv_jax.data import imagenet, local, tfds_source

# ----------------------------------------------------------------------------- helpers


def _encode(array, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _tiny_images():
  """{split: {class: [uint8 8x8x3 arrays]}} with distinct, known pixels."""
  rng = np.random.default_rng(0)
  tree = {}
  for split, per_class in (("train", 2), ("test", 1)):
    tree[split] = {cls: [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                         for _ in range(per_class)]
                   for cls in ("truck", "airplane", "cat")}
  return tree


def _write_tree(root, tree):
  for split, classes in tree.items():
    for cls, images in classes.items():
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i, image in enumerate(images):
        with open(os.path.join(root, split, cls, f"{i:04d}.png"), "wb") as f:
          f.write(_encode(image))


def _make_tar(path, folder, arc_prefix="cifar"):
  with tarfile.open(path, "w:gz") as tar:
    tar.add(folder, arcname=arc_prefix)


def _prepare_tfds(data_dir, dataset_name, version, features, splits):
  """Prepares a real ArrayRecord TFDS dataset without TensorFlow."""
  with tfds.core.registered.skip_registration():

    class Fake(tfds.core.GeneratorBasedBuilder):
      name = dataset_name
      VERSION = tfds.core.Version(version)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features)

      def _split_generators(self, dl_manager):
        return {k: self._generate_examples(v) for k, v in splits.items()}

      def _generate_examples(self, examples):
        for i, example in enumerate(examples):
          yield i, example

  Fake(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FASTADV_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("FASTADV_JAX_DATA", raising=False)


@pytest.fixture(scope="module")
def tiny_tree():
  return _tiny_images()


@pytest.fixture
def tiny_tar(tmp_path, tiny_tree):
  folder = tmp_path / "folder"
  _write_tree(folder, tiny_tree)
  path = tmp_path / "tiny.tar.gz"
  _make_tar(path, folder)
  return str(path), str(folder)


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory):
  """A data_dir with tiny real ArrayRecord 'cifar10' and 'imagenet2012' datasets."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(1)
  cifar = {split: [{"id": f"{split}_{i}",
                    "image": io.BytesIO(_encode(rng.integers(0, 256, (32, 32, 3), np.uint8))),
                    "label": i % 10} for i in range(n)]
           for split, n in (("train", 12), ("test", 5))}
  expected = {split: {ex["id"]: (np.asarray(Image.open(io.BytesIO(ex["image"].getvalue()))),
                                 ex["label"]) for ex in exs} for split, exs in cifar.items()}
  for exs in cifar.values():
    for ex in exs:
      ex["image"].seek(0)
  _prepare_tfds(data_dir, "cifar10", "3.0.2", tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(num_classes=10)}), cifar)
  imnet = [{"image": io.BytesIO(_encode(rng.integers(0, 256, (20 + 3 * i, 28, 3), np.uint8),
                                        "JPEG")),
            "label": i, "file_name": f"img{i}.JPEG"} for i in range(9)]
  _prepare_tfds(data_dir, "imagenet2012", "5.1.0", tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000),
      "file_name": tfds.features.Text()}), {"train": imnet, "validation": imnet[:5]})
  return data_dir, expected


# ----------------------------------------------------------------------------- TFDS


def test_tfds_mock_data_source_loads_arrays_without_tensorflow():
  with tfds.testing.mock_data(num_examples=7):
    images, labels = data.load_split("cifar100", "train", source="tfds", progress=False)
    again, _ = data.load_split("cifar100", "train", source="auto", progress=False)
  assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.shape == (7,)
  assert labels.min() >= 0 and labels.max() < 100
  np.testing.assert_array_equal(images, again)  # mock data is deterministic; auto used TFDS
  assert "tensorflow" not in sys.modules


def test_tfds_prepared_array_record_roundtrip(prepared_tfds):
  data_dir, expected = prepared_tfds
  source = tfds_source.data_source("cifar10", "train", data_dir=data_dir)
  assert len(source) == 12
  by_id = {}
  for i in range(len(source)):
    ex = source[i]
    by_id[ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]] = ex["label"]
  assert by_id == {k: label for k, (_, label) in expected["train"].items()}
  images, labels = data.load_split("cifar10", "train", source="tfds", data_dir=data_dir,
                                   progress=False)
  assert images.shape == (12, 32, 32, 3) and labels.dtype == np.int32
  # Same multiset of (image, label) pairs as written (TFDS shuffles the order).
  written = sorted((img.tobytes(), lab) for img, lab in expected["train"].values())
  read = sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels))
  assert written == read
  assert data.is_prepared("cifar10", data_dir)
  assert not data.is_prepared("cifar100", data_dir)
  assert "tensorflow" not in sys.modules


def test_tfds_split_is_cached_and_reused(prepared_tfds, tmp_path, monkeypatch):
  data_dir, _ = prepared_tfds
  first = data.load_split("cifar10", "test", source="tfds", data_dir=data_dir,
                          progress=False)
  cached = [f for f in os.listdir(tmp_path / "cache") if f.startswith("tfds-cifar10-test")]
  assert len(cached) == 1

  def fail(*args, **kwargs):
    raise AssertionError("the cache should have been used")
  monkeypatch.setattr(tfds_source, "read_records", fail)
  second = data.load_split("cifar10", "test", source="tfds", data_dir=data_dir,
                           progress=False)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_missing_tfds_dataset_gives_clear_error(tmp_path):
  missing = str(tmp_path / "no_tfds_here")
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_split("cifar100", "train", source="tfds", data_dir=missing, progress=False)
  message = str(info.value)
  for needle in ("cifar100", missing, 'pip install "fastadv-jax[prepare]"',
                 "file_format='array_record'", "download_and_prepare()",
                 "tfds build cifar100 --file_format=array_record"):
    assert needle in message, needle
  assert not os.path.exists(missing)  # nothing was downloaded or created
  with pytest.raises(data.DatasetNotFoundError, match="imagenet2012.*manual"):
    imagenet.imagenet_source("validation", data_dir=missing)


def test_auto_falls_back_to_local_cifar10_archive(tiny_tar, tmp_path, monkeypatch):
  tar_path, _ = tiny_tar
  missing = str(tmp_path / "no_tfds_here")
  monkeypatch.setenv("FASTADV_JAX_DATA", tar_path)
  images, labels = data.load_split("cifar10", "test", data_dir=missing, progress=False)
  assert images.shape == (3, 8, 8, 3)
  # airplane, cat, truck in CIFAR order, returned in the fixed shuffled folder order
  np.testing.assert_array_equal(labels, np.array([0, 3, 9])[local.folder_order(3)])
  monkeypatch.setenv("FASTADV_JAX_DATA", str(tmp_path / "nothing.tar.gz"))
  with pytest.raises(data.DatasetNotFoundError, match="FASTADV_JAX_DATA"):
    data.load_split("cifar10", "test", data_dir=missing, progress=False)
  with pytest.raises(data.DatasetNotFoundError, match="local_path"):
    data.load_split("svhn", "test", data_dir=missing, progress=False)


def test_names_splits_and_sources_are_validated():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'.*cifar10"):
    data.load_split("mnist", "train")
  with pytest.raises(ValueError, match="Unknown split 'validation'.*'test'"):
    data.load_split("cifar10", "validation")
  with pytest.raises(ValueError, match="Unknown source 'gcs'"):
    data.load_split("cifar10", "train", source="gcs")
  with pytest.raises(ValueError, match="stream it"):
    data.load_split("imagenet", "train")
  with pytest.raises(ValueError, match="needs local_path"):
    data.load_split("cifar100", "train", source="local")
  assert data.get_spec("svhn").name == "svhn_cropped"


# ----------------------------------------------------------------------------- local


def test_tar_source_labels_order_and_pixels(tiny_tar, tiny_tree):
  tar_path, _ = tiny_tar
  images, labels = data.load_split("cifar10", "train", source="local", local_path=tar_path,
                                   progress=False)
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)
  order = local.folder_order(6)  # class-by-class folders come back shuffled, fixed
  np.testing.assert_array_equal(labels, np.array([0, 0, 3, 3, 9, 9])[order])
  expected = np.stack([img for cls in ("airplane", "cat", "truck")
                       for img in tiny_tree["train"][cls]])[order]
  np.testing.assert_array_equal(images, expected)  # PNG is lossless
  # Without a given order: sorted folder names.
  _, sorted_labels = data.load_image_folder_split(tar_path, "train", progress=False)
  np.testing.assert_array_equal(sorted_labels, np.array([0, 0, 1, 1, 2, 2])[order])
  sliced, _ = data.load_split("cifar10", "train[-2:]", local_path=tar_path, progress=False)
  np.testing.assert_array_equal(sliced, expected[-2:])
  with pytest.raises(ValueError, match="Unknown split 'extra'.*'test', 'train'"):
    data.load_image_folder_split(tar_path, "extra", progress=False)


def test_folder_source_matches_tar_and_jpeg_decodes(tiny_tar, tmp_path):
  tar_path, folder = tiny_tar
  from_tar = data.load_image_folder(tar_path, progress=False)
  from_folder = data.load_image_folder(folder, progress=False)
  assert sorted(from_tar) == sorted(from_folder)
  for key in from_tar:
    np.testing.assert_array_equal(from_tar[key], from_folder[key])
  jpeg_root = tmp_path / "jpeg"
  os.makedirs(jpeg_root / "train" / "a")
  image = np.full((8, 8, 3), 200, np.uint8)
  (jpeg_root / "train" / "a" / "x.JPG").write_bytes(_encode(image, "JPEG"))
  (jpeg_root / "train" / "a" / "notes.txt").write_text("ignored")
  images, labels = data.load_image_folder_split(str(jpeg_root), "train", progress=False)
  assert images.shape == (1, 8, 8, 3) and labels.tolist() == [0]
  assert np.abs(images.astype(int) - 200).max() <= 2


def test_unknown_class_folder_rejected(tiny_tar):
  tar_path, _ = tiny_tar
  with pytest.raises(ValueError, match="not among the expected class names"):
    data.load_image_folder(tar_path, class_names=("airplane", "cat"), progress=False)


def test_decode_cache_is_written_reused_and_keyed(tiny_tar, tmp_path, monkeypatch):
  tar_path, _ = tiny_tar
  cache = tmp_path / "cache"
  first = data.load_image_folder(tar_path, progress=False)
  files = [f for f in os.listdir(cache) if f.endswith(".npz")]
  assert len(files) == 1 and files[0].startswith("tiny-")
  assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]

  real_decode = local._decode_all
  calls = []

  def counting_decode(*args, **kwargs):
    calls.append(1)
    return real_decode(*args, **kwargs)
  monkeypatch.setattr(local, "_decode_all", counting_decode)
  second = data.load_image_folder(tar_path, progress=False)
  assert not calls  # read from the cache
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  # A changed archive (new mtime) is decoded again under a new key, which
  # replaces the old file; another archive's cache (same name, another
  # folder) and files that are not this cache's stay.
  (before,) = [f for f in os.listdir(cache) if f.endswith(".npz")]
  other = tmp_path / "copy" / os.path.basename(tar_path)
  other.parent.mkdir()
  shutil.copy(tar_path, other)
  data.load_image_folder(other, progress=False)
  (cache / "unrelated-0123456789abcdef.npz").write_bytes(b"")
  os.utime(tar_path, ns=(1_000_000_000, 1_000_000_000))
  data.load_image_folder(tar_path, progress=False)
  assert len(calls) == 2
  after = sorted(f for f in os.listdir(cache) if f.endswith(".npz"))
  assert len(after) == 3 and before not in after
  data.load_image_folder(other, progress=False)
  data.load_image_folder(tar_path, progress=False)
  assert len(calls) == 2  # both caches still valid


def test_corrupt_cache_is_rebuilt(tiny_tar, tmp_path):
  tar_path, _ = tiny_tar
  first = data.load_image_folder(tar_path, progress=False)
  (cache_file,) = [tmp_path / "cache" / f for f in os.listdir(tmp_path / "cache")]
  cache_file.write_bytes(b"PK\x03\x04 truncated garbage")
  with pytest.warns(UserWarning, match="unreadable cache"):
    second = data.load_image_folder(tar_path, progress=False)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.load_image_folder(tar_path, progress=False)  # the rebuilt cache is valid


def test_interrupted_cache_write_leaves_nothing(tiny_tar, tmp_path, monkeypatch):
  tar_path, _ = tiny_tar

  def interrupted(file, **arrays):
    file.write(b"partial")
    raise KeyboardInterrupt
  monkeypatch.setattr(local.np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    data.load_image_folder(tar_path, progress=False)
  assert os.listdir(tmp_path / "cache") == []


def test_npz_layouts(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  y = np.arange(5)
  np.savez(tmp_path / "keras.npz", x_train=x, y_train=y[:, None], x_test=x[:2], y_test=y[:2])
  images, labels = data.load_split("cifar10", "train", local_path=str(tmp_path / "keras.npz"))
  np.testing.assert_array_equal(images, x)
  assert labels.dtype == np.int32 and labels.tolist() == [0, 1, 2, 3, 4]
  images, _ = data.load_npz_split(str(tmp_path / "keras.npz"), "test")
  assert images.shape == (2, 4, 4, 3)
  folder = tmp_path / "per_split"
  folder.mkdir()
  np.savez(folder / "test.npz", images=x.astype(np.float32) / 255, labels=y)
  images, labels = data.load_split("svhn", "test", local_path=str(folder))
  np.testing.assert_array_equal(images, x)  # float [0, 1] -> uint8 exactly
  with pytest.raises(data.DatasetNotFoundError, match="found splits \\['test'\\]"):
    data.load_npz_split(str(folder), "train")
  np.savez(tmp_path / "nchw.npz", images=x.transpose(0, 3, 1, 2), labels=y)
  with pytest.raises(ValueError, match="channels-first"):
    data.load_npz_split(str(tmp_path / "nchw.npz"), "train")
  with pytest.raises(ValueError, match="keys are"):
    data.load_npz_split(str(tmp_path / "keras.npz"), "extra")


# ----------------------------------------------------------------------------- batching


def test_epoch_permutation_is_deterministic():
  p = data.epoch_permutation(100, seed=3, epoch=2)
  np.testing.assert_array_equal(p, data.epoch_permutation(100, seed=3, epoch=2))
  assert sorted(p.tolist()) == list(range(100))
  assert not np.array_equal(p, data.epoch_permutation(100, seed=3, epoch=3))
  assert not np.array_equal(p, data.epoch_permutation(100, seed=4, epoch=2))
  with pytest.raises(ValueError, match="seed"):
    data.epoch_permutation(10, seed=-1, epoch=0)


def _toy(n=23):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  return images, np.arange(n) % 7


def test_train_batches_shapes_coverage_and_resume():
  images, labels = _toy()
  batches = list(data.train_batches(images, labels, batch_size=5, seed=0, epoch=1))
  assert len(batches) == data.steps_per_epoch(23, 5) == 4
  seen = np.concatenate([b[0][:, 0, 0, 0] for b in batches])
  assert len(set(seen.tolist())) == 20  # distinct examples, remainder dropped
  for x, y in batches:
    assert x.shape == (5, 2, 2, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(y, labels[x[:, 0, 0, 0]])
  np.testing.assert_array_equal(
      seen, data.epoch_permutation(23, 0, 1)[:20])
  for k in (0, 1, 3, 4):
    resumed = list(data.train_batches(images, labels, batch_size=5, seed=0, epoch=1,
                                      start_step=k))
    assert len(resumed) == 4 - k
    for (a, b), (c, d) in zip(resumed, batches[k:]):
      np.testing.assert_array_equal(a, c)
      np.testing.assert_array_equal(b, d)
  tail = list(data.train_batches(images, labels, batch_size=5, seed=0, epoch=1,
                                 drop_remainder=False))
  assert len(tail) == 5 and len(tail[-1][0]) == 3
  with pytest.raises(ValueError, match="past the end"):
    data.train_batches(images, labels, batch_size=5, seed=0, epoch=1, start_step=5)
  with pytest.raises(ValueError, match="batch size"):
    data.train_batches(images, labels[:3], batch_size=5, seed=0, epoch=0)


@pytest.mark.parametrize("num_examples,drop_remainder", [(26, True), (26, False), (24, True)])
@pytest.mark.parametrize("process_count", [2, 3])
def test_multi_host_batches_are_blocks_of_the_global_batch(num_examples, drop_remainder,
                                                          process_count):
  images, labels = _toy(num_examples)
  kwargs = dict(batch_size=6, seed=5, epoch=0, drop_remainder=drop_remainder)
  single = list(data.train_batches(images, labels, **kwargs))
  hosts = [list(data.train_batches(images, labels, process_index=h,
                                   process_count=process_count, **kwargs))
           for h in range(process_count)]
  # A last partial batch smaller than the host count is used by no host.
  tail = num_examples % 6
  steps = len(single) - (not drop_remainder and 0 < tail < process_count)
  assert all(len(h) == steps for h in hosts)
  used = []
  for step, (x, _) in enumerate(single[:steps]):
    # Host h's batch is block h of the one-host batch: devices see the same examples.
    blocks = [hosts[h][step][0][:, 0, 0, 0] for h in range(process_count)]
    assert len({len(b) for b in blocks}) == 1
    np.testing.assert_array_equal(np.concatenate(blocks), x[:len(blocks[0]) * process_count,
                                                            0, 0, 0])
    used += np.concatenate(blocks).tolist()
  # Every example at most once per epoch; all of them but the dropped remainder.
  assert len(used) == len(set(used))
  expected = (num_examples // 6 * 6 if drop_remainder else
              num_examples // 6 * 6 + (num_examples % 6) // process_count * process_count)
  assert len(used) == expected


def test_shard_for_host_checks_its_arguments():
  shards = [data.shard_for_host(np.arange(11), h, 3, 3) for h in range(3)]
  np.testing.assert_array_equal(shards[1], [1, 4, 7])  # block 1 of batches 0-2, tail 9-10 unused
  with pytest.raises(ValueError, match="divisible"):
    data.train_batches(*_toy(26), batch_size=5, seed=0, epoch=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    data.shard_for_host(np.arange(4), 3, 3, 3)


# ----------------------------------------------------------------------------- augmentation

_AUG_SHAPE = (16, 6, 6, 3)


@pytest.fixture(scope="module")
def aug_images():
  return np.random.default_rng(3).integers(1, 256, _AUG_SHAPE, dtype=np.uint8)


@pytest.fixture(scope="module")
def jitted_augment():
  return jax.jit(data.augment, static_argnames=("padding", "pad_mode", "flip",
                                                "rotation_degrees", "rotation_order"))


def _crops(image, padding, mode):
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                  mode="constant" if mode == "zero" else "reflect")
  size = image.shape[0]
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + size, dx:dx + size]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


@pytest.fixture(scope="module")
def jitted_crop_flip():
  return jax.jit(data.random_crop_flip, static_argnames=("padding", "pad_mode", "flip"))


@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
def test_crop_flip_is_a_padded_crop_and_flip(aug_images, jitted_crop_flip, pad_mode):
  key = jax.random.key(0)
  out = np.asarray(jitted_crop_flip(aug_images, key, padding=2, pad_mode=pad_mode))
  assert out.shape == _AUG_SHAPE and out.dtype == np.uint8  # dtype kept: exact pixels
  chosen = []
  for image, result in zip(aug_images, out):
    matches = [params for params, crop in _crops(image, 2, pad_mode)
               if np.array_equal(crop, result)]
    assert matches, "output is not a crop (+flip) of the padded image"
    chosen.append(matches[0])
  assert len({c[:2] for c in chosen}) > 1 and len({c[2] for c in chosen}) == 2
  np.testing.assert_array_equal(
      out, jitted_crop_flip(aug_images, key, padding=2, pad_mode=pad_mode))
  assert not np.array_equal(
      out, jitted_crop_flip(aug_images, jax.random.key(1), padding=2, pad_mode=pad_mode))


def test_augment_is_float_crop_flip_deterministic_per_key(aug_images, jitted_augment,
                                                          jitted_crop_flip):
  key = jax.random.key(0)
  out = np.asarray(jitted_augment(aug_images, key, padding=2, pad_mode="reflect"))
  assert out.shape == _AUG_SHAPE and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  crop_key = jax.random.split(key)[0]
  expected = np.asarray(jitted_crop_flip(aug_images, crop_key, padding=2,
                                         pad_mode="reflect")) / np.float32(255)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)  # x/255 up to rounding
  np.testing.assert_array_equal(
      out, jitted_augment(aug_images, key, padding=2, pad_mode="reflect"))
  assert not np.array_equal(
      out, jitted_augment(aug_images, jax.random.key(1), padding=2, pad_mode="reflect"))


def test_augment_identity_and_flip_only(aug_images, jitted_augment):
  key = jax.random.key(4)
  plain = np.asarray(jitted_augment(aug_images, key, padding=0, flip=False))
  np.testing.assert_allclose(plain, aug_images.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(data.to_float(aug_images)),
                             aug_images.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
  ends = np.asarray(data.to_float(np.array([[[[0, 255, 128]]]], np.uint8)))
  assert ends[0, 0, 0, 0] == 0.0 and ends[0, 0, 0, 1] == 1.0  # exact box ends
  flipped = np.asarray(jitted_augment(aug_images, key, padding=0, flip=True))
  is_flipped = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain)]
  is_same = [np.array_equal(f, p) for f, p in zip(flipped, plain)]
  assert all(a or b for a, b in zip(is_flipped, is_same))
  assert any(is_flipped) and any(is_same)
  floats = aug_images.astype(np.float32) / 255.0
  np.testing.assert_array_equal(np.asarray(data.to_float(floats)), floats)
  with pytest.raises(ValueError, match="Unknown pad_mode 'edge'"):
    data.augment(aug_images, key, pad_mode="edge")


def test_rotation_matches_rot90_and_random_rotation_is_bounded(aug_images, jitted_augment):
  rotate = jax.jit(data.rotate, static_argnames="order")
  image = np.random.default_rng(6).random((2, 6, 6, 3)).astype(np.float32)
  rotated = np.asarray(rotate(image, jnp.array([np.pi / 2, -np.pi / 2])))
  np.testing.assert_array_equal(rotated[0], np.rot90(image[0], k=1))   # counter-clockwise
  np.testing.assert_array_equal(rotated[1], np.rot90(image[1], k=-1))
  same = np.asarray(rotate(image, jnp.zeros((2,)), order=1))
  np.testing.assert_allclose(same, image, atol=1e-6)
  out = np.asarray(jitted_augment(aug_images, jax.random.key(5), padding=0, flip=False,
                                  rotation_degrees=15.0))
  assert out.shape == _AUG_SHAPE and out.min() >= 0 and out.max() <= 1
  # Images start at >= 1/255; a rotated image has zero-filled corners somewhere.
  assert (out == 0).any() and not np.array_equal(out, aug_images / 255.0)


# ----------------------------------------------------------------------------- ImageNet


def test_progressive_resize_phases():
  assert imagenet.progressive_resize_phase(0).image_size == 128
  assert imagenet.progressive_resize_phase(5.99).batch_size == 512
  assert imagenet.progressive_resize_phase(6).image_size == 224
  assert imagenet.progressive_resize_phase(11).resize_size == 352
  phase3 = imagenet.progressive_resize_phase(12)
  assert (phase3.image_size, phase3.batch_size, phase3.resize_size) == (288, 128, None)
  assert imagenet.progressive_resize_phase(13, imagenet.GRADALIGN_PHASES).batch_size == 100
  with pytest.raises(ValueError, match="outside the phases"):
    imagenet.progressive_resize_phase(15)
  with pytest.raises(ValueError, match="contiguous"):
    imagenet.progressive_resize_phase(0, (imagenet.ResizePhase(0, 2, 8, 2),
                                          imagenet.ResizePhase(3, 4, 8, 2)))
  assert imagenet.phase_steps_per_epoch(1_281_167) == (2502, 5719, 10009)


def test_crop_functions_on_synthetic_images():
  rng = np.random.default_rng(6)
  for _ in range(50):
    top, left, h, w = imagenet.random_resized_crop_box(60, 90, rng)
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    assert 0.08 * 5400 * 0.9 <= h * w <= 5400
  # A 1x100 strip cannot fit the ratio range: the centred fallback clamps the ratio.
  top, left, h, w = imagenet.random_resized_crop_box(1, 100, np.random.default_rng(0))
  assert (h, w) == (1, 1) or (h == 1 and w <= 2)
  array = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
  image = Image.fromarray(array)
  np.testing.assert_array_equal(imagenet.center_crop(image, 6), array[2:8, 3:9])
  padded = imagenet.center_crop(image, 14)
  assert padded.shape == (14, 14, 3)
  np.testing.assert_array_equal(padded[2:12, 1:13], array)
  assert padded[0].max() == 0 and padded[:, 0].max() == 0
  resized = imagenet.resize_shorter_side(image, 5)
  assert resized.size == (6, 5)
  jpeg = _encode(np.random.default_rng(7).integers(0, 256, (40, 50, 3), np.uint8), "JPEG")
  decoded = np.asarray(imagenet.decode_image(jpeg))
  one = imagenet.preprocess_train(jpeg, np.random.default_rng(8), image_size=16, resize_size=24)
  two = imagenet.preprocess_train(jpeg, np.random.default_rng(8), image_size=16, resize_size=24)
  assert one.shape == (16, 16, 3) and one.dtype == np.uint8
  np.testing.assert_array_equal(one, two)
  evaluated = imagenet.preprocess_eval(jpeg, image_size=30)
  np.testing.assert_array_equal(evaluated, decoded[5:35, 10:40])
  assert imagenet.preprocess_eval(decoded, image_size=12, resize_size=12).shape == (12, 12, 3)


def _fake_imagenet(n=10):
  rng = np.random.default_rng(9)
  return [{"image": _encode(rng.integers(0, 256, (20 + i, 26 - i, 3), np.uint8), "JPEG"),
           "label": i} for i in range(n)]


def test_imagenet_loader_on_fake_source_is_deterministic_and_resumable():
  source = _fake_imagenet()
  phase = imagenet.ResizePhase(0, 1, 16, 4, 18)
  one = list(imagenet.train_batches(source, phase=phase, seed=1, epoch=0, num_threads=1))
  two = list(imagenet.train_batches(source, phase=phase, seed=1, epoch=0, num_threads=3,
                                    prefetch=0))
  assert len(one) == 2
  for (a, b), (c, d) in zip(one, two):
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8 and b.dtype == np.int32
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
  np.testing.assert_array_equal(np.concatenate([b for _, b in one]),
                                data.epoch_permutation(10, 1, 0)[:8])
  resumed = list(imagenet.train_batches(source, phase=phase, seed=1, epoch=0, start_step=1))
  np.testing.assert_array_equal(resumed[0][0], one[1][0])
  hosts = [list(imagenet.train_batches(source, phase=phase, seed=1, epoch=0,
                                       process_index=h, process_count=2)) for h in range(2)]
  for step in range(2):
    union = np.concatenate([hosts[h][step][1] for h in range(2)])
    assert sorted(union.tolist()) == sorted(one[step][1].tolist())
  evals = list(imagenet.eval_batches(source, batch_size=4, image_size=12))
  assert [e[0].shape for e in evals] == [(4, 12, 12, 3)] * 3
  mask = np.concatenate([e[2] for e in evals])
  np.testing.assert_array_equal(np.concatenate([e[1] for e in evals])[mask], np.arange(10))
  assert (evals[-1][0][~evals[-1][2]] == 0).all()
  with pytest.raises(ValueError, match="start_step"):
    imagenet.train_batches(source, phase=phase, seed=1, epoch=0, start_step=3)


def test_imagenet_loader_on_tfds(prepared_tfds):
  data_dir, _ = prepared_tfds
  source = imagenet.imagenet_source("train", data_dir=data_dir)
  assert isinstance(source[0]["image"], bytes)  # left encoded for the thread pool
  phase = imagenet.ResizePhase(0, 1, 16, 4, None)
  batches = list(imagenet.train_batches(source, phase=phase, seed=0, epoch=0, num_threads=2))
  assert len(batches) == 2 and batches[0][0].shape == (4, 16, 16, 3)
  labels = np.concatenate([b[1] for b in batches])
  assert len(set(labels.tolist())) == 8 and labels.max() < 9
  with tfds.testing.mock_data(num_examples=6):  # mock records hold decoded arrays
    mocked = tfds_source.data_source("imagenet2012", "validation")
    evals = list(imagenet.eval_batches(mocked, batch_size=4, image_size=8))
  assert [e[0].shape for e in evals] == [(4, 8, 8, 3)] * 2
  assert np.concatenate([e[2] for e in evals]).sum() == 6
